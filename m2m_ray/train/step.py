"""One M2M training step in plain PyTorch: the auto-regressive ε-loss (paper eq. 5), the LR
schedule and the EMA. The Ray Train loop (``loop.py``) and ``benchmarks/train_step.py`` share it.

Loss of a set of N images (teacher forcing): every image i gets its own timestep t_i and noise ε_i,
the UNet predicts ε_i from x_{t_i} with the clean images < i as context, and the per-image MSEs
(mean over latent elements) are summed over the N images, then averaged over the sets. With
probability ``context_drop_prob`` a set sees no context at all (null token only) and, jointly, no
task conditions: the unconditional branch of classifier-free guidance is trained in the same model.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from m2m_ray.formats.rng import Salt
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.train.config import OptimConfig


@dataclass
class TrainBatch:
    """One batch on the training device."""

    latents: torch.Tensor                  # (B, N, 4, h, w) float32, clean, scaled SD latents
    dino_pixels: torch.Tensor | None       # (B, N, 3, R, R) uint8, M2M-DINO only
    task: TaskConditions | None = None     # per image [B, N], fine-tuning only

    @classmethod
    def from_columns(cls, columns: dict[str, torch.Tensor], device: torch.device,
                     task_kinds: list[str]) -> "TrainBatch":
        missing = [kind for kind in task_kinds if kind not in columns]
        if missing:
            raise ValueError(f"the model has task conditions {task_kinds} but the batch lacks "
                             f"columns {missing} (got {sorted(columns)}); MIS carries none: "
                             "train with task conditions on a task dataset")
        task = (TaskConditions(**{kind: columns[kind].to(device, non_blocking=True).float()
                                  for kind in task_kinds}) if task_kinds else None)
        dino = columns.get("dino_pixels")
        return cls(latents=columns["latents"].to(device, non_blocking=True).float(),
                   dino_pixels=None if dino is None else dino.to(device, non_blocking=True),
                   task=task)

    def select(self, sets: slice) -> "TrainBatch":
        """The sets ``sets`` of the batch (a micro-batch of gradient accumulation)."""
        return TrainBatch(latents=self.latents[sets],
                          dino_pixels=None if self.dino_pixels is None else self.dino_pixels[sets],
                          task=None if self.task is None else TaskConditions(
                              **{k: getattr(self.task, k)[sets] for k in self.task.present()}))


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one step's noise, timesteps and context drops on one worker: a pure
    function of (seed, step, rank), so a resumed run draws what the uninterrupted one drew."""
    value = int(np.random.SeedSequence([seed, step, rank, Salt.STEP_NOISE]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(value & (2**63 - 1))


@dataclass
class StepNoise:
    """The random draws of one step's loss on one worker, for all of its B sets: ``timesteps``
    int64 ``[B, N]``, ``noise`` ``[B, N, 4, h, w]`` (the ε targets), ``drop`` bool ``[B]`` (the sets
    that see no context). Drawn once per step for the worker's whole batch, so splitting the batch
    into micro-batches (gradient accumulation) slices these draws instead of drawing new ones: the
    accumulated update equals the one-batch update, whatever the accumulation setting."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor

    @classmethod
    def draw(cls, generator: torch.Generator, latents_shape: torch.Size, num_timesteps: int,
             context_drop_prob: float, device: torch.device) -> "StepNoise":
        """Draw for latents of shape ``(B, N, 4, h, w)``; ``num_timesteps``: the training
        schedule's length (SD: 1000)."""
        num_sets, num_images = latents_shape[:2]
        timesteps = torch.randint(0, num_timesteps, (num_sets, num_images), generator=generator,
                                  device=device)
        noise = torch.randn(latents_shape, generator=generator, device=device)
        drop = torch.rand(num_sets, generator=generator, device=device) < context_drop_prob
        return cls(timesteps, noise, drop)

    def select(self, sets: slice) -> "StepNoise":
        return StepNoise(self.timesteps[sets], self.noise[sets], self.drop[sets])


def m2m_loss(model: nn.Module, batch: TrainBatch, alphas_cumprod: torch.Tensor,
             generator: torch.Generator | StepNoise, context_drop_prob: float,
             dino: DinoEncoder | None = None,
             autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eq. 5 on one batch (``model``: an ``M2MUNet``, possibly DDP-wrapped). Returns the scalar
    loss: per-image MSE summed over the set's N images, averaged over the B sets. ``generator``
    draws the step's noise (``StepNoise.draw``), or ``StepNoise`` gives it (``context_drop_prob``
    is then unused)."""
    latents = batch.latents
    (num_sets, num_images), device = latents.shape[:2], latents.device
    draws = generator if isinstance(generator, StepNoise) else StepNoise.draw(
        generator, latents.shape, alphas_cumprod.shape[0], context_drop_prob, device)
    timesteps, noise, drop = draws.timesteps, draws.noise, draws.drop
    if timesteps.shape != (num_sets, num_images) or noise.shape != latents.shape:
        raise ValueError(f"StepNoise for timesteps {tuple(timesteps.shape)} and noise "
                         f"{tuple(noise.shape)} does not fit latents {tuple(latents.shape)}")
    alpha = alphas_cumprod[timesteps].view(num_sets, num_images, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise  # (B, N, 4, h, w)
    if dino is None:
        context = latents[:, :-1]  # (B, N-1, 4, h, w): no target sees image N-1
    else:
        pixels = batch.dino_pixels[:, :-1].float() / 255  # (B, N-1, 3, R, R)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            context = dino(pixels).float()  # (B, N-1, L, D), frozen: no gradient
    task = batch.task
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        eps = model(noisy, timesteps, context, offset=0, target_task=task,
                    context_task=None if task is None else task.select(slice(0, num_images - 1)),
                    context_drop=drop, task_drop=None if task is None else drop)
    per_image = (eps.float() - noise).pow(2).mean(dim=(2, 3, 4))  # (B, N)
    return per_image.sum(1).mean()


def accumulate_gradients(model: nn.Module, batch: TrainBatch, alphas_cumprod: torch.Tensor,
                         draws: StepNoise, micro_batches: int, dino: DinoEncoder | None = None,
                         autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Backward of eq. 5 over a worker's batch of B sets in ``micro_batches`` equal slices
    (gradient accumulation): each slice's mean loss is weighted by its share of B, so the summed
    gradients are those of the whole batch's mean loss, and with ``draws`` for the whole batch the
    update is the one-batch update (up to float summation order). With DDP, gradients are
    all-reduced only on the last slice (``no_sync`` before it). Returns the batch's loss (detached
    scalar). Raises ``ValueError`` when B is not a multiple of ``micro_batches``."""
    num_sets = batch.latents.shape[0]
    if micro_batches < 1 or num_sets % micro_batches:
        raise ValueError(f"a worker batch of {num_sets} sets does not split into "
                         f"{micro_batches} equal micro-batches; make global_batch_size / "
                         "scaling.num_workers a multiple of gradient_accumulation_steps")
    size, total = num_sets // micro_batches, torch.zeros((), device=batch.latents.device)
    for index in range(micro_batches):
        sets = slice(index * size, (index + 1) * size)
        last = index == micro_batches - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            loss = m2m_loss(model, batch.select(sets), alphas_cumprod, draws.select(sets), 0.0,
                            dino, autocast_dtype) / micro_batches
            loss.backward()
        total += loss.detach()
    return total


class LRSchedule:
    """Linear warm-up to 1, then constant or cosine down to ``min_lr_ratio`` at ``max_steps``
    (a multiplier for ``LambdaLR``; an object, so the scheduler's state_dict holds it)."""

    def __init__(self, optim: OptimConfig, max_steps: int):
        self.warmup, self.kind = optim.warmup_steps, optim.schedule
        self.min_ratio, self.max_steps = optim.min_lr_ratio, max_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, optim: OptimConfig, max_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=optim.fused or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(optim, max_steps))


class EMA:
    """Exponential moving average of a model's weights, as a full frozen copy (``model``) that
    can be sampled from and saved like any ``M2MUNet``."""

    def __init__(self, model: M2MUNet, decay: float, warmup: bool):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: M2MUNet, step: int) -> None:
        """Move the average towards ``model`` after optimizer step ``step`` (1-based)."""
        weight = 1 - self.decay_at(step)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), weight)
        for own, new in zip(self.model.buffers(), model.buffers()):
            own.copy_(new)
