"""The photos bundled with scikit-image (no download), as RGB Pillow images."""

from __future__ import annotations

from PIL import Image


def load_photo(name: str) -> Image.Image:
    """``skimage.data.<name>()`` as RGB (greyscale photos get three equal channels). Raises
    ``ValueError`` for a name scikit-image does not have. scikit-image is a training dependency,
    imported only here."""
    import skimage.data

    if not hasattr(skimage.data, name):
        raise ValueError(f"scikit-image has no photo {name!r}")
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
