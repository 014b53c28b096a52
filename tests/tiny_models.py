"""Helpers for tests of the tiny preset's models."""

from __future__ import annotations

import torch


def randomize_new_projections(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Stand-in for a trained model: randomize the zero-initialized new projections (image-set
    attention outputs, task-condition projections), so the context and the task conditions
    change the output. Seeded, in place; returns the model."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "attn2.to_out" in name or "task_proj" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model
