"""The shapes world's visual procedures: the VGSI task (paper §8.5.2) in miniature.

A **procedure** stacks ``S`` objects (default 6) one per step into a fixed grid of ``S`` slots,
bottom row first, left to right, then the row above: step ``k`` (0-based) shows ``k + 1``
objects, each placed object staying where it was. The step is therefore countable from the image
alone (``read_step``), while each procedure has its own look, drawn with ``world.py``'s
attributes and nuisances: shape, colour, background (plain / stripes / dots), the background's
greys, stripe angle and phase, the objects' size; each object its own rotation, hue jitter and a
small offset inside its slot. A model that continues a procedure must take the look from the
context images and the step from the position condition.

    proc = sample_procedure(np.random.default_rng(0))      # 6 steps
    images = proc.render_all()                              # uint8 [6, 32, 32, 3]
    read_steps(images)                                      # array([0, 1, 2, 3, 4, 5])

``write_vgsi_layout`` writes procedures in the exact layout of the VGSI dataset (Yang et al.,
2021) — ``WikihowText_data.json`` (JSON lines, one article per line) and ``wiki_images/
<step_id>.png`` — so ``m2m_ray.mis.tasks.vgsi.iter_vgsi_sets`` reads them like the real thing:
goal "How to Stack Red Squares", methods "Method 1", "Method 2"..., headlines "Place the first
square." ...; ``img`` is a ``shapes://procedure/...`` URI naming the render (the real dataset's
is the image's wikiHow URL; neither is used to find the file).

**Read-out** (``read_step``): the background is neutral grey and the objects saturated, so a slot
is occupied when at least 4 % of its pixels are saturated (the smallest object covers ≥ 9 % of
its slot, an empty slot 0 %); the step is the count of occupied slots minus 1. Measured on fresh
renders with ``python -m m2m_ray.shapes.procedures --measure 2000 --seed 1`` (2,000 procedures ×
6 steps = 12,000 images, 32 px): accuracy **1.0000** (12,000 / 12,000), and the same on
``degrade``d copies (Gaussian blur 0.6 px + pixel noise σ = 6/255). Same seed: 9 and 12 steps
(3 × 3 and 4 × 3 slots, 500 procedures each) and 64 px (500): 1.0000 each; 300 procedures (1,800
images) through the shapes VAE (``presets.load_vae``, posterior mean, seed 1): 1.0000.

CLI: ``python -m m2m_ray.shapes.procedures --out DIR --count N --seed S [--steps 6]
[--methods 1] [--size 32]``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from m2m_ray import storage as st
from m2m_ray.mis.tasks.vgsi import IMAGE_SUFFIX, IMAGES_DIR, JSON_NAME
from m2m_ray.shapes.world import (
    HUE_JITTER,
    HUES,
    Attributes,
    ShapeObject,
    render,
    sample_attributes,
)

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

DEFAULT_STEPS = 6
SATURATED = 0.4              # (max − min) / max of a pixel: the grey background is 0, objects ~0.85
OCCUPIED_FRACTION = 0.04     # of a slot's pixels saturated: an object (≥ 0.09 measured; empty: 0)
SLOT_MARGIN = 0.03           # of the image width kept free at a slot's edges (no spill-over)
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
             "ninth", "tenth", "eleventh", "twelfth")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
_BACKGROUND_WORDS = {"plain": "plain grey", "stripes": "striped", "dots": "dotted"}


def grid(steps: int) -> tuple[int, int]:
    """``(columns, rows)`` of the slot grid for ``steps`` steps: near-square, ``columns ≥ rows``."""
    if steps < 1:
        raise ValueError(f"steps={steps}: a procedure needs at least 1 step")
    columns = math.ceil(math.sqrt(steps))
    return columns, math.ceil(steps / columns)


def slot_boxes(steps: int) -> list[tuple[float, float, float, float]]:
    """The slots in fill order (bottom row first, left to right): ``(x0, y0, x1, y1)`` in [0, 1]
    of the image width/height."""
    columns, rows = grid(steps)
    boxes = []
    for index in range(steps):
        row, column = rows - 1 - index // columns, index % columns
        boxes.append((column / columns, row / rows, (column + 1) / columns, (row + 1) / rows))
    return boxes


@dataclass(frozen=True)
class Procedure:
    """One procedure: ``look`` holds its attributes and all ``steps`` objects in fill order."""

    look: Attributes
    steps: int

    def attributes_at(self, step: int) -> Attributes:
        """The picture after step ``step`` (0-based): the first ``step + 1`` objects."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} outside [0, {self.steps})")
        return replace(self.look, objects=self.look.objects[:step + 1])

    def render_step(self, step: int, size: int = 32) -> np.ndarray:
        """uint8 ``[size, size, 3]``."""
        return render(self.attributes_at(step), size)

    def render_all(self, size: int = 32) -> np.ndarray:
        """uint8 ``[steps, size, size, 3]``, step 0 first."""
        return np.stack([self.render_step(k, size) for k in range(self.steps)])


