"""Reading MIS shards back (the write side and the layout are ``m2m_ray.formats.mis``, the fields
``m2m_ray.formats.mis_fields``): samples of one shard (``iter_shard``) or of a dataset
(``iter_mis``), the training reader (``iter_sets``), the same sets as a Ray Dataset
(``read_mis``), and the one guarded decode of stored latents (``decode_latents``).

Every reader returns the same ``MISSample`` from both formats, of the fields ``columns`` names
(None: all of them; Parquet reads no other column): ``latents`` the stored ``.npy`` bytes (or
None), ``metadata`` and ``task`` decoded JSON; a field a set or an older shard lacks reads as its
table default. A shard that cannot be read as MIS, a set whose stored data do not decode and a
shard whose set count differs from its committed stats raise ``CorruptShardError`` naming the
shard (and the set).
"""

from __future__ import annotations

import tarfile
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.formats.mis import Format, committed_shards
from m2m_ray.formats.mis_fields import (
    BAD_SHARD_HELP,
    CorruptShardError,
    MISField,
    MISSample,
    check_columns,
    current_fields,
    from_stored_row,
    from_wds_members,
    npy_to_latents,
    parquet_columns,
    parquet_schema,
    to_stored_row,
)

_BLOCK_SETS = 16  # sets per block of read_mis (a 512 px set is ~2 MB)


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


def _has_null_latents(shard: pq.ParquetFile, group: int, present: list[str]) -> bool:
    """Whether row group ``group`` may hold sets without latents (column statistics)."""
    if "latents" not in present:
        return True
    stats = shard.metadata.row_group(group).column(present.index("latents")).statistics
    return stats is None or not stats.has_null_count or stats.null_count > 0


