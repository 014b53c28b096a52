"""Sets of real images from an MSCOCO-format annotation file, grouped by category (paper §8.3).

The paper's zero-shot study conditions M2M on real photos that share a category. From
``instances_*.json`` (the ``images``, ``annotations`` and ``categories`` lists of the COCO
format)::

    grouping = coco_sets("coco/annotations/instances_val2017.json", images_per_set=5)
    for s in grouping.sets:            # CocoSet(set_id="coco-18-000", category="dog", image_uris=[...])
        ...

Decisions (the paper does not spell them out):
- an image joins exactly one set: that of its *dominant* category, the one with the largest total
  annotated area in it (ties: the smaller category id), so sets are disjoint; crowd annotations
  count only with ``include_crowd``;
- ``min_area_fraction`` keeps only images whose dominant category covers at least that fraction of
  the image (0: keep all), so a set's images are about their category;
- a category's images are in image-id order; ``images_per_set`` cuts them into consecutive sets of
  that size (the remainder is dropped), None keeps one set per category; sets with fewer than
  ``min_images`` images are dropped;
- image files are ``<images_root>/<file_name>``; ``images_root`` defaults to COCO's own layout,
  ``<dataset>/val2017/`` beside ``<dataset>/annotations/instances_val2017.json``.

The sets feed ``pipelines/generate.py`` (``inputs.coco_annotations``): the first K images of a set
are the context, no caption (the category is in the set's meta).
"""

from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from m2m_ray import storage as st

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig


class CocoFormatError(ValueError):
    """An annotation file that does not follow the COCO instances format."""


@dataclass(frozen=True)
class CocoSet:
    set_id: str                # coco-<category id>-<index of the set in its category>
    category_id: int
    category: str
    image_ids: list[int]
    image_uris: list[str]


@dataclass(frozen=True)
class CocoGrouping:
    sets: list[CocoSet]
    counts: dict[str, int] = field(default_factory=dict)  # images: total, grouped, dropped and why


def default_images_root(annotations_uri: str) -> str:
    """``<dataset>/annotations/instances_<split>.json`` → ``<dataset>/<split>``."""
    folder, name = posixpath.split(annotations_uri.rstrip("/"))
    stem = name.removesuffix(".json")
    if not stem.startswith("instances_"):
        raise ValueError(f"cannot infer the image folder of {annotations_uri!r} (expected a name "
                         "like instances_val2017.json); set coco_images to the image folder")
    return st.join(posixpath.dirname(folder), stem.removeprefix("instances_"))


def _table(data: dict[str, Any], key: str, fields: Sequence[str], uri: str) -> list[dict]:
    rows = data.get(key)
    if not isinstance(rows, list):
        raise CocoFormatError(f"{uri}: no list {key!r} at the top level; expected a COCO "
                              "instances file with images, annotations and categories")
    for i, row in enumerate(rows):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise CocoFormatError(f"{uri}: {key}[{i}] lacks {missing} (got {str(row)[:200]})")
    return rows


def coco_sets(annotations_uri: str, images_root: str | None = None, *,
              images_per_set: int | None = None, min_images: int = 1,
              min_area_fraction: float = 0.0, categories: Sequence[str | int] | None = None,
              include_crowd: bool = False,
              storage: "StorageConfig | None" = None) -> CocoGrouping:
    """Group the images of a COCO instances file into sets by dominant category."""
    if images_per_set is not None and images_per_set < 1:
        raise ValueError(f"images_per_set {images_per_set}: expected >= 1 or None")
    try:
        data = json.loads(st.read_bytes(annotations_uri, storage))
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{annotations_uri}: not valid JSON ({err})") from None
    images = {row["id"]: row for row in _table(data, "images", ("id", "file_name"), annotations_uri)}
    names = {row["id"]: row["name"] for row in
             _table(data, "categories", ("id", "name"), annotations_uri)}
    wanted = None
    if categories is not None:
        by_name = {name: cid for cid, name in names.items()}
        unknown = [c for c in categories if c not in names and c not in by_name]
        if unknown:
            raise ValueError(f"categories {unknown} are not in {annotations_uri} (it has "
                             f"{len(names)}: {', '.join(sorted(by_name)[:10])}, ...)")
        wanted = {by_name.get(c, c) for c in categories}

    area: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for ann in _table(data, "annotations", ("image_id", "category_id", "area"), annotations_uri):
        if ann["image_id"] not in images or ann["category_id"] not in names:
            raise CocoFormatError(f"{annotations_uri}: annotation {ann.get('id')} refers to image "
                                  f"{ann['image_id']} / category {ann['category_id']}, which the "
                                  "file does not define")
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        area[ann["image_id"]][ann["category_id"]] += float(ann["area"])

    root = images_root or default_images_root(annotations_uri)
    members: dict[int, list[int]] = defaultdict(list)
    counts = {"images": len(images), "without_annotations": 0, "below_min_area": 0,
              "other_categories": 0}
    for image_id in sorted(images):
        if not area.get(image_id):
            counts["without_annotations"] += 1
            continue
        category, covered = min(area[image_id].items(), key=lambda item: (-item[1], item[0]))
        image = images[image_id]
        pixels = float(image.get("width", 0)) * float(image.get("height", 0))
        if min_area_fraction > 0 and (pixels <= 0 or covered / pixels < min_area_fraction):
            counts["below_min_area"] += 1
            continue
        if wanted is not None and category not in wanted:
            counts["other_categories"] += 1
            continue
        members[category].append(image_id)

    sets, dropped = [], 0
    for category in sorted(members):
        ids = members[category]
        size = images_per_set or len(ids)
        for index, start in enumerate(range(0, len(ids), size)):
            chunk = ids[start:start + size]
            if len(chunk) < max(min_images, size if images_per_set else 1):
                dropped += len(chunk)
                continue
            sets.append(CocoSet(f"coco-{category}-{index:03d}", category, names[category], chunk,
                                [st.join(root, *images[i]["file_name"].split("/"))
                                 for i in chunk]))
    counts["in_too_small_sets"] = dropped
    counts["grouped"] = sum(len(s.image_ids) for s in sets)
    return CocoGrouping(sets, counts)
