"""The auto-regressive M2M sampler: K context images → M new images, one after another.

Each new image is denoised from Gaussian noise by a diffusers scheduler (DDIM by default), with the
last W images (the context window: given ones first, then each generated image as it is made) as
the UNet's context, and image guidance (eq. 6) or image + task guidance (eq. 7, ``guidance``)::

    state = ContextState(model, window=W, use_cache=True)
    state.add(codec.context_of(latents_or_None, pixels), context_task)   # K given images, once
    for j in range(M):
        noise = one draw per set from that set's own generator            # [B, 4, h, w]
        latents = denoise_image(model, scheduler, state, noise, steps, branches, task_j)
        state.add(codec.context_of(latents, pixels), task_j)              # joins the context

``ContextState`` holds the context as the UNet reads it. With ``use_cache`` (the default) every
context image is encoded into per-site keys/values once, when it joins (``M2MUNet.encode_context``;
for M2M-Self one clean UNet pass at t = 0), and the cache serves all denoising steps of all later
images; without it the raw context (clean latents or DINO features) goes into every UNet call, which
for M2M-Self re-runs the clean pass at every step — the paper's cost, kept as a reference. Both
give the same images.

Sets are batched: B sets denoise together, every guidance branch of them in one UNet forward.
Reproducibility is per set: set b's noises come only from ``generators[b]`` (drawn on that
generator's device), so a set gives the same images alone or in any batch; ``set_generators``
derives them from (set id, base seed), the one derivation of the pipeline, the generate job and
training previews. The model only predicts ε; schedulers, guidance and this loop live here. A
``callback`` (``m2m_ray.sampling.callbacks``) sees every step and every finished image and may
stop the run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from m2m_ray.models import presets
from m2m_ray.models.codec import ImageCodec
from m2m_ray.models.context import ContextCache
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.sampling.callbacks import Callback, ImageEvent, StepEvent, wants_stop
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.sampling.guidance import Branch, branch_masks, combine, guidance_branches


@dataclass(frozen=True)
class SampleOutput:
    latents: torch.Tensor               # (B, M', 4, h, w) float32; M' = M unless a callback stopped
    pixels: torch.Tensor | None = None  # (B, M', 3, H, W) in [0, 1] when decoded in the loop (dino)
    finite: torch.Tensor | None = None  # (B,) bool: the set's latents (and pixels) have no NaN/Inf
    stopped: bool = False               # a callback returned STOP


def set_seed(set_id: str, base_seed: int) -> int:
    """The noise seed of a set: a 63-bit hash of its id and the base seed (SampleConfig.seed)."""
    digest = hashlib.blake2b(f"{base_seed}:{set_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def set_generators(set_ids: Sequence[str], base_seed: int) -> list[torch.Generator]:
    """One CPU generator per set, seeded with ``set_seed(set_id, base_seed)``: a set's noise
    depends on its id and the base seed only (not on its batch, actor or device)."""
    return [torch.Generator().manual_seed(set_seed(str(s), base_seed)) for s in set_ids]


def check_scheduler(scheduler: Any, spec: SampleConfig) -> None:
    """Refuse a scheduler object of another kind than ``spec.scheduler`` names (None: any)."""
    if spec.scheduler is None:
        return
    wanted = presets.SCHEDULERS[spec.scheduler]
    if type(scheduler).__name__ != wanted:
        raise ValueError(f"SampleConfig.scheduler is {spec.scheduler!r} ({wanted}) but the "
                         f"scheduler given is a {type(scheduler).__name__}; pass the scheduler it "
                         "names (M2MPipeline.scheduler_for(spec), presets.load_scheduler) or set "
                         "scheduler=None to sample with the one given")


class NonFiniteOutputError(RuntimeError):
    """Sets whose latents or pixels hold NaN or Inf (e.g. a float16 overflow); ``sets`` are their
    indices in the batch."""

    def __init__(self, message: str, sets: list[int]):
        super().__init__(message)
        self.sets = sets


def finite_sets(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` → ``(B,)`` bool: which rows hold no NaN or Inf."""
    return torch.isfinite(x).flatten(1).all(1)


