"""Does the task condition steer generation? The shapes world's two fine-tuning tasks (paper §8.5),
measured on their test sets with read-outs of what the condition asks for.

- ``views``: K posed views of a box (Zero123 layout, m2m_ray.shapes.views) → M views at requested
  cameras chosen at random among the other orbit views; the azimuth read-out of each generated view
  against the requested camera's azimuth (median and mean absolute error, degrees; chance ≈ 90°).
- ``procedures``: the first K steps of a procedure (VGSI layout, m2m_ray.shapes.procedures) → M
  steps at requested positions chosen at random among the later steps (increasing); the step
  read-out of each generated image against the requested position (accuracy; chance = 1 / the
  number of later steps, and always-the-next-step is reported too).

Each with the task condition (s_T = ``sample.task_guidance_scale`` > 0, eq. 7) and with it dropped
(s_T = 0: the image-guided prediction alone), same seeds. Writes the report at ``out``
(``m2m_ray.fidelity.report``: JSON, Markdown, plot, and a contact sheet: per set, context |
generated with the condition | generated without | the real images at the requested conditions).

    python -m m2m_ray.fidelity.task --config configs/shapes/task_fidelity_views.yaml
    python -m m2m_ray.fidelity.task --config configs/shapes/task_fidelity_procedures.yaml \\
        --out=benchmarks/results/task_fidelity_procedures.json --threads=1

Any ``TaskFidelityConfig`` key can be overridden as ``--a.b=value``.
"""

from __future__ import annotations

import io
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from m2m_ray.data.tasks import camera_inputs
from m2m_ray.fidelity.config import TaskFidelityConfig, parse_config
from m2m_ray.fidelity.report import pyplot, write_report
from m2m_ray.formats.mis_read import iter_mis
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.sampling.pipeline import M2MPipeline
from m2m_ray.shapes.procedures import read_step
from m2m_ray.shapes.views import azimuth_error, camera_azimuth, read_azimuth
from m2m_ray.viz import contact_sheet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The two runs, as named in the results: with the task condition, and with it dropped (s_T = 0).
MODES = ("condition", "dropped")


def choose(task: str, rng: np.random.Generator, n: int, K: int, M: int) -> np.ndarray:
    """Image indices of one trial: K context, then M targets (see the module docstring)."""
    if task == "views":
        order = rng.permutation(n)
        return np.concatenate([order[:K], order[K:K + M]])
    later = np.sort(rng.choice(np.arange(K, n), size=M, replace=False))
    return np.concatenate([np.arange(K), later])


def conditions(task: str, stored: dict, indices: np.ndarray, camera_frame: str):
    """The trial's ``TaskConditions`` ``[1, K + M]`` from a set's stored ``task`` column (cameras
    made relative to the first image when ``camera_frame`` is relative)."""
    if task == "views":
        camera = camera_inputs(np.asarray(stored["camera"])[indices], camera_frame)  # (K+M, 12)
        return TaskConditions(camera=torch.from_numpy(camera)[None])
    position = np.asarray(stored["position"], dtype=np.float32)[indices]
    return TaskConditions(position=torch.from_numpy(position)[None])


def read(task: str, image: np.ndarray) -> float:
    """The read-out of a uint8 ``[H, W, 3]`` image: its azimuth in degrees (NaN: unreadable), or
    its step."""
    if task == "views":
        return float(read_azimuth(image))
    return float(read_step(image))


def requested(task: str, stored: dict, index: int) -> float:
    """What image ``index`` of a set shows: its camera's azimuth in degrees, or its step."""
    if task == "views":
        return float(camera_azimuth(np.asarray(stored["camera"])[index]))
    return float(stored["position"][index])


def score(task: str, got: list[float], want: list[float]) -> dict[str, float]:
    """Read-outs against requests: azimuth errors (an unreadable view counts 180°), or step
    accuracy."""
    got_a, want_a = np.asarray(got), np.asarray(want)
    if task == "views":
        errors = np.where(np.isnan(got_a), 180.0, azimuth_error(got_a, want_a))
        return {"median_azimuth_error_deg": float(np.median(errors)),
                "mean_azimuth_error_deg": float(np.mean(errors)),
                "within_30deg": float(np.mean(errors <= 30)),
                "unreadable": int(np.isnan(got_a).sum())}
    return {"step_accuracy": float(np.mean(got_a == want_a))}


