"""The MIS on-disk contract: where shards live, how one is written and committed, the manifest,
and the listing of committed shards (both formats hold the same sets).

Layout under a dataset root (local path or s3://)::

    mis/parquet/<shard>.parquet       one row per image set
    mis/webdataset/<shard>.tar        one entry group per set: <key>.json, <key>.00.jpg ... <key>.latents.npy
    mis/stats/<shard>.json            the shard's commit mark, written last
    mis/manifest.json                 committed shards and totals, rewritten at the end of every run
    mis/generate_config.json          the settings every shard of this dataset was generated with

A shard is built in a local temporary folder (under ``shard_temp_root()``, one folder per live
process; a writer that starts sweeps the folders of dead processes), moved to its final names
(atomic rename locally; a single PUT on S3, which makes an object visible only once whole) and
committed by writing its stats JSON last. Readers and reruns trust only shards whose stats file exists, so a killed job never leaves
a partial shard that counts as committed, and a rerun redoes exactly the uncommitted ones.

What a set holds, and how each format stores each field, is the one field table of
``m2m_ray.formats.mis_fields``. Reading shards back (samples, the training reader, Ray Datasets,
guarded decodes) is ``m2m_ray.formats.mis_read``; only committed shards are listed (``committed_shards``) and read.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from typing import Any, Literal, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.formats.ids import shard_name

# IMAGE_EXTENSIONS, CorruptShardError and latents_to_npy are the contract's names for producers
# and readers; they are importable from here too.
from m2m_ray.formats.mis_fields import (  # noqa: F401
    IMAGE_EXTENSIONS,
    CorruptShardError,
    SetRecord,
    as_sample,
    current_fields,
    field_names,
    latents_to_npy,
    parquet_schema,
    to_stored_row,
    wds_members,
)

Format = Literal["parquet", "webdataset"]


def set_key(caption_id: int) -> str:
    """A set's WebDataset key: the zero-padded caption id (no dots, sorts like the ids)."""
    return f"{caption_id:020d}"


class MISLayout:
    """Paths of a MIS dataset rooted at ``root``."""

    def __init__(self, root: str, storage_cfg: StorageConfig | None = None):
        self.root = root
        self.storage = storage_cfg
        self.mis = storage.join(root, "mis")

    def parquet(self, sid: int) -> str:
        return storage.join(self.mis, "parquet", f"{shard_name(sid)}.parquet")

    def webdataset(self, sid: int) -> str:
        return storage.join(self.mis, "webdataset", f"{shard_name(sid)}.tar")

    def stats(self, sid: int) -> str:
        return storage.join(self.mis, "stats", f"{shard_name(sid)}.json")

    @property
    def manifest(self) -> str:
        return storage.join(self.mis, "manifest.json")

    @property
    def config(self) -> str:
        return storage.join(self.mis, "generate_config.json")

    def fault_marker(self, sid: int) -> str:
        return storage.join(self.mis, "_faults", f"{shard_name(sid)}.crashed")

    def is_committed(self, sid: int) -> bool:
        return storage.exists(self.stats(sid), self.storage)

    def committed_stats(self) -> dict[int, dict[str, Any]]:
        """Stats of every committed shard, keyed by shard id."""
        out = {}
        for uri in storage.list_files(storage.join(self.mis, "stats"), self.storage, ".json"):
            stats = json.loads(storage.read_bytes(uri, self.storage))
            out[int(stats["shard_id"])] = stats
        return out


def shard_temp_root() -> str:
    """The one local folder under which every ``ShardWriter`` of this user on this node builds
    its shards: ``<tempdir>/m2m_ray-mis-shards-<uid>``."""
    return os.path.join(tempfile.gettempdir(), f"m2m_ray-mis-shards-{os.getuid()}")


_process_temp: tuple[int, str] | None = None  # (locked fd, folder) of this process's temporaries


def _process_temp_dir() -> str:
    """This process's folder under ``shard_temp_root()``, created on first use beside a lock file
    it holds (``flock``) while it lives, so that a sweep can tell a dead process's folder from a
    live one without trusting pids."""
    global _process_temp
    if _process_temp is None or not os.path.isdir(_process_temp[1]):
        root = shard_temp_root()
        os.makedirs(root, exist_ok=True)
        name = f"pid{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(os.path.join(root, f"{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # new and unique: never blocks; released when we die
        folder = os.path.join(root, name)
        os.makedirs(folder)  # after the lock: a folder without a lock file is a dead one's
        _process_temp = (fd, folder)
    return _process_temp[1]


def sweep_shard_temps() -> list[str]:
    """Remove the temporary folders (and lock files) that processes which are gone left under
    ``shard_temp_root()`` (a killed actor's partial shards, ~2 GB per format at 512 px); a
    folder whose lock a live process holds is left alone. Returns the removed folders."""
    root = shard_temp_root()
    if not os.path.isdir(root):
        return []
    removed = []
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False):
            continue
        lock = f"{entry.path}.lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # its lock was swept, or it predates locks: no live owner
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process is writing there
            shutil.rmtree(entry.path, ignore_errors=True)
            if fd is not None:
                os.unlink(lock)
            removed.append(entry.path)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


