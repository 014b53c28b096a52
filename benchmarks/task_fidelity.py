"""Does the task condition steer generation? The shapes world's two fine-tuning tasks (paper §8.5),
measured on their test sets with read-outs of what the condition asks for.

- ``views``: K posed views of a box (Zero123 layout, m2m_ray.shapes.views) → M views at requested
  cameras chosen at random among the other orbit views; the azimuth read-out of each generated view
  against the requested camera's azimuth (median and mean absolute error, degrees; chance ≈ 90°).
- ``procedures``: the first K steps of a procedure (VGSI layout, m2m_ray.shapes.procedures) → M
  steps at requested positions chosen at random among the later steps (increasing); the step
  read-out of each generated image against the requested position (accuracy; chance = 1 / the
  number of later steps, and always-the-next-step is reported too).

Each with the task condition (s_T > 0, eq. 7) and with it dropped (s_T = 0: the image-guided
prediction alone), same seeds. Writes JSON and a contact sheet (per set: context | generated with
the condition | generated without | the real images at the requested conditions).

    python benchmarks/task_fidelity.py views --model outputs/shapes/views/model \\
        --data outputs/shapes/views/data --out benchmarks/results/task_fidelity_views.json
    python benchmarks/task_fidelity.py procedures --model outputs/shapes/procedures/model \\
        --data outputs/shapes/procedures/data --out benchmarks/results/task_fidelity_procedures.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from m2m_ray.data.tasks import camera_inputs  # noqa: E402
from m2m_ray.formats.mis_read import iter_mis  # noqa: E402
from m2m_ray.viz import contact_sheet  # noqa: E402


def choose(task: str, rng: np.random.Generator, n: int, K: int, M: int) -> np.ndarray:
    """Image indices of one trial: K context, then M targets (see the module docstring)."""
    if task == "views":
        order = rng.permutation(n)
        return np.concatenate([order[:K], order[K:K + M]])
    later = np.sort(rng.choice(np.arange(K, n), size=M, replace=False))
    return np.concatenate([np.arange(K), later])


def conditions(task: str, stored: dict, indices: np.ndarray, camera_frame: str):
    from m2m_ray.models.embedders import TaskConditions

    if task == "views":
        camera = camera_inputs(np.asarray(stored["camera"])[indices], camera_frame)  # (K+M, 12)
        return TaskConditions(camera=torch.from_numpy(camera)[None])
    position = np.asarray(stored["position"], dtype=np.float32)[indices]
    return TaskConditions(position=torch.from_numpy(position)[None])


def read(task: str, image: np.ndarray) -> float:
    if task == "views":
        from m2m_ray.shapes.views import read_azimuth

        return float(read_azimuth(image))
    from m2m_ray.shapes.procedures import read_step

    return float(read_step(image))


def requested(task: str, stored: dict, index: int) -> float:
    if task == "views":
        from m2m_ray.shapes.views import camera_azimuth

        return float(camera_azimuth(np.asarray(stored["camera"])[index]))
    return float(stored["position"][index])


def score(task: str, got: list[float], want: list[float]) -> dict[str, float]:
    got_a, want_a = np.asarray(got), np.asarray(want)
    if task == "views":
        from m2m_ray.shapes.views import azimuth_error

        errors = np.where(np.isnan(got_a), 180.0, azimuth_error(got_a, want_a))
        return {"median_azimuth_error_deg": float(np.median(errors)),
                "mean_azimuth_error_deg": float(np.mean(errors)),
                "within_30deg": float(np.mean(errors <= 30)),
                "unreadable": int(np.isnan(got_a).sum())}
    return {"step_accuracy": float(np.mean(got_a == want_a))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["views", "procedures"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the task dataset (build_tasks output)")
    parser.add_argument("--out", required=True, help="results JSON (a .png sheet beside it)")
    parser.add_argument("--sets", type=int, default=48, help="test sets (all if fewer)")
    parser.add_argument("--context", type=int, default=2, help="K")
    parser.add_argument("--targets", type=int, default=2, help="M")
    parser.add_argument("--image-guidance", type=float, default=3.0, help="s_I")
    parser.add_argument("--task-guidance", type=float, default=3.0, help="s_T with the condition")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from m2m_ray.sampling.config import SampleConfig
    from m2m_ray.sampling.pipeline import M2MPipeline

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = M2MPipeline.from_pretrained(args.model)
    sets = list(iter_mis(args.data, split="test"))[: args.sets]
    K, M = args.context, args.targets
    modes = {"condition": args.task_guidance, "dropped": 0.0}
    got: dict[str, list[float]] = {mode: [] for mode in modes}
    want: list[float] = []
    next_step: list[float] = []
    rows = []
    for s, stored_set in enumerate(sets):
        rng = np.random.default_rng([args.seed, s])
        images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                  for b in stored_set["images"]]
        indices = choose(args.task, rng, len(images), K, M)
        task = conditions(args.task, stored_set["task"], indices,
                          pipe.unet.config.camera_frame)
        context = [Image.fromarray(images[i]) for i in indices[:K]]
        outputs = {}
        for mode, s_t in modes.items():
            spec = SampleConfig(num_images=M, num_inference_steps=args.steps, scheduler="euler",
                                guidance_scale=args.image_guidance, task_guidance_scale=s_t)
            generated = pipe([*context], M, generator=torch.Generator().manual_seed(
                args.seed * 1000 + s), context_task=task.select(slice(0, K)),
                target_task=task.select(slice(K, K + M)), **spec.model_dump(
                    exclude={"num_images"}))
            outputs[mode] = generated
            got[mode] += [read(args.task, np.asarray(im)) for im in generated]
        want += [requested(args.task, stored_set["task"], int(i)) for i in indices[K:]]
        next_step += [float(K + m) for m in range(M)]
        if s < 8:
            rows.append((f"set {stored_set['caption_id']}: context | with condition | dropped | "
                         f"real at the requested {'cameras' if args.task == 'views' else 'steps'}"
                         f" {[round(w) for w in want[-M:]]}",
                         [*context, *outputs["condition"], *outputs["dropped"],
                          *[Image.fromarray(images[i]) for i in indices[K:]]]))
    results = {
        "task": args.task, "model": args.model, "data": args.data, "sets": len(sets),
        "context_images": K, "generated_images": M, "s_I": args.image_guidance,
        "s_T": args.task_guidance, "steps": args.steps, "scheduler": "euler",
        "camera_frame": pipe.unet.config.camera_frame if args.task == "views" else None,
        "command": "python benchmarks/task_fidelity.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"CPU, {torch.get_num_threads()} torch threads",
        **{mode: score(args.task, got[mode], want) for mode in modes},
    }
    if args.task == "procedures":
        later = [len(sets[0]["images"]) - K]
        results["chance"] = {"step_accuracy": 1.0 / later[0]}
        results["always_next_step"] = score(args.task, next_step, want)
    else:
        results["chance"] = {"median_azimuth_error_deg": 90.0}
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    contact_sheet(rows, thumb=64).save(out.with_suffix(".png"))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
