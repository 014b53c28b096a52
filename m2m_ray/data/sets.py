"""The image sets a generation job reads, as rows: user files, MIS sets, COCO category sets.

Every source gives rows ``{order, set_id, caption, split, meta (JSON), images | uris}`` — encoded
context images, or URIs an actor reads — for ``m2m_ray.sampling.job.M2MSetGenerator``:

- ``images``: files / folders / globs → one set (id ``input``) whose context is all of them;
  every file is decoded here first, so an unreadable one stops the job naming it.
- ``mis_uri`` (+ ``mis_split``) or ``mis_shard``: MIS sets, context = their first K images; with
  Ray the dataset is read by Ray Data (``read_mis``), never through the driver. ``max_sets``
  picks a random, reproducible choice of N sets (``choose_caption_ids``; paper §8.4: "a random
  selection of 10K samples from the test split").
- ``coco_annotations``: real-image sets by category (``m2m_ray.data.coco_sets``), first K images.

``meta.split`` of a set is its MIS split, or ``external`` for images that are not from MIS (user
files, COCO): evaluate those with ``--protocol.split=null``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from m2m_ray import storage as st
from m2m_ray.config import StorageConfig
from m2m_ray.data.coco_sets import coco_sets
from m2m_ray.data.config import GenerateInputsConfig
from m2m_ray.data.image_inputs import expand_image_specs, open_image
from m2m_ray.formats.mis_fields import MISSample, stored_table
from m2m_ray.formats.mis_read import iter_mis, iter_shard, read_mis
from m2m_ray.formats.rng import Salt

log = logging.getLogger(__name__)

EXTERNAL_SPLIT = "external"

# The MIS fields a generation set is made of (a set's context: its first K images).
_MIS_COLUMNS = ("caption_id", "shard_id", "split", "caption", "seeds", "images", "task")


def file_set_rows(inputs: GenerateInputsConfig,
                  storage: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Rows ``{order, set_id, caption, split, meta, uris}`` of the images / COCO sources."""
    if inputs.images:
        uris = expand_image_specs(inputs.images, storage)
        for uri in uris:  # fail now, naming the file, rather than inside an actor
            open_image(st.read_bytes(uri, storage), uri)
        return [{"order": 0, "set_id": "input", "caption": inputs.caption,
                 "split": EXTERNAL_SPLIT, "meta": json.dumps({"source": "images"}),
                 "uris": uris}]
    K = inputs.context_images
    grouping = coco_sets(inputs.coco_annotations, inputs.coco_images, images_per_set=K or None,
                         min_images=max(K, 1), min_area_fraction=inputs.coco_min_area_fraction,
                         storage=storage)
    log.info("COCO grouping: %s", grouping.counts)
    sets = grouping.sets[: inputs.max_sets]
    return [{"order": i, "set_id": s.set_id, "caption": None, "split": EXTERNAL_SPLIT,
             "meta": json.dumps({"source": "coco", "category": s.category,
                                 "category_id": s.category_id, "image_ids": s.image_ids}),
             "uris": s.image_uris} for i, s in enumerate(sets)]


def local_mis_rows(inputs: GenerateInputsConfig,
                   storage: StorageConfig | None = None) -> Iterator[dict[str, Any]]:
    """MIS sets read in this process (engine=local), in shard order."""
    def samples(columns: Sequence[str] = _MIS_COLUMNS) -> Iterator[MISSample]:
        if inputs.mis_shard:
            return (s for s in iter_shard(inputs.mis_shard, storage, columns)
                    if inputs.mis_split is None or s["split"] == inputs.mis_split)
        return iter_mis(inputs.mis_uri, inputs.mis_format, storage, inputs.mis_split, columns)

    rows: Iterable[MISSample] = samples()
    if inputs.max_sets:  # two passes: caption ids first, then only the chosen sets' rows
        ids = [s["caption_id"] for s in samples(["caption_id", "split"])]
        chosen = set(choose_caption_ids(ids, inputs.max_sets, inputs.selection_seed).tolist())
        rows = (s for s in samples() if s["caption_id"] in chosen)
    for sample in rows:  # the Ray path's conversion, one set at a time
        yield from _mis_batch_to_sets(stored_table([sample], _MIS_COLUMNS),
                                      inputs.context_images).to_pylist()


