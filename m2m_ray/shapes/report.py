"""Does a shapes-MIS follow its captions? Per-attribute agreement of every image with its set's
caption, and within-set diversity against the renderer's own: the shapes-world counterpart of
"the 25 images of a set share their caption's content" (paper §4).

    python -m m2m_ray.shapes.report outputs/shapes/mis --out outputs/shapes/mis_report

A set's target attributes come from its ``url`` (``shapes://<shape>/<colour>/<background>/<seed>``,
written by ``m2m_ray.shapes.world.write_caption_tsv``), else from the words of its caption
(``caption_attributes``). Writes ``report.json``, ``report.md`` and ``report.png``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from typing import Any

import numpy as np
from PIL import Image

from m2m_ray import storage
from m2m_ray.formats.mis_read import iter_mis
from m2m_ray.shapes import world
from m2m_ray.shapes.evaluate import (
    SCORED,
    agreement,
    renderer_diversity,
    within_set_diversity,
)
from m2m_ray.shapes.readout import AttributeReadout


def targets_of(url: str, caption: str) -> dict[str, str | None]:
    """The attributes a MIS set was asked for (see the module docstring)."""
    if url.startswith("shapes://"):
        shape, colour, background, _seed = url.removeprefix("shapes://").split("/")
        return {"shape": shape, "colour": colour, "background": background}
    return world.caption_attributes(caption)


def mis_report(root: str, fmt: str = "parquet", max_sets: int | None = None,
               readout: AttributeReadout | None = None, seed: int = 0) -> dict[str, Any]:
    readout = readout or AttributeReadout.load()
    sets, targets, captions = [], [], []
    for sample in itertools.islice(iter_mis(root, fmt), max_sets):
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
        "all_three": round(float(np.mean([all(predicted[a][i] == per_image[i][a] for a in SCORED)
                                          for i in range(len(per_image))])), 4),
        "sets_with_majority_agreement": {a: round(float(np.mean([s[a] > 0.5 for s in set_agreement
                                                                 if s[a] is not None])), 4)
                                         for a in SCORED},
        "chance": {a: round(1 / len(world.ATTRIBUTES[a]), 4) for a in SCORED},
        "diversity": within_set_diversity(images),
        "renderer_diversity": renderer_diversity(known, per_set, seed) if known else None,
        "examples": [{"caption": c, "target": t, "agreement": s}
                     for c, t, s in list(zip(captions, targets, set_agreement))[:8]],
    }


def write_report(report: dict[str, Any], out: str) -> dict[str, str]:
    """``report.json``, ``report.md`` and ``report.png`` under ``out`` (local or s3://)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [f"| {a} | {report['agreement'][a]:.3f} | {report['chance'][a]:.3f} | "
            f"{report['sets_with_majority_agreement'][a]:.3f} |" for a in SCORED]
    markdown = "\n".join([
        f"# shapes-MIS: agreement with the captions ({report['sets']} sets × "
        f"{report['images_per_set']} images)", "",
        "| attribute | images agreeing | chance | sets with > 50% agreeing |", "|---|---|---|---|",
        *rows, "",
        f"- all three attributes right: {report['all_three']:.3f} of images",
        f"- within-set diversity (mean pairwise L1, pixels in [0, 1]): {report['diversity']:.4f}; "
        f"the renderer's own for the same attributes: {report['renderer_diversity']}", ""])
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
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
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    files = {"json": storage.join(out, "report.json"), "md": storage.join(out, "report.md"),
             "png": storage.join(out, "report.png")}
    storage.write_bytes(files["json"], json.dumps(report, indent=2).encode())
    storage.write_bytes(files["md"], markdown.encode())
    storage.write_bytes(files["png"], png.getvalue())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="shapes-MIS root (build_mis output_uri)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", default="parquet", choices=["parquet", "webdataset"])
    parser.add_argument("--max-sets", type=int, default=None)
    args = parser.parse_args(argv)
    report = mis_report(args.root, args.format, args.max_sets)
    files = write_report(report, args.out)
    print(json.dumps({k: report[k] for k in ("sets", "agreement", "all_three", "diversity",
                                             "renderer_diversity")}, indent=2))
    print(f"wrote {files['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
