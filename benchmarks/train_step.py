"""Samples/s and peak memory of one M2M training step, plain PyTorch (no Ray): what each Ray Train
worker does per step — ``m2m_ray.train.step.m2m_loss`` (eq. 5, per-image timesteps, 10% context
drop; for dino the frozen DINOv2 forward on the N-1 context images), backward, gradient clipping,
AdamW, LR schedule and the EMA update — on random latents and pixels of the preset's shapes.

    # CPU, tiny preset (this repo's CI machine)
    python benchmarks/train_step.py --preset tiny --variant both --batch-size 2 --images-per-set 4 \
        --threads 1
    # GPU: full SD-2.1-base UNet + DINOv2-giant shapes, random weights, no download
    python benchmarks/train_step.py --preset sd21-base-random --device cuda --variant both \\
        --batch-size 8 --images-per-set 8 --precision bf16 --steps 10

Each variant runs in its own subprocess (so peak memory is that variant's alone) and prints one
self-describing JSON object per line: machine, settings, step time, samples/s (image sets/s),
images/s, peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, model
construction included) and, for dino, the frozen DINOv2 forward's own time (``dino_forward_s``, its
share of the step). ``--gradient-checkpointing`` defaults to on for CUDA, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(args: argparse.Namespace) -> dict:
    import torch

    from m2m_ray.models.config import M2MConfig, ModelConfig
    from m2m_ray.models.context import DinoEncoder
    from m2m_ray.models.m2m_unet import M2MUNet
    from m2m_ray.models.presets import get_preset, load_scheduler
    from m2m_ray.train.config import EMAConfig, OptimConfig
    from m2m_ray.train.step import (
        EMA,
        TrainBatch,
        m2m_loss,
        make_optimizer,
        step_generator,
    )

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_cfg = ModelConfig(preset=args.preset, seed=args.seed)
    preset = get_preset(model_cfg)
    checkpointing = device.type == "cuda" if args.gradient_checkpointing is None \
        else args.gradient_checkpointing
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    build_start = time.perf_counter()
    model = M2MUNet.from_preset(model_cfg, M2MConfig(variant=args.variant)).to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    dino = DinoEncoder.from_preset(model_cfg, device) if args.variant == "dino" else None
    ema = EMA(model, EMAConfig().decay, True) if args.ema else None
    optimizer, scheduler = make_optimizer(model, OptimConfig(warmup_steps=0), 10**6)
    alphas = load_scheduler(model_cfg, "ddim").alphas_cumprod.to(device)
    build_s = time.perf_counter() - build_start

    latent, size = preset.resolution // 8, preset.dino_resolution
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    batch = TrainBatch(
        latents=(torch.randn(args.batch_size, args.images_per_set, 4, latent, latent,
                             generator=gen) * 0.8).to(device),
        dino_pixels=None if dino is None else torch.randint(
            0, 256, (args.batch_size, args.images_per_set, 3, size, size), generator=gen,
            dtype=torch.uint8).to(device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = m2m_loss(model, batch, alphas, step_generator(args.seed, step, 0, device), 0.1,
                        dino, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, step + 1)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    dino_s = None
    if dino is not None:  # its share of the step: the frozen forward on the N-1 context images
        pixels = batch.dino_pixels[:, :-1].float() / 255
        dino_times = []
        for _ in range(args.steps):
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                dino(pixels)
            sync()
            dino_times.append(time.perf_counter() - start)
        dino_s = round(statistics.mean(dino_times), 4)

    if device.type == "cuda":
        peak = {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(),
                "reserved_bytes": torch.cuda.max_memory_reserved()}
        device_name = torch.cuda.get_device_name(device)
    else:
        peak = {"kind": "cpu_peak_rss_process", "bytes": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss * 1024}
        device_name = platform.processor() or platform.machine()
    peak["gib"] = round(peak["bytes"] / 2**30, 3)
    mean = statistics.mean(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "benchmark": "train_step", "variant": args.variant, "preset": args.preset,
        "device": {"type": device.type, "name": device_name, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
                   "host": platform.node()},
        "settings": {"sets_per_step": args.batch_size, "images_per_set": args.images_per_set,
                     "resolution": preset.resolution, "latent_size": latent,
                     "dino_resolution": size if dino is not None else None,
                     "precision": args.precision, "gradient_checkpointing": checkpointing,
                     "ema": args.ema, "steps_timed": args.steps, "warmup_steps": args.warmup},
        "params": {"unet_trainable": trainable,
                   "dino": None if dino is None else sum(p.numel() for p in dino.parameters())},
        "step_s": {"mean": round(mean, 4), "median": round(statistics.median(times), 4),
                   "min": round(min(times), 4), "max": round(max(times), 4)},
        "dino_forward_s": dino_s,
        "samples_per_s": round(args.batch_size / mean, 3),
        "images_per_s": round(args.batch_size * args.images_per_set / mean, 3),
        "peak_memory": peak, "build_s": round(build_s, 2), "loss_last": round(loss.item(), 4),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd21-base-random"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="both", choices=["self", "dino", "both"])
    parser.add_argument("--batch-size", type=int, default=2, help="image sets per step (per GPU)")
    parser.add_argument("--images-per-set", type=int, default=4, help="N")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: autocast, as training on GPU (weights stay fp32)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=None, help="default: on for CUDA, off for CPU")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 on a shared, loaded CPU")
    args, _ = parser.parse_known_args(argv)
    if args.variant != "both":
        print(json.dumps(measure(args)), flush=True)
        return
    for variant in ("self", "dino"):
        argv_variant = [a for a in (argv if argv is not None else sys.argv[1:])]
        if "--variant" in argv_variant:
            at = argv_variant.index("--variant")
            del argv_variant[at:at + 2]
        argv_variant = [a for a in argv_variant if not a.startswith("--variant=")]
        subprocess.run([sys.executable, __file__, *argv_variant, "--variant", variant],
                       check=True, env=os.environ)


if __name__ == "__main__":
    main()
