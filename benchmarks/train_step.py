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

FLOPs and MFU as training reports them (``m2m_ray.train.flops``): model FLOPs of one set (UNet
forward and backward without checkpointing's recomputation, the frozen DINOv2 forward for dino;
counted on the meta device) × sets per step ÷ step time ÷ the matmul rate measured in the same
process in the step's precision. Levers: ``--no-gradient-checkpointing``, ``--compile [MODE]`` (the
UNet, in place), ``--fused-adamw``. Out of memory is a result (``"oom": true``), so a sweep of batch
sizes runs on. ``paper_plan``: what the paper's 256 sets per optimizer step on 8 GPUs (32 sets per
GPU) costs at this micro-batch. ``--profile`` adds where one step's time goes
(``perf.profile_summary``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAPER_SETS_PER_GPU = 32  # paper, Appendix A: 256 sets per step on 8 GPUs


def flops_on_meta(preset: str, variant: str, images_per_set: int) -> int:
    """``train_flops_per_set`` of the full-size model, built on the meta device (seconds, no
    memory: the count for an H200 run, made on any machine)."""
    # local: torch and the model code load only where a measurement runs; the parent process that
    # launches one subprocess per variant never imports them
    import torch

    from m2m_ray.models.config import M2MConfig, ModelConfig
    from m2m_ray.models.context import DinoEncoder
    from m2m_ray.models.m2m_unet import M2MUNet
    from m2m_ray.train.flops import train_flops_per_set

    model_cfg = ModelConfig(preset=preset)
    with torch.device("meta"):
        model = M2MUNet.from_preset(model_cfg, M2MConfig(variant=variant))
        dino = DinoEncoder.from_preset(model_cfg) if variant == "dino" else None
    return train_flops_per_set(model, images_per_set, dino)


def measure(args: argparse.Namespace) -> dict:
    """One variant's numbers; out of memory (CUDA) comes back as ``{"oom": true, "error"}``."""
    import torch

    try:
        return _measure(args)
    except torch.cuda.OutOfMemoryError as error:
        return {"benchmark": "train_step", "variant": args.variant, "preset": args.preset,
                "settings": {"sets_per_step": args.batch_size, "images_per_set":
                             args.images_per_set, "gradient_checkpointing":
                             args.gradient_checkpointing, "compile": args.compile},
                "oom": True, "error": str(error).splitlines()[0]}


def _measure(args: argparse.Namespace) -> dict:
    # local: torch and the model code load only where a measurement runs; the parent process that
    # launches one subprocess per variant never imports them (as in flops_on_meta)
    import torch

    from benchmarks.perf import profile_summary, sync
    from m2m_ray.models.config import M2MConfig, ModelConfig
    from m2m_ray.models.context import DinoEncoder
    from m2m_ray.models.m2m_unet import M2MUNet
    from m2m_ray.models.presets import get_preset, load_scheduler
    from m2m_ray.train.config import EMAConfig, OptimConfig
    from m2m_ray.train.flops import measure_peak_tflops, mfu, train_flops_per_set
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
    with torch.device(device):  # random weights initialised where they run (seconds on a GPU)
        model = M2MUNet.from_preset(model_cfg, M2MConfig(variant=args.variant)).to(device).train()
        dino = DinoEncoder.from_preset(model_cfg, device) if args.variant == "dino" else None
    if checkpointing:
        model.enable_gradient_checkpointing()
    ema = EMA(model, EMAConfig().decay, True) if args.ema else None
    optimizer, scheduler = make_optimizer(model, OptimConfig(warmup_steps=0,
                                                             fused=args.fused_adamw), 10**6)
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

    def step(number: int):
        loss = m2m_loss(model, batch, alphas, step_generator(args.seed, number, 0, device), 0.1,
                        dino, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model, number + 1)
        return loss

    flops_per_set = train_flops_per_set(model, args.images_per_set, dino)
    if args.compile:
        model.unet.compile(mode=None if args.compile == "default" else args.compile)
    peak_dtype = torch.bfloat16 if autocast is not None else torch.float32
    peak_tflops = measure_peak_tflops(device, peak_dtype, seconds=1.0)

    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup_start = time.perf_counter()
    for number in range(args.warmup + args.steps):
        if number == args.warmup:
            sync(device)
            warmup_s = time.perf_counter() - warmup_start
        sync(device)
        start = time.perf_counter()
        loss = step(number)
        sync(device)
        if number >= args.warmup:
            times.append(time.perf_counter() - start)
    profile = None
    if args.profile:
        profile = profile_summary(lambda: step(args.warmup + args.steps), device)
        print(profile.pop("table"), file=sys.stderr, flush=True)

    dino_s = None
    if dino is not None:  # its share of the step: the frozen forward on the N-1 context images
        pixels = batch.dino_pixels[:, :-1].float() / 255
        dino_times = []
        for _ in range(args.steps):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                dino(pixels)
            sync(device)
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
    flops_per_step = flops_per_set * args.batch_size
    accumulation = math.ceil(PAPER_SETS_PER_GPU / args.batch_size)
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
                     "compile": args.compile, "fused_adamw": args.fused_adamw,
                     "ema": args.ema, "steps_timed": args.steps, "warmup_steps": args.warmup},
        "params": {"unet_trainable": trainable,
                   "dino": None if dino is None else sum(p.numel() for p in dino.parameters())},
        "step_s": {"mean": round(mean, 4), "median": round(statistics.median(times), 4),
                   "min": round(min(times), 4), "max": round(max(times), 4)},
        "dino_forward_s": dino_s,
        "samples_per_s": round(args.batch_size / mean, 3),
        "images_per_s": round(args.batch_size * args.images_per_set / mean, 3),
        "flops_per_step": flops_per_step,
        "achieved_tflops": round(flops_per_step / mean / 1e12, 2),
        "peak_tflops": {"tflops": round(peak_tflops, 2), "dtype": str(peak_dtype)[6:],
                        "how": "m2m_ray.train.flops.measure_peak_tflops"},
        "mfu": round(mfu(flops_per_set, args.batch_size / mean, 1, peak_tflops), 4),
        "paper_plan": {"sets_per_gpu": PAPER_SETS_PER_GPU, "gpus": 8,
                       "micro_batch": args.batch_size, "accumulation_steps": accumulation,
                       "optimizer_step_s": round(mean * accumulation, 3)},
        "peak_memory": peak, "build_s": round(build_s, 2), "warmup_s": round(warmup_s, 2),
        "loss_last": round(loss.item(), 4), "profile": profile,
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
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=["default", "max-autotune-no-cudagraphs", "max-autotune",
                                 "reduce-overhead"], help="torch.compile the UNet (MODE)")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW's fused kernel")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step: where its time goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 on a shared, loaded CPU")
    parser.add_argument("--flops-only", action="store_true", help="model FLOPs per step on the "
                        "meta device, no timings (full-size shapes without a GPU)")
    args, _ = parser.parse_known_args(argv)
    if args.flops_only:
        for variant in ("self", "dino") if args.variant == "both" else (args.variant,):
            per_set = flops_on_meta(args.preset, variant, args.images_per_set)
            print(json.dumps({"benchmark": "train_step_flops", "variant": variant,
                              "preset": args.preset, "images_per_set": args.images_per_set,
                              "tflops_per_set": round(per_set / 1e12, 3),
                              "sets_per_step": args.batch_size,
                              "tflops_per_step": round(per_set * args.batch_size / 1e12, 3)}),
                  flush=True)
        return
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
