"""Task conditions for training and sampling (paper §6.2, §8.5): the raw per-image conditions of
a task dataset's ``task`` column (``m2m_ray.formats.tasks``; written by ``m2m_ray.mis.tasks``) or
of a user's file, turned into the model's inputs:

- **camera**: the dataset's world-to-camera extrinsics ``[R|T]`` (3 × 4) of each image, stored as
  the dataset gives them. The model sees them *relative to the first image of the sequence it is
  given* (``relative_cameras``): ``E_i · E_1⁻¹``, top three rows flattened to 12 values, so image 1
  is always the identity and a condition never depends on the dataset's world frame (Objaverse
  renders put each object in its own frame).
- **position**: the 0-based index of each image's step in its procedure, as the dataset orders the
  steps (a step whose image is missing keeps the steps after it at their own index).

Missing or misshapen conditions are an error naming the set or file, never a silent change.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from m2m_ray import storage
from m2m_ray.formats.mis import CorruptShardError
from m2m_ray.formats.tasks import TASK_KINDS, TaskDataError, condition_shape


def relative_cameras(w2c: np.ndarray) -> np.ndarray:
    """World-to-camera extrinsics ``[..., N, 3, 4]`` → float32 ``[..., N, 12]``: each image's
    extrinsics relative to the first image of the sequence, ``E_i · E_1⁻¹`` (4 × 4 homogeneous,
    top three rows flattened). The first image's is the identity; a rotation or translation of
    the world applied to every camera leaves the result unchanged."""
    w2c = np.asarray(w2c, dtype=np.float64)
    if w2c.shape[-2:] != (3, 4):
        raise ValueError(f"camera extrinsics of shape {w2c.shape}: expected [..., N, 3, 4]")
    full = np.zeros(w2c.shape[:-2] + (4, 4))
    full[..., :3, :] = w2c
    full[..., 3, 3] = 1.0
    relative = full @ np.linalg.inv(full[..., :1, :, :])
    return relative[..., :3, :].reshape(w2c.shape[:-2] + (12,)).astype(np.float32)


def camera_inputs(w2c: np.ndarray, frame: str = "relative") -> np.ndarray:
    """The camera MLP's input for a sequence's extrinsics ``[N, 3, 4]``: float32 ``[N, 12]``,
    relative to the first image (``relative_cameras``) or as stored (``frame="world"``)."""
    if frame == "world":
        return np.asarray(w2c, dtype=np.float32).reshape(len(w2c), 12)
    return relative_cameras(w2c)


def task_columns(task: dict[str, Any] | None, kinds: tuple[str, ...], indices: np.ndarray,
                 total: int, where: str, camera_frame: str = "relative") -> dict[str, np.ndarray]:
    """A stored set's raw conditions → the model's inputs for its images ``indices`` (in sample
    order): ``camera`` float32 ``[N, 12]`` (``camera_inputs``: by default relative to the
    sample's first image), ``position`` float32 ``[N]``. Raises ``CorruptShardError`` naming
    ``where`` when the set lacks a kind or stores it with the wrong shape."""
    out = {}
    for kind in kinds:
        values = None if task is None else task.get(kind)
        expected = condition_shape(kind, total)
        array = None if values is None else np.asarray(values, dtype=np.float64)
        if array is None or array.shape != expected or not np.isfinite(array).all():
            raise CorruptShardError(
                f"{where}: the model takes a {kind} condition per image but the set stores "
                f"{'none' if array is None else f'shape {array.shape}'} (expected {expected}, "
                "finite); train with m2m.task_conditions matching the task dataset")
        chosen = array[indices]
        out[kind] = (camera_inputs(chosen, camera_frame) if kind == "camera"
                     else chosen.astype(np.float32))
    return out


def sequence_conditions(task: dict[str, Any] | None, kinds: list[str], count: int,
                        where: str, camera_frame: str = "relative") -> dict[str, np.ndarray]:
    """The model's inputs for the first ``count`` images of a stored or user-given sequence of
    raw conditions (sampling: K context images, then M targets): ``camera`` float32
    ``[count, 12]`` (``camera_inputs``), ``position`` float32 ``[count]``. Raises
    ``TaskDataError`` naming ``where`` when a kind is missing or covers fewer images."""
    out = {}
    for kind in kinds:
        values = None if task is None else task.get(kind)
        array = None if values is None else np.asarray(values, dtype=np.float64)
        tail = condition_shape(kind, count)[1:]
        if array is None or array.shape[1:] != tail or len(array) < count:
            raise TaskDataError(
                f"{where}: the model takes a {kind} condition per image; {count} are needed (the "
                f"context images, then the targets) but "
                f"{'none are given' if array is None else f'the given ones have shape {array.shape}'}"
                "; give them with inputs.task_conditions or use a task dataset's sets")
        chosen = array[:count]
        out[kind] = (camera_inputs(chosen, camera_frame) if kind == "camera"
                     else chosen.astype(np.float32))
    return out


def decode_task_file(uri: str, storage_cfg: Any = None) -> dict[str, Any]:
    """A user's task conditions file (``inputs.task_conditions``): JSON ``{"camera": [n][3][4]}``
    and/or ``{"position": [n]}``. Raises ``TaskDataError`` naming the file when it is not that."""
    try:
        task = json.loads(storage.read_bytes(uri, storage_cfg))
    except (OSError, ValueError) as err:
        raise TaskDataError(f"cannot read task conditions {uri}: {type(err).__name__}: {err}"
                            ) from err
    if not isinstance(task, dict) or not set(task) & set(TASK_KINDS) or set(task) - set(
            TASK_KINDS):
        raise TaskDataError(f"task conditions {uri}: expected a JSON object with camera and/or "
                            f"position, got {type(task).__name__} "
                            f"{sorted(task) if isinstance(task, dict) else ''}")
    return task
