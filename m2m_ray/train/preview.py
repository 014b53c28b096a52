"""The sample grid written with each checkpoint, drawn with the project's auto-regressive sampler
(``m2m_ray.sampling.sampler.sample``, driven by the run's ``samples.sample`` spec).

Each row is one training set: its first K images (decoded from their latents) and M images the EMA
model generates after them, one at a time, each joining the context of the next.
"""

from __future__ import annotations

import torch

from m2m_ray.models.codec import ImageCodec
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.models.presets import load_scheduler
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.sampling.sampler import sample
from m2m_ray.viz import grid_png


@torch.no_grad()
def sample_grid(model: M2MUNet, vae, dino: DinoEncoder | None, latents: torch.Tensor,
                num_context: int, spec: SampleConfig, seed: int,
                task: TaskConditions | None = None) -> bytes:
    """The PNG grid of the module docstring for sets of latents ``[S, N, 4, h, w]``: K =
    ``num_context`` real images per row, then ``spec.num_images`` sampled by ``spec`` (the same
    sampling spec as generation: scheduler, steps, guidance, window). ``task`` ``[S, N]``: a task
    model's conditions of the sample's images; the first K condition the context, the next M
    the generated images (so they should look like images K .. K+M-1 of the sample)."""
    codec = ImageCodec(vae, model.config.variant, dino, spec.vae_batch_size)
    context = codec.decode(latents[:, :num_context])  # (S, K, 3, H, W) in [0, 1]
    generators = [torch.Generator(device=model.device).manual_seed(seed + row)
                  for row in range(latents.shape[0])]
    M = spec.num_images
    out = sample(model, load_scheduler(model.model_config, spec.scheduler), codec, context,
                 generators, spec,
                 context_task=None if task is None else task.select(slice(0, num_context)),
                 target_task=None if task is None else task.select(
                     slice(num_context, num_context + M)))
    new = out.pixels if out.pixels is not None else codec.decode(out.latents)  # (S, M, 3, H, W)
    return grid_png(torch.cat([context, new.to(context.device)], 1))
