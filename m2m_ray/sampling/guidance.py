"""Image guidance (paper eq. 6) and image + task guidance (eq. 7) as weighted sums of branches.

A *branch* is one conditional prediction of ε: with or without the context images (``c_I``) and,
for task-conditioned models, with or without the task conditions (``c_T``)::

    eq. 6:  ε̃ = ε(z, ∅) + s_I · (ε(z, c_I) − ε(z, ∅))
    eq. 7:  ε̃ = ε(z, ∅, ∅) + s_I · (ε(z, c_I, ∅) − ε(z, ∅, ∅)) + s_T · (ε(z, c_I, c_T) − ε(z, c_I, ∅))

Both are linear in the branches, so they are written as weights over them:

    eq. 6:  (1 − s_I) · ε(∅)        + s_I · ε(c_I)
    eq. 7:  (1 − s_I) · ε(∅, ∅)     + (s_I − s_T) · ε(c_I, ∅)     + s_T · ε(c_I, c_T)

A branch of weight 0 is not run at all: s_I = 1 without task conditions is the conditional
prediction alone (one UNet row per set instead of two), and s_I = s_T drops ε(c_I, ∅). The branches
that remain run in one batched forward: the sets are tiled once per branch and the M2M UNet's
``context_drop`` / ``task_drop`` masks select what each copy sees (``branch_masks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Branch:
    """One conditional prediction: which conditions it drops, and its weight in ε̃."""

    context_drop: bool
    task_drop: bool
    weight: float


def guidance_branches(image_scale: float, task_scale: float | None = None) -> list[Branch]:
    """The branches of eq. 6 (``task_scale`` None: the model has no task conditions) or eq. 7,
    without those of weight 0, in the order unconditional → fully conditional."""
    if task_scale is None:
        branches = [Branch(True, True, 1.0 - image_scale), Branch(False, True, image_scale)]
    else:
        branches = [Branch(True, True, 1.0 - image_scale),
                    Branch(False, True, image_scale - task_scale),
                    Branch(False, False, task_scale)]
    kept = [b for b in branches if b.weight != 0.0]
    if not kept:
        raise ValueError(f"guidance scales s_I={image_scale}, s_T={task_scale} give every branch "
                         "weight 0; use s_I = 1 for the conditional prediction alone")
    return kept


def branch_masks(branches: list[Branch], batch: int, with_task: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(context_drop, task_drop)`` bool masks ``[len(branches) * batch]`` for sets tiled once
    per branch (``torch.cat([x] * len(branches))``); None where no copy drops anything, and
    ``task_drop`` None without task conditions."""

    def mask(flags: list[bool]) -> torch.Tensor | None:
        if not any(flags):
            return None
        # On the CPU: the model turns the masks into row indices once per call without a device
        # synchronisation (a device mask would stall the GPU queue at every denoising step).
        return torch.tensor(flags).repeat_interleave(batch)  # (nb*B,)

    context_drop = mask([b.context_drop for b in branches])
    task_drop = mask([b.task_drop for b in branches]) if with_task else None
    return context_drop, task_drop


def combine(eps: torch.Tensor, branches: list[Branch]) -> torch.Tensor:
    """Predictions of the tiled sets ``[nb * B, ...]`` → guided ε̃ ``[B, ...]``."""
    if eps.shape[0] % len(branches):
        raise ValueError(f"{eps.shape[0]} predictions for {len(branches)} guidance branches: "
                         "expected the sets tiled once per branch")
    parts = eps.chunk(len(branches))  # nb × (B, ...)
    if len(parts) == 1 and branches[0].weight == 1.0:
        return parts[0]
    guided = parts[0] * branches[0].weight
    for part, branch in zip(parts[1:], branches[1:]):
        guided = guided + part * branch.weight
    return guided
