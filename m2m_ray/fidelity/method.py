"""Method fidelity on the shapes world: do the images M2M generates take their context's shape,
colour and background (paper §8.1–8.2, Figure 6: more context helps), and does that survive
context from outside its training distribution (§8.3's zero-shot setting)?

    python -m m2m_ray.fidelity.method --config configs/shapes/fidelity.yaml \
        --model_path=outputs/shapes/model --mis_uri=outputs/shapes/mis

Any ``MethodFidelityConfig`` key can be overridden as ``--a.b=value``
(``--sample.num_inference_steps=10``).

For S context sets and each K: the first K images of a set are the context, M images are generated
auto-regressively (``M2MPipeline.generate``), and the shapes world's attribute read-out
(``m2m_ray.shapes.readout``) reads every image. The *context's attribute* is the read-out's
majority over the K context images (ties: the earliest image's). Reported per attribute, as the
fraction of generated images that carry the context's attribute:

- ``m2m``: the model with its context, overall and per generated position k = 1..M (drift over a
  long auto-regressive run, the paper's stated limitation);
- ``context_dropped``: the same model with no context (the unconditional branch, the training's
  10% dropped sets): one image per draw, so it can follow nothing; its agreement with the context
  is the base rate, and ``base_rate`` is what independence predicts (mean over sets of the
  unconditional samples' frequency of the context's value);
- ``chance``: 1 / number of values;
- ``teacher``: the text-to-image teacher given the set's caption (MIS sets: the set's own images
  after the context, which the teacher drew from the caption; rendered sets: drawn here) — an upper
  reference: what caption-level information achieves.

Context sources: MIS test sets (the teacher's images, as in training), and images straight from
the renderer (this world's "real images"; M2M never trained on one), also for attribute
combinations held out of the teacher's captions and of shapes-MIS
(``m2m_ray.shapes.world.HELD_OUT``). Writes the report at ``out`` (``m2m_ray.fidelity.report``).
"""

from __future__ import annotations

import io
import itertools
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from m2m_ray.fidelity.config import MethodFidelityConfig, parse_config
from m2m_ray.fidelity.report import pyplot, write_report
from m2m_ray.fidelity.scoring import CHANCE, agreement_by_value
from m2m_ray.fidelity.scoring import teacher_images as teacher_images_of
from m2m_ray.formats.mis_read import iter_mis
from m2m_ray.formats.rng import Salt
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.sampling.pipeline import M2MPipeline
from m2m_ray.shapes import world
from m2m_ray.shapes.readout import AttributeReadout
from m2m_ray.shapes.world import HELD_OUT, SCORED
from m2m_ray.viz import arrow_tile, contact_sheet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from m2m_ray.config import StorageConfig


@dataclass
class ContextSets:
    """S image sets to take contexts from. ``images``: uint8 ``[S, N, H, W, 3]``, N ≥ the
    largest K; ``captions``: S strings; ``reference``: uint8 ``[S, R, H, W, 3]`` images the
    teacher drew from each caption, or None (drawn on demand)."""

    name: str
    images: np.ndarray
    captions: list[str]
    reference: np.ndarray | None = None


def mis_context_sets(root: str, split: str = "test", max_sets: int | None = 32,
                     fmt: str = "parquet", context_images: int = 4,
                     storage_cfg: "StorageConfig | None" = None) -> ContextSets:
    """The first ``max_sets`` sets of ``split`` of a shapes-MIS: images ``[:context_images]`` are
    contexts, the rest the teacher reference. Raises ``FileNotFoundError`` when there are none."""
    images, captions = [], []
    for sample in itertools.islice(iter_mis(root, fmt, storage_cfg, split=split), max_sets):
        images.append(np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                                for b in sample["images"]]))
        captions.append(sample["caption"])
    if not images:
        raise FileNotFoundError(f"no {split} sets in the {fmt} MIS at {root}; build a shapes-MIS "
                                "with pipelines/build_mis.py --config configs/shapes/build_mis.yaml")
    stacked = np.stack(images)
    return ContextSets(f"MIS {split}", stacked[:, :context_images], captions,
                       stacked[:, context_images:])