def _parquet_samples(uri: str, storage_cfg: StorageConfig | None, columns: list[str],
                     fields: Sequence[MISField], images_without_latents: bool = False
                     ) -> Iterator[MISSample]:
    """A Parquet shard's samples, row group by row group and a few sets at a time (a 512 px
    shard of 1,000 sets is ~2 GB), reading only the columns ``columns`` needs (plus ``images``
    for row groups with sets lacking latents, with ``images_without_latents``). Any read error is
    a ``CorruptShardError`` naming the shard."""
    fs, path = storage.pyarrow_filesystem(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            present = shard.schema_arrow.names
            read = parquet_columns(columns, present, fields)
            if "caption_id" in present and "caption_id" not in read:
                read.append("caption_id")  # names the set in errors
            for group in range(shard.num_row_groups):
                names = columns
                if (images_without_latents and "images" not in columns
                        and _has_null_latents(shard, group, present)):
                    names = [*columns, "images"]
                group_read = read + [c for c in names if c not in read and c in present]
                for batch in shard.iter_batches(batch_size=8, row_groups=[group],
                                                columns=group_read):
                    for row in batch.to_pylist():
                        where = f"shard {uri}: set {row.get('caption_id')}"
                        yield from_stored_row(row, names, where, fields)
    except CorruptShardError:
        raise
    except (OSError, ValueError, pa.ArrowException) as err:
        raise CorruptShardError(f"cannot read Parquet shard {uri}: {type(err).__name__}: "
                                f"{str(err).rstrip('.')}. "
                                f"{BAD_SHARD_HELP}") from err


def _webdataset_samples(uri: str, storage_cfg: StorageConfig | None, columns: list[str],
                        fields: Sequence[MISField]) -> Iterator[MISSample]:
    """Groups tar members ``<key>.<member>`` by key, in file order, into samples."""
    fs, path = storage.fsspec_filesystem(uri, storage_cfg)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                member_key, _, member = info.name.partition(".")
                if key is not None and member_key != key:
                    yield from_wds_members(members, columns,
                                           f"WebDataset shard {uri}: set {key}", fields)
                    members = {}
                key = member_key
                members[member] = tar.extractfile(info).read()
            if key is not None:
                yield from_wds_members(members, columns, f"WebDataset shard {uri}: set {key}",
                                       fields)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CorruptShardError(f"cannot read WebDataset shard {uri}: {type(err).__name__}: "
                                f"{str(err).rstrip('.')}. "
                                f"{BAD_SHARD_HELP}") from err


def iter_parquet_shard(uri: str, storage_cfg: StorageConfig | None = None,
                       columns: Sequence[str] | None = None) -> Iterator[MISSample]:
    """The samples (of ``columns``) of one Parquet shard, in order."""
    fields = current_fields()
    return _parquet_samples(uri, storage_cfg, check_columns(columns, fields), fields)


def iter_webdataset_shard(uri: str, storage_cfg: StorageConfig | None = None,
                          columns: Sequence[str] | None = None) -> Iterator[MISSample]:
    """The samples (of ``columns``) of one WebDataset shard, in order (the whole tar is read)."""
    fields = current_fields()
    return _webdataset_samples(uri, storage_cfg, check_columns(columns, fields), fields)


def iter_shard(uri: str, storage_cfg: StorageConfig | None = None,
               columns: Sequence[str] | None = None) -> Iterator[MISSample]:
    """The samples of one shard, either format (by its extension: ``.parquet``, ``.tar``)."""
    if uri.endswith(".parquet"):
        return iter_parquet_shard(uri, storage_cfg, columns)
    if uri.endswith(".tar"):
        return iter_webdataset_shard(uri, storage_cfg, columns)
    raise ValueError(f"not a MIS shard: {uri} (expected .parquet or .tar)")


def iter_sets(uri: str, storage_cfg: StorageConfig | None,
              columns: Sequence[str]) -> Iterator[MISSample]:
    """The training reader: the samples of one shard, of ``columns``; when ``columns`` has
    ``latents`` but not ``images``, a set without stored latents also carries its ``images``
    (Parquet reads the images column only for row groups whose latents column statistics count
    nulls). The consumer decodes ``latents`` (``decode_latents``), so a corrupt set is a bad
    *set* it can skip, not the end of the shard."""
    fields = current_fields()
    columns = check_columns(columns, fields)
    fallback = "latents" in columns and "images" not in columns
    if uri.endswith(".parquet"):
        samples = _parquet_samples(uri, storage_cfg, columns, fields,
                                   images_without_latents=fallback)
    else:
        samples = _webdataset_samples(uri, storage_cfg,
                                      [*columns, "images"] if fallback else columns, fields)
    for sample in samples:
        if fallback and sample["latents"] is not None:
            sample.pop("images", None)
        yield sample


def _with(columns: list[str], name: str) -> list[str]:
    return columns if name in columns else [*columns, name]


def iter_mis(root: str, fmt: Format = "parquet", storage_cfg: StorageConfig | None = None,
             split: str | None = None, columns: Sequence[str] | None = None
             ) -> Iterator[MISSample]:
    """Every sample (of ``columns``) of the committed shards of ``fmt``, optionally of one split.
    Raises ``CorruptShardError`` naming a shard that cannot be read or whose set count differs
    from its committed stats (a file cut between two sets reads as a valid, shorter shard)."""
    columns = check_columns(columns, current_fields())
    for uri, stats in committed_shards(root, fmt, storage_cfg):
        read = 0
        for sample in iter_shard(uri, storage_cfg, _with(columns, "split")):
            read += 1
            if split is None or sample["split"] == split:
                yield {name: sample[name] for name in columns}  # type: ignore[misc]
        check_set_count(uri, read, stats["sets"])


def check_set_count(uri: str, read: int, committed: int) -> None:
    """Raises ``CorruptShardError`` when a whole read of shard ``uri`` gave ``read`` sets but its
    stats committed another number."""
    if read != committed:
        raise CorruptShardError(f"shard {uri}: {read} sets read but its stats committed "
                                f"{committed}: the file was truncated or changed after it was "
                                f"committed. {BAD_SHARD_HELP}")


def read_mis(root: str, fmt: Format = "parquet", storage_cfg: StorageConfig | None = None,
             split: str | None = None, columns: Sequence[str] | None = None):
    """The committed shards as a Ray Dataset of stored rows (``mis_fields.from_stored_row`` turns
    one into its ``MISSample``): ``latents`` the stored .npy bytes or null, JSON fields as JSON
    text, every column typed by the field table (``parquet_schema``, never Arrow's null type),
    optionally of one ``split`` and only some ``columns`` (Parquet reads no others; WebDataset
    reads whole shards).

    One Ray Data task per shard reads it through this module's guarded readers (pyarrow, tarfile)
    rather than ``ray.data.read_parquet`` / ``read_webdataset``: those name no file in their errors
    (a truncated shard ends a job with a bare ``ArrowInvalid`` or ``tarfile.ReadError``) and cannot
    check a shard's set count against its committed stats, so a tar cut between two sets would
    read as a shorter, valid shard. Here any such shard raises ``CorruptShardError`` naming it,
    whichever engine reads the dataset. Raises ``FileNotFoundError`` when no shard is committed,
    ``ValueError`` for a column that is no MIS field."""
    import ray

    fields = current_fields()  # resolved here and shipped: the tasks run in other processes
    columns = check_columns(columns, fields)
    shards = committed_shards(root, fmt, storage_cfg)
    if not shards:
        raise FileNotFoundError(f"no committed {fmt} shards under {root}/mis; build MIS first "
                                "(pipelines/build_mis.py) or check the format and the path")
    items = [{"uri": uri, "sets": int(stats["sets"])} for uri, stats in shards]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _shard_tables, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"storage_cfg": storage_cfg, "split": split, "columns": columns,
                   "fields": fields})


def _shard_tables(item: pa.Table, storage_cfg: StorageConfig | None, split: str | None,
                  columns: list[str], fields: Sequence[MISField]) -> Iterator[pa.Table]:
    """``read_mis``'s task: the stored rows of one shard (``item``: uri, committed set count) as
    typed tables of up to ``_BLOCK_SETS`` rows."""
    (uri,), (sets,) = item["uri"].to_pylist(), item["sets"].to_pylist()
    read_columns = _with(columns, "split") if split is not None else columns
    reader = _parquet_samples if uri.endswith(".parquet") else _webdataset_samples
    schema = parquet_schema(fields, columns)
    rows: list[dict[str, Any]] = []
    read = emitted = 0
    for sample in reader(uri, storage_cfg, read_columns, fields):
        read += 1
        if split is None or sample["split"] == split:
            rows.append(to_stored_row(sample, columns, fields))
        if len(rows) == _BLOCK_SETS:
            yield pa.Table.from_pylist(rows, schema=schema)
            emitted, rows = emitted + len(rows), []
    check_set_count(uri, read, sets)
    if rows or not emitted:  # an empty shard of the split still gives the typed schema
        yield pa.Table.from_pylist(rows, schema=schema)
