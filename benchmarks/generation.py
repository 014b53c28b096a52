"""Stage-2 generator vs the code a user writes first, images/s end to end (text encoding, denoising,
VAE decode, JPEG encoding), with the generator's speed levers side by side, FLOPs and MFU.

    # CPU, tiny preset (this repo's CI machine)
    python benchmarks/generation.py --preset tiny --captions 4 --steps 20 --variants c2 c2-fused
    # GPU, full SD-2.1-base shapes with random weights (no Ray, no download): the paper's settings
    python benchmarks/generation.py --preset sd21-base-random --device cuda --steps 50 \\
        --captions 2 --variants c2 c2-bf16 c2-fused c2-fused-compile --profile --out gen.json
    # FLOPs per image only, on the meta device (no weights, no compute: seconds on any machine)
    python benchmarks/generation.py --preset sd21-base-random --flops-only --steps 50

Baseline ("naive"): ``StableDiffusionPipeline(...)(caption, num_images_per_prompt=25)`` once per
caption, PIL images out, each saved as JPEG in the same thread — what a user writes first.
Ours: ``SDSetGenerator`` (captions encoded once, ``captions_per_batch`` captions × 25 images × 2
guidance branches in one UNet batch, noise from per-image seeds, VAE decode in chunks) with JPEG
encoding on a thread pool overlapped with the next batch's denoising (``encoded_sets``). Same
captions, steps, scheduler (Euler), guidance 7.5 and size. Each is built afresh (random weights
initialised on the device), warmed up on one batch of ``--warmup-steps`` steps (compiles there),
then timed.

A variant is dash-separated tokens, each a ``GenerateConfig`` setting (the rest from the flags):
``c<N>`` captions per UNet batch, ``vae<N>`` latents per VAE call, ``cl``/``nocl`` channels-last,
``fp16``/``bf16``, ``fused`` (QKV projections), ``compile`` or ``compile:<mode>`` (``_`` for ``-``,
as in ``compile:max_autotune``), ``sdpa:<kernel>`` (flash, efficient, cudnn, math). The first
variant is the reference: every other one reports its drift from it (PSNR and max abs difference
of the first set's images), since a lever that changes pixels changes what MIS stores.

FLOPs per image (counted on the meta device, ``perf.count_flops``): steps × one guided UNet
evaluation (2 rows), + the text encoder on the caption and the empty prompt ÷ images per caption,
+ one VAE decode. MFU = images/s × FLOPs per image ÷ the matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.perf import count_flops, profile_summary, sync  # noqa: E402
from m2m_ray.mis.config import GenerateConfig  # noqa: E402
from m2m_ray.mis.generate import SDSetGenerator, encoded_sets  # noqa: E402
from m2m_ray.models import presets  # noqa: E402
from m2m_ray.models.config import ModelConfig  # noqa: E402
from m2m_ray.train.flops import measure_peak_tflops  # noqa: E402

CAPTIONS = [
    "a red fox standing in fresh snow at dawn", "an old lighthouse on a rocky coast",
    "a bowl of ramen with egg and scallions", "a watercolor painting of a small village",
    "<PERSON> riding a bicycle through a park", "a modern kitchen with white cabinets",
    "a close-up photo of a monarch butterfly", "a vintage car parked on a city street",
    "a mountain lake reflecting pine trees", "a cartoon robot holding a balloon",
]
GOALS = {"images_per_s": 5.0, "vs_naive": 1.5, "mfu": 0.5}  # issue 18, at 50 steps on one GPU
_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def parse_variant(name: str) -> dict:
    """``"c4-fused-compile:max_autotune"`` → ``{"captions_per_batch": 4, "fuse_qkv": True,
    "compile": "max-autotune"}`` (``_`` for ``-`` in a compile mode, ``-`` joins tokens); raises
    ``ValueError`` naming the token it cannot read."""
    settings: dict = {}
    for token in name.split("-"):
        if token.startswith("compile"):
            settings["compile"] = token.partition(":")[2].replace("_", "-") or "default"
        elif token.startswith("sdpa:"):
            settings["attention_backend"] = token.partition(":")[2]
        elif token in ("cl", "nocl"):
            settings["channels_last"] = token == "cl"
        elif token in _DTYPES:
            settings["dtype"] = _DTYPES[token]
        elif token == "fused":
            settings["fuse_qkv"] = True
        elif token.startswith("vae") and token[3:].isdigit():
            settings["vae_batch_size"] = int(token[3:])
        elif token.startswith("c") and token[1:].isdigit():
            settings["captions_per_batch"] = int(token[1:])
        else:
            raise ValueError(f"variant {name!r}: cannot read {token!r}; expected tokens c<N>, "
                             "vae<N>, cl, nocl, fp16, bf16, fp32, fused, compile[:<mode>] "
                             "(max_autotune, reduce_overhead, ...), "
                             "sdpa:<flash|efficient|cudnn|math>, joined by '-'")
    return settings


def generation_flops(args) -> dict:
    """FLOPs per generated image at ``args.steps`` with guidance (2 UNet rows per step), the text
    encoder's share (caption + empty prompt, ÷ images per caption) and one VAE decode."""
    model, size = ModelConfig(preset=args.preset), _size(args)
    with torch.device("meta"):
        unet = presets.load_unet(model)
        vae = presets.load_vae(model)
        text = presets.load_text_encoder(model)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.empty(2, unet.config.in_channels, size // factor, size // factor,
                          device="meta")
    states = torch.empty(2, 77, unet.config.cross_attention_dim, device="meta")
    t = torch.tensor(500, device="meta")
    ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
    with torch.no_grad():
        unet_step = count_flops(lambda: unet(latents, t, encoder_hidden_states=states))
        text_caption = count_flops(lambda: text(ids))
        decode = count_flops(lambda: vae.decode(latents[:1]))
    parts = {"unet": args.steps * unet_step, "text": text_caption / args.images_per_caption,
             "vae_decode": decode}
    return {"per_image": sum(parts.values()), "parts": parts, "unet_per_step_2_rows": unet_step,
            "shares": {k: round(v / sum(parts.values()), 4) for k, v in parts.items()}}


