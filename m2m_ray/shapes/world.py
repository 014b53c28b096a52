"""The shapes world: procedural RGB images with hidden attributes, and captions that describe them.

An image has three **hidden attributes** that a set shares and a model must carry over:

- ``shape``: circle, square, triangle, cross (every object of the image has it);
- ``colour``: red, yellow, green, blue (the objects' hue; the background is always neutral grey,
  so the colour can be read back exactly from the saturated pixels);
- ``background``: plain, stripes, dots (periods of 8 px: twice the toy VAE's downsampling factor,
  so the latent can carry the texture).

and **nuisance variation** that makes two images with the same attributes differ visibly: the number
of objects (1–3), their size, position and rotation, a hue jitter of the objects, the grey levels
and phase of the background pattern.

Everything is a pure function of a seed: ``sample_attributes(rng)`` draws attributes and nuisances,
``render(attributes)`` draws them (4× supersampled, anti-aliased, uint8 ``[S, S, 3]``), and
``caption(attributes, rng)`` writes CC12M-like English from them ("two small red triangles on a
striped background", "a red triangle, stripes behind it"). ``write_caption_tsv`` writes
``url<TAB>caption`` lines so MIS stage 1 ingests them like CC12M; the "url" is a ``shapes://`` URI
that names the attributes and seed of the render the caption was written from.

``SCORED`` names the attributes every measure scores; ``HELD_OUT`` combinations appear neither in
the teacher's training data nor in shapes-MIS (``configs/shapes/``).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "yellow", "green", "blue")
BACKGROUNDS = ("plain", "stripes", "dots")
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS}
#: The attributes a set shares and every measure scores (read-out agreement, fidelity).
SCORED = ("shape", "colour", "background")
#: (shape, colour, background) combinations left out of teacher training and shapes-MIS, so that
#: generalisation to unseen combinations can be measured.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("triangle", "blue", "dots"),
    ("circle", "yellow", "stripes"),
    ("cross", "red", "plain"),
)
HUES = {"red": 0.0, "yellow": 55.0, "green": 125.0, "blue": 225.0}  # degrees
HUE_JITTER = 8.0             # degrees, uniform ±
PERIOD = 8                   # px: stripe and dot period at 32 px
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    x: float                 # centre, in [0, 1] of the image width
    y: float
    radius: float            # circumradius, in [0, 1] of the image width
    angle: float             # degrees
    hue: float               # degrees, the colour's hue with jitter


@dataclass(frozen=True)
class Attributes:
    """One image: its hidden attributes and the nuisances that vary between images."""

    shape: str
    colour: str
    background: str
    objects: tuple[ShapeObject, ...]
    grey: float              # background base lightness in [0, 1]
    pattern_grey: float      # lightness of stripes / dots
    stripe_angle: int        # 0, 45, 90 or 135 degrees
    phase: tuple[float, float]

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.background)


def sample_attributes(rng: np.random.Generator, shape: str | None = None,
                      colour: str | None = None, background: str | None = None,
                      count: int | None = None) -> Attributes:
    """Draw an image's attributes (those given are fixed) and its nuisances from ``rng``."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    background = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    _check(shape, colour, background)
    count = count or int(rng.integers(1, 4))
    objects: list[ShapeObject] = []
    for _ in range(count):
        radius = float(rng.uniform(0.19, 0.27)) if count == 1 else float(rng.uniform(0.15, 0.21))
        for _attempt in range(30):  # keep objects apart so they stay countable
            x, y = (float(v) for v in rng.uniform(radius + 0.02, 0.98 - radius, 2))
            if all(math.hypot(x - o.x, y - o.y) > radius + o.radius for o in objects):
                break
        objects.append(ShapeObject(x, y, radius, float(rng.uniform(0, 360)),
                                   HUES[colour] + float(rng.uniform(-HUE_JITTER, HUE_JITTER))))
    grey = float(rng.uniform(0.55, 0.9))
    pattern = grey - float(rng.uniform(0.25, 0.4)) if grey > 0.7 else grey + float(rng.uniform(0.1, 0.2))
    return Attributes(shape, colour, background, tuple(objects), grey, float(np.clip(pattern, 0, 1)),
                      int(rng.choice([0, 45, 90, 135])), (float(rng.uniform()), float(rng.uniform())))


def _check(shape: str, colour: str, background: str) -> None:
    for name, value in (("shape", shape), ("colour", colour), ("background", background)):
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; expected one of {ATTRIBUTES[name]}")


