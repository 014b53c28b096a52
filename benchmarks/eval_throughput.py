"""Evaluation costs, measured apart so a run can be sized: extractor images/s per device, reduce
rows/s per CPU task, and the driver's FID seconds (O(d³), independent of the number of images).

An evaluation of N sets with K + M images each costs N(K + M) extractions (spread over the actor
pool), N(K + M) reduced rows (spread over CPU tasks) and, on the driver, one √Σ of the context
images plus M distances at d = 2048 — this script measures each term.

    # CPU (this repo's CI machine): few images
    python benchmarks/eval_throughput.py --device cpu --images 2 --batch 2
    # GPU, no Ray, real architectures with random weights (no download)
    python benchmarks/eval_throughput.py --device cuda --images 512 --batch 64

Timed: Inception pool+logits on 512×512 uint8 images (resized to 299 inside), CLIP ViT-L/14 image
embeddings (224² inputs) and text embeddings (77 tokens); on the CPU: ``GaussianMoments.update`` of
4096 × 2048 features and ``ClassProbStats.update`` of 4096 × 1008 probabilities (one reduce batch),
and FID at d = 2048: the reference side (√Σ of the context images, once) and one distance (per k),
the driver's work. One warm-up batch, not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2m_ray.eval.inception import FIDInceptionV3  # noqa: E402
from m2m_ray.eval.stats import (  # noqa: E402
    ClassProbStats,
    FrechetReference,
    GaussianMoments,
    softmax64,
)

# openai/clip-vit-large-patch14's published architecture (weights random here).
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     projection_dim=768)
CLIP_L14_VISION = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                       num_hidden_layers=24, num_attention_heads=16, projection_dim=768)


def _timed(fn, batches: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=512, help="timed images per extractor")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = max(1, args.images // args.batch)
    n = batches * args.batch
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda"
                     else platform.processor() or platform.machine(),
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "images": n, "batch": args.batch}

    from transformers import CLIPConfig, CLIPModel

    inception = FIDInceptionV3().to(device).eval()
    clip = CLIPModel(CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=CLIP_L14_VISION,
                                projection_dim=768)).to(device).eval()
    images = torch.randint(0, 256, (args.batch, 3, 512, 512), dtype=torch.uint8, device=device)
    pixels = torch.randn(args.batch, 3, 224, 224, device=device)
    tokens = torch.randint(0, 49406, (args.batch, 77), device=device)
    with torch.inference_mode():
        for name, fn in [
            ("inception", lambda: inception(images)),
            ("clip_image", lambda: clip.get_image_features(pixel_values=pixels)),
            ("clip_text", lambda: clip.get_text_features(input_ids=tokens)),
        ]:
            seconds = _timed(fn, batches, device)
            results[f"{name}_images_per_s"] = round(n / seconds, 1)

    rng = np.random.default_rng(0)
    rows = 4096
    features = rng.normal(size=(rows, 2048)).astype(np.float32)
    probs = softmax64(rng.normal(size=(rows, 1008)))
    start = time.perf_counter()
    moments = GaussianMoments(2048).update(features)
    ClassProbStats(1008, 10).update(probs, rng.integers(0, 10, rows))
    reduce_s = time.perf_counter() - start
    results["reduce_rows_per_s_cpu"] = round(rows / reduce_s, 1)
    other = GaussianMoments(2048).update(features[::-1] * 1.1)
    start = time.perf_counter()
    reference = FrechetReference(*moments.mean_cov())  # once per evaluation (the context images)
    results["fid_reference_2048_seconds_cpu"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    reference.distance(*other.mean_cov())  # once per k
    results["fid_per_k_2048_seconds_cpu"] = round(time.perf_counter() - start, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
