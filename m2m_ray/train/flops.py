"""Model FLOPs utilization (MFU) of a training run, as in PaLM (Chowdhery et al. 2022, app. B):
the FLOPs the model needs per second at the measured throughput, over the device's peak.

- ``train_flops_per_set``: forward + backward FLOPs of one training set of N images, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model on the meta device (no
  memory, no compute, same on every device): the UNet on N noisy targets with the N - 1 clean
  images as context (``step.m2m_loss``), plus the frozen DINO forward of the N - 1 context images
  for M2M-DINO. Model FLOPs: the recomputation of gradient checkpointing is not counted.
- ``measure_peak_tflops``: the matmul rate this device reaches in the training precision, when
  ``tracking.peak_tflops`` does not give the datasheet's.
- ``mfu``: ``train_flops_per_set × samples_per_s / (world_size × peak)``.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.m2m_unet import M2MUNet


def train_flops_per_set(model: M2MUNet, images_per_set: int,
                        dino: DinoEncoder | None = None) -> int:
    """FLOPs of one training step on one set of ``images_per_set`` images (forward + backward of
    the UNet, plus the DINO forward of the context for M2M-DINO). Task embedders are left out
    (a few linear layers). Raises ``ValueError`` for fewer than 2 images per set."""
    if images_per_set < 2:
        raise ValueError(f"images_per_set {images_per_set}: a training set has at least 2 "
                         "images (one context, one target)")
    with torch.device("meta"):
        unet = M2MUNet(model.base_config, model.config, model.model_config, model.dino_hidden_size)
        encoder = (None if dino is None
                   else DinoEncoder(type(dino.dino)(dino.dino.config), dino.resolution))
    size, num_context = model.base_config["sample_size"], images_per_set - 1
    targets = torch.empty(1, images_per_set, 4, size, size, device="meta")  # (1, N, 4, h, w)
    timesteps = torch.zeros(1, images_per_set, dtype=torch.long, device="meta")  # (1, N)
    with FlopCounterMode(display=False) as counter:
        if encoder is None:
            context = torch.empty(1, num_context, 4, size, size, device="meta")  # (1, N-1, 4, h, w)
        else:
            pixels = torch.empty(1, num_context, 3, dino.resolution, dino.resolution,
                                 device="meta")  # (1, N-1, 3, R, R)
            context = encoder(pixels)  # (1, N-1, L, D)
        unet(targets, timesteps, context, offset=0).float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32,
                        size: int | None = None, seconds: float = 0.5) -> float:
    """Dense matmul TFLOP/s of ``device`` in ``dtype``: ``size``² × ``size`` products (default
    8192 on GPU, 1024 on CPU) repeated for about ``seconds`` after one warm-up."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    count, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        count += 1
        if count % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * size**3 * count / elapsed / 1e12


def mfu(flops_per_set: float, samples_per_s: float, world_size: int, peak_tflops: float) -> float:
    """Fraction of ``world_size`` devices' peak that ``samples_per_s`` sets per second (all
    workers) use, at ``flops_per_set`` each."""
    return flops_per_set * samples_per_s / (world_size * peak_tflops * 1e12)