def _rgb(hue_degrees: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_degrees % 360) / 360, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.cos(math.radians(angle + 45 + 90 * i)), math.sin(math.radians(angle + 45 + 90 * i)))
                   for i in range(4)]
        return [(cx + r * c, cy + r * s) for c, s in corners]
    if shape == "triangle":
        return [(cx + r * math.cos(math.radians(angle + 120 * i)),
                 cy + r * math.sin(math.radians(angle + 120 * i))) for i in range(3)]
    # cross: a plus sign of arm half-width r/3, rotated
    w = r / 3
    outline = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w),
               (-r, w), (-w, w), (-w, r)]
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in outline]


def render(attributes: Attributes, size: int = 32) -> np.ndarray:
    """The image of ``attributes``: uint8 ``[size, size, 3]`` (drawn at 4× and downsampled)."""
    big = size * SUPERSAMPLE
    base = round(attributes.grey * 255)
    image = Image.new("RGB", (big, big), (base, base, base))
    draw = ImageDraw.Draw(image)
    pattern = round(attributes.pattern_grey * 255)
    period = PERIOD * big / 32
    if attributes.background == "stripes":
        width = period * 0.45
        offset = attributes.phase[0] * period
        theta = math.radians(attributes.stripe_angle)
        direction, normal = (math.cos(theta), math.sin(theta)), (-math.sin(theta), math.cos(theta))
        reach = big * 1.5
        for k in range(-int(reach / period) - 2, int(reach / period) + 2):
            d = k * period + offset
            cx, cy = big / 2 + normal[0] * d, big / 2 + normal[1] * d
            corners = [(cx + direction[0] * s * reach + normal[0] * t * width / 2,
                        cy + direction[1] * s * reach + normal[1] * t * width / 2)
                       for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            draw.polygon(corners, fill=(pattern, pattern, pattern))
    elif attributes.background == "dots":
        radius = period * 0.3
        ox, oy = (p * period for p in attributes.phase)
        for i in range(-1, int(big / period) + 2):
            for j in range(-1, int(big / period) + 2):
                x, y = i * period + ox, j * period + oy
                draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                             fill=(pattern, pattern, pattern))
    for obj in attributes.objects:
        colour = _rgb(obj.hue, 0.85, 0.95)
        cx, cy, r = obj.x * big, obj.y * big, obj.radius * big
        if attributes.shape == "circle":
            draw.ellipse((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=colour)
        else:
            draw.polygon(_polygon(attributes.shape, cx, cy, r, obj.angle), fill=colour)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


# --- captions ------------------------------------------------------------------------------------

_NUMBERS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
_SYNONYMS = {"circle": ("circle", "disc", "round dot"), "square": ("square", "box"),
             "triangle": ("triangle",), "cross": ("cross", "plus sign")}
_PLURAL_SYNONYMS = {"disc": "discs", "round dot": "round dots", "box": "boxes",
                    "plus sign": "plus signs"}
_BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "on a plain grey background", "against a plain backdrop",
              "on an empty grey background", "with nothing behind it"),
    "stripes": ("on a striped background", "with stripes behind it", "against stripes",
                "on a background of stripes", "over grey stripes"),
    "dots": ("on a dotted background", "with dots behind it", "on polka dots",
             "against a dotted pattern", "over a grid of grey dots"),
}
_COLOUR_WORDS = {"red": ("red", "bright red"), "yellow": ("yellow",), "green": ("green",),
                 "blue": ("blue", "deep blue")}
_TEMPLATES = (
    "{count} {size}{colour} {shape} {background}",
    "{count} {colour} {shape} {background}",
    "{colour} {shape} {background}",
    "a picture of {count} {colour} {shape} {background}",
    "{count} {size}{colour} {shape}, {background_clause}",
    "illustration: {colour} {shape} {background}",
    "{background_noun} with {count} {colour} {shape}",
)
_BACKGROUND_NOUNS = {"plain": ("a plain grey background", "an empty backdrop"),
                     "stripes": ("a striped background", "grey stripes"),
                     "dots": ("a dotted background", "polka dots")}
_BACKGROUND_CLAUSES = {"plain": ("nothing behind it", "a plain backdrop"),
                       "stripes": ("stripes behind it", "a striped backdrop"),
                       "dots": ("dots behind it", "a dotted backdrop")}


