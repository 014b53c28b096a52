"""Stage-2 generator vs the code a user writes first, images/s end to end (generate + JPEG encode).

    # CPU, tiny preset (this repo's CI machine)
    python benchmarks/generation.py --preset tiny --captions 8 --steps 20
    # GPU, full SD-2.1-base shapes with random weights (no Ray, no download)
    python benchmarks/generation.py --preset sd21-base-random --device cuda --dtype float16 \
        --captions 4 --steps 30 --variants cl-vae8-c2 nocl-vae8-c2 nocl-vae25-c1

Baseline ("naive"): ``StableDiffusionPipeline(...)(caption, num_images_per_prompt=25)`` once per
caption, PIL images out, each saved as JPEG in the same thread — what a user writes first.
Ours: ``SDSetGenerator`` (captions encoded once, ``captions_per_batch`` captions × 25 images × 2
guidance branches in one UNet batch, noise from per-image seeds, VAE decode in chunks) with JPEG
encoding on a thread pool overlapped with the next batch's denoising (``encoded_sets``). Same
captions, steps, scheduler (Euler), guidance 7.5 and size. One warm-up batch each, not timed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2m_ray.mis.config import GenerateConfig  # noqa: E402
from m2m_ray.mis.generate import SDSetGenerator, encoded_sets  # noqa: E402
from m2m_ray.models import presets  # noqa: E402
from m2m_ray.models.config import ModelConfig  # noqa: E402

CAPTIONS = [
    "a red fox standing in fresh snow at dawn", "an old lighthouse on a rocky coast",
    "a bowl of ramen with egg and scallions", "a watercolor painting of a small village",
    "<PERSON> riding a bicycle through a park", "a modern kitchen with white cabinets",
    "a close-up photo of a monarch butterfly", "a vintage car parked on a city street",
    "a mountain lake reflecting pine trees", "a cartoon robot holding a balloon",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_naive(args, captions: list[str]) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    pipe = presets.load_sd_pipeline(ModelConfig(preset=args.preset), "euler", device, dtype)
    size = presets.PRESETS[args.preset].resolution if args.size is None else args.size

    def run(caption: str) -> int:
        images = pipe(caption, num_images_per_prompt=args.images_per_caption,
                      num_inference_steps=args.steps, guidance_scale=7.5, height=size,
                      width=size).images
        for image in images:
            image.save(io.BytesIO(), format="JPEG", quality=95)
        return len(images)

    run(captions[0])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    images = sum(run(c) for c in captions)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "peak_gpu_gib": peak}


def bench_ours(args, captions: list[str]) -> dict[str, dict]:
    """One generator, timed once per variant ``<cl|nocl>-vae<N>-c<C>`` (UNet memory format,
    latents per VAE decode call, captions per UNet batch), so the variants share one model build."""
    device = torch.device(args.device)
    size = presets.PRESETS[args.preset].resolution if args.size is None else args.size
    cfg = GenerateConfig(images_per_caption=args.images_per_caption, num_inference_steps=args.steps,
                         height=size, width=size, dtype=args.dtype,
                         actors={"num_gpus": 1 if device.type == "cuda" else 0},
                         image_format="jpeg",
                         vae_batch_size=args.vae_batch_size, encode_threads=args.encode_threads)
    generator = SDSetGenerator(ModelConfig(preset=args.preset), cfg)
    image_pool = cf.ThreadPoolExecutor(cfg.encode_threads)
    batch_pool = cf.ThreadPoolExecutor(1)
    rows = [{"caption_id": i + 1, "caption": c, "split": "train", "url": "", "shard_id": 0}
            for i, c in enumerate(captions)]
    results = {}
    for variant in args.variants:
        layout, vae, per_batch = variant.split("-")
        generator.pipe.unet.to(memory_format=torch.channels_last if layout == "cl"
                               else torch.contiguous_format)
        generator.cfg.vae_batch_size = generator.codec.vae_batch_size = int(vae.removeprefix("vae"))
        generator.cfg.captions_per_batch = int(per_batch.removeprefix("c"))
        list(encoded_sets(generator, rows[:generator.cfg.captions_per_batch], image_pool,
                          batch_pool, {}, rejected=[]))
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        rejected: list[dict] = []
        images = sum(len(r.images) for batch in encoded_sets(generator, rows, image_pool,
                                                              batch_pool, timings,
                                                              rejected=rejected) for r in batch)
        if rejected:
            raise RuntimeError(f"{len(rejected)} sets came out non-finite: {rejected[:3]}")
        _sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        results[variant] = {"images": images, "seconds": seconds, "images_per_s": images / seconds,
                            "generate_seconds": timings["generate_seconds"], "peak_gpu_gib": peak}
        print(f"ours[{variant}]: {images / seconds:.2f} images/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--captions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images-per-caption", type=int, default=25)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--encode-threads", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="pixels; default: the preset's")
    parser.add_argument("--variants", nargs="+", default=["cl-vae8-c2"],
                        help="ours, each timed: <cl|nocl>-vae<latents per VAE call>-c<captions "
                        "per UNet batch>")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.captions)]
    naive = bench_naive(args, captions)
    ours = bench_ours(args, captions)
    result = {
        "machine": platform.node(), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__, "args": vars(args), "naive": naive, "ours": ours,
        "ratio": {v: r["images_per_s"] / naive["images_per_s"] for v, r in ours.items()},
    }
    print(json.dumps(result, indent=2))
    for variant, ratio in result["ratio"].items():
        print(f"naive {naive['images_per_s']:.2f} images/s | ours[{variant}] "
              f"{ours[variant]['images_per_s']:.2f} images/s | ratio {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