class ContextState:
    """The context of B sets as the UNet reads it, limited to the last ``window`` images: a
    ``ContextCache`` (``use_cache``) or the raw context tensor with its task conditions."""

    def __init__(self, model: M2MUNet, window: int, use_cache: bool = True):
        if window < 1:
            raise ValueError(f"context window {window}: expected >= 1 images")
        self.model, self.window, self.use_cache = model, window, use_cache
        self.cache: ContextCache | None = None
        self.context: torch.Tensor | None = None  # (B, K, ...) raw context, uncached
        self.task: TaskConditions | None = None   # (B, K) its task conditions, uncached

    @property
    def num_images(self) -> int:
        if self.use_cache:
            return 0 if self.cache is None else self.cache.num_images
        return 0 if self.context is None else self.context.shape[1]

    def add(self, context: torch.Tensor, task: TaskConditions | None = None) -> None:
        """Append images ``[B, n, ...]`` (latents for self, DINO features for dino)."""
        if context.shape[1] == 0:
            return
        if self.num_images and (task is not None) != self._has_task():
            raise ValueError("context images with and without task conditions in one set; give "
                             "task conditions for all context images or for none")
        context = context[:, -self.window:].to(self.model.dtype)  # older ones are never seen
        task = None if task is None else task.select(slice(-context.shape[1], None))
        if self.use_cache:
            new = self.model.encode_context(context, task=task)
            self.cache = (new if self.cache is None else self.cache.append(new)).window(self.window)
            return
        if self.context is None:
            self.context, self.task = context, task
        else:
            self.context = torch.cat([self.context, context], 1)
            self.task = None if task is None else TaskConditions.cat([self.task, task], 1)
        start = -min(self.window, self.context.shape[1])
        self.context = self.context[:, start:]
        self.task = None if self.task is None else self.task.select(slice(start, None))

    def _has_task(self) -> bool:
        if self.use_cache:
            return self.cache is not None and self.cache.sites[0].key_task is not None
        return self.task is not None

    def branch_kwargs(self, times: int) -> dict[str, Any]:
        """UNet keyword arguments with the context tiled once per guidance branch."""
        if self.num_images == 0:
            return {}
        if self.use_cache:
            return {"cache": self.cache if times == 1 else self.cache.repeat(times)}
        context = torch.cat([self.context] * times)  # (nb*B, K, ...)
        task = None if self.task is None else self.task.repeat(times)
        return {"context": context, "context_task": task}


def latent_shape(codec: ImageCodec, height: int, width: int) -> tuple[int, int, int]:
    config = codec.vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"image size {height}×{width}: expected multiples of {factor} (the VAE's "
                         "downsampling factor)")
    return config.latent_channels, height // factor, width // factor


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...],
                  device: torch.device) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per set from its own generator: ``[B, *shape]``."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]
                       ).to(device)


class GuidedDenoiser:
    """ε̃ of one new image per set (eq. 6 / eq. 7): every guidance branch of the B sets in one UNet
    forward. Built once per image: the context is tiled once per branch here, not at every step."""

    def __init__(self, model: M2MUNet, state: ContextState, branches: list[Branch], batch: int,
                 target_task: TaskConditions | None = None):
        self.model, self.branches, self.batch = model, branches, batch
        self.dtype = model.dtype  # a property that walks the modules: read it once per image
        self.offset = state.num_images  # the new image sees all of the context
        times = len(branches)
        self.context_drop, self.task_drop = branch_masks(branches, batch,
                                                         target_task is not None)
        self.context = state.branch_kwargs(times)
        self.task = None if target_task is None else target_task.repeat(times)  # (nb*B, 1)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Scaled model input ``[B, 4, h, w]`` at timestep ``t`` → ε̃ ``[B, 4, h, w]`` (float32)."""
        times = len(self.branches)
        model_input = torch.cat([latents] * times)[:, None].to(self.dtype)  # (nb*B, 1, 4, h, w)
        timesteps = t.reshape(1, 1).expand(self.batch * times, 1).to(latents.device)  # (nb*B, 1)
        eps = self.model(model_input, timesteps, offset=self.offset, target_task=self.task,
                         context_drop=self.context_drop, task_drop=self.task_drop,
                         **self.context)  # (nb*B, 1, 4, h, w)
        return combine(eps[:, 0].float(), self.branches)  # (B, 4, h, w)


@torch.no_grad()
def denoise_image(model: M2MUNet, scheduler: Any, state: ContextState, noise: torch.Tensor,
                  num_inference_steps: int, branches: list[Branch],
                  target_task: TaskConditions | None = None, *,
                  on_step: Callable[[int, int, torch.Tensor, torch.Tensor], bool] | None = None
                  ) -> torch.Tensor | None:
    """One new image per set: noise ``[B, 4, h, w]`` → clean latents ``[B, 4, h, w]`` (float32),
    seeing the context in ``state``. The denoising loop, written out. ``on_step(step,
    num_steps, t, latents)`` after every step; when it returns True the loop ends and returns
    None."""
    denoiser = GuidedDenoiser(model, state, branches, noise.shape[0], target_task)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    latents = noise.float() * scheduler.init_noise_sigma  # (B, 4, h, w)
    for step, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)  # (B, 4, h, w)
        eps = denoiser(model_input, t)  # (B, 4, h, w)
        latents = scheduler.step(eps, t, latents).prev_sample
        if on_step is not None and on_step(step, len(scheduler.timesteps), t, latents):
            return None
    return latents


def _check_tasks(model: M2MUNet, batch: int, num_context: int, num_images: int,
                 context_task: TaskConditions | None, target_task: TaskConditions | None) -> None:
    if target_task is None and context_task is None:
        return
    if model.task_embedder is None:
        raise ValueError("task conditions given, but this model has none (M2MConfig."
                         "task_conditions is empty); pass context_task=None, target_task=None")
    if target_task is None or target_task.shape() != (batch, num_images):
        raise ValueError(f"target_task covers {None if target_task is None else target_task.shape()}"
                         f": expected the conditions of the {num_images} new images of each of "
                         f"the {batch} sets, [B, M] = [{batch}, {num_images}]")
    if num_context and (context_task is None or context_task.shape() != (batch, num_context)):
        raise ValueError(f"context_task covers {None if context_task is None else context_task.shape()}"
                         f": expected [B, K] = [{batch}, {num_context}], one condition per given "
                         "image (with target_task, the context needs its conditions too)")


