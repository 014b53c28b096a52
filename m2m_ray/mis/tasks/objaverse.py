"""Objaverse novel-view sets in Zero123's render layout (paper §6.2, §8.5).

The layout (Zero-1-to-3's ``objaverse-rendering/scripts/blender_script.py`` and its
``ObjaverseData`` loader)::

    <root>/valid_paths.json          optional: a JSON list of object folder names (uids)
    <root>/<uid>/000.png … 011.png   RGBA renders, transparent background (Blender film_transparent)
    <root>/<uid>/000.npy … 011.npy   float 3 × 4 world-to-camera [R|T] of each render

**Camera convention** (Blender's, as Zero123 saves it): the world is the object's frame, +Z up,
the object normalised to a largest side of 1 and centred on the origin; the camera looks down its
own −Z with +Y up in the image and +X to the right; ``R`` is the transpose of the camera's
world rotation and ``T = −R · location``, so ``x_cam = R · x_world + T`` (no OpenCV axis flip).
Zero123 reads the camera position back as ``−Rᵀ T`` and its azimuth as ``atan2(y, x)``.

A set is one object: its views in ``order`` (default ``0 … views−1``), each alpha-composited on
white (straight alpha, ``rgb·a + 255·(1−a)``; Zero123 only whitens the fully transparent pixels)
and stored as RGB PNG bytes, with the ``[N, 3, 4]`` float64 extrinsics of those views.

A malformed object — a view's PNG or pose missing, a pose not 3 × 4, non-finite or not a rotation,
a PNG that does not decode or has no alpha channel, a listed uid without folder — raises a
``TaskDataError`` subclass naming the file (its class name is the reason a skip is counted under);
the object is read whole or not at all.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import Image

from m2m_ray import storage
from m2m_ray.formats.tasks import TaskDataError
from m2m_ray.mis.tasks import OnBad, TaskReadReport, TaskSet

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

VALID_PATHS = "valid_paths.json"
ROTATION_TOLERANCE = 1e-3  # |R Rᵀ − I|: Blender's float32 matrices are orthonormal to ~1e-6


class MissingObjectError(TaskDataError):
    """A uid listed in valid_paths.json has no folder."""


class MissingViewError(TaskDataError):
    """A view's PNG or pose file is absent."""


class BadPoseError(TaskDataError):
    """A pose file that is not a finite 3 × 4 ``[R|T]`` with ``R`` a rotation."""


class BadImageError(TaskDataError):
    """A PNG that does not decode."""