def _size(args) -> int:
    return presets.PRESETS[args.preset].resolution if args.size is None else args.size


def _peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def bench_naive(args, captions: list[str]) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    with torch.device(device):  # random weights initialised where they run (fast on a GPU)
        pipe = presets.load_sd_pipeline(ModelConfig(preset=args.preset), "euler", device, dtype)
    size = _size(args)

    def run(caption: str, steps: int) -> int:
        images = pipe(caption, num_images_per_prompt=args.images_per_caption,
                      num_inference_steps=steps, guidance_scale=7.5, height=size,
                      width=size).images
        for image in images:
            image.save(io.BytesIO(), format="JPEG", quality=95)
        return len(images)

    run(captions[0], args.warmup_steps)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = sum(run(c, args.steps) for c in captions)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": images / seconds,
            "peak_gpu_gib": _peak(device)}


def _drift(reference: list[bytes], images: list[bytes]) -> dict:
    """PSNR (dB; inf if equal) and max abs difference (grey levels) over one set's images."""
    a = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in reference])
    b = np.stack([np.asarray(Image.open(io.BytesIO(x)).convert("RGB")) for x in images])
    diff = a.astype(np.float64) - b
    mse = float((diff**2).mean())
    return {"psnr_db": math.inf if mse == 0 else round(10 * math.log10(255**2 / mse), 2),
            "max_abs": int(np.abs(diff).max())}


def bench_variant(args, captions: list[str], variant: str) -> tuple[dict, SDSetGenerator, list]:
    """Build the generator of ``variant``, warm it up on one batch, time all ``captions``."""
    device = torch.device(args.device)
    cfg = GenerateConfig(**{
        "images_per_caption": args.images_per_caption, "num_inference_steps": args.steps,
        "height": _size(args), "width": _size(args), "dtype": args.dtype,
        "actors": {"num_gpus": 1 if device.type == "cuda" else 0}, "image_format": "jpeg",
        "vae_batch_size": args.vae_batch_size, "encode_threads": args.encode_threads,
        **parse_variant(variant)})
    build_start = time.perf_counter()
    with torch.device(device):
        generator = SDSetGenerator(ModelConfig(preset=args.preset), cfg)
    build_s = time.perf_counter() - build_start
    rows = [{"caption_id": i + 1, "caption": c, "split": "train", "url": "", "shard_id": 0}
            for i, c in enumerate(captions)]
    timings: dict[str, float] = {}
    rejected: list[dict] = []
    with cf.ThreadPoolExecutor(cfg.encode_threads) as image_pool, \
            cf.ThreadPoolExecutor(1) as batch_pool:
        warm_start = time.perf_counter()
        generator.cfg.num_inference_steps = args.warmup_steps
        list(encoded_sets(generator, rows[:cfg.captions_per_batch], image_pool, batch_pool, {},
                          rejected=[]))
        generator.cfg.num_inference_steps = args.steps
        sync(device)
        warmup_s = time.perf_counter() - warm_start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        records = [r for batch in encoded_sets(generator, rows, image_pool, batch_pool, timings,
                                               rejected=rejected) for r in batch]
        sync(device)
        seconds = time.perf_counter() - start
    if rejected:
        raise RuntimeError(f"{variant}: {len(rejected)} sets came out non-finite: {rejected[:3]}")
    images = sum(len(r.images) for r in records)
    result = {"settings": parse_variant(variant), "images": images, "seconds": round(seconds, 3),
              "images_per_s": images / seconds, "generate_seconds": round(
                  timings["generate_seconds"], 3), "build_s": round(build_s, 2),
              "warmup_s": round(warmup_s, 2), "peak_gpu_gib": _peak(device)}
    print(f"ours[{variant}]: {images / seconds:.2f} images/s (warm-up {warmup_s:.0f} s)",
          flush=True)
    return result, generator, records[0].images


