"""User images as model inputs: files, folders or globs (local or s3://) → RGB squares.

    uris = expand_image_specs(["photos/", "more/*.jpg", "s3://bucket/cat.png"])
    images = [fit_square(open_image(read_bytes(u), u), 512) for u in uris]

- A folder gives its image files (by suffix, not recursive) in name order; a glob gives its
  matches in name order; a file gives itself. A spec that matches nothing is an error naming it.
- Any size and mode: EXIF orientation applied; transparency composited over white; 16-bit and
  float images scaled to 8 bits; grey, palette, CMYK... converted to RGB. Then the shorter side is
  resized to the target and the centre cropped to a square (the aspect ratio is kept).
- A file that cannot be decoded is an ``ImageInputError`` naming it and what PIL said.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from m2m_ray import storage as st

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_GLOB_CHARS = set("*?[")


class ImageInputError(ValueError):
    """An input image spec that matches nothing, or a file that is not a readable image."""


def _with_scheme(uri: str, path: str) -> str:
    return f"s3://{path}" if st.is_remote(uri) else path


def expand_image_specs(specs: Sequence[str],
                       storage: "StorageConfig | None" = None) -> list[str]:
    """Files, folders and globs → image URIs, in the order of the specs, each sorted by name."""
    uris: list[str] = []
    for spec in specs:
        fs, path = st.fsspec_filesystem(spec, storage)
        if _GLOB_CHARS & set(path):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            what = "glob"
        elif fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False)
                           if p.lower().endswith(IMAGE_SUFFIXES) and fs.isfile(p))
            what = f"folder (looked for {', '.join(IMAGE_SUFFIXES)})"
        elif fs.isfile(path):
            found, what = [path], "file"
        else:
            raise ImageInputError(f"input image {spec!r}: no such file or folder; expected image "
                                  "files, folders of images or globs such as 'photos/*.jpg'")
        if not found:
            raise ImageInputError(f"input images {spec!r}: the {what} matches no image file")
        uris.extend(_with_scheme(spec, p) for p in found)
    return uris


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


def open_image(data: bytes, name: str) -> Image.Image:
    """Decode ``data`` fully (a truncated file fails here) → RGB; errors name ``name``."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image)
    except Exception as err:  # PIL raises many types for broken or unknown files
        raise ImageInputError(f"cannot read image {name} ({len(data)} bytes): "
                              f"{type(err).__name__}: {err}. Expected a PNG, JPEG, WebP, BMP, "
                              "GIF or TIFF file; remove or replace it") from err


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre to ``size`` × ``size``."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of one size → ``[N, 3, H, W]`` float32 in [0, 1]."""
    if not images:
        raise ValueError("images_to_tensor needs at least one image")
    arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (N, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` floats in [0, 1] → RGB images."""
    arrays = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]
