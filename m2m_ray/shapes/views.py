"""The shapes world's novel-view task: a coloured box seen from 12 cameras on an orbit, written in
Zero123's Objaverse render layout so that the Objaverse reader reads it like the real thing.

**The object** (``sample_box``): an axis-aligned box centred on the origin with a square footprint
(width ``w`` along X and Y, height ``h`` along Z, the larger of the two 1, as Zero123 normalises
an object), each face a fixed hue by its outward normal — +X red (0°), +Y yellow (60°), −X green
(120°), −Y cyan (180°), +Z blue (240°), −Z magenta (300°) — so any view tells where it was taken
from. Per object: the height-to-width ratio (0.6–1.5), a hue shift (±6°, all faces), a brightness
(0.85–1), and a base azimuth: the first camera's azimuth, uniform in [0°, 360°), which the stored
poses carry (the world is the box's frame, as an Objaverse object's own frame is).

**The cameras** (``orbit_cameras``): azimuths ``base + 30°·k``, k = 0 … 11, elevation 30°, distance
``RADIUS`` = 2.4 from the origin (Zero123 draws 1.5–2.2; a little further keeps the largest box
2 px inside a 32 px frame), Zero123's lens (35 mm on a 32 mm sensor: 49.1° field of view).
**Convention** — Blender's, as Zero123 saves it: world +Z up; azimuth ``atan2(y, x)`` of the camera
position; the camera looks down its −Z at the origin, +Y up in the image, +X right;
``[R|T]`` world-to-camera with ``x_cam = R · x_world + T``, ``R = [x y z]ᵀ`` of the camera's axes in
world coordinates, ``T = −R · position`` (``m2m_ray.mis.tasks.objaverse``).

**Rendering** (``render_rgba``): one ray per sub-pixel through the box (slab test), 4 × 4
supersampled, flat per-face shading from a fixed light; RGBA with straight alpha and a transparent
background, as Blender's ``film_transparent`` writes.

**Read-out** (``read_azimuth``): on a render composited on white, each coloured pixel is given to
the face of the nearest hue (mixing with white keeps the hue) and counts for its coverage (chroma ÷
the face's full chroma). The faces' shares of the covered area and their horizontal centroids are
matched against the exact perspective projection of the box (``_face_table``: every 1° of azimuth
× 27 height-to-width ratios), then refined between grid points. Areas alone would not do: under
perspective a side face hides up to 14° before the camera passes its plane, and a view ε to either
side of a face is the mirror image of the other — the centroids tell which side. Accuracy on fresh
renders at 32 px (a random box at a uniform azimuth each; ``python -m m2m_ray.shapes.views
--measure 2000 --seed 1``, ~10 s): median error 0.36°, 90th percentile 0.92°, max 2.7°.

    python -m m2m_ray.shapes.views --out DIR --count N --seed S [--size 32]
"""

from __future__ import annotations

import colorsys
import functools
import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from m2m_ray import storage
from m2m_ray.mis.tasks.objaverse import VALID_PATHS, composite_on_white

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

VIEWS = 12
AZIMUTH_STEP = 30.0          # degrees between neighbouring views
ELEVATION = 30.0             # degrees above the XY plane
RADIUS = 2.4                 # camera distance: the largest box stays ≥ 2 px inside a 32 px frame
LENS_MM, SENSOR_MM = 35.0, 32.0   # Zero123's Blender camera
SUPERSAMPLE = 4
# Faces in the order (+X, −X, +Y, −Y, +Z, −Z): index = 2 · axis + (normal points to −axis).
FACE_HUES = np.array([0.0, 120.0, 60.0, 180.0, 240.0, 300.0])
FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                        dtype=np.float64)
SIDE_FACES = (0, 1, 2, 3)   # +X, −X, +Y, −Y: a read-out needs one of them in view
SATURATION = 0.8
LIGHT = np.array([0.45, 0.25, 0.86]) / np.linalg.norm([0.45, 0.25, 0.86])
HUE_JITTER = 6.0             # degrees, uniform ±, all faces of an object together
MIN_CHROMA = 0.08            # a pixel with less (of 1) is background or too faint to read
MOMENT_WEIGHT = 4.0          # the centroids' weight against the areas' in the fit
TABLE_STEP = 1.0             # degrees between the read-out's tabulated azimuths
RATIOS = np.exp(np.linspace(np.log(0.5), np.log(1.8), 27))  # height / width, beyond sample_box's