def run(args) -> dict:
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.captions)]
    try:
        flops = generation_flops(args)
    except (AttributeError, NotImplementedError, RuntimeError) as error:
        # Another torch or transformers (the device's) may lack a meta kernel: timings still
        # count, the error is in the result, and --flops-only can count elsewhere.
        flops = {"per_image": None, "error": f"{type(error).__name__}: {error}"}
    result = {"benchmark": "generation", "machine": platform.node(), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "args": vars(args), "flops": flops}
    if args.flops_only:
        return result
    device = torch.device(args.device)
    rates: dict[str, float] = {}  # dtype → measured matmul TFLOP/s

    def mfu(row: dict, dtype: str) -> None:
        dtype = dtype if device.type == "cuda" else "float32"
        if dtype not in rates:
            rates[dtype] = measure_peak_tflops(device, getattr(torch, dtype), seconds=1.0)
        if flops["per_image"] is None:
            row["tflops"] = row["mfu"] = None
            return
        tflops = row["images_per_s"] * flops["per_image"] / 1e12  # unrounded: tiny runs are ~0.01
        row["tflops"], row["mfu"] = round(tflops, 4), round(tflops / rates[dtype], 4)

    naive = bench_naive(args, captions)
    mfu(naive, args.dtype)
    result.update(naive=naive, peak_tflops=rates, ours={})
    save(args, result)
    print(f"naive: {naive['images_per_s']:.2f} images/s", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ours, reference, best = result["ours"], None, None
    for variant in args.variants:
        row, generator, first_set = bench_variant(args, captions, variant)
        mfu(row, generator.cfg.dtype)
        reference = reference or first_set
        row["drift_vs_" + args.variants[0]] = _drift(reference, first_set)
        ours[variant] = row
        save(args, result)  # a part cut short by the device call's timeout keeps what it did
        if best is None or row["images_per_s"] > ours[best[0]]["images_per_s"]:
            best = (variant, generator)
        del generator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.update(ratio={v: round(r["images_per_s"] / naive["images_per_s"], 3)
                         for v, r in ours.items()})
    fastest = ours[best[0]]
    result["goals"] = {"fastest": best[0], "at_issue_settings": (
        args.preset == "sd21-base-random" and args.steps == 50 and device.type == "cuda"
        and args.images_per_caption == 25 and _size(args) == 512),
                       **{name: {"value": round(value, 3), "goal": f">= {GOALS[name]}",
                                 "met": value >= GOALS[name]}
                          for name, value in (("images_per_s", fastest["images_per_s"]),
                                              ("vs_naive", result["ratio"][best[0]]),
                                              ("mfu", fastest["mfu"] or 0.0))}}
    if args.profile:  # where the fastest variant's time goes: one batch at --profile-steps steps
        generator = best[1]
        generator.cfg.num_inference_steps = args.profile_steps
        chunk = captions[:generator.cfg.captions_per_batch]
        summary = profile_summary(lambda: generator.generate(chunk, list(range(len(chunk)))),
                                  device)
        result["profile"] = {"variant": best[0], "steps": args.profile_steps, **summary}
        print(summary["table"], flush=True)
    return result


def save(args, result: dict) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16", help="on CUDA, unless a variant says")
    parser.add_argument("--captions", type=int, default=4, help="timed captions")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps (paper: 50)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--images-per-caption", type=int, default=25)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--encode-threads", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="pixels; default: the preset's")
    parser.add_argument("--variants", nargs="+", default=["c2"],
                        help="ours, each built and timed; the first is the drift reference")
    parser.add_argument("--flops-only", action="store_true",
                        help="count FLOPs per image on the meta device, no timings")
    parser.add_argument("--profile", action="store_true",
                        help="profile one batch of the fastest variant (where the time goes)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    for variant in args.variants:  # a bad variant fails here, not after minutes of work
        GenerateConfig(actors={"num_gpus": 0}, **parse_variant(variant))
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=2))
    for variant, ratio in result.get("ratio", {}).items():
        row = result["ours"][variant]
        print(f"naive {result['naive']['images_per_s']:.2f} images/s | ours[{variant}] "
              f"{row['images_per_s']:.2f} images/s, MFU {row['mfu'] or 0:.1%} | ratio "
              f"{ratio:.2f}x")
    save(args, result)
    return result


if __name__ == "__main__":
    main()
