"""What the user brings: the data folder's layout (manifest, labels, splits) and the pixel rules for its images.

Pixel rules shared by ``qc`` and ``crops`` (tissue by colour, ink) live here, below both. Imports only ``core``.
"""
