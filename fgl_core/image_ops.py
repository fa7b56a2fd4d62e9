"""Images as the datasets read them: a PIL image made a square RGB array (shared by image
folders, `fgl_core.datasets`, and Hugging Face datasets, `fgl_core.hf_datasets`)."""

from __future__ import annotations

import numpy as np


def square_rgb(image, size: int, resize: str = "squash") -> np.ndarray:  # type: ignore[no-untyped-def]
    """A PIL image as a size x size RGB array, as `resize` says (left as it is at that size)."""
    from PIL import Image, ImageOps

    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        if resize == "shorter-side":
            rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.BICUBIC)
        else:
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)