def renderer_context_sets(keys: Sequence[tuple[str, str, str]], sets_per_key: int,
                          per_set: int, seed: int, name: str = "renderer") -> ContextSets:
    """``sets_per_key`` sets of ``per_set`` fresh renders for every (shape, colour, background)
    in ``keys`` (nuisances drawn from ``seed``); captions in the world's English."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for shape, colour, background in keys:
        for _ in range(sets_per_key):
            drawn = [world.sample_attributes(rng, shape=shape, colour=colour,
                                             background=background) for _ in range(per_set)]
            images.append(np.stack([world.render(a) for a in drawn]))
            captions.append(world.caption(drawn[0], rng))
    return ContextSets(name, np.stack(images), captions)


def context_attributes(readout: AttributeReadout, context: np.ndarray) -> list[dict[str, str]]:
    """uint8 ``[S, K, H, W, 3]`` → per set the read-out's majority value of each attribute over
    its K images (ties: the earliest image's value)."""
    S, K = context.shape[:2]
    predicted = readout.predict(context.reshape(S * K, *context.shape[2:]))
    out = []
    for s in range(S):
        row = {}
        for name in SCORED:
            values = predicted[name][s * K:(s + 1) * K]
            counts = Counter(values)
            row[name] = max(values, key=lambda v: (counts[v], -values.index(v)))
        out.append(row)
    return out


def _agree(predicted: dict[str, list[str]], targets: Sequence[dict[str, str]], per: int
           ) -> np.ndarray:
    """Boolean ``[attributes, S, per]``: image j of set s carries its set's target value."""
    S = len(targets)
    return np.stack([np.array([p == targets[i // per][name] for i, p in
                               enumerate(predicted[name])]).reshape(S, per) for name in SCORED])


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` in [0, 1] → uint8 ``[..., H, W, 3]``."""
    return (pixels.clamp(0, 1) * 255).round().byte().movedim(-3, -1).numpy()


def _generate(pipe: "M2MPipeline", context: np.ndarray, spec: "SampleConfig", seed: int
              ) -> np.ndarray:
    """uint8 contexts ``[S, K, H, W, 3]`` → uint8 ``[S, M, H, W, 3]``, one seeded generator per
    set (set s: ``seed + s``), so a result does not depend on the batch it ran in. The generators
    carry the seed (this tool's scheme, which the published tables were made with), so the spec
    goes to the pipeline with ``seed`` at its default: a pipeline refuses both."""
    sets = [[Image.fromarray(image) for image in images] for images in context]
    generators = [torch.Generator().manual_seed(seed + s) for s in range(len(sets))]
    spec = spec.model_copy(update={"seed": 0})
    return _to_uint8(pipe.generate(sets, spec, generators, output_type="pt"))


def measure_fidelity(pipe: "M2MPipeline", sets: ContextSets, ks: Sequence[int],
                     spec: "SampleConfig", readout: AttributeReadout | None = None,
                     seed: int = 0, teacher_images: int = 4) -> dict[str, Any]:
    """The module docstring's table for one context source: per K in ``ks`` (each ≤ N), the
    agreement of ``spec.num_images`` generated images with the context, next to the
    context-dropped model, its base rate, chance and the teacher (sets without reference images:
    ``teacher_images`` drawn per caption; 0: no teacher column). Returns a JSON-ready dict
    (``rows[-1]["examples"]`` holds image arrays; ``write_fidelity_report`` leaves them out).

    Raises ``ValueError`` when a K exceeds the context images the sets hold."""
    readout = readout or AttributeReadout.load()
    if max(ks) > sets.images.shape[1]:
        raise ValueError(f"K up to {max(ks)} but the {sets.name} sets hold "
                         f"{sets.images.shape[1]} context images")
    S, M = len(sets.captions), spec.num_images
    # The unconditional branch: S·M independent single images with no context at all.
    single = SampleConfig(**{**spec.model_dump(), "num_images": 1})
    dropped = _generate(pipe, np.zeros((S * M, 0, *sets.images.shape[2:]), np.uint8), single,
                        seed + Salt.CONTEXT_DROPPED).reshape(S, M, *sets.images.shape[2:])
    dropped_read = readout.predict(dropped.reshape(S * M, *dropped.shape[2:]))
    reference = sets.reference
    if (reference is None or reference.shape[1] == 0) and teacher_images:
        # the teacher given each caption, through MIS stage 2's generator (Euler, guidance 7.5)
        reference = teacher_images_of("shapes", sets.captions, teacher_images,
                                      seed=seed + Salt.TEACHER_IMAGES, captions_per_batch=8, first_id=0)
    elif reference is not None and reference.shape[1] == 0:
        reference = None  # no teacher column (teacher_images=0)
    reference_read = (None if reference is None else
                      readout.predict(reference.reshape(-1, *reference.shape[2:])))
    rows = []
    for K in ks:
        targets = context_attributes(readout, sets.images[:, :K])
        generated = _generate(pipe, sets.images[:, :K], spec, seed)
        read = readout.predict(generated.reshape(S * M, *generated.shape[2:]))
        agree = _agree(read, targets, M)
        base = _agree(dropped_read, targets, M)
        teacher = (None if reference is None else
                   _agree(reference_read, targets, reference.shape[1]).mean(axis=(1, 2)))
        frequency = {name: Counter(dropped_read[name]) for name in SCORED}
        rows.append({
            "K": K,
            "m2m": _by_attribute(agree.mean(axis=(1, 2))),
            "m2m_all_three": round(float(agree.all(axis=0).mean()), 4),
            "m2m_per_k": [_by_attribute(agree[:, :, k].mean(axis=1)) for k in range(M)],
            "m2m_by_value": agreement_by_value(read, targets, M),
            "context_dropped": _by_attribute(base.mean(axis=(1, 2))),
            "base_rate": {name: round(float(np.mean([frequency[name][t[name]] / (S * M)
                                                     for t in targets])), 4) for name in SCORED},
            "teacher": None if teacher is None else _by_attribute(teacher),
            "chance": {name: CHANCE[name] for name in SCORED},
        })
        if K == max(ks):
            rows[-1]["examples"] = {"context": sets.images[:8, :K], "generated": generated[:8],
                                    "captions": sets.captions[:8]}
    return {"source": sets.name, "sets": S, "generated_images": M, "rows": rows}


def _by_attribute(values: np.ndarray) -> dict[str, float]:
    return {name: round(float(v), 4) for name, v in zip(SCORED, values)}


# --- reports ---------------------------------------------------------------------------------------


def _method(results: dict[str, Any]) -> str:
    """The paper's name of the measured variant: M2M-Self or M2M-DINO."""
    return {"self": "M2M-Self", "dino": "M2M-DINO"}.get(results["variant"],
                                                       f"M2M-{results['variant']}")


def _value_cell(value: str, split: dict[str, Any]) -> str:
    """``"square 0.42 (24; circle 0.55)"``: agreement, sets and the most frequent other value."""
    others = [(v, f) for v, f in split["generated"].items() if v != value]
    other = f"; {others[0][0]} {others[0][1]:.2f}" if others else ""
    return f"{value} {split['generated'].get(value, 0.0):.2f} ({split['sets']}{other})"


def render_fidelity_markdown(results: dict[str, Any]) -> str:
    """The Table of ``measure_fidelity`` results: one row per (source, K), one column group per
    attribute (M2M | context dropped | base rate | chance | teacher)."""
    head = ("| context source | K | " + " | ".join(
        f"{a}: M2M / dropped / base / teacher" for a in SCORED) + " | all three (M2M) |")
    lines = [f"{_method(results)} ({results['model']}); chance: "
             + ", ".join(f"{a} {CHANCE[a]:.2f}" for a in SCORED) + ".", "", head,
             "|---|---|" + "---|" * (len(SCORED) + 1)]
    for source in results["sources"]:
        for row in source["rows"]:
            teacher = row["teacher"] or {}
            cells = [f"**{row['m2m'][a]:.3f}** / {row['context_dropped'][a]:.3f} / "
                     f"{row['base_rate'][a]:.3f} / "
                     + (f"{teacher[a]:.3f}" if a in teacher else "–") for a in SCORED]
            lines.append(f"| {source['source']} ({source['sets']} sets) | {row['K']} | "
                         + " | ".join(cells) + f" | {row['m2m_all_three']:.3f} |")
    by_value = [(source, source["rows"][-1]) for source in results["sources"]
                if "m2m_by_value" in source["rows"][-1]]
    if by_value:
        lines += ["", "M2M's agreement by the context's value (largest K; sets, and the most "
                  "frequent other value generated, in brackets):", "",
                  "| context source | K | " + " | ".join(SCORED) + " |",
                  "|---|---|" + "---|" * len(SCORED)]
        lines += [f"| {source['source']} | {row['K']} | " + " | ".join(
            ", ".join(_value_cell(value, split) for value, split
                      in row["m2m_by_value"][a].items()) for a in SCORED) + " |"
            for source, row in by_value]
    drift = results.get("drift")
    if drift:
        row = drift["rows"][0]
        lines += ["", f"Per generated position k (K = {row['K']}, {drift['sets']} "
                  f"{drift['source']} sets):", "",
                  "| k | " + " | ".join(SCORED) + " |", "|---|" + "---|" * len(SCORED)]
        lines += [f"| {k + 1} | " + " | ".join(f"{values[a]:.3f}" for a in SCORED) + " |"
                  for k, values in enumerate(row["m2m_per_k"])]
    return "\n".join(lines) + "\n"


def render_fidelity_plot(results: dict[str, Any]) -> "Figure":
    """PNG: agreement against K per attribute and source (dashed: context dropped), and the
    per-k curve of the drift run."""
    plt = pyplot()
    panels = len(SCORED) + (1 if results.get("drift") else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4))
    for ax, name in zip(axes, SCORED):
        for index, source in enumerate(results["sources"]):
            ks = [row["K"] for row in source["rows"]]
            colour = f"C{index}"
            ax.plot(ks, [row["m2m"][name] for row in source["rows"]], "o-", color=colour,
                    label=source["source"])
            ax.plot(ks, [row["context_dropped"][name] for row in source["rows"]], "x--",
                    color=colour, alpha=0.6)
        ax.axhline(CHANCE[name], color="grey", lw=0.8, ls=":", label="chance")
        ax.set(title=f"{name} agreement with context", xlabel="K (context images)",
               ylim=(0, 1.02), xticks=[row["K"] for row in results["sources"][0]["rows"]])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower right")
    if results.get("drift"):
        row = results["drift"]["rows"][0]
        ax = axes[-1]
        for name in SCORED:
            ax.plot(range(1, len(row["m2m_per_k"]) + 1),
                    [values[name] for values in row["m2m_per_k"]], "o-", label=name)
        ax.set(title=f"drift: K = {row['K']}", xlabel="k (generated image)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{_method(results)} on the shapes world (dashed: context dropped)")
    fig.tight_layout()
    return fig


def fidelity_sheet(source: dict[str, Any], thumb: int = 64) -> Image.Image:
    """Contact sheet of the largest K's first sets: context | arrow | generated, caption below."""
    examples = source["rows"][-1]["examples"]
    rows = []
    for context, generated, text in zip(examples["context"], examples["generated"],
                                        examples["captions"]):
        tiles = ([Image.fromarray(i) for i in context] + [arrow_tile(context.shape[1])]
                 + [Image.fromarray(i) for i in generated])
        rows.append((text, tiles))
    return contact_sheet(rows, thumb)


def without_examples(value: Any) -> Any:
    """``results`` without the ``examples`` (image arrays) that only the contact sheet shows."""
    if isinstance(value, dict):
        return {k: without_examples(v) for k, v in value.items() if k != "examples"}
    if isinstance(value, list):
        return [without_examples(v) for v in value]
    return value


def write_fidelity_report(results: dict[str, Any], cfg: MethodFidelityConfig) -> dict[str, str]:
    """The report at ``cfg.out``: JSON (no example images), Markdown, plot, the first source's
    contact sheet and the config (``m2m_ray.fidelity.report.write_report``); returns the paths."""
    return write_report(cfg, without_examples(results), render_fidelity_markdown(results),
                        render_fidelity_plot(results), fidelity_sheet(results["sources"][0]))


def run_method_fidelity(cfg: MethodFidelityConfig, command: str = "") -> dict[str, Any]:
    """Every context source of the module docstring, then the drift run; returns the results
    (``rows[-1]["examples"]`` hold image arrays)."""
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    pipe = M2MPipeline.from_pretrained(cfg.model_path, storage=cfg.storage)
    readout = AttributeReadout.load()
    spec, K, seed = cfg.sample, max(cfg.ks), cfg.sample.seed
    seen = [k for k in itertools.product(world.SHAPES, world.COLOURS, world.BACKGROUNDS)
            if k not in HELD_OUT]
    sources = [
        mis_context_sets(cfg.mis_uri, "test", cfg.mis_sets, context_images=K,
                         storage_cfg=cfg.storage),
        renderer_context_sets(seen, cfg.renderer_sets, K, seed + Salt.RENDERER_SEEN,
                              "renderer (combinations in shapes-MIS)"),
        renderer_context_sets(HELD_OUT, max(4, cfg.renderer_sets * 4), K, seed + Salt.RENDERER_HELD_OUT,
                              "renderer (held-out combinations)"),
    ]
    results = {"model": cfg.model_path, "variant": pipe.variant, "spec": spec.model_dump(),
               "command": command, "machine": f"CPU, {torch.get_num_threads()} torch threads",
               "sources": []}
    for sets in sources:
        results["sources"].append(measure_fidelity(pipe, sets, cfg.ks, spec, readout, seed,
                                                   cfg.teacher_images))
        print(f"[fidelity] {sets.name}: {time.perf_counter() - started:.0f} s", flush=True)
    if cfg.drift:
        long = spec.model_copy(update={"num_images": cfg.drift})
        results["drift"] = measure_fidelity(pipe, sources[0], [K], long, readout, seed,
                                            cfg.teacher_images)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(MethodFidelityConfig, argv, __doc__.split("\n\n")[0])
    command = "python -m m2m_ray.fidelity.method " + " ".join(
        sys.argv[1:] if argv is None else argv)
    results = run_method_fidelity(cfg, command)
    write_fidelity_report(results, cfg)
    print(render_fidelity_markdown(results))
    return without_examples(results)


if __name__ == "__main__":
    main()
