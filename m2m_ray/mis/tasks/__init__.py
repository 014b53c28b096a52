"""Building task datasets for fine-tuning (paper §6.2, §8.5): image sets whose images each carry
a task condition — a camera for novel-view synthesis (Objaverse, ``objaverse.py``), a position in
a procedure for visual procedure generation (VGSI / wikiHow, ``vgsi.py``).

A reader yields ``TaskSet`` objects; ``build.py`` writes them as training shards (the MIS shard
layout of ``m2m_ray.formats.mis`` plus the per-set ``task`` column of ``m2m_ray.formats.tasks``)
with the building package's one shard builder (``m2m_ray.mis.shards``). Training and sampling
turn the raw conditions into the model's inputs (``m2m_ray.data.tasks``).

Bad entries are a ``TaskDataError`` naming the file (``on_bad="error"``) or a counted skip
(``"skip"``) in a ``TaskReadReport``, never a silent change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from m2m_ray.formats.tasks import condition_shape, encode_task

OnBad = Literal["error", "skip"]


@dataclass
class TaskSet:
    """One set of a task dataset.

    ``images``: encoded RGB images (PNG or JPEG bytes, alpha already composited), in the set's
    order; ``camera``: float64 ``[N, 3, 4]`` world-to-camera extrinsics or None; ``position``:
    int64 ``[N]`` step indices or None; ``caption``: text (VGSI: goal and method) or None;
    ``source``: where it came from (paths, ids), kept in the shard's metadata. Raises
    ``ValueError`` when a condition's shape does not match the images."""

    set_id: str
    images: list[bytes]
    image_ext: str
    caption: str | None = None
    camera: np.ndarray | None = None
    position: np.ndarray | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        for kind in ("camera", "position"):
            value = getattr(self, kind)
            expected = condition_shape(kind, n)
            if value is not None and tuple(np.shape(value)) != expected:
                raise ValueError(f"set {self.set_id}: {kind} of shape {np.shape(value)} for "
                                 f"{n} images; expected {list(expected)}")

    def task(self) -> dict[str, list]:
        """The raw conditions as JSON-ready lists (the shards' ``task`` column)."""
        return encode_task(self.camera, self.position)


@dataclass
class TaskReadReport:
    """What a reader skipped (``on_bad="skip"``) and why: counts by reason and a few examples."""

    sets: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(detail)

    def to_dict(self) -> dict[str, Any]:
        return {"sets": self.sets, "skipped": dict(self.skipped), "examples": self.examples}