def selection_keys(caption_ids: np.ndarray, seed: int) -> np.ndarray:
    """uint64 ``[n]``: a seeded hash of each caption id (splitmix64 of id + seed-derived offset),
    uniform and independent across ids; the N smallest keys are a uniform random N-subset."""
    with np.errstate(over="ignore"):
        offset = np.random.SeedSequence([seed, Salt.SET_SELECTION]).generate_state(1, np.uint64)[0]
        z = np.asarray(caption_ids).astype(np.uint64) + offset
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def choose_caption_ids(caption_ids, max_sets: int, seed: int) -> np.ndarray:
    """The caption ids of a random choice of ``max_sets`` sets (all of them if fewer), sorted: the
    ids with the smallest ``selection_keys``. A pure function of the id *set* and the seed — the
    order the shards are read in, the number of shards, blocks or workers do not change it, and a
    larger ``max_sets`` extends a smaller one's choice. Raises ``ValueError`` on duplicate ids."""
    ids = np.asarray(caption_ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("MIS caption ids repeat across the sets read; a verified MIS has one set "
                         "per caption id (run python -m m2m_ray.mis.verify on the dataset)")
    if len(ids) <= max_sets:
        return np.sort(ids)
    keys = selection_keys(ids, seed)
    return np.sort(ids[np.argpartition(keys, max_sets - 1)[:max_sets]])


def _mis_batch_to_sets(table, K: int):
    """MIS stored rows (pyarrow, ``_MIS_COLUMNS``) → set rows with the first K images; the one
    conversion of both engines (Ray Data batches; the local path's single sets)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    metas = [json.dumps({"source": "mis", "caption_id": cid, "shard_id": sid,
                         "context_seeds": seeds[:K]})
             for cid, sid, seeds in zip(table["caption_id"].to_pylist(),
                                        table["shard_id"].to_pylist(),
                                        table["seeds"].to_pylist())]
    # a task dataset's raw per-image conditions (JSON), for the sampler; "" in MIS
    task = pc.fill_null(table["task"], "")
    return pa.table({"order": table["caption_id"],
                     "set_id": pc.cast(table["caption_id"], pa.string()),
                     "caption": table["caption"], "split": table["split"],
                     "meta": pa.array(metas, pa.string()),
                     "images": pc.list_slice(table["images"], 0, K), "task": task})


def local_set_rows(inputs: GenerateInputsConfig,
                   storage: StorageConfig | None = None) -> Iterable[dict[str, Any]]:
    """The input sets as rows, read in this process (engine=local)."""
    if inputs.images or inputs.coco_annotations:
        return file_set_rows(inputs, storage)
    return local_mis_rows(inputs, storage)


def ray_set_dataset(inputs: GenerateInputsConfig, storage: StorageConfig | None = None):
    """The input sets as a Ray Dataset (MIS through Ray Data's readers)."""
    import ray

    if inputs.mis_shard:
        return ray.data.from_items(list(local_mis_rows(inputs, storage)))  # one shard: the driver
    if not inputs.mis_uri:
        return ray.data.from_items(file_set_rows(inputs, storage))
    ds = read_mis(inputs.mis_uri, inputs.mis_format, storage, inputs.mis_split, _MIS_COLUMNS)
    if inputs.max_sets:
        # Pass 1 reads the caption ids alone (Parquet: one column) and chooses on the driver; pass
        # 2 keeps the chosen sets. No sort or shuffle of the split's image bytes.
        ids = read_mis(inputs.mis_uri, inputs.mis_format, storage, inputs.mis_split,
                       columns=["caption_id", "split"])
        all_ids = [batch["caption_id"] for batch in ids.iter_batches(
            batch_size=None, batch_format="numpy")]
        chosen = choose_caption_ids(np.concatenate(all_ids) if all_ids else [], inputs.max_sets,
                                    inputs.selection_seed)
        log.info("chose %d of %d MIS sets (max_sets, selection_seed %d)", len(chosen),
                 sum(map(len, all_ids)), inputs.selection_seed)
        ds = ds.map_batches(_keep_caption_ids, fn_kwargs={"chosen": chosen},
                            batch_format="pyarrow")
    return ds.map_batches(_mis_batch_to_sets, fn_kwargs={"K": inputs.context_images},
                          batch_format="pyarrow")


def _keep_caption_ids(table, chosen: np.ndarray):
    import pyarrow as pa
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table["caption_id"], value_set=pa.array(chosen)))
