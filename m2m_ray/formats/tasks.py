"""The ``task`` column of task datasets (paper §6.2, §8.5): the raw per-image conditions that the
builders write (``m2m_ray.mis.tasks``) and training and sampling read (``m2m_ray.data.tasks``).

A set's ``task`` is a JSON object with one or both kinds, one value per image of the set in its
order:

- ``camera``: ``[N][3][4]`` floats, each image's world-to-camera extrinsics ``[R|T]`` as the
  dataset gives them;
- ``position``: ``[N]`` ints, the 0-based index of each image's step in its procedure.

A user's task conditions file (``inputs.task_conditions``) has the same layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TASK_KINDS = ("camera", "position")


class TaskDataError(ValueError):
    """A task dataset entry or task conditions that cannot be read; the message names the file
    (or set) and what is wrong."""


def condition_shape(kind: str, count: int) -> tuple[int, ...]:
    """The shape ``kind`` has for ``count`` images: camera ``(count, 3, 4)``, position
    ``(count,)``. Raises ``ValueError`` for a kind not in ``TASK_KINDS``."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task condition {kind!r}: expected one of {TASK_KINDS}")
    return (count, 3, 4) if kind == "camera" else (count,)


def encode_task(camera: np.ndarray | None, position: np.ndarray | None) -> dict[str, list]:
    """The raw conditions as the JSON-ready ``task`` value: camera as float64 lists, position as
    int64 lists; a kind that is None is left out."""
    out: dict[str, Any] = {}
    if camera is not None:
        out["camera"] = np.asarray(camera, dtype=np.float64).tolist()
    if position is not None:
        out["position"] = np.asarray(position, dtype=np.int64).tolist()
    return out
