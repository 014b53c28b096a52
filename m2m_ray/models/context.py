"""Context of image-set attention: per-site keys/values (``SiteContext``), the sampling cache
(``ContextCache``) and the frozen DINOv2 encoder of M2M-DINO (``DinoEncoder``).

A ``ContextCache`` holds, for every image-set attention site of one M2M UNet, the projected keys and
values of K context images, ``[B, K, L, inner]``, plus the per-image task-condition terms
``[B, K, inner]`` when the context was encoded with task conditions. Keys depend only on the
context image (self: its clean latents at t=0; dino: its DINO features) and its task condition, so
the sampler encodes every context image once (``M2MUNet.encode_context``) and reuses the cache for
all denoising steps and all later images::

    cache = model.encode_context(context_latents, task=context_task)   # [B, K, 4, h, w] → K images
    eps = model(noisy[:, None], t[:, None], cache=cache, offset=cache.num_images)
    cache = cache.append(model.encode_context(new_latents[:, None], task=new_task)).window(W)

The task terms are stored apart from the keys (keys = to_k(h) + W_k·task, exact by linearity), so
one cache serves the task-dropped and task-conditioned guidance branches alike. A cache belongs to
the weights that made it: re-encode after changing them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from m2m_ray.models.presets import get_preset, load_dino

if TYPE_CHECKING:
    from m2m_ray.models.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SiteContext:
    """Keys/values of K context images at one site (no null token: the processor owns it)."""

    key: torch.Tensor                     # (B, K, L, inner)
    value: torch.Tensor                   # (B, K, L, inner)
    key_task: torch.Tensor | None = None  # (B, K, inner): W_k · task input, added unless dropped
    value_task: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SiteContext":
        return SiteContext(**{f.name: None if getattr(self, f.name) is None
                              else fn(getattr(self, f.name)) for f in fields(self)})

    @staticmethod
    def cat(parts: Sequence["SiteContext"], dim: int) -> "SiteContext":
        if len({p.key_task is None for p in parts}) != 1:
            raise ValueError("cannot join context encoded with task conditions and context encoded "
                             "without them; encode all context images the same way")
        joined = {f.name: None if getattr(parts[0], f.name) is None
                  else torch.cat([getattr(p, f.name) for p in parts], dim)
                  for f in fields(SiteContext)}
        return SiteContext(**joined)


@dataclass(frozen=True)
class ContextCache:
    """Per-site context of K images for a batch of B sets; immutable (methods return new ones)."""

    sites: tuple[SiteContext, ...]

    @property
    def batch_size(self) -> int:
        return self.sites[0].key.shape[0]

    @property
    def num_images(self) -> int:
        return self.sites[0].key.shape[1]

    def append(self, other: "ContextCache") -> "ContextCache":
        """This context followed by ``other``'s images (same batch, same model)."""
        if other.batch_size != self.batch_size or len(other.sites) != len(self.sites):
            raise ValueError(f"cannot append a cache of batch {other.batch_size} with "
                             f"{len(other.sites)} sites to one of batch {self.batch_size} with "
                             f"{len(self.sites)} sites; encode with the same model and batch")
        if self.num_images == 0:
            return other
        if other.num_images == 0:
            return self
        return ContextCache(tuple(SiteContext.cat([a, b], 1)
                                  for a, b in zip(self.sites, other.sites)))

    def window(self, size: int) -> "ContextCache":
        """The last ``size`` images (all of them when there are fewer)."""
        if size < 0:
            raise ValueError(f"window size {size}: expected >= 0")
        start = max(self.num_images - size, 0)
        return ContextCache(tuple(s.map(lambda t: t[:, start:]) for s in self.sites))

    def repeat(self, times: int) -> "ContextCache":
        """Tiled along the batch like ``torch.cat([x] * times)`` (e.g. the guidance branches)."""
        return ContextCache(tuple(s.map(lambda t: torch.cat([t] * times)) for s in self.sites))

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "ContextCache":
        return ContextCache(tuple(s.map(lambda t: t.to(device=device, dtype=dtype))
                                  for s in self.sites))

    def nbytes(self) -> int:
        return sum(getattr(s, f.name).nbytes for s in self.sites for f in fields(s)
                   if getattr(s, f.name) is not None)


class DinoEncoder(nn.Module):
    """Frozen DINOv2: images ``[B, K, 3, H, W]`` (float in [0, 1]) → last hidden states
    ``[B, K, L, D]`` (L = 1 + (resolution / patch)², D = hidden size), the context of M2M-DINO.

    Resizes to the preset's ``dino_resolution`` and normalizes with ImageNet statistics. Run it in
    the training worker next to the UNet: shipping pixels there costs 3·224² = 150 KB per image as
    uint8, shipping DINOv2-giant features 257·1536·2 B = 790 KB per image as fp16 (5.3× the bytes),
    for one no-grad ViT-g forward per image (≈ 0.6 TFLOP, well under the UNet's training step).
    """

    def __init__(self, dino: nn.Module, resolution: int):
        super().__init__()
        self.dino = dino.eval().requires_grad_(False)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_preset(cls, model: "ModelConfig", device=None, dtype=None) -> "DinoEncoder":
        encoder = cls(load_dino(model), get_preset(model).dino_resolution)
        return encoder.to(device=device, dtype=dtype)

    @property
    def hidden_size(self) -> int:
        return self.dino.config.hidden_size

    @property
    def num_tokens(self) -> int:
        return 1 + (self.resolution // self.dino.config.patch_size) ** 2

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"DINO context images of shape {tuple(images.shape)}: expected "
                             "[B, K, 3, H, W] floats in [0, 1]")
        batch, count = images.shape[:2]
        dtype = self.mean.dtype
        if count == 0:
            return images.new_zeros(batch, 0, self.num_tokens, self.hidden_size, dtype=dtype)
        pixels = images.flatten(0, 1).float()  # (B*K, 3, H, W)
        if pixels.shape[-2:] != (self.resolution, self.resolution):
            pixels = F.interpolate(pixels, size=(self.resolution, self.resolution), mode="bicubic",
                                   align_corners=False, antialias=True)
        pixels = ((pixels - self.mean.float()) / self.std.float()).to(dtype)
        features = self.dino(pixel_values=pixels).last_hidden_state  # (B*K, L, D)
        return features.unflatten(0, (batch, count))  # (B, K, L, D)
