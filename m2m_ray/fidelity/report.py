"""The one report writer of the fidelity tools: JSON, Markdown, plot, contact sheet and the resolved
config, side by side at one ``.json`` path (local or s3://).

    out = outputs/shapes/fidelity/fidelity.json
    → fidelity.json, fidelity.md, fidelity.png (plot), fidelity_sheet.png, fidelity_config.json
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

from m2m_ray import storage

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from m2m_ray.fidelity.config import _ReportConfig


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_paths(out: str) -> dict[str, str]:
    """The files written for the report at ``out`` (a ``.json`` path)."""
    stem = out.removesuffix(".json")
    return {"json": out, "md": f"{stem}.md", "png": f"{stem}.png",
            "sheet": f"{stem}_sheet.png", "config": f"{stem}_config.json"}


def write_report(cfg: "_ReportConfig", results: dict[str, Any], markdown: str,
                 figure: "Figure", sheet: "Image.Image | None" = None) -> dict[str, str]:
    """Write ``results`` (JSON-ready: no arrays), ``markdown``, ``figure`` (PNG at 100 dpi; closed
    here), ``sheet`` (if any) and ``cfg`` itself (``storage.save_config``) at ``cfg.out``'s
    paths; returns the paths written.

    Raises ``TypeError`` when ``results`` holds something JSON cannot write (e.g. image arrays)."""
    paths = report_paths(cfg.out)
    if sheet is None:
        del paths["sheet"]
    else:
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        storage.write_bytes(paths["sheet"], buffer.getvalue(), cfg.storage)
    storage.write_bytes(paths["json"], json.dumps(results, indent=2).encode(), cfg.storage)
    storage.write_bytes(paths["md"], markdown.encode(), cfg.storage)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    pyplot().close(figure)
    storage.write_bytes(paths["png"], png.getvalue(), cfg.storage)
    storage.save_config(cfg, paths["config"], cfg.storage)
    return paths