@torch.no_grad()
def sample(model: M2MUNet, scheduler: Any, codec: ImageCodec, context_images: torch.Tensor,
           generators: Sequence[torch.Generator], spec: SampleConfig, *,
           context_task: TaskConditions | None = None,
           target_task: TaskConditions | None = None,
           callback: Callback | None = None) -> SampleOutput:
    """Generate ``spec.num_images`` (M) images after ``context_images`` ``[B, K, 3, H, W]``
    (floats in [0, 1], K may be 0) for B sets, one after another (paper §6.1), each seeing the last
    ``spec.context_window`` images of its set. ``spec`` is the one sampling spec; this function
    reads M, W, steps, s_I, s_T, ``use_cache`` and ``scheduler`` (None: use ``scheduler`` as
    given; a name: ``scheduler`` must be of that kind). The run's seed, dtype, resolution and VAE
    batch size are the caller's: ``generators`` (one per set, e.g. ``set_generators``), the
    model's dtype, the context's size and ``codec``. ``context_task`` ``[B, K]`` /
    ``target_task`` ``[B, M]``: task conditions (eq. 7 guidance with s_T); None: eq. 6.
    ``callback``: called with a ``StepEvent`` after every denoising step and an ``ImageEvent``
    after every image (``m2m_ray.sampling.callbacks``); returning ``STOP`` ends the run with the
    M' images finished (``SampleOutput.stopped``).

    ``SampleOutput.finite`` tells which sets came out without NaN/Inf (checked after every image;
    the caller decides what a non-finite set is).

    Raises ``ValueError`` for context images that are not ``[B, K, 3, H, W]``, a generator count
    other than B, a scheduler of another kind than ``spec.scheduler``, or task conditions of the
    wrong shape or for a model without them; ``TypeError`` for a callback that returns anything
    but None or ``STOP``."""
    num_images, context_window = spec.num_images, spec.context_window
    if context_images.ndim != 5 or context_images.shape[2] != 3:
        raise ValueError(f"context images {tuple(context_images.shape)}: expected [B, K, 3, H, W] "
                         "floats in [0, 1]")
    batch, num_context, _, height, width = context_images.shape
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for {batch} sets: give one per set")
    check_scheduler(scheduler, spec)
    _check_tasks(model, batch, num_context, num_images, context_task, target_task)
    device = model.device
    state = ContextState(model, context_window, spec.use_cache)
    if num_context:
        pixels = context_images[:, -context_window:].to(device)  # older images are never seen
        latents = codec.encode(pixels) if codec.variant == "self" else None
        task = None if context_task is None else context_task.select(slice(-pixels.shape[1], None))
        state.add(codec.context_of(latents, pixels), task)
    branches = guidance_branches(spec.guidance_scale,
                                 None if target_task is None else spec.task_guidance_scale)
    shape = latent_shape(codec, height, width)
    rows = tuple(range(batch))
    generated, decoded = [], []
    finite = torch.ones(batch, dtype=torch.bool, device=device)  # (B,)
    stopped = False
    for j in range(num_images):
        def on_step(step: int, num_steps: int, t: torch.Tensor, latents: torch.Tensor,
                    j: int = j) -> bool:
            event = StepEvent(j, num_images, step, num_steps, int(t), latents, rows)
            return wants_stop(callback(event), event)

        task = None if target_task is None else target_task.select(slice(j, j + 1))  # (B, 1)
        noise = initial_noise(generators, shape, device)  # (B, 4, h, w)
        latents = denoise_image(model, scheduler, state, noise, spec.num_inference_steps, branches,
                                task, on_step=None if callback is None else on_step)
        if latents is None:  # stopped at a step: this image is dropped
            stopped = True
            break
        latents = latents[:, None]  # (B, 1, 4, h, w)
        generated.append(latents)
        finite &= finite_sets(latents)  # a NaN stays in its own set: rows never mix
        pixels = codec.decode(latents) if codec.needs_pixels else None  # (B, 1, 3, H, W)
        if pixels is not None:
            decoded.append(pixels)
            finite &= finite_sets(pixels)
        if callback is not None:
            event = ImageEvent(j, num_images, latents[:, 0],
                               None if pixels is None else pixels[:, 0], rows)
            if wants_stop(callback(event), event):
                stopped = True
                break
        if j + 1 < num_images:
            state.add(codec.context_of(latents, pixels), task)
    empty = torch.zeros(batch, 0, *shape, device=device)  # stopped before the first image
    return SampleOutput(torch.cat(generated, 1) if generated else empty,
                        torch.cat(decoded, 1) if decoded else None, finite.cpu(), stopped)