@dataclass(frozen=True)
class Box:
    """One object: ``width`` (X and Y) and ``height`` (Z) with the larger 1, a hue shift in
    degrees, a brightness factor in (0, 1], and the first camera's azimuth in degrees."""

    width: float
    height: float
    hue_shift: float
    brightness: float
    base_azimuth: float

    @property
    def half_extent(self) -> np.ndarray:
        return np.array([self.width, self.width, self.height]) / 2

    def face_colours(self) -> np.ndarray:
        """float ``[6, 3]`` RGB in [0, 1] of the faces (order of ``FACE_HUES``), shaded."""
        colours = []
        for hue, normal in zip(FACE_HUES, FACE_NORMALS):
            value = self.brightness * (0.62 + 0.33 * max(float(normal @ LIGHT), 0.0))
            colours.append(_hsv_to_rgb(hue + self.hue_shift, SATURATION, value))
        return np.array(colours)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb((hue % 360) / 360, saturation, value)


def sample_box(rng: np.random.Generator) -> Box:
    """Draw a box's proportions, colour jitter and base azimuth from ``rng``."""
    ratio = math.exp(rng.uniform(math.log(0.6), math.log(1.5)))  # height / width
    width = 1.0 / max(1.0, ratio)
    return Box(width=width, height=ratio * width,
               hue_shift=float(rng.uniform(-HUE_JITTER, HUE_JITTER)),
               brightness=float(rng.uniform(0.85, 1.0)), base_azimuth=float(rng.uniform(0, 360)))


# --- cameras -------------------------------------------------------------------------------------


def look_at(position: np.ndarray) -> np.ndarray:
    """float64 ``[3, 4]`` world-to-camera ``[R|T]`` of a camera at ``position`` (world units)
    looking at the origin, image up towards world +Z (Blender's track-to, −Z forward, +Y up)."""
    position = np.asarray(position, dtype=np.float64)
    back = position / np.linalg.norm(position)           # the camera's +Z: away from the target
    right = np.cross([0.0, 0.0, 1.0], back)
    if np.linalg.norm(right) < 1e-9:
        raise ValueError(f"camera at {position.tolist()} looks straight up or down: no image up")
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    rotation = np.stack([right, up, back])               # rows: camera axes in world coordinates
    return np.concatenate([rotation, (-rotation @ position)[:, None]], axis=1)


def orbit_cameras(base_azimuth: float, views: int = VIEWS, elevation: float = ELEVATION,
                  radius: float = RADIUS, step: float = AZIMUTH_STEP) -> np.ndarray:
    """float64 ``[views, 3, 4]``: cameras at azimuths ``base_azimuth + step·k`` (degrees)."""
    cameras = []
    for k in range(views):
        az, el = math.radians(base_azimuth + step * k), math.radians(elevation)
        cameras.append(look_at(radius * np.array(
            [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])))
    return np.stack(cameras)


def camera_azimuth(w2c: np.ndarray) -> np.ndarray:
    """Azimuth in degrees, [0, 360), of the camera position ``−Rᵀ T`` of ``[..., 3, 4]``
    extrinsics (as Zero123 reads it: ``atan2(y, x)``)."""
    w2c = np.asarray(w2c, dtype=np.float64)
    position = -np.einsum("...ji,...j->...i", w2c[..., :3], w2c[..., 3])
    return np.degrees(np.arctan2(position[..., 1], position[..., 0])) % 360


# --- rendering -----------------------------------------------------------------------------------