def sample_procedure(rng: np.random.Generator, steps: int = DEFAULT_STEPS,
                     shape: str | None = None, colour: str | None = None,
                     background: str | None = None) -> Procedure:
    """Draw a procedure's look (those attributes given are fixed) and its objects from ``rng``."""
    look = sample_attributes(rng, shape, colour, background, count=1)
    boxes = slot_boxes(steps)
    cell = min(boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1])
    radius = float(rng.uniform(0.36, 0.44)) * cell      # circumradius, one size per procedure
    objects = []
    for x0, y0, x1, y1 in boxes:
        # the object's centre moves only as far as keeps it inside its slot, so slots stay apart
        free_x = max(0.0, (x1 - x0) / 2 - radius - SLOT_MARGIN)
        free_y = max(0.0, (y1 - y0) / 2 - radius - SLOT_MARGIN)
        objects.append(ShapeObject(
            (x0 + x1) / 2 + float(rng.uniform(-free_x, free_x)),
            (y0 + y1) / 2 + float(rng.uniform(-free_y, free_y)), radius,
            float(rng.uniform(0, 360)),
            HUES[look.colour] + float(rng.uniform(-HUE_JITTER, HUE_JITTER))))
    return Procedure(replace(look, objects=tuple(objects)), steps)


# --- the read-out --------------------------------------------------------------------------------


