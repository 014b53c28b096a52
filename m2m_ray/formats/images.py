"""Stored and input images in one convention, for the builders (``mis/``) and the readers
(``data/``, sampling) alike: any PIL image → RGB (``to_rgb``), and the one square fit
(``fit_square``: the shorter side resized, the centre cropped) that training reads, inference
inputs and task datasets stored at a ``resolution`` all use.

``to_rgb``: EXIF orientation applied; 16-bit and float images scaled to 8 bits; transparency
composited over white; grey, palette, CMYK... converted to RGB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(array.round().clip(0, 255).astype(np.uint8))
    elif image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max()
        if peak > 255:  # 16/32-bit integers or HDR floats: scale the range down to 8 bits
            array = array * (255.0 / peak)
        image = Image.fromarray(array.round().clip(0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre to ``size`` × ``size``."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))
