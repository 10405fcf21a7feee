"""Classify histology images with a frozen pathology foundation model."""

__version__ = "0.1.0"

from histoembed.core.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
