"""Does a shapes-MIS follow its captions? Per-attribute agreement of every image with its set's
caption, and within-set diversity against the renderer's own: the shapes-world counterpart of
"the 25 images of a set share their caption's content" (paper §4).

    python -m m2m_ray.fidelity.mis_report --config configs/shapes/mis_report.yaml \\
        --mis_uri=outputs/shapes/mis --out=outputs/shapes/mis_report/report.json

A set's target attributes come from its ``url`` (``shapes://<shape>/<colour>/<background>/<seed>``,
written by ``m2m_ray.shapes.world.write_caption_tsv``), else from the words of its caption
(``caption_attributes``). Writes the report at ``out`` (``m2m_ray.fidelity.report``: JSON,
Markdown, plot, config).
"""

from __future__ import annotations

import io
import itertools
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from m2m_ray.fidelity.config import MISReportConfig, parse_config
from m2m_ray.fidelity.report import pyplot, write_report
from m2m_ray.fidelity.scoring import CHANCE, all_three, renderer_diversity, within_set_diversity
from m2m_ray.formats.mis_read import iter_mis
from m2m_ray.shapes import world
from m2m_ray.shapes.evaluate import agreement
from m2m_ray.shapes.readout import AttributeReadout
from m2m_ray.shapes.world import SCORED

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from m2m_ray.config import StorageConfig


def targets_of(url: str, caption: str) -> dict[str, str | None]:
    """The attributes a MIS set was asked for (see the module docstring)."""
    if url.startswith("shapes://"):
        shape, colour, background, _seed = url.removeprefix("shapes://").split("/")
        return {"shape": shape, "colour": colour, "background": background}
    return world.caption_attributes(caption)


def mis_report(root: str, fmt: str = "parquet", max_sets: int | None = None,
               readout: AttributeReadout | None = None, seed: int = 0,
               storage_cfg: "StorageConfig | None" = None) -> dict[str, Any]:
    """The first ``max_sets`` sets (None: all) of a shapes-MIS, read out against their captions;
    a JSON-ready dict. Raises ``FileNotFoundError`` when there are no committed sets."""
    readout = readout or AttributeReadout.load()
    sets, targets, captions = [], [], []
    for sample in itertools.islice(iter_mis(root, fmt, storage_cfg), max_sets):
        sets.append(np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                              for b in sample["images"]]))
        targets.append(targets_of(sample["url"], sample["caption"]))
        captions.append(sample["caption"])
    if not sets:
        raise FileNotFoundError(f"no committed {fmt} sets under {root}; build a shapes-MIS first")
    images = np.stack(sets)                                      # (S, N, H, W, 3)
    per_set = images.shape[1]
    predicted = readout.predict(images.reshape(-1, *images.shape[2:]))
    per_image = [t for t in targets for _ in range(per_set)]
    known = [tuple(t[a] for a in SCORED) for t in targets if all(t[a] for a in SCORED)]
    set_agreement = [agreement({a: predicted[a][i * per_set:(i + 1) * per_set] for a in SCORED},
                               [t] * per_set) for i, t in enumerate(targets)]
    return {
        "dataset": root, "format": fmt, "sets": len(sets), "images_per_set": per_set,
        "agreement": agreement(predicted, per_image),
        "all_three": all_three(predicted, per_image),
        "sets_with_majority_agreement": {a: round(float(np.mean([s[a] > 0.5 for s in set_agreement
                                                                 if s[a] is not None])), 4)
                                         for a in SCORED},
        "chance": {a: CHANCE[a] for a in SCORED},
        "diversity": within_set_diversity(images),
        "renderer_diversity": renderer_diversity(known, per_set, seed) if known else None,
        "examples": [{"caption": c, "target": t, "agreement": s}
                     for c, t, s in list(zip(captions, targets, set_agreement))[:8]],
    }


def render_mis_markdown(report: dict[str, Any]) -> str:
    """The agreement table and the diversity line of a ``mis_report``."""
    rows = [f"| {a} | {report['agreement'][a]:.3f} | {report['chance'][a]:.3f} | "
            f"{report['sets_with_majority_agreement'][a]:.3f} |" for a in SCORED]
    return "\n".join([
        f"# shapes-MIS: agreement with the captions ({report['sets']} sets × "
        f"{report['images_per_set']} images)", "",
        "| attribute | images agreeing | chance | sets with > 50% agreeing |", "|---|---|---|---|",
        *rows, "",
        f"- all three attributes right: {report['all_three']:.3f} of images",
        f"- within-set diversity (mean pairwise L1, pixels in [0, 1]): {report['diversity']:.4f}; "
        f"the renderer's own for the same attributes: {report['renderer_diversity']}", ""])


def render_mis_plot(report: dict[str, Any]) -> "Figure":
    """Agreement per attribute against chance, and within-set diversity against the renderer's."""
    figure, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    axes[0].bar(SCORED, [report["agreement"][a] for a in SCORED], color="tab:blue", label="MIS")
    axes[0].scatter(SCORED, [report["chance"][a] for a in SCORED], color="black", marker="_",
                    s=400, label="chance")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("agreement with the caption")
    axes[0].legend(loc="lower right")
    axes[1].bar(["MIS", "renderer"], [report["diversity"], report["renderer_diversity"] or 0],
                color=["tab:blue", "tab:gray"])
    axes[1].set_title("within-set diversity")
    figure.tight_layout()
    return figure


def run_mis_report(cfg: MISReportConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """``mis_report`` of ``cfg.mis_uri``, written at ``cfg.out``; returns it and the paths."""
    report = mis_report(cfg.mis_uri, cfg.format, cfg.max_sets, seed=cfg.seed,
                        storage_cfg=cfg.storage)
    files = write_report(cfg, report, render_mis_markdown(report), render_mis_plot(report))
    return report, files


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(MISReportConfig, argv, __doc__.split("\n\n")[0])
    report, files = run_mis_report(cfg)
    print(json.dumps({k: report[k] for k in ("sets", "agreement", "all_three", "diversity",
                                             "renderer_diversity")}, indent=2))
    print(f"wrote {files['md']}")
    return report


if __name__ == "__main__":
    main()
