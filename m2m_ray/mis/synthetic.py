"""A small synthetic MIS dataset written straight through ``ShardWriter``, for tests, benchmarks and
demos that need MIS shards but not SD's images (no UNet, seconds on a CPU).

Each set has one random background colour and a coloured square that moves from image to image, so
images of a set are related as in MIS; latents (``keep_latents``) are the preset VAE's encodings
(posterior mean × scaling factor), like the SD latents MIS stores.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from m2m_ray.formats.ids import image_seed, split_of
from m2m_ray.formats.mis import MISLayout, SetRecord, ShardWriter, latents_to_npy
from m2m_ray.models.codec import ImageCodec
from m2m_ray.models.config import ModelConfig
from m2m_ray.models.presets import load_vae


def _set_pixels(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """uint8 ``[count, size, size, 3]``: one background colour, a square walking across."""
    background, square = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    side = max(2, size // 4)
    start, step = rng.integers(0, size - side, 2), rng.integers(-3, 4, 2)
    pixels = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        pixels[i] = background
        y, x = np.clip(start + i * step, 0, size - side)
        pixels[i, y:y + side, x:x + side] = square
    return pixels


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_synthetic_mis(root: str, num_shards: int = 2, sets_per_shard: int = 2,
                        images_per_set: int = 25, size: int = 64,
                        formats: tuple[str, ...] = ("parquet", "webdataset"),
                        keep_latents: bool = True, model: ModelConfig | None = None,
                        test_fraction: float = 0.0, seed: int = 0) -> list[int]:
    """Write and commit ``num_shards`` shards under ``root``; returns their shard ids."""
    layout = MISLayout(root)
    codec = ImageCodec(load_vae(model or ModelConfig(preset="tiny"))) if keep_latents else None
    rng = np.random.default_rng(seed)
    shard_ids = []
    for shard in range(num_shards):
        writer = ShardWriter(layout, shard, list(formats))
        records = []
        for line in range(1, sets_per_shard + 1):
            cid = (shard << 16) | line
            pixels = _set_pixels(rng, images_per_set, size)
            latents = None
            if codec is not None:
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
                latents = latents_to_npy(codec.encode(x).numpy())
            records.append(SetRecord(
                caption_id=cid, shard_id=shard, split=split_of(cid, test_fraction),
                caption=f"synthetic set {cid}", url=f"synthetic://{cid}",
                seeds=[image_seed(cid, i, seed) for i in range(images_per_set)],
                images=[_jpeg(p) for p in pixels], image_ext="jpg", latents=latents,
                metadata={"synthetic": True, "height": size, "width": size,
                          "image_format": "jpeg"}))
        writer.add(records)
        writer.commit({"synthetic": True, "config": {"keep_latents": keep_latents}})
        shard_ids.append(shard)
    return shard_ids