class ShardWriter:
    """Writes one shard's sets, in order, to local temporary files; ``commit`` publishes them.

    The temporary files live in this process's folder under ``shard_temp_root()``; starting a
    writer first sweeps the folders of processes that died (``sweep_shard_temps``), so a killed
    actor's partial shard is removed by the next writer on its node.

    Parquet gets a row group per ``add`` call; the tar is streamed, with fixed member metadata
    (mtime 0, uid 0) so the same sets give the same bytes.
    """

    def __init__(self, layout: MISLayout, sid: int, formats: list[str]):
        self.layout, self.sid, self.formats = layout, sid, list(formats)
        sweep_shard_temps()
        self._tmp = tempfile.mkdtemp(prefix=f"{shard_name(sid)}-", dir=_process_temp_dir())
        self._fields = current_fields()
        self._parquet = (pq.ParquetWriter(os.path.join(self._tmp, "shard.parquet"),
                                          parquet_schema(self._fields))
                         if "parquet" in formats else None)
        self._tar = (tarfile.open(os.path.join(self._tmp, "shard.tar"), "w", format=tarfile.USTAR_FORMAT)
                     if "webdataset" in formats else None)
        self.num_sets = 0
        self.num_images = 0
        self.num_bytes = 0
        self.split_sets: dict[str, int] = {}  # sets per split: the training run length's unit

    def add(self, records: list[SetRecord | Mapping[str, Any]]) -> None:
        """Append sets (``SetRecord``s or sample mappings of every field of ``MIS_FIELDS``);
        raises ``ValueError`` for a set that lacks a required field."""
        samples = [as_sample(r, self._fields) for r in records]
        if not samples:
            return
        if self._parquet is not None:
            columns = field_names(self._fields)
            self._parquet.write_table(pa.Table.from_pylist(
                [to_stored_row(s, columns, self._fields) for s in samples],
                schema=parquet_schema(self._fields)))
        if self._tar is not None:
            for s in samples:
                key = set_key(s["caption_id"])
                for member, data in wds_members(s, self._fields):
                    self._tar_add(f"{key}.{member}", data)
        self.num_sets += len(samples)
        for s in samples:
            self.split_sets[s["split"]] = self.split_sets.get(s["split"], 0) + 1
        self.num_images += sum(len(s["images"]) for s in samples)
        self.num_bytes += sum(sum(map(len, s["images"])) for s in samples)

    def _tar_add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def commit(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Publish the shard's files, then its stats JSON (the commit mark). Returns the stats."""
        if self._parquet is not None:
            self._parquet.close()
        if self._tar is not None:
            self._tar.close()
        try:
            if self._parquet is not None:
                storage.put_file(os.path.join(self._tmp, "shard.parquet"),
                                 self.layout.parquet(self.sid), self.layout.storage)
            if self._tar is not None:
                storage.put_file(os.path.join(self._tmp, "shard.tar"),
                                 self.layout.webdataset(self.sid), self.layout.storage)
            stats = {"shard_id": self.sid, "shard": shard_name(self.sid), "sets": self.num_sets,
                     "split_sets": dict(sorted(self.split_sets.items())),
                     "images": self.num_images, "image_bytes": self.num_bytes,
                     "formats": self.formats, **stats}
            storage.write_bytes(self.layout.stats(self.sid),
                                json.dumps(stats, indent=2, sort_keys=True).encode(),
                                self.layout.storage)
            return stats
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def abort(self) -> None:
        for handle in (self._parquet, self._tar):
            if handle is not None:
                handle.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def write_manifest(layout: MISLayout, expected_shards: list[int], extra: dict[str, Any],
                   committed: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Rewrite the manifest from the committed shards' stats files (the source of truth):
    ``committed`` when the caller has just read them (``layout.committed_stats()``), else read
    here."""
    committed = layout.committed_stats() if committed is None else committed
    shards = [{"shard_id": sid, "shard": s["shard"], "sets": s["sets"], "images": s["images"],
               "formats": s["formats"]} for sid, s in sorted(committed.items())]
    manifest = {
        "shards": shards,
        "committed_shards": len(shards),
        "expected_shards": len(expected_shards),
        "pending_shards": sorted(set(expected_shards) - set(committed)),
        "sets": sum(s["sets"] for s in shards),
        "images": sum(s["images"] for s in shards),
        **extra,
    }
    storage.write_bytes(layout.manifest, json.dumps(manifest, indent=2).encode(), layout.storage)
    return manifest


# --- reading ------------------------------------------------------------------------------------


def committed_shards(root: str, fmt: Format, storage_cfg: StorageConfig | None = None
                     ) -> list[tuple[str, dict[str, Any]]]:
    """``(uri, stats)`` of every committed shard of ``fmt`` under a MIS root, in shard order.
    Raises ``ValueError`` for a format that is neither (it would match no shard: an empty read)."""
    if fmt not in ("parquet", "webdataset"):
        raise ValueError(f"MIS format {fmt!r}: expected 'parquet' or 'webdataset'")
    layout = MISLayout(root, storage_cfg)
    path = layout.parquet if fmt == "parquet" else layout.webdataset
    return [(path(sid), stats) for sid, stats in sorted(layout.committed_stats().items())
            if fmt in stats["formats"]]


def split_set_count(stats: dict[str, Any], split: str | None) -> int | None:
    """Sets of ``split`` in a committed shard from its stats (None: all of them); None where the
    stats predate per-split counts (``split_sets``)."""
    if split is None:
        return int(stats["sets"])
    counts = stats.get("split_sets")
    return None if counts is None else int(counts.get(split, 0))
