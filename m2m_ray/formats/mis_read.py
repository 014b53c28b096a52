"""Reading MIS shards back (the write side and the layout are ``m2m_ray.formats.mis``): whole
samples (``iter_shard``, ``iter_mis``), the training reader that reads only the columns a set
needs (``iter_sets``), the same rows as a Ray Dataset (``read_mis``), and the one guarded decode of
stored latents and JSON. A shard that cannot be read as MIS, a set whose stored data do not decode
and a shard whose set count differs from its committed stats raise ``CorruptShardError`` naming
the shard (and the set).

A sample is a dict::

    caption_id int, shard_id int, split str, caption str, url str, seeds list[int],
    images list[bytes] (encoded, in seed order), image_ext str,
    latents np.ndarray float16 [N, 4, h, w] | None, metadata dict,
    task dict | None (a task dataset's raw per-image conditions; None in MIS and in shards
    written before the column existed)
"""

from __future__ import annotations

import json
import tarfile
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.formats.mis import (
    IMAGE_EXTENSIONS,
    CorruptShardError,
    Format,
    committed_shards,
    npy_to_latents,
)

# What a user can do about a bad shard, appended to every read error of this module.
BAD_SHARD_HELP = ("Check the dataset with python -m m2m_ray.mis.verify <MIS root> (it lists every "
                  "bad shard); training can skip bad shards and sets with data.on_bad_data=skip")


def decode_latents(data: bytes, where: str) -> np.ndarray:
    """Stored ``.npy`` latents → float16 ``[n, 4, h, w]``; the one guarded decode of stored latents.
    Raises ``CorruptShardError`` naming ``where`` (shard and set) for bytes that are no latents."""
    try:
        latents = npy_to_latents(data)
    except Exception as err:  # numpy raises ValueError, EOFError, OSError... for broken .npy bytes
        raise CorruptShardError(f"{where}: stored latents ({len(data)} bytes) cannot be decoded: "
                                f"{type(err).__name__}: {str(err).rstrip('.')}. {BAD_SHARD_HELP}"
                                ) from err
    if latents.ndim != 4 or not np.issubdtype(latents.dtype, np.floating):
        raise CorruptShardError(f"{where}: stored latents have shape {latents.shape} and dtype "
                                f"{latents.dtype}, not float [n, 4, h, w]. {BAD_SHARD_HELP}")
    return latents


