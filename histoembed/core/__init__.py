"""Contracts every layer shares: typed settings, the run folder's files, user errors, the console, CPU threads.

The bottom layer: imports nothing else of histoembed.
"""
