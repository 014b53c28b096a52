"""The shapes world's DINO encoder for M2M-DINO: a DINOv2-architecture ViT trained
self-supervised on renders — no attribute labels — so that its features, like DINOv2's on real
images, carry what the images show (paper §5.2: M2M-DINO leans on DINOv2's "fine-grained vision
information").

Why: with seeded random weights (the first choice), a linear probe reads shape from the features at
0.37 (chance 0.25) and background at 0.59 (chance 0.33), and M2M-DINO's generations followed their
context's shape near chance however long it trained (BENCHMARKS.md, "Method fidelity"). The
``shapes`` preset ships the encoder below (``models/weights/shapes/dino``, 5,000 steps): on it
M2M-DINO follows shape 0.66 on MIS test sets at K = 4 after 900 steps, 0.73 after 1,800 (0.30 on the
random encoder).

Objective: SimCLR's NT-Xent (Chen et al. 2020) between two augmented views of each render, on the
mean of the last hidden states (all tokens: M2M-DINO attends to every token), one term and one
throw-away projection head per view kind (``COLOUR_VIEWS``). Both kinds turn by any angle, shift,
zoom, flip, blur and add noise — changes that keep shape, colour and background. "keep" views turn
the hue a little (small next to the distance between the colour classes), so colour stays in the
features; "drop" views turn it anywhere and move the grey levels, so two views can no longer be
matched by colour and lightness and must be matched by what is left, shape among it. Each change
removes a fingerprint by which two views of one render could be matched without looking at its
shape: the render's own hue jitter (without the small hue turn the encoder learned no shape), its
objects' rotation and their place, its colour and grey levels. Labels are used only by
``linear_probe``, to measure the features.

Measured (linear probe shape / colour / background on held-out renders;
``benchmarks/results/shapes_dino_ssl.json``): random weights 0.371 / 1.000 / 0.590; "keep" views
only, 1,500 steps × 256 renders, 0.497 / 1.000 / 0.851; both view kinds, 1,500 steps × 128 renders
(the same images per step), 0.513 / 1.000 / 0.919, and 5,000 steps 0.572 / 1.000 / 0.941. For
scale, the same architecture trained *with* shape labels (a diagnostic, never shipped) reads shape
at 0.60 after 400 steps × 128 and 0.89 after 1,500: shape is slow to learn in a 2-layer ViT on 4 px
patches even when asked for directly.

    python -m m2m_ray.shapes.train dino --out m2m_ray/models/weights/shapes --threads 2

writes ``<out>/dino`` (``Dinov2Model.save_pretrained``, float16) with its probe report
(``training.json``); the ``shapes`` preset loads ``models/weights/shapes/dino``, and
``--model.dino_model_id=<out>/dino`` trains M2M-DINO on another.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m2m_ray.formats.rng import Salt
from m2m_ray.models.context import IMAGENET_MEAN, IMAGENET_STD
from m2m_ray.models.presets import SHAPES_DINO_CONFIG
from m2m_ray.shapes import world
from m2m_ray.shapes.readout import to_tensor
from m2m_ray.shapes.world import render_batch

TEMPERATURE = 0.2
# View kinds, one NT-Xent term and projection head each: "keep" views keep colour and lightness
# (so the features keep them for M2M-DINO), "drop" views randomize both (so matching views takes
# shape, which colour-keeping views alone let SimCLR skip).
COLOUR_VIEWS = ("keep", "drop")


def features(dino: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ``[B, 3, S, S]`` → last hidden states ``[B, L, D]``, normalized as
    ``m2m_ray.models.context.DinoEncoder`` normalizes them."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return dino(pixel_values=(images - mean) / std).last_hidden_state


def augment(x: torch.Tensor, generator: torch.Generator, colour: str = "keep") -> torch.Tensor:
    """One random view per image of ``x`` ``[B, 3, S, S]`` in [0, 1]: a turn by any angle about a
    shifted centre with a zoom of 1–1.4× (bilinear, reflected borders); a flip; blur on half; then
    ``colour="keep"``: a hue turn of up to ±12° and a brightness change of ±10% (shape, colour class
    and background survive), or ``colour="drop"``: a hue turn by any angle and contrast and
    brightness ×0.6–1.4 (shape and background survive, colour does not); noise on half. Raises
    ``ValueError`` for another ``colour``.

    Why any angle and a wide shift: two views that share their objects' rotation (modulo the
    quarter turns and flips) or their distance from the centre can be matched by that alone, the
    way the first encoder matched views by each render's hue jitter and learned no shape."""
    batch = x.shape[0]
    scale = 0.7 + 0.3 * torch.rand(batch, generator=generator)
    angle = torch.rand(batch, generator=generator) * 2 * math.pi
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * 0.25
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = scale * angle.cos(), -scale * angle.sin()
    theta[:, 1, 0], theta[:, 1, 1] = scale * angle.sin(), scale * angle.cos()
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    flip = torch.rand(batch, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    kernel = (torch.tensor([1.0, 2.0, 1.0]) / 4)
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), "replicate"), kernel, groups=3)
    blur = torch.rand(batch, generator=generator) < 0.5
    x = torch.where(blur[:, None, None, None], blurred, x)
    # A small hue turn and brightness change per view: each render has its own hue jitter (±8°)
    # and grey levels, a fingerprint that identifies the image without looking at its shape. The
    # colour classes are ≥ 55° apart, so ±12° keeps colour in the features.
    if colour == "keep":
        x = _turn_hue(x, (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(12))
        x = x * (0.9 + 0.2 * torch.rand(batch, 1, 1, 1, generator=generator))
    elif colour == "drop":
        # Any hue, and grey levels moved well past a render's own: colour and lightness no longer
        # tell two views apart, so matching them takes what is left — shape, count, size, texture.
        x = _turn_hue(x, torch.rand(batch, generator=generator) * 2 * math.pi).clamp(0, 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        contrast = 0.6 + 0.8 * torch.rand(batch, 1, 1, 1, generator=generator)
        x = (x - mean) * contrast + mean * (0.6 + 0.8 * torch.rand(batch, 1, 1, 1,
                                                                    generator=generator))
    else:
        raise ValueError(f"colour={colour!r}: expected 'keep' or 'drop'")
    noise = torch.randn(x.shape, generator=generator) * 0.03
    noisy = torch.rand(batch, generator=generator) < 0.5
    return (x + noise * noisy[:, None, None, None]).clamp(0, 1)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])