def run_task_fidelity(cfg: TaskFidelityConfig, command: str = ""
                      ) -> tuple[dict[str, Any], list[tuple[str, list[Image.Image]]]]:
    """Every trial of the module docstring; returns the JSON-ready results and the contact sheet's
    rows (the first 8 sets)."""
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    pipe = M2MPipeline.from_pretrained(cfg.model_path, storage=cfg.storage)
    sets = list(iter_mis(cfg.data_uri, storage_cfg=cfg.storage, split="test"))[: cfg.sets]
    if not sets:
        raise FileNotFoundError(f"no test sets in the task dataset at {cfg.data_uri}; build one "
                                f"with pipelines/build_tasks.py --config "
                                f"configs/shapes/{cfg.task}_data.yaml")
    K, M, seed = cfg.context_images, cfg.sample.num_images, cfg.sample.seed
    modes = {"condition": cfg.sample.task_guidance_scale, "dropped": 0.0}
    got: dict[str, list[float]] = {mode: [] for mode in modes}
    want: list[float] = []
    next_step: list[float] = []
    rows = []
    for s, stored_set in enumerate(sets):
        rng = np.random.default_rng([seed, s])
        images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                  for b in stored_set["images"]]
        indices = choose(cfg.task, rng, len(images), K, M)
        task = conditions(cfg.task, stored_set["task"], indices,
                          pipe.unet.config.camera_frame)
        context = [Image.fromarray(images[i]) for i in indices[:K]]
        outputs = {}
        for mode, s_t in modes.items():
            # the generator carries the seed (seed * 1000 + s), so the spec's stays at its default
            spec = cfg.sample.model_copy(update={"task_guidance_scale": s_t, "seed": 0})
            generated = pipe([*context], M, generator=torch.Generator().manual_seed(
                seed * 1000 + s), context_task=task.select(slice(0, K)),
                target_task=task.select(slice(K, K + M)), **spec.model_dump(
                    exclude={"num_images"}))
            outputs[mode] = generated
            got[mode] += [read(cfg.task, np.asarray(im)) for im in generated]
        want += [requested(cfg.task, stored_set["task"], int(i)) for i in indices[K:]]
        next_step += [float(K + m) for m in range(M)]
        if s < 8:
            rows.append((f"set {stored_set['caption_id']}: context | with condition | dropped | "
                         f"real at the requested {'cameras' if cfg.task == 'views' else 'steps'}"
                         f" {[round(w) for w in want[-M:]]}",
                         [*context, *outputs["condition"], *outputs["dropped"],
                          *[Image.fromarray(images[i]) for i in indices[K:]]]))
    results = {
        "task": cfg.task, "model": cfg.model_path, "data": cfg.data_uri, "sets": len(sets),
        "context_images": K, "generated_images": M, "s_I": cfg.sample.guidance_scale,
        "s_T": cfg.sample.task_guidance_scale, "steps": cfg.sample.num_inference_steps,
        "scheduler": cfg.sample.scheduler,
        "camera_frame": pipe.unet.config.camera_frame if cfg.task == "views" else None,
        "command": command, "machine": f"CPU, {torch.get_num_threads()} torch threads",
        **{mode: score(cfg.task, got[mode], want) for mode in modes},
    }
    if cfg.task == "procedures":
        later = [len(sets[0]["images"]) - K]
        results["chance"] = {"step_accuracy": 1.0 / later[0]}
        results["always_next_step"] = score(cfg.task, next_step, want)
    else:
        results["chance"] = {"median_azimuth_error_deg": 90.0}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results, rows


def _reference_rows(results: dict[str, Any]) -> list[str]:
    """The reference rows of the table: chance, and (procedures) always the next step."""
    return ["chance", *(["always_next_step"] if "always_next_step" in results else [])]


def render_task_markdown(results: dict[str, Any]) -> str:
    """One row per run (with the condition, dropped) and per reference, one column per score."""
    metrics = list(results["condition"])
    lines = [f"# Task fidelity: {results['task']} ({results['sets']} test sets, K = "
             f"{results['context_images']} → M = {results['generated_images']}; s_I "
             f"{results['s_I']}, s_T {results['s_T']}, {results['steps']} {results['scheduler']}"
             " steps)", "", "| run | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name in (*MODES, *_reference_rows(results)):
        cells = [results[name].get(m) for m in metrics]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(
            "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
            for v in cells) + " |")
    return "\n".join(lines) + "\n"


def render_task_plot(results: dict[str, Any]) -> "Figure":
    """Bars of the headline score (median azimuth error, or step accuracy) per run and reference."""
    metric = ("median_azimuth_error_deg" if results["task"] == "views" else "step_accuracy")
    names = [*MODES, *_reference_rows(results)]
    fig, ax = pyplot().subplots(figsize=(4.5, 3.2))
    ax.bar([n.replace("_", " ") for n in names], [results[n][metric] for n in names],
           color=["tab:blue", "tab:orange", "tab:gray", "tab:gray"][:len(names)])
    ax.set(title=f"{results['task']}: {metric.replace('_', ' ')}", ylabel=metric)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(TaskFidelityConfig, argv, __doc__.split("\n\n")[0])
    command = "python -m m2m_ray.fidelity.task " + " ".join(
        sys.argv[1:] if argv is None else argv)
    results, rows = run_task_fidelity(cfg, command)
    write_report(cfg, results, render_task_markdown(results), render_task_plot(results),
                 contact_sheet(rows, thumb=64))
    print(render_task_markdown(results))
    return results


if __name__ == "__main__":
    main()
