"""Numerical pieces, each testable against a reference: metrics, the views' augmentation, stain, scale fusion,
and QC's scores (an image's colours and thumbnail; hashes, outliers and duplicate groups among images).

Imports only ``core`` and ``inputs``.
"""