class NoAlphaError(TaskDataError):
    """A render without an alpha channel (the layout's PNGs are RGBA)."""


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 4]`` straight-alpha RGBA → uint8 ``[H, W, 3]`` RGB over a white background."""
    rgba = np.asarray(rgba, dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def view_order(views: int, order: Sequence[int] | None = None) -> list[int]:
    """The view indices to read: ``order`` checked (distinct, each in ``[0, views)``), or
    ``0 … views−1``. Raises ValueError: a configuration error, not a data error."""
    if views < 1:
        raise ValueError(f"views={views}: an object has at least one view")
    if order is None:
        return list(range(views))
    indices = [int(i) for i in order]
    bad = [i for i in indices if not 0 <= i < views]
    if bad or len(set(indices)) != len(indices) or not indices:
        raise ValueError(f"view order {list(order)}: expected distinct view indices in "
                         f"[0, {views}) (views={views}), at least one")
    return indices


def list_objects(root: str, storage_cfg: "StorageConfig | None" = None) -> list[str]:
    """The object uids under ``root``: those of ``<root>/valid_paths.json`` in its order (Zero123
    splits train/validation by position in it), else the sub-folders' names (hidden ones
    left out), sorted.

    Raises TaskDataError naming valid_paths.json when it is not a JSON list of distinct, relative
    folder names; FileNotFoundError when ``root`` is not a folder."""
    fs, path = storage.fsspec_filesystem(root, storage_cfg)
    listing = storage.join(root, VALID_PATHS)
    if fs.exists(posixpath.join(path, VALID_PATHS)):
        try:
            uids = json.loads(storage.read_bytes(listing, storage_cfg))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TaskDataError(f"{listing}: not JSON ({err})") from None
        if not isinstance(uids, list) or not all(_is_folder_name(u) for u in uids):
            raise TaskDataError(f"{listing}: expected a JSON list of object folder names "
                                "(relative, non-empty strings), as Zero123 writes it")
        uids = [u.strip("/") for u in uids]
        if len(set(uids)) < len(uids):
            twice = sorted(u for u, n in Counter(uids).items() if n > 1)
            raise TaskDataError(f"{listing}: uids listed twice: {twice[:5]}")
        return uids
    if not fs.isdir(path):
        raise FileNotFoundError(f"no folder at {root}; check the Objaverse render root (and, for "
                                "s3://, the endpoint and credentials)")
    names = (posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
             if e["type"] == "directory")
    return sorted(n for n in names if not n.startswith("."))  # .ipynb_checkpoints and the like


def _is_folder_name(uid: object) -> bool:
    return (isinstance(uid, str) and uid.strip("/") != "" and not uid.startswith("/")
            and ".." not in uid.split("/"))


def read_object(root: str, uid: str, storage_cfg: "StorageConfig | None" = None,
                views: int = 12, order: Sequence[int] | None = None) -> TaskSet:
    """One object's views as a ``TaskSet``: ``images`` RGB PNG bytes (composited on white) in
    ``order``, ``camera`` float64 ``[N, 3, 4]`` world-to-camera, ``caption`` None, ``source``
    ``{"root", "uid", "views"}``.

    Raises a TaskDataError subclass naming the file (module docstring); ValueError for an
    invalid ``order``."""
    indices = view_order(views, order)
    folder = storage.join(root, uid)
    fs, folder_path = storage.fsspec_filesystem(folder, storage_cfg)
    if not fs.isdir(folder_path):
        raise MissingObjectError(f"{folder}: object folder missing (uid {uid!r} from "
                                 f"{VALID_PATHS} or the listing)")
    names = [f"{i:03d}.{ext}" for i in indices for ext in ("png", "npy")]
    # One batched read: s3fs fetches the files concurrently, a local fs in turn.
    contents = fs.cat([posixpath.join(folder_path, n) for n in names], on_error="return")
    by_name = {posixpath.basename(k): v for k, v in contents.items()}
    images, cameras = [], []
    for i in indices:
        png, npy = (_content(by_name, f"{i:03d}.{ext}", folder) for ext in ("png", "npy"))
        images.append(_decode_view(png, storage.join(folder, f"{i:03d}.png")))
        cameras.append(_decode_pose(npy, storage.join(folder, f"{i:03d}.npy")))
    return TaskSet(set_id=uid, images=images, image_ext="png", caption=None,
                   camera=np.stack(cameras), source={"root": root, "uid": uid, "views": indices})


def _content(by_name: dict, name: str, folder: str) -> bytes:
    data = by_name.get(name)
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if data is None or isinstance(data, FileNotFoundError):
        raise MissingViewError(f"{storage.join(folder, name)}: view file missing")
    raise data  # an unexpected storage error (permissions, network): not a data problem


def _decode_view(data: bytes, uri: str) -> bytes:
    """RGBA PNG bytes → RGB PNG bytes composited on white."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            rgba = np.asarray(image) if mode == "RGBA" else None
    except Exception as err:  # PIL raises many types for corrupt files
        raise BadImageError(f"{uri}: cannot decode image ({len(data)} bytes): {err}") from None
    if rgba is None:
        raise NoAlphaError(f"{uri}: image mode {mode}, expected RGBA: the layout's renders carry "
                           "an alpha channel (transparent background) to composite on white")
    buffer = io.BytesIO()
    Image.fromarray(composite_on_white(rgba), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_pose(data: bytes, uri: str) -> np.ndarray:
    """``.npy`` bytes → float64 ``[3, 4]`` world-to-camera ``[R|T]``."""
    try:
        pose = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # ValueError, EOFError, OSError... for a corrupt file
        raise BadPoseError(f"{uri}: not a .npy array ({err})") from None
    if pose.shape != (3, 4) or not np.issubdtype(pose.dtype, np.number):
        raise BadPoseError(f"{uri}: pose of shape {pose.shape} and dtype {pose.dtype}; expected "
                           "a 3 x 4 float world-to-camera [R|T]")
    pose = pose.astype(np.float64)
    if not np.all(np.isfinite(pose)):
        raise BadPoseError(f"{uri}: pose has non-finite values")
    rotation = pose[:, :3]
    if (np.abs(rotation @ rotation.T - np.eye(3)).max() > ROTATION_TOLERANCE
            or np.linalg.det(rotation) < 0):
        raise BadPoseError(f"{uri}: the 3 x 3 part of the pose is not a rotation")
    return pose


def iter_objaverse_sets(root: str, storage_cfg: "StorageConfig | None" = None, views: int = 12,
                        order: Sequence[int] | None = None, on_bad: OnBad = "error",
                        report: TaskReadReport | None = None,
                        uids: Sequence[str] | None = None) -> Iterator[TaskSet]:
    """Every object's ``TaskSet`` (``uids``, default ``list_objects(root)``), in that order.

    ``on_bad="error"``: the first malformed object's TaskDataError propagates; ``"skip"``: the
    object is left out and counted in ``report.skipped`` under the error's class name
    (``MissingViewError``, ``BadPoseError``, ``BadImageError``, ``NoAlphaError``,
    ``MissingObjectError``). ``report.sets`` counts the sets yielded."""
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad={on_bad!r}: expected 'error' or 'skip'")
    report = report if report is not None else TaskReadReport()
    view_order(views, order)  # a bad order is a config error: raised before any object is read
    for uid in (list_objects(root, storage_cfg) if uids is None else uids):
        try:
            task_set = read_object(root, uid, storage_cfg, views=views, order=order)
        except TaskDataError as err:
            if on_bad == "error":
                raise
            report.skip(type(err).__name__, str(err))
            continue
        report.sets += 1
        yield task_set