def _turn_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of ``x`` ``[B, 3, S, S]`` by ``angle`` ``[B]`` radians (in YIQ: luma kept)."""
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(angle), 3, 3)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's loss for projections ``[B, P]`` of two views: each view's positive is the other
    view of its image, its negatives the other 2B − 2 views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, P)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    batch = z1.shape[0]
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    return F.cross_entropy(logits, targets)


def train_dino(out: Path, steps: int, seed: int, batch: int = 128, lr: float = 2e-3
               ) -> dict[str, Any]:
    """Train the ``shapes`` preset's DINOv2 architecture (``SHAPES_DINO_CONFIG``) on fresh renders
    for ``steps`` steps of ``batch`` images, save it to ``<out>/dino`` with its linear-probe report
    (``training.json``) and return the report."""
    import json

    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    dino = Dinov2Model(Dinov2Config(**SHAPES_DINO_CONFIG)).train()
    width = dino.config.hidden_size
    heads = {colour: nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                   nn.Linear(2 * width, width)) for colour in COLOUR_VIEWS}
    params = [*dino.parameters(), *(p for head in heads.values() for p in head.parameters())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps,
                                                   pct_start=0.1)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        images, _, _ = render_batch(rng, batch)  # the labels are never read
        x = to_tensor(images)
        views = torch.cat([augment(x, generator, colour) for colour in COLOUR_VIEWS
                           for _ in range(2)])
        pooled = features(dino, views).mean(1).chunk(2 * len(COLOUR_VIEWS))
        loss = sum(nt_xent(heads[colour](pooled[2 * i]), heads[colour](pooled[2 * i + 1]))
                   for i, colour in enumerate(COLOUR_VIEWS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(f"[dino] step {step}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    dino.eval()
    report = {"steps": steps, "seed": seed, "batch": batch, "lr": lr,
              "objective": f"SimCLR NT-Xent, temperature {TEMPERATURE}, mean of last hidden "
                           f"states, one head per view kind {list(COLOUR_VIEWS)}",
              "seconds": round(time.perf_counter() - started, 1),
              "linear_probe": linear_probe(dino, seed + Salt.HELD_OUT_EVAL)}
    folder = Path(out) / "dino"
    # float16 on disk like the other shipped shapes weights (features move by < 0.003); presets
    # load float32
    copy.deepcopy(dino).half().save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def _pooled(dino: nn.Module, images: np.ndarray) -> torch.Tensor:
    x = to_tensor(images)
    return torch.cat([features(dino, x[i:i + 500]).mean(1) for i in range(0, len(x), 500)])


def linear_probe(dino: nn.Module, seed: int, train: int = 2000, test: int = 1000
                 ) -> dict[str, float]:
    """Held-out accuracy per attribute of a logistic regression on the mean of ``dino``'s last
    hidden states (renders of ``seed``): how linearly the features carry shape, colour and
    background. The probe, not the encoder, sees the labels."""

    images, attributes, _ = render_batch(np.random.default_rng(seed), train + test)
    pooled = _pooled(dino, images)
    pooled = (pooled - pooled[:train].mean(0)) / (pooled[:train].std(0) + 1e-6)
    report = {}
    for name, values in world.ATTRIBUTES.items():
        y = torch.tensor([values.index(getattr(a, name)) for a in attributes])
        weight = torch.zeros(pooled.shape[1], len(values), requires_grad=True)
        bias = torch.zeros(len(values), requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            with torch.enable_grad():
                logits = pooled[:train] @ weight + bias
                loss = F.cross_entropy(logits, y[:train]) + 1e-3 * weight.pow(2).sum()
                loss.backward()
            return loss

        optimizer.step(closure)
        right = ((pooled[train:] @ weight + bias).argmax(1) == y[train:]).float().mean()
        report[name] = round(float(right), 4)
    return report