def decode_json(data: bytes | str, where: str) -> Any:
    """JSON stored in a shard (a WebDataset header, Parquet metadata) → its value; raises
    ``CorruptShardError`` naming ``where``."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptShardError(f"{where}: stored JSON cannot be decoded: {str(err).rstrip('.')}. "
                                f"{BAD_SHARD_HELP}"
                                ) from err


def _parquet_row_to_sample(row: dict[str, Any], uri: str,
                           image_ext: str | None = None) -> dict[str, Any]:
    where = f"shard {uri}: set {row['caption_id']}"
    metadata = decode_json(row["metadata"], where)
    return {
        "caption_id": int(row["caption_id"]), "shard_id": int(row["shard_id"]),
        "split": row["split"], "caption": row["caption"], "url": row["url"],
        "seeds": [int(s) for s in row["seeds"]], "images": list(row["images"]),
        "image_ext": image_ext or IMAGE_EXTENSIONS[metadata["image_format"]],
        "latents": None if row["latents"] is None else decode_latents(row["latents"], where),
        "metadata": metadata,
        "task": None if row.get("task") is None else decode_json(row["task"], where),
    }


def _parquet_rows(uri: str, storage_cfg: StorageConfig | None,
                  columns_for: Callable[[pq.ParquetFile, int], list[str] | None]
                  ) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet shard as dicts, row group by row group and a few sets at a time (a
    512 px shard of 1,000 sets is ~2 GB); ``columns_for(shard, group)`` picks the columns of each
    row group (None: all). Any read error is a ``CorruptShardError`` naming the shard."""
    fs, path = storage.pyarrow_filesystem(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            for group in range(shard.num_row_groups):
                for batch in shard.iter_batches(batch_size=8, row_groups=[group],
                                                columns=columns_for(shard, group)):
                    yield from batch.to_pylist()
    except CorruptShardError:
        raise
    except (OSError, ValueError, pa.ArrowException) as err:
        raise CorruptShardError(f"cannot read Parquet shard {uri}: {type(err).__name__}: "
                                f"{str(err).rstrip('.')}. "
                                f"{BAD_SHARD_HELP}") from err


def iter_parquet_shard(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[dict]:
    for row in _parquet_rows(uri, storage_cfg, lambda shard, group: None):
        yield _parquet_row_to_sample(row, uri)


def iter_webdataset_shard(uri: str, storage_cfg: StorageConfig | None = None,
                          decode: bool = True) -> Iterator[dict]:
    """Groups tar members ``<key>.<member>`` by key, in file order, into samples (``decode=False``:
    latents stay the stored ``.npy`` bytes)."""
    fs, path = storage.fsspec_filesystem(uri, storage_cfg)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                member_key, _, member = info.name.partition(".")
                if key is not None and member_key != key:
                    yield _wds_group_to_sample(uri, key, members, decode)
                    members = {}
                key = member_key
                members[member] = tar.extractfile(info).read()
            if key is not None:
                yield _wds_group_to_sample(uri, key, members, decode)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CorruptShardError(f"cannot read WebDataset shard {uri}: {type(err).__name__}: "
                                f"{str(err).rstrip('.')}. "
                                f"{BAD_SHARD_HELP}") from err


def _wds_group_to_sample(uri: str, key: str, members: dict[str, bytes],
                         decode: bool = True) -> dict[str, Any]:
    """One set's members → a sample; ``decode=False`` leaves ``latents`` as the stored bytes."""
    if "json" not in members:
        raise CorruptShardError(f"WebDataset shard {uri}: set {key} has no json member. "
                                f"{BAD_SHARD_HELP}")
    where = f"WebDataset shard {uri}: set {key}"
    header = decode_json(members["json"], where)
    ext = header["image_ext"]
    images = [members.get(f"{i:02d}.{ext}") for i in range(len(header["seeds"]))]
    if any(image is None for image in images):
        missing = [i for i, image in enumerate(images) if image is None]
        raise CorruptShardError(f"WebDataset shard {uri}: set {key} lacks images {missing}. "
                                f"{BAD_SHARD_HELP}")
    latents = members.get("latents.npy")
    return _header_sample(header, images, None if latents is None or not decode
                          else decode_latents(latents, where))


def _header_sample(header: dict[str, Any], images: list, latents: Any) -> dict[str, Any]:
    """A sample from a WebDataset set's JSON header (``SetRecord.json_header``) and members."""
    return {
        "caption_id": int(header["caption_id"]), "shard_id": int(header["shard_id"]),
        "split": header["split"], "caption": header["caption"], "url": header["url"],
        "seeds": [int(s) for s in header["seeds"]], "images": images,
        "image_ext": header["image_ext"], "latents": latents, "metadata": header["metadata"],
        "task": header.get("task"),
    }


def iter_sets(uri: str, storage_cfg: StorageConfig | None, want_images: bool,
              want_task: bool = False) -> Iterator[dict[str, Any]]:
    """The training reader: one dict ``{caption_id, split, latents, images?, task?}`` per set,
    reading only those columns (Parquet: the images column only with ``want_images`` or for row
    groups with sets that lack latents; the task column only with ``want_task``). ``latents`` are
    the stored ``.npy`` bytes (or None): the consumer decodes them with ``decode_latents``, so a
    corrupt set is a bad *set* it can skip, not the end of the shard; ``task`` is the stored JSON
    (or None), decoded by the consumer for the same reason."""
    if uri.endswith(".parquet"):
        yield from _iter_parquet_sets(uri, storage_cfg, want_images, want_task)
    else:
        for sample in iter_webdataset_shard(uri, storage_cfg, decode=False):
            task = sample["task"]
            yield {"caption_id": sample["caption_id"], "split": sample["split"],
                   "latents": sample["latents"], "images": sample["images"],
                   **({"task": None if task is None else json.dumps(task)} if want_task else {})}


def _iter_parquet_sets(uri: str, storage_cfg, want_images: bool, want_task: bool
                       ) -> Iterator[dict[str, Any]]:
    """Which row groups lack latents (and so need their images) comes from column statistics."""
    def columns_for(shard: pq.ParquetFile, group: int) -> list[str]:
        names = shard.schema_arrow.names
        if want_task and "task" not in names:
            raise CorruptShardError(f"shard {uri} has no task column: it is a MIS shard, not a "
                                    "task dataset's (m2m_ray.data.tasks.build writes those); "
                                    "train with m2m.task_conditions only on a task dataset")
        stats = shard.metadata.row_group(group).column(names.index("latents")).statistics
        missing_latents = stats is None or not stats.has_null_count or stats.null_count > 0
        return ["caption_id", "split", "latents", *(["images"] if want_images or missing_latents
                                                    else []), *(["task"] if want_task else [])]

    yield from _parquet_rows(uri, storage_cfg, columns_for)


def iter_shard(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[dict]:
    if uri.endswith(".parquet"):
        return iter_parquet_shard(uri, storage_cfg)
    if uri.endswith(".tar"):
        return iter_webdataset_shard(uri, storage_cfg)
    raise ValueError(f"not a MIS shard: {uri} (expected .parquet or .tar)")


def iter_mis(root: str, fmt: Format = "parquet", storage_cfg: StorageConfig | None = None,
             split: str | None = None) -> Iterator[dict]:
    """Every sample of the committed shards of ``fmt``, optionally of one split. Raises
    ``CorruptShardError`` naming a shard that cannot be read or whose set count differs from its
    committed stats (a file cut between two sets reads as a valid, shorter shard)."""
    for uri, stats in committed_shards(root, fmt, storage_cfg):
        read = 0
        for sample in iter_shard(uri, storage_cfg):
            read += 1
            if split is None or sample["split"] == split:
                yield sample
        check_set_count(uri, read, stats["sets"])


def check_set_count(uri: str, read: int, committed: int) -> None:
    """Raises ``CorruptShardError`` when a whole read of shard ``uri`` gave ``read`` sets but its
    stats committed another number."""
    if read != committed:
        raise CorruptShardError(f"shard {uri}: {read} sets read but its stats committed "
                                f"{committed}: the file was truncated or changed after it was "
                                f"committed. {BAD_SHARD_HELP}")


def read_mis(root: str, fmt: Format = "parquet", storage_cfg: StorageConfig | None = None,
             split: str | None = None, columns: list[str] | None = None):
    """The committed shards as a Ray Dataset of MIS rows (the sample columns, ``latents`` as the
    stored .npy bytes or None, ``metadata`` as a JSON string), optionally of one ``split`` and
    only some ``columns`` (Parquet reads no others; WebDataset reads whole shards), which must
    include ``split`` when ``split`` is given.

    One Ray Data task per shard reads it through this module's guarded readers (pyarrow, tarfile)
    rather than ``ray.data.read_parquet`` / ``read_webdataset``: those name no file in their errors
    (a truncated shard ends a job with a bare ``ArrowInvalid`` or ``tarfile.ReadError``) and cannot
    check a shard's set count against its committed stats, so a tar cut between two sets would
    read as a shorter, valid shard. Here any such shard raises ``CorruptShardError`` naming it,
    whichever engine reads the dataset. Raises ``FileNotFoundError`` when no shard is committed."""
    import ray

    shards = committed_shards(root, fmt, storage_cfg)
    if not shards:
        raise FileNotFoundError(f"no committed {fmt} shards under {root}/mis; build MIS first "
                                "(pipelines/build_mis.py) or check the format and the path")
    items = [{"uri": uri, "sets": int(stats["sets"])} for uri, stats in shards]
    return ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _shard_rows, fn_kwargs={"storage_cfg": storage_cfg, "split": split, "columns": columns})


def _shard_rows(item: dict[str, Any], storage_cfg: StorageConfig | None, split: str | None,
                columns: list[str] | None) -> Iterator[dict[str, Any]]:
    """``read_mis``'s task: the MIS rows of one shard (``item``: uri, committed set count)."""
    uri = item["uri"]
    if uri.endswith(".parquet"):
        rows: Iterator[dict[str, Any]] = _parquet_rows(uri, storage_cfg,
                                                       lambda shard, group: columns)
    else:
        rows = (_stored_row(s) for s in iter_webdataset_shard(uri, storage_cfg, decode=False))
    read = 0
    for row in rows:
        read += 1
        if split is None or row["split"] == split:
            if columns is None:
                row.setdefault("task", None)  # Parquet shards written before the column
                yield row
            else:
                yield {key: row[key] for key in columns}
    check_set_count(uri, read, item["sets"])


def _stored_row(sample: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset sample (``decode=False``) → the Parquet row layout: metadata a JSON string,
    no ``image_ext`` (the Parquet columns have none)."""
    row = {key: value for key, value in sample.items() if key != "image_ext"}
    row["metadata"] = json.dumps(sample["metadata"], sort_keys=True)
    row["task"] = None if sample["task"] is None else json.dumps(sample["task"], sort_keys=True)
    return row
