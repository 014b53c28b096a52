"""Pictures a person looks at: contact sheets (MIS preview, generations) and the training grid.

Pure drawing: images in, an image or PNG bytes out; callers read and write the files.
"""

from __future__ import annotations

import io
import textwrap
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    import torch

PAD = 4
CAPTION_LINES = 2


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], thumb: int = 96) -> Image.Image:
    """``rows`` of ``(caption, images)`` → one sheet, images scaled to ``thumb`` px squares."""
    font = ImageFont.load_default()
    line_height = 12
    cols = max(len(images) for _, images in rows)
    row_height = thumb + CAPTION_LINES * line_height + 2 * PAD
    sheet = Image.new("RGB", (cols * (thumb + PAD) + PAD, len(rows) * row_height + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    chars_per_line = max(20, (sheet.width - 2 * PAD) // 6)
    for r, (caption, images) in enumerate(rows):
        top = PAD + r * row_height
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((thumb, thumb)), (PAD + c * (thumb + PAD), top))
        lines = textwrap.wrap(caption, chars_per_line)[:CAPTION_LINES]
        for i, line in enumerate(lines):
            draw.text((PAD, top + thumb + 2 + i * line_height), line, fill="black", font=font)
    return sheet


def arrow_tile(size: int) -> Image.Image:
    """A white ``size`` px tile with a black arrow: \"inputs → generated\" in a sheet row."""
    tile = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(tile)
    mid, width = size // 2, max(1, size // 24)
    draw.line([(size // 5, mid), (size * 4 // 5, mid)], fill="black", width=width)
    draw.polygon([(size * 4 // 5, mid - size // 8), (size * 9 // 10, mid),
                  (size * 4 // 5, mid + size // 8)], fill="black")
    return tile


def grid_png(rows: "torch.Tensor") -> bytes:
    """Pixels ``[S, C, 3, H, W]`` in [0, 1] → one PNG of S rows of C images."""
    import torch

    num_rows, num_cols, _, height, width = rows.shape
    pixels = (rows.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    tiles = pixels.permute(0, 3, 1, 4, 2).reshape(num_rows * height, num_cols * width, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(tiles.numpy())).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
