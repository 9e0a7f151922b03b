"""Embedded data sets (no downloads): scikit-learn's bundled digits."""

from alignjax.data.digits import load_digits_split, to_images, from_images

__all__ = ["load_digits_split", "to_images", "from_images"]
