"""User images as model inputs: files, folders or globs (local or s3://) → RGB squares.

    uris = expand_image_specs(["photos/", "more/*.jpg", "s3://bucket/cat.png"])
    images = [fit_square(open_image(read_bytes(u), u), 512) for u in uris]

- A folder gives its image files (by suffix, not recursive) in name order; a glob gives its
  matches in name order; a file gives itself. A spec that matches nothing is an error naming it.
- Any size and mode: ``m2m_ray.formats.images.to_rgb`` (EXIF orientation applied; transparency
  composited over white; 16-bit and float images scaled to 8 bits; grey, palette, CMYK...
  converted to RGB). Then ``m2m_ray.formats.images.fit_square``: the shorter side is resized to the target and the
  centre cropped to a square (the aspect ratio is kept).
- A file that cannot be decoded is an ``ImageInputError`` naming it and what PIL said.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

from m2m_ray import storage as st
from m2m_ray.formats.images import to_rgb

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
