"""Measure the shapes world's shipped models: read-out accuracy, VAE agreement, teacher agreement
(through MIS stage 2's generator) at two guidance scales, within-set diversity, and the attribute
combinations held out of the teacher's training.

    python benchmarks/shapes_world.py --out benchmarks/results/shapes_world.json

Captions: one per (shape, colour, background) combination the teacher trained on (45), written by
the shapes world's caption generator from a seed the training never used; the held-out
combinations (3) are scored separately. Every image is read out and compared with its caption's
attributes (``m2m_ray.shapes.evaluate``, ``m2m_ray.fidelity.scoring``), overall and split by the
caption's value (``by_value``: what each caption value is read as).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2m_ray.fidelity.scoring import teacher_agreement  # noqa: E402
from m2m_ray.models import presets  # noqa: E402
from m2m_ray.models.config import ModelConfig  # noqa: E402
from m2m_ray.shapes import evaluate, world  # noqa: E402
from m2m_ray.shapes.readout import AttributeReadout  # noqa: E402
from m2m_ray.shapes.world import HELD_OUT  # noqa: E402


def captions_for(keys, seed: int) -> tuple[list[str], list[dict]]:
    rng = np.random.default_rng(seed)
    captions, targets = [], []
    for shape, colour, background in keys:
        attributes = world.sample_attributes(rng, shape=shape, colour=colour, background=background)
        captions.append(world.caption(attributes, rng))
        targets.append({"shape": shape, "colour": colour, "background": background})
    return captions, targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--images-per-caption", type=int, default=25)
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5, 3.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--weights", default=None,
                        help="a folder of shapes weights in the diffusers layout (vae/, unet/, "
                             "text_encoder/, scheduler/), e.g. a reproducibility rerun of "
                             "`python -m m2m_ray.shapes.train`; default: the shipped preset")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    readout = AttributeReadout.load()
    model = ModelConfig(preset="shapes", sd_model_id=args.weights)
    trained = [k for k in itertools.product(world.SHAPES, world.COLOURS, world.BACKGROUNDS)
               if k not in HELD_OUT]
    results: dict = {
        "machine": f"CPU, {torch.get_num_threads()} torch threads",
        "weights": args.weights or "shipped (m2m_ray/models/weights/shapes)",
        "readout_held_out_renders": evaluate.readout_accuracy(readout, args.seed, 2000),
        "vae_reconstructions": evaluate.vae_agreement(presets.load_vae(model),
                                                      readout, args.seed + 1, 1000),
        "teacher": {}, "teacher_held_out_combinations": {},
    }
    for guidance in args.guidance:
        for name, keys in (("teacher", trained), ("teacher_held_out_combinations", HELD_OUT)):
            captions, targets = captions_for(keys, args.seed + 2)
            measured = teacher_agreement(
                model, captions, targets, images_per_caption=args.images_per_caption,
                guidance_scale=guidance, steps=args.steps, seed=args.seed, readout=readout)
            measured.pop("images")
            results[name][f"guidance_{guidance:g}"] = measured
            print(name, guidance, json.dumps({k: measured[k] for k in
                                              ("agreement", "all_three", "diversity",
                                               "renderer_diversity")}), flush=True)
            print("  shape by caption:", "; ".join(  # one shape's miss hides in the mean
                f"{value} {split['generated'].get(value, 0):.3f}" for value, split in
                measured["by_value"]["shape"].items()), flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
