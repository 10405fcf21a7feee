"""Numerical pieces, each testable against a reference: metrics, the views' augmentation, stain, scale fusion.

Imports only ``core`` and ``inputs``.
"""