def occupied_slots(images: np.ndarray, steps: int = DEFAULT_STEPS) -> np.ndarray:
    """bool ``[N, steps]``: which slots of uint8 RGB ``images`` ``[N, H, W, 3]`` hold an object."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images of shape {images.shape}: expected [N, H, W, 3] RGB")
    rgb = images.astype(np.float32)
    top, bottom = rgb.max(-1), rgb.min(-1)
    saturated = (top - bottom) > SATURATED * np.maximum(top, 1.0)
    height, width = images.shape[1:3]
    occupied = np.zeros((len(images), steps), dtype=bool)
    for index, (x0, y0, x1, y1) in enumerate(slot_boxes(steps)):
        box = saturated[:, round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)]
        occupied[:, index] = box.mean(axis=(1, 2)) >= OCCUPIED_FRACTION
    return occupied


def read_steps(images: np.ndarray, steps: int = DEFAULT_STEPS) -> np.ndarray:
    """int64 ``[N]``: the 0-based step each uint8 RGB image ``[N, H, W, 3]`` shows (occupied slots
    − 1, clipped to ``[0, steps)``; an image with no object reads as step 0)."""
    count = occupied_slots(images, steps).sum(axis=1)
    return np.clip(count - 1, 0, steps - 1).astype(np.int64)


def read_step(image_rgb: np.ndarray, steps: int = DEFAULT_STEPS) -> int:
    """The 0-based step one uint8 RGB image ``[H, W, 3]`` shows."""
    return int(read_steps(np.asarray(image_rgb)[None], steps)[0])


def degrade(images: np.ndarray, rng: np.random.Generator, blur: float = 0.6,
            noise: float = 6.0) -> np.ndarray:
    """A VAE-like softening of uint8 ``[N, H, W, 3]``: Gaussian blur (px) + pixel noise (σ, of 255)."""
    out = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(blur)), np.float32)
           for im in images]
    noisy = np.stack(out) + rng.normal(0.0, noise, (len(images),) + images.shape[1:])
    return noisy.round().clip(0, 255).astype(np.uint8)


def measure_readout(count: int, seed: int, steps: int = DEFAULT_STEPS, size: int = 32
                    ) -> dict[str, float | int]:
    """Read-out accuracy on ``count`` fresh procedures (``count × steps`` images) drawn from
    ``seed``: clean renders and the ``degrade``d ones."""
    rng = np.random.default_rng(seed)
    clean = degraded = 0
    for _ in range(count):
        images = sample_procedure(rng, steps).render_all(size)
        truth = np.arange(steps)
        clean += int((read_steps(images, steps) == truth).sum())
        degraded += int((read_steps(degrade(images, rng), steps) == truth).sum())
    total = count * steps
    return {"images": total, "correct": clean, "accuracy": clean / total,
            "degraded_correct": degraded, "degraded_accuracy": degraded / total}


# --- the VGSI layout ------------------------------------------------------------------------------


class VgsiLayout(NamedTuple):
    json_uri: str
    image_root: str
    articles: int
    sets: int
    images: int


def _ordinal(n: int) -> str:
    """1 → "first" … 12 → "twelfth", then "13th", "21st"."""
    if n <= len(_ORDINALS):
        return _ORDINALS[n - 1]
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def procedure_texts(proc: Procedure) -> dict[str, object]:
    """The wikiHow texts of a procedure: ``goal``, ``goal_description``, ``headlines`` and
    ``descriptions`` (one per step)."""
    shape, colour = proc.look.shape, proc.look.colour
    shapes = _PLURALS[shape]
    columns, _ = grid(proc.steps)
    background = _BACKGROUND_WORDS[proc.look.background]
    return {
        "goal": f"How to Stack {colour.title()} {shapes.title()}",
        "goal_description": f"Stack {proc.steps} {colour} {shapes} in rows of {columns}, the "
                            "bottom row first.",
        "headlines": [f"Place the {_ordinal(k + 1)} {shape}." for k in range(proc.steps)],
        "descriptions": [f"Put a {colour} {shape} in the next free place; {k + 1} of "
                         f"{proc.steps} {shapes} now stand on the {background} background."
                         for k in range(proc.steps)],
    }


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def write_vgsi_layout(out_root: str, count: int, seed: int, size: int = 32,
                      steps: int = DEFAULT_STEPS, methods: int = 1,
                      storage_cfg: "StorageConfig | None" = None) -> VgsiLayout:
    """Write ``count`` articles of ``methods`` procedures each in the VGSI layout under
    ``out_root`` (local or s3://): ``WikihowText_data.json`` and ``wiki_images/<step_id>.png``.

    Article ``i``'s ``file_id`` is ``seed · 10⁷ + i`` (unique across seeds for count ≤ 10⁷); its
    methods share the goal's shape and colour and each draw their own background and nuisances;
    method ``m`` of article ``i`` is drawn from ``default_rng([seed, i, m])``, so a bigger count
    keeps the first articles as they were. ``step_id`` = ``<file_id>_<m>_<k>`` as in VGSI."""
    if count < 0 or methods < 1:
        raise ValueError(f"count={count}, methods={methods}: expected count ≥ 0, methods ≥ 1")
    image_root = st.join(out_root, IMAGES_DIR)
    st.makedirs(image_root, storage_cfg)
    lines, images = [], 0
    for i in range(count):
        file_id = str(seed * 10**7 + i)
        first = sample_procedure(np.random.default_rng([seed, i, 0]), steps)
        goal = procedure_texts(first)
        article: dict[str, object] = {  # the real file's key order
            "file_id": file_id, "goal": goal["goal"], "goal_description": goal["goal_description"],
            "category_hierarchy": ["Shapes World", "Stacking"], "methods": []}
        for m in range(methods):
            proc = first if m == 0 else sample_procedure(
                np.random.default_rng([seed, i, m]), steps, first.look.shape, first.look.colour)
            texts = procedure_texts(proc)
            method_steps = []
            for k in range(steps):
                step_id = f"{file_id}_{m}_{k}"
                st.write_bytes(st.join(image_root, step_id + IMAGE_SUFFIX),
                               _png(proc.render_step(k, size)), storage_cfg)
                images += 1
                method_steps.append({
                    "headline": texts["headlines"][k], "description": texts["descriptions"][k],
                    "img": f"shapes://procedure/{proc.look.shape}/{proc.look.colour}/"
                           f"{proc.look.background}/{seed}/{i}/{m}/{k}",
                    "img_license": "generated (m2m_ray shapes world)", "step_id": step_id})
            article["methods"].append({"name": f"Method {m + 1}", "steps": method_steps})
        lines.append(json.dumps(article))
    json_uri = st.join(out_root, JSON_NAME)
    st.write_bytes(json_uri, "".join(line + "\n" for line in lines).encode(), storage_cfg)
    return VgsiLayout(json_uri, image_root, count, count * methods, images)


def main(argv: list[str] | None = None) -> int:
    """``python -m m2m_ray.shapes.procedures --out DIR --count N --seed S``: shapes procedures in
    the VGSI layout; ``--measure N`` measures the step read-out on N fresh procedures instead."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", help="folder (local or s3://) for WikihowText_data.json and "
                                      "wiki_images/")
    parser.add_argument("--count", type=int, default=64, help="articles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--methods", type=int, default=1, help="procedures per article")
    parser.add_argument("--size", type=int, default=32, help="image side, px")
    parser.add_argument("--measure", type=int, metavar="N",
                        help="measure the read-out on N fresh procedures (no files written)")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_readout(args.measure, args.seed, args.steps, args.size)))
        return 0
    if not args.out:
        parser.error("--out is required (or --measure N)")
    layout = write_vgsi_layout(args.out, args.count, args.seed, args.size, args.steps, args.methods)
    print(f"wrote {layout.sets} procedures ({layout.images} images) to {layout.json_uri} and "
          f"{layout.image_root}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
