"""The sample grid written with each checkpoint, drawn with the project's auto-regressive sampler
(``m2m_ray.sampling.sampler.sample``, driven by the run's ``samples.sample`` spec).

Each row is one training set: its first K images (decoded from their latents) and M images the EMA
model generates after them, one at a time, each joining the context of the next. Of the spec's
run settings, ``seed`` seeds row r as set ``"r"`` (``set_generators``, as the pipeline does),
``dtype`` is the autocast precision on a GPU (the CPU runs float32), ``vae_batch_size`` the VAE
chunk; ``resolution`` is refused: a preview samples at the size of the training images.
"""

from __future__ import annotations

import torch

from m2m_ray.models.codec import ImageCodec
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.models.presets import load_scheduler
from m2m_ray.runtime import torch_dtype
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.sampling.sampler import sample, set_generators
from m2m_ray.train.config import MODEL_SCHEDULER, check_preview_spec
from m2m_ray.viz import grid_png


@torch.no_grad()
def sample_grid(model: M2MUNet, vae, dino: DinoEncoder | None, latents: torch.Tensor,
                num_context: int, spec: SampleConfig,
                task: TaskConditions | None = None) -> bytes:
    """The PNG grid of the module docstring for sets of latents ``[S, N, 4, h, w]``: K =
    ``num_context`` real images per row, then ``spec.num_images`` sampled by ``spec`` (the same
    sampling spec as generation: scheduler — None: DDIM —, steps, guidance, window, seed, dtype).
    ``task`` ``[S, N]``: a task model's conditions of the sample's images; the first K condition
    the context, the next M the generated images (so they should look like images K .. K+M-1 of
    the sample). Raises ``ValueError`` for a ``spec.resolution`` (``check_preview_spec``)."""
    check_preview_spec(spec)
    dtype = torch_dtype(spec.dtype, model.device)
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
        codec = ImageCodec(vae, model.config.variant, dino, spec.vae_batch_size)
        context = codec.decode(latents[:, :num_context])  # (S, K, 3, H, W) in [0, 1]
        generators = set_generators([str(row) for row in range(latents.shape[0])], spec.seed)
        M = spec.num_images
        scheduler = load_scheduler(model.model_config, spec.scheduler or MODEL_SCHEDULER)
        out = sample(model, scheduler, codec, context, generators, spec,
                     context_task=None if task is None else task.select(slice(0, num_context)),
                     target_task=None if task is None else task.select(
                         slice(num_context, num_context + M)))
        new = out.pixels if out.pixels is not None else codec.decode(out.latents)  # (S, M, 3, H, W)
    return grid_png(torch.cat([context, new.to(context.device)], 1))
