"""Task-condition embedders (paper §6.2): per-image camera extrinsics and position indices.

``TaskConditions`` carries the raw conditions of N images of a set (any subset of the two kinds);
``TaskEmbedder`` turns them into one embedding per image, ``[B, N, E]``, the sum of the enabled
embedders. The M2M UNet adds that embedding, through zero-initialized projections, to the inputs of
image-set attention (see ``m2m_unet``), so a freshly enabled condition starts as a no-op and the
fine-tuned model starts from the pre-trained one.

- camera: extrinsics ``[B, N, 4, 4]``, ``[B, N, 3, 4]`` or already flattened ``[B, N, 12]`` (the
  top three rows, world-to-camera or camera-to-world as the dataset defines; the MLP learns either)
  → MLP(12 → E → E).
- position: index of the image in its sequence ``[B, N]`` (int or float) → sinusoidal(E) → MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

CONDITION_KINDS = ("camera", "position")


@dataclass(frozen=True)
class TaskConditions:
    """Raw task conditions of N images; ``None`` for a kind the call does not carry."""

    camera: torch.Tensor | None = None    # [B, N, 4, 4] | [B, N, 3, 4] | [B, N, 12]
    position: torch.Tensor | None = None  # [B, N]

    def present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def shape(self) -> tuple[int, int]:
        """``(B, N)``, checked to agree across the kinds present."""
        shapes = {kind: tuple(getattr(self, kind).shape[:2]) for kind in self.present()}
        if not shapes or len(set(shapes.values())) != 1:
            raise ValueError(f"TaskConditions needs at least one condition and the same [B, N] "
                             f"for all of them; got leading shapes {shapes}")
        return next(iter(shapes.values()))

    def select(self, index: slice | torch.Tensor) -> "TaskConditions":
        """The conditions of images ``index`` (a slice or index tensor along N)."""
        return TaskConditions(**{k: getattr(self, k)[:, index] for k in self.present()})

    def repeat(self, times: int) -> "TaskConditions":
        """Tiled ``times`` along the batch, like ``torch.cat([x] * times)``."""
        return TaskConditions(**{k: torch.cat([getattr(self, k)] * times) for k in self.present()})

    @staticmethod
    def cat(parts: Sequence["TaskConditions"], dim: int) -> "TaskConditions":
        """Concatenated along the batch (``dim=0``) or the images (``dim=1``)."""
        kinds = parts[0].present()
        if any(p.present() != kinds for p in parts):
            raise ValueError(f"cannot concatenate TaskConditions with different kinds: "
                             f"{[p.present() for p in parts]}")
        return TaskConditions(**{k: torch.cat([getattr(p, k) for p in parts], dim) for k in kinds})


class CameraEmbedder(nn.Module):
    """Camera extrinsics → ``[B, N, E]``."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(12, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        if camera.ndim == 4 and camera.shape[-2:] in ((4, 4), (3, 4)):
            camera = camera[..., :3, :].flatten(-2)  # (B, N, 12)
        if camera.ndim != 3 or camera.shape[-1] != 12:
            raise ValueError(f"camera extrinsics of shape {tuple(camera.shape)}: expected "
                             "[B, N, 4, 4], [B, N, 3, 4] or [B, N, 12]")
        camera = camera.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(camera)))  # (B, N, E)


class PositionEmbedder(nn.Module):
    """Position index in the sequence → sinusoidal encoding → MLP → ``[B, N, E]``."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.linear_1 = nn.Linear(embed_dim, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        if position.ndim != 2:
            raise ValueError(f"position indices of shape {tuple(position.shape)}: expected [B, N]")
        encoding = get_timestep_embedding(position.flatten(), self.embed_dim, flip_sin_to_cos=True,
                                          downscale_freq_shift=0)  # (B*N, E)
        encoding = encoding.unflatten(0, position.shape).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(encoding)))  # (B, N, E)


class TaskEmbedder(nn.Module):
    """Sum of the enabled condition embedders; a call must carry exactly the enabled kinds."""

    def __init__(self, kinds: Sequence[str], embed_dim: int):
        super().__init__()
        unknown = set(kinds) - set(CONDITION_KINDS)
        if unknown or not kinds:
            raise ValueError(f"task condition kinds {list(kinds)}: expected a non-empty subset of "
                             f"{list(CONDITION_KINDS)}")
        builders = {"camera": CameraEmbedder, "position": PositionEmbedder}
        self.kinds = tuple(kinds)
        self.embedders = nn.ModuleDict({kind: builders[kind](embed_dim) for kind in self.kinds})

    def forward(self, task: TaskConditions) -> torch.Tensor:
        if sorted(task.present()) != sorted(self.kinds):
            raise ValueError(
                f"TaskConditions carries {task.present()} but this model was built with "
                f"task_conditions={list(self.kinds)}; pass exactly those (or task=None for none)"
            )
        task.shape()  # checks that the kinds agree on [B, N]
        embeddings = [self.embedders[kind](getattr(task, kind)) for kind in self.kinds]
        return torch.stack(embeddings).sum(0)  # (B, N, E)
