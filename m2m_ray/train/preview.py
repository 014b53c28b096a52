"""The sample grid written with each checkpoint, drawn with the project's auto-regressive sampler
(``m2m_ray.sampling.sampler.sample``: DDIM, image guidance, cached context).

Each row is one training set: its first K images (decoded from their latents) and M images the EMA
model generates after them, one at a time, each joining the context of the next.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.models.presets import load_scheduler
from m2m_ray.sampling.codec import ImageCodec
from m2m_ray.sampling.sampler import sample


def grid_png(rows: torch.Tensor) -> bytes:
    """Pixels ``[S, C, 3, H, W]`` in [0, 1] → one PNG of S rows of C images."""
    num_rows, num_cols, _, height, width = rows.shape
    pixels = (rows.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    tiles = pixels.permute(0, 3, 1, 4, 2).reshape(num_rows * height, num_cols * width, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(tiles.numpy())).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def sample_grid(model: M2MUNet, vae, dino: DinoEncoder | None, latents: torch.Tensor,
                num_context: int, num_new: int, steps: int, guidance_scale: float,
                seed: int) -> bytes:
    """The PNG grid of the module docstring for sets of latents ``[S, N, 4, h, w]``."""
    codec = ImageCodec(vae, model.config.variant, dino)
    context = codec.decode(latents[:, :num_context])  # (S, K, 3, H, W) in [0, 1]
    generators = [torch.Generator(device=model.device).manual_seed(seed + row)
                  for row in range(latents.shape[0])]
    out = sample(model, load_scheduler(model.model_config, "ddim"), codec, context, num_new,
                 generators, num_inference_steps=steps, guidance_scale=guidance_scale,
                 context_window=num_context + num_new)
    new = out.pixels if out.pixels is not None else codec.decode(out.latents)  # (S, M, 3, H, W)
    return grid_png(torch.cat([context, new.to(context.device)], 1))
