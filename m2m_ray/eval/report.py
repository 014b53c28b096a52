"""Evaluation reports: ``report.json`` (everything), ``report.md`` (the paper's Table 1 layout plus
the per-k table) and ``report.png`` (each metric against k).

Every report says what its numbers were measured with — every backbone (the FID Inception and
its weights, CLIP's ViT, DINO's ViT) and every resize (one FID column per resize, the one IS
used, CLIP's and DINO's preprocessing); tiny random extractors are flagged in the title — how
many sets were evaluated and skipped and why, the split the sets came from, and the file formats
of the evaluated images (FID needs lossless generated images). Summary values are mean ± std over k = 1..M with the
population std (ddof = 0).
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from m2m_ray import storage as st
from m2m_ray.config import config_to_dict

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig
    from m2m_ray.eval.config import EvalConfig

LOSSLESS = {"png"}
MAX_LISTED_SKIPS = 100


def metrics_of(extractors: dict[str, Any], kind: str) -> list[tuple[str, str, str]]:
    """(key in a per-k row, column title, better) of the report's metrics: one FID per resize,
    IS, CLIP-T, CLIP-I and, with a DINO model, DINO (DreamBench's names); the shapes world's
    read-out measures under the same keys with their own titles."""
    resizes = list(extractors["fid"]["resizes"])
    if kind == "shapes":
        return ([(f"fid_{name}", "FID (read-out features)", "↓") for name in resizes]
                + [("is_mean", "IS (48 attribute classes)", "↑"),
                   ("clip_text", "caption agreement %", "↑"),
                   ("clip_image", "context agreement %", "↑")])
    return ([(f"fid_{name}", f"FID {name}", "↓") for name in resizes]
            + [("is_mean", "IS", "↑"), ("clip_text", "CLIP-T", "↑"),
               ("clip_image", "CLIP-I", "↑")]
            + ([("dino", "DINO", "↑")] if extractors.get("dino") else []))


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "over_k": 0}
    return {"mean": float(np.mean(present)), "std": float(np.std(present)),
            "over_k": len(present)}


# The shapes world's extractors (eval/shapes_extractors.py) measure other things under the same
# Table-1 columns: its report says what, instead of Inception and CLIPScore.
SHAPES_PROTOCOL = {
    "fid": "k-th generated image of every set vs the K context images of every set; the "
           "attribute read-out network's pooled features, float64 mean and unbiased covariance",
    "is_classes": "the 48 joint (shape, colour, background) classes of the read-out",
    "clip_text": "% of the k-th generated image's shape, colour and background read-outs that "
                 "agree with its set's caption (none for sets without a caption)",
    "clip_image": "mean over the K context images of the % of the k-th generated image's shape, "
                  "colour and background read-outs that agree with that context image's",
}


def build_report(*, cfg: "EvalConfig", generations_uri: str, sets_total: int,
                 sets_evaluated: int, skipped: list[dict[str, str]], sets_over_max_sets: int,
                 splits: dict[str, int],
                 per_k: list[dict[str, Any]], extractors: dict[str, Any],
                 image_formats: dict[str, dict[str, int]], method: str | None,
                 wall_s: float) -> dict[str, Any]:
    """The report dict. ``extractors``: ``describe_extractors(cfg.extractors)`` (every backbone
    and resize); ``per_k``: ``job.metrics_per_k`` rows; ``image_formats``: ``job.image_formats``.
    The input counts add up: ``sets_total`` (the generation's input sets) = evaluated + skipped
    (in generation or in evaluation, each with its reason) + ``sets_over_max_sets`` (readable
    sets past ``protocol.max_sets``)."""
    if sets_evaluated + len(skipped) + sets_over_max_sets != sets_total:
        raise ValueError(f"set counts do not add up: {sets_evaluated} evaluated + {len(skipped)} "
                         f"skipped + {sets_over_max_sets} over max_sets != {sets_total} input sets")
    tiny, kind = cfg.extractors.kind == "tiny", cfg.extractors.kind
    metrics = metrics_of(extractors, kind)
    titles = ", ".join(title for _, title, _ in metrics)
    lossy = sorted(set(image_formats.get("generated", {})) - LOSSLESS)
    return {
        "title": ("[TINY RANDOM EXTRACTORS: meaningless numbers] " if tiny else "")
        + ("M2M on the shapes world: " if kind == "shapes" else "M2M evaluation: ")
        + f"{titles} per generated image k",
        "extractors": {"kind": cfg.extractors.kind, **extractors},
        "image_formats": image_formats,
        "warnings": ([f"generated images stored as {', '.join(lossy)} (lossy): FID is not "
                      "comparable with FIDs of lossless images; generate with "
                      "image_format: png"] if lossy else []),
        "method": method or generations_uri.rstrip("/").rsplit("/", 1)[-1],
        "input": {
            "generations_uri": generations_uri,
            "sets_total": sets_total,
            "sets_evaluated": sets_evaluated,
            "sets_skipped": len(skipped),
            "sets_over_max_sets": sets_over_max_sets,
            "skip_reasons": dict(Counter(s["kind"] for s in skipped)),
            "skipped": skipped[:MAX_LISTED_SKIPS],
            "split": splits,
            "expected_split": cfg.protocol.split,
        },
        "protocol": {
            "context_images": cfg.protocol.context_images,
            "generated_images": cfg.protocol.generated_images,
            "fid": "k-th generated image of every set vs the K context images of every set; "
                   "Inception pool features, float64 mean and unbiased covariance over the "
                   "whole set; one FID per resize: "
                   + "; ".join(f"{name} = {what}"
                               for name, what in extractors["fid"]["resizes"].items()),
            "is": f"{cfg.is_splits} splits by a hash of set_id; mean ± std (ddof 0) over "
                  "splits; softmax of the unbiased logits; images resized as "
                  f"{extractors['is']['resize']}",
            "clip_text": f"CLIPScore w·max(100·cos, 0), w = {cfg.clip_score_weight:g}, of the "
                         "k-th generated image and its set's caption (none for sets without "
                         "a caption)",
            "clip_image": "mean over the K context images of CLIPScore (same w) of the k-th "
                          "generated image and that context image",
            **({"dino": "mean over the K context images of 100·cos of the DINO [CLS] "
                        "embeddings of the k-th generated image and that context image "
                        "(DreamBench)"} if extractors.get("dino") else {}),
            "summary": "mean ± std (ddof 0) over k = 1..M, as the paper's Table 1",
            **(SHAPES_PROTOCOL if kind == "shapes" else {}),
        },
        "per_k": per_k,
        "summary": {key: _mean_std([row[key] for row in per_k]) for key, _, _ in metrics},
        "metrics": [list(metric) for metric in metrics],  # [key, column title, better]
        "metric_titles": {key: title for key, title, _ in metrics},
        "config": config_to_dict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(wall_s, 2),
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def _backbone_lines(extractors: dict[str, Any]) -> list[str]:
    """Markdown bullets naming every backbone and every resize (``describe_extractors``)."""
    fid, inception_score = extractors["fid"], extractors["is"]
    lines = [f"- FID network: {fid['network']}; weights `{fid['weights']}`; {fid['features']}"]
    lines += [f"- FID resize `{name}`: {what}" for name, what in fid["resizes"].items()]
    lines.append(f"- IS: {inception_score['network']}, resize `{inception_score['resize']}`")
    for name, title in (("clip", "CLIP (CLIP-T, CLIP-I)"), ("dino", "DINO")):
        model = extractors.get(name)
        lines.append(f"- {title}: " + ("none" if model is None else
                                        f"{model['backbone']} (`{model['model']}`); "
                                        f"{model['preprocess']}"))
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    inp, proto, extractors = report["input"], report["protocol"], report["extractors"]
    metrics = report["metrics"]
    lines = [f"# {report['title']}", ""]
    if extractors["kind"] == "tiny":
        lines += [f"> **{extractors['label']}**", ""]
    lines += [f"> **Warning: {warning}**" for warning in report["warnings"]]
    split = ", ".join(f"{k} {v}" for k, v in inp["split"].items()) or "none"
    formats = "; ".join(f"{group}: " + ", ".join(f"{n} {suffix}" for suffix, n in counts.items())
                        for group, counts in report["image_formats"].items())
    lines += [
        f"- generations: `{inp['generations_uri']}`",
        f"- sets: {inp['sets_evaluated']} evaluated of {inp['sets_total']} input sets, "
        f"{inp['sets_skipped']} skipped"
        + (f", {inp['sets_over_max_sets']} past protocol.max_sets"
           if inp.get("sets_over_max_sets") else ""),
        f"- split of the evaluated sets: {split} (expected: {inp['expected_split']})",
        f"- K = {proto['context_images']} context images, M = {proto['generated_images']} "
        "generated images per set",
        f"- image files: {formats or 'none'}",
        "",
        "## Backbones and resizes",
        "",
        *_backbone_lines(extractors),
        "",
        "## Table 1 layout (mean ± std over k)",
        "",
        "| Method | " + " | ".join(f"{t} {b}" for _, t, b in metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
        f"| {report['method']} | " + " | ".join(
            f"{_fmt(report['summary'][k]['mean'])} ± {_fmt(report['summary'][k]['std'])}"
            for k, _, _ in metrics) + " |",
        "",
        "## Per generated image k",
        "",
        "| k | images | " + " | ".join(
            f"{t} {b}" + (" (± std over splits)" if k == "is_mean" else "")
            for k, t, b in metrics) + " |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    one_split = report["config"].get("is_splits") == 1  # no spread to show
    for row in report["per_k"]:
        lines.append(f"| {row['k']} | {row['images']} | " + " | ".join(
            (_fmt(row['is_mean']) + ("" if one_split else f" ± {_fmt(row['is_std'])}"))
            if key == "is_mean" else _fmt(row[key]) for key, _, _ in metrics) + " |")
    lines += ["", f"## Skipped sets: {inp['sets_skipped']}", ""]
    if inp["sets_skipped"]:
        lines += ["| reason | sets |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in inp["skip_reasons"].items()]
        lines += [""] + [f"- `{s['set_id']}`: {s['reason']}" for s in inp["skipped"][:20]]
        if inp["sets_skipped"] > 20:
            lines.append(f"- ... {inp['sets_skipped'] - 20} more in report.json")
    else:
        lines.append("None.")
    lines += ["", "## Protocol", ""] + [f"- {k}: {v}" for k, v in proto.items()
                                        if k not in ("context_images", "generated_images")]
    lines += ["", f"_Created {report['created']} in {report['wall_s']} s._", ""]
    return "\n".join(lines)


def render_plot(report: dict[str, Any]) -> bytes:
    """PNG bytes: one panel per metric against k (IS with its std over splits as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [row["k"] for row in report["per_k"]]
    metrics = report["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
    for ax, (key, title, better) in zip(axes, metrics):
        values = [np.nan if row[key] is None else row[key] for row in report["per_k"]]
        errors = ([np.nan if row["is_std"] is None else row["is_std"] for row in report["per_k"]]
                  if key == "is_mean" else None)
        ax.errorbar(ks, values, yerr=errors, marker="o", capsize=3)
        ax.set_title(f"{title} {better}")
        ax.set_xlabel("k (generated image)")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    tiny = report["extractors"]["kind"] == "tiny"
    fig.suptitle(("TINY RANDOM EXTRACTORS: meaningless numbers — " if tiny else "")
                 + f"{report['method']}: {report['input']['sets_evaluated']} sets",
                 color="red" if tiny else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_reports(report: dict[str, Any], output_uri: str,
                  storage: "StorageConfig | None" = None) -> dict[str, str]:
    """Write report.json, report.md and report.png under ``output_uri``; returns their URIs."""
    files = {name: st.join(output_uri, f"report.{name}") for name in ("json", "md", "png")}
    st.write_bytes(files["md"], render_markdown(report).encode("utf-8"), storage)
    st.write_bytes(files["png"], render_plot(report), storage)
    st.write_bytes(files["json"], json.dumps({**report, "files": files}, indent=2,
                                             allow_nan=False).encode("utf-8"), storage)
    return files