def caption(attributes: Attributes, rng: np.random.Generator) -> str:
    """CC12M-like English for ``attributes``: shape, colour and background always; count and size
    sometimes (a caption without them leaves the teacher free to vary them within a set)."""
    count = attributes.count
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    noun = _SYNONYMS[attributes.shape][rng.integers(len(_SYNONYMS[attributes.shape]))]
    if count > 1:
        noun = _PLURAL.get(noun) or _PLURAL_SYNONYMS[noun]
    mean_radius = np.mean([o.radius for o in attributes.objects])
    size = ("large " if mean_radius > 0.22 else "small " if mean_radius < 0.17 else "")
    text = template.format(
        count=_pick(rng, _NUMBERS[count]), size=size, shape=noun,
        colour=_pick(rng, _COLOUR_WORDS[attributes.colour]),
        background=_pick(rng, _BACKGROUND_PHRASES[attributes.background]),
        background_noun=_pick(rng, _BACKGROUND_NOUNS[attributes.background]),
        background_clause=_pick(rng, _BACKGROUND_CLAUSES[attributes.background]))
    if "{count}" not in template and count == 1:
        text = ("a " if text[0] not in "aeiou" else "an ") + text
    if count > 1:
        text = text.replace(" behind it", " behind them")
    return " ".join(text.split())


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def caption_attributes(text: str) -> dict[str, str | None]:
    """The hidden attributes a caption names (``None`` where it names none): the inverse of
    ``caption`` for the words it uses, used to score generated images against their caption."""
    words = " " + " ".join("".join(c if c.isalpha() else " " for c in text.lower()).split()) + " "
    found: dict[str, str | None] = {"shape": None, "colour": None, "background": None}
    for shape, names in _SYNONYMS.items():
        if any(f" {n} " in words or f" {_PLURAL.get(n) or _PLURAL_SYNONYMS[n]}" in words
               for n in names):
            found["shape"] = shape
    for colour in COLOURS:
        if f" {colour} " in words:
            found["colour"] = colour
    for background, keys in (("stripes", ("stripe", "striped")), ("dots", ("dot ", "dots", "dotted")),
                             ("plain", ("plain", "empty", "nothing behind"))):
        if any(k in words.replace("round dot", "") for k in keys):
            found["background"] = background
    return found


# --- caption files -------------------------------------------------------------------------------


def iter_captioned(seed: int, count: int, exclude: Sequence[tuple[str, str, str]] = ()
                   ) -> Iterator[tuple[Attributes, str, int]]:
    """``(attributes, caption, image seed)`` of ``count`` renders drawn from ``seed``, skipping
    attribute combinations in ``exclude`` (held out from training)."""
    excluded = set(map(tuple, exclude))
    rng = np.random.default_rng(seed)
    made = 0
    while made < count:
        image_seed = int(rng.integers(2**62))
        image_rng = np.random.default_rng(image_seed)
        attributes = sample_attributes(image_rng)
        if attributes.key in excluded:
            continue
        yield attributes, caption(attributes, image_rng), image_seed
        made += 1


def source_url(attributes: Attributes, image_seed: int) -> str:
    return f"shapes://{attributes.shape}/{attributes.colour}/{attributes.background}/{image_seed}"


def write_caption_tsv(path: str, seed: int, count: int,
                      exclude: Sequence[tuple[str, str, str]] = ()) -> int:
    """Write ``count`` ``url<TAB>caption`` lines (the CC12M format) to ``path``; returns count."""
    with open(path, "w", encoding="utf-8") as f:
        for attributes, text, image_seed in iter_captioned(seed, count, exclude):
            f.write(f"{source_url(attributes, image_seed)}\t{text}\n")
    return count


def render_batch(rng: np.random.Generator, size: int, image_size: int = 32,
                 exclude: tuple = ()) -> tuple[np.ndarray, list[Attributes], list[str]]:
    """``size`` random renders: uint8 ``[size, S, S, 3]``, their attributes and captions."""
    images, attributes, captions = [], [], []
    while len(images) < size:
        a = sample_attributes(rng)
        if a.key in exclude:
            continue
        images.append(render(a, image_size))
        attributes.append(a)
        captions.append(caption(a, rng))
    return np.stack(images), attributes, captions


def main(argv: list[str] | None = None) -> int:
    """``python -m m2m_ray.shapes.world --out captions.tsv --count 64 --seed 0``: a CC12M-format
    caption file of the shapes world, without the held-out attribute combinations."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--include-held-out", action="store_true",
                        help="also the combinations held out of teacher training and shapes-MIS")
    args = parser.parse_args(argv)
    write_caption_tsv(args.out, args.seed, args.count, () if args.include_held_out else HELD_OUT)
    print(f"wrote {args.count} captions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