def render_rgba(box: Box, w2c: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 ``[size, size, 4]``: ``box`` seen by the camera ``w2c`` (``[3, 4]``), straight alpha,
    transparent background (RGB 0 where alpha is 0)."""
    rotation, translation = w2c[:, :3], w2c[:, 3]
    origin = -rotation.T @ translation
    n = size * SUPERSAMPLE
    half_fov = SENSOR_MM / (2 * LENS_MM)                 # tan of half the field of view
    grid = ((np.arange(n) + 0.5) / n * 2 - 1) * half_fov
    u, v = np.meshgrid(grid, -grid)                      # image rows go down, camera +Y up
    directions = np.stack([u, v, -np.ones_like(u)], axis=-1) @ rotation  # = Rᵀ · d_cam
    directions = np.where(np.abs(directions) < 1e-12, 1e-12, directions)
    bound = box.half_extent
    t1, t2 = (-bound - origin) / directions, (bound - origin) / directions
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = near.max(axis=-1), far.min(axis=-1)
    hit = (t_near <= t_far) & (t_far > 0)
    axis = near.argmax(axis=-1)                          # the slab entered last: the face hit
    entering_negative = np.take_along_axis(directions, axis[..., None], -1)[..., 0] > 0
    face = 2 * axis + entering_negative
    colour = box.face_colours()[face] * hit[..., None]
    blocks = (size, SUPERSAMPLE, size, SUPERSAMPLE)
    alpha = hit.reshape(blocks).mean(axis=(1, 3))
    premultiplied = colour.reshape(blocks + (3,)).mean(axis=(1, 3))
    rgb = premultiplied / np.maximum(alpha, 1e-12)[..., None]
    rgba = np.concatenate([rgb * 255, alpha[..., None] * 255], axis=-1)
    return np.clip(np.rint(rgba), 0, 255).astype(np.uint8)


def render_views(box: Box, size: int = 32, views: int = VIEWS) -> tuple[np.ndarray, np.ndarray]:
    """The object's orbit: uint8 RGBA ``[views, size, size, 4]`` and float64 ``[views, 3, 4]``."""
    cameras = orbit_cameras(box.base_azimuth, views)
    return np.stack([render_rgba(box, c, size) for c in cameras]), cameras


# --- read-out ------------------------------------------------------------------------------------


def _hue_chroma(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma in [0, 1] of float RGB ``[..., 3]`` in [0, 1]."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    high, low = image.max(axis=-1), image.min(axis=-1)
    chroma = high - low
    safe = np.maximum(chroma, 1e-12)
    hue = np.where(high == r, ((g - b) / safe) % 6,
                   np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    return hue, chroma


def face_moments(image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage, moment)``, float ``[6]`` each, of a render composited on white (uint8
    ``[S, S, 3]``): the pixels each face covers (order of ``FACE_HUES``; fractional at
    anti-aliased edges) and their sum of horizontal positions (−1 … 1 across the frame, 0 at the
    centre, where the box's centre projects)."""
    image = np.asarray(image_rgb, dtype=np.float64) / 255.0
    hue, chroma = _hue_chroma(image)
    column = (np.arange(image.shape[1]) + 0.5) / image.shape[1] * 2 - 1
    x = np.broadcast_to(column, chroma.shape)
    inked = chroma > MIN_CHROMA
    distance = np.abs((hue[inked][:, None] - FACE_HUES[None, :] + 180.0) % 360.0 - 180.0)
    face, strength, x = distance.argmin(axis=1), chroma[inked], x[inked]
    coverage, moment = np.zeros(len(FACE_HUES)), np.zeros(len(FACE_HUES))
    for f in range(len(FACE_HUES)):
        mine = face == f
        if mine.any():
            # A fully covered pixel shows the face's own chroma; an edge pixel a fraction of it.
            weight = np.minimum(strength[mine] / np.percentile(strength[mine], 90), 1.0)
            coverage[f], moment[f] = weight.sum(), weight @ x[mine]
    return coverage, moment


@functools.lru_cache(maxsize=4)
def _face_table(elevation: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The read-out's model: for azimuths every ``TABLE_STEP`` degrees and height-to-width ratios
    ``RATIOS``, the exact projected area of the five faces a camera above the box can see (+X,
    −X, +Y, −Y, +Z) as fractions of their sum, and those fractions times each face's horizontal
    centroid (frame units): float ``[azimuths, ratios, 10]``; and the azimuths."""
    azimuths = np.arange(0.0, 360.0, TABLE_STEP)
    area, moment = np.zeros((2, len(azimuths), len(RATIOS), 5))
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)  # around a face
    half_fov = SENSOR_MM / (2 * LENS_MM)
    cameras = orbit_cameras(0.0, len(azimuths), elevation, radius, TABLE_STEP)  # [A, 3, 4]
    positions = -np.einsum("aji,aj->ai", cameras[:, :, :3], cameras[:, :, 3])
    for j, ratio in enumerate(RATIOS):
        width = 1.0 / max(1.0, ratio)
        half = np.array([width, width, ratio * width]) / 2
        for f in range(5):
            axis, normal = f // 2, FACE_NORMALS[f]
            others = [a for a in range(3) if a != axis]
            corners = np.zeros((4, 3))
            corners[:, axis] = normal[axis] * half[axis]
            corners[:, others] = signs * half[others]
            camera = np.einsum("aij,cj->aci", cameras[:, :, :3], corners) + cameras[:, None, :, 3]
            u, v = np.moveaxis(camera[..., :2] / -camera[..., 2:] / half_fov, -1, 0)  # [A, 4]
            cross = u * np.roll(v, -1, axis=1) - np.roll(u, -1, axis=1) * v  # shoelace terms
            signed = cross.sum(axis=1) / 2
            # Hidden when the camera is behind the face's plane (then seen edge-on at best).
            visible = positions @ normal > half[axis]
            with np.errstate(divide="ignore", invalid="ignore"):
                centroid = ((u + np.roll(u, -1, axis=1)) * cross).sum(axis=1) / (6 * signed)
            area[:, j, f] = np.where(visible, np.abs(signed), 0.0)
            moment[:, j, f] = np.where(visible, np.abs(signed) * centroid, 0.0)
    total = area.sum(axis=-1, keepdims=True)
    return np.concatenate([area / total, MOMENT_WEIGHT * moment / total], axis=-1), azimuths


def read_azimuth(image_rgb: np.ndarray, elevation: float = ELEVATION,
                 radius: float = RADIUS) -> float:
    """The camera azimuth in degrees, [0, 360), of a box render composited on white (uint8
    ``[S, S, 3]``): the azimuth and proportions whose exact face areas and centroids best match
    the image's (module docstring). NaN when no side face shows (count it as a miss)."""
    coverage, moment = face_moments(image_rgb)
    if coverage[list(SIDE_FACES)].sum() < 1.0:
        return float("nan")
    total = coverage[:5].sum()
    measured = np.concatenate([coverage[:5], MOMENT_WEIGHT * moment[:5]]) / total
    table, azimuths = _face_table(float(elevation), float(radius))
    mismatch = ((table - measured) ** 2).sum(axis=-1).min(axis=1)
    best = int(mismatch.argmin())
    # A parabola through the best grid point and its neighbours: below the grid's step.
    left, mid, right = mismatch[best - 1], mismatch[best], mismatch[(best + 1) % len(mismatch)]
    curvature = left - 2 * mid + right
    offset = 0.5 * (left - right) / curvature if curvature > 0 else 0.0
    return float((azimuths[best] + TABLE_STEP * np.clip(offset, -1, 1)) % 360)


def azimuth_error(a, b):
    """Circular difference ``|a − b|`` in degrees, in [0, 180]; arrays broadcast."""
    difference = np.abs((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
                         + 180.0) % 360.0 - 180.0)
    return float(difference) if difference.ndim == 0 else difference


def measure_readout(count: int, seed: int, size: int = 32) -> dict[str, float]:
    """Read-out accuracy on ``count`` fresh renders (a random box at a uniform random azimuth
    each): median, 90th percentile and max azimuth error in degrees."""
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(count):
        box = sample_box(rng)
        w2c = orbit_cameras(box.base_azimuth, views=1)[0]
        image = composite_on_white(render_rgba(box, w2c, size))
        errors.append(azimuth_error(read_azimuth(image), box.base_azimuth))
    errors_array = np.nan_to_num(np.array(errors), nan=180.0)
    return {"count": count, "median": float(np.median(errors_array)),
            "p90": float(np.percentile(errors_array, 90)), "max": float(errors_array.max())}


# --- the Zero123 layout --------------------------------------------------------------------------


def object_uid(seed: int, index: int) -> str:
    """A 32-hex-digit uid like Objaverse's, a pure function of (seed, index)."""
    return np.random.default_rng([seed, index]).bytes(16).hex()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_objaverse_layout(out_root: str, count: int, seed: int, size: int = 32,
                           storage_cfg: "StorageConfig | None" = None) -> list[str]:
    """Write ``count`` boxes in Zero123's layout under ``out_root`` (local or s3://):
    ``<uid>/000.png … 011.png`` (RGBA), ``<uid>/000.npy … 011.npy`` (float64 3 × 4 world-to-camera)
    and ``valid_paths.json`` (the uids, in order). Returns the uids. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    uids = []
    for index in range(count):
        uid = object_uid(seed, index)
        images, cameras = render_views(sample_box(rng), size)
        for k, (image, camera) in enumerate(zip(images, cameras)):
            storage.write_bytes(storage.join(out_root, uid, f"{k:03d}.png"), _png(image),
                                storage_cfg)
            storage.write_bytes(storage.join(out_root, uid, f"{k:03d}.npy"), _npy(camera),
                                storage_cfg)
        uids.append(uid)
    # Written last: a listing never names an object that is not all there.
    storage.write_bytes(storage.join(out_root, VALID_PATHS), json.dumps(uids).encode(),
                        storage_cfg)
    return uids


def main(argv: list[str] | None = None) -> int:
    """``python -m m2m_ray.shapes.views --out DIR --count N --seed S``: box orbits in Zero123's
    Objaverse layout; ``--measure N --seed S``: the azimuth read-out's accuracy on N renders."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", help="layout root (local path or s3://)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--measure", type=int, metavar="N",
                        help="print the read-out's accuracy on N fresh renders instead")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_readout(args.measure, args.seed, args.size)))
        return 0
    if not args.out:
        parser.error("--out is required (or --measure N)")
    uids = write_objaverse_layout(args.out, args.count, args.seed, args.size)
    print(f"wrote {len(uids)} objects x {VIEWS} views to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
