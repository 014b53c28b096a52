"""The MIS on-disk contract, in one module: where shards live, how one is written and committed,
the manifest, and how shards are listed and read back (both formats give the same sample).

Layout under a dataset root (local path or s3://)::

    mis/parquet/<shard>.parquet       one row per image set
    mis/webdataset/<shard>.tar        one entry group per set: <key>.json, <key>.00.jpg ... <key>.latents.npy
    mis/stats/<shard>.json            the shard's commit mark, written last
    mis/manifest.json                 committed shards and totals, rewritten at the end of every run
    mis/generate_config.json          the settings every shard of this dataset was generated with

A shard is built in a local temporary folder, moved to its final names (atomic rename locally; a
single PUT on S3, which makes an object visible only once whole) and committed by writing its stats
JSON last. Readers and reruns trust only shards whose stats file exists, so a killed job never leaves
a partial shard that counts as committed, and a rerun redoes exactly the uncommitted ones.

Reading: a sample is a dict::

    caption_id int, shard_id int, split str, caption str, url str, seeds list[int],
    images list[bytes] (encoded, in seed order), image_ext str,
    latents np.ndarray float16 [N, 4, h, w] | None, metadata dict

Only committed shards are listed (``committed_shards``) and read: ``iter_mis`` / ``iter_shard``
(whole samples), ``iter_sets`` (training: only the columns a set needs), ``read_mis`` (the same
rows as a Ray Dataset). A shard that cannot be read as MIS raises ``CorruptShardError`` naming it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.formats.ids import shard_name

Format = Literal["parquet", "webdataset"]

IMAGE_EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png"}

PARQUET_SCHEMA = pa.schema([
    ("caption_id", pa.int64()),
    ("shard_id", pa.int64()),
    ("split", pa.string()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("seeds", pa.list_(pa.int64())),
    ("images", pa.list_(pa.binary())),
    ("latents", pa.binary()),          # .npy bytes, float16 [N, 4, h, w]; null when not kept
    ("metadata", pa.string()),         # JSON: generation settings, enough to regenerate
])


@dataclass
class SetRecord:
    """One encoded image set, the unit both formats store."""

    caption_id: int
    shard_id: int
    split: str
    caption: str
    url: str
    seeds: list[int]
    images: list[bytes]                # encoded, in seed order
    image_ext: str                     # jpg / webp / png
    latents: bytes | None              # .npy bytes or None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """WebDataset key: the zero-padded caption id (no dots, sorts like the ids)."""
        return f"{self.caption_id:020d}"

    def json_header(self) -> dict[str, Any]:
        return {"caption_id": self.caption_id, "shard_id": self.shard_id, "split": self.split,
                "caption": self.caption, "url": self.url, "seeds": self.seeds,
                "image_ext": self.image_ext, "metadata": self.metadata}


def latents_to_npy(latents: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, latents.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def npy_to_latents(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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


class ShardWriter:
    """Writes one shard's sets, in order, to local temporary files; ``commit`` publishes them.

    Parquet gets a row group per ``add`` call; the tar is streamed, with fixed member metadata
    (mtime 0, uid 0) so the same sets give the same bytes.
    """

    def __init__(self, layout: MISLayout, sid: int, formats: list[str]):
        self.layout, self.sid, self.formats = layout, sid, list(formats)
        self._tmp = tempfile.mkdtemp(prefix=f"{shard_name(sid)}-")
        self._parquet = (pq.ParquetWriter(os.path.join(self._tmp, "shard.parquet"), PARQUET_SCHEMA)
                         if "parquet" in formats else None)
        self._tar = (tarfile.open(os.path.join(self._tmp, "shard.tar"), "w", format=tarfile.USTAR_FORMAT)
                     if "webdataset" in formats else None)
        self.num_sets = 0
        self.num_images = 0
        self.num_bytes = 0

    def add(self, records: list[SetRecord]) -> None:
        if not records:
            return
        if self._parquet is not None:
            self._parquet.write_table(pa.Table.from_pylist([{
                "caption_id": r.caption_id, "shard_id": r.shard_id, "split": r.split,
                "caption": r.caption, "url": r.url, "seeds": r.seeds, "images": r.images,
                "latents": r.latents, "metadata": json.dumps(r.metadata, sort_keys=True),
            } for r in records], schema=PARQUET_SCHEMA))
        if self._tar is not None:
            for r in records:
                self._tar_add(f"{r.key}.json", json.dumps(r.json_header(), sort_keys=True).encode())
                for index, image in enumerate(r.images):
                    self._tar_add(f"{r.key}.{index:02d}.{r.image_ext}", image)
                if r.latents is not None:
                    self._tar_add(f"{r.key}.latents.npy", r.latents)
        self.num_sets += len(records)
        self.num_images += sum(len(r.images) for r in records)
        self.num_bytes += sum(sum(map(len, r.images)) for r in records)

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


def write_manifest(layout: MISLayout, expected_shards: list[int],
                   extra: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the manifest from the committed shards' stats files (the source of truth)."""
    committed = layout.committed_stats()
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


class CorruptShardError(ValueError):
    """A shard file that cannot be read as MIS; the message names the shard."""


# --- reading ------------------------------------------------------------------------------------


def committed_shards(root: str, fmt: Format, storage_cfg: StorageConfig | None = None
                     ) -> list[tuple[str, dict[str, Any]]]:
    """``(uri, stats)`` of every committed shard of ``fmt`` under a MIS root, in shard order."""
    layout = MISLayout(root, storage_cfg)
    path = layout.parquet if fmt == "parquet" else layout.webdataset
    return [(path(sid), stats) for sid, stats in sorted(layout.committed_stats().items())
            if fmt in stats["formats"]]


def shard_uris(root: str, fmt: Format, storage_cfg: StorageConfig | None = None) -> list[str]:
    """URIs of the committed shards of ``fmt`` under a MIS root, in shard order."""
    return [uri for uri, _ in committed_shards(root, fmt, storage_cfg)]


def _parquet_row_to_sample(row: dict[str, Any], image_ext: str | None = None) -> dict[str, Any]:
    metadata = json.loads(row["metadata"])
    return {
        "caption_id": int(row["caption_id"]), "shard_id": int(row["shard_id"]),
        "split": row["split"], "caption": row["caption"], "url": row["url"],
        "seeds": [int(s) for s in row["seeds"]], "images": list(row["images"]),
        "image_ext": image_ext or IMAGE_EXTENSIONS[metadata["image_format"]],
        "latents": None if row["latents"] is None else npy_to_latents(row["latents"]),
        "metadata": metadata,
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
    except (OSError, ValueError, pa.ArrowException) as err:
        raise CorruptShardError(f"cannot read Parquet shard {uri}: {type(err).__name__}: {err}") from err


def iter_parquet_shard(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[dict]:
    for row in _parquet_rows(uri, storage_cfg, lambda shard, group: None):
        yield _parquet_row_to_sample(row)


def iter_webdataset_shard(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[dict]:
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
                    yield _wds_group_to_sample(uri, key, members)
                    members = {}
                key = member_key
                members[member] = tar.extractfile(info).read()
            if key is not None:
                yield _wds_group_to_sample(uri, key, members)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CorruptShardError(f"cannot read WebDataset shard {uri}: {type(err).__name__}: {err}") from err


def _wds_group_to_sample(uri: str, key: str, members: dict[str, bytes]) -> dict[str, Any]:
    if "json" not in members:
        raise CorruptShardError(f"WebDataset shard {uri}: set {key} has no json member")
    header = json.loads(members["json"])
    ext = header["image_ext"]
    images = [members.get(f"{i:02d}.{ext}") for i in range(len(header["seeds"]))]
    if any(image is None for image in images):
        missing = [i for i, image in enumerate(images) if image is None]
        raise CorruptShardError(f"WebDataset shard {uri}: set {key} lacks images {missing}")
    latents = members.get("latents.npy")
    return _header_sample(header, images, None if latents is None else npy_to_latents(latents))


def _header_sample(header: dict[str, Any], images: list, latents: Any) -> dict[str, Any]:
    """A sample from a WebDataset set's JSON header (``SetRecord.json_header``) and members."""
    return {
        "caption_id": int(header["caption_id"]), "shard_id": int(header["shard_id"]),
        "split": header["split"], "caption": header["caption"], "url": header["url"],
        "seeds": [int(s) for s in header["seeds"]], "images": images,
        "image_ext": header["image_ext"], "latents": latents, "metadata": header["metadata"],
    }


def iter_sets(uri: str, storage_cfg: StorageConfig | None, want_images: bool
              ) -> Iterator[dict[str, Any]]:
    """The training reader: one dict ``{caption_id, split, latents, images?}`` per set, reading
    only those columns (Parquet: the images column only with ``want_images`` or for row groups
    with sets that lack latents)."""
    if uri.endswith(".parquet"):
        yield from _iter_parquet_sets(uri, storage_cfg, want_images)
    else:
        for sample in iter_webdataset_shard(uri, storage_cfg):
            yield {"caption_id": sample["caption_id"], "split": sample["split"],
                   "latents": sample["latents"], "images": sample["images"]}


def _iter_parquet_sets(uri: str, storage_cfg, want_images: bool) -> Iterator[dict[str, Any]]:
    """Which row groups lack latents (and so need their images) comes from column statistics."""
    def columns_for(shard: pq.ParquetFile, group: int) -> list[str]:
        latents_col = shard.schema_arrow.names.index("latents")
        stats = shard.metadata.row_group(group).column(latents_col).statistics
        missing_latents = stats is None or not stats.has_null_count or stats.null_count > 0
        return ["caption_id", "split", "latents", *(["images"] if want_images or missing_latents
                                                    else [])]

    for row in _parquet_rows(uri, storage_cfg, columns_for):
        row["latents"] = None if row["latents"] is None else npy_to_latents(row["latents"])
        yield row


def iter_shard(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[dict]:
    if uri.endswith(".parquet"):
        return iter_parquet_shard(uri, storage_cfg)
    if uri.endswith(".tar"):
        return iter_webdataset_shard(uri, storage_cfg)
    raise ValueError(f"not a MIS shard: {uri} (expected .parquet or .tar)")


def iter_mis(root: str, fmt: Format = "parquet", storage_cfg: StorageConfig | None = None,
             split: str | None = None) -> Iterator[dict]:
    """Every sample of the committed shards of ``fmt``, optionally of one split."""
    for uri in shard_uris(root, fmt, storage_cfg):
        for sample in iter_shard(uri, storage_cfg):
            if split is None or sample["split"] == split:
                yield sample


def _wds_rows_to_samples(batch: dict[str, Any]) -> dict[str, list]:
    """Ray Data's ``read_webdataset`` rows (one column per member) → MIS sample columns."""
    out: dict[str, list] = defaultdict(list)
    for i, raw_header in enumerate(batch["json"]):
        header = json.loads(raw_header) if isinstance(raw_header, (bytes, str)) else raw_header
        images = [batch[f"{j:02d}.{header['image_ext']}"][i] for j in range(len(header["seeds"]))]
        latents = batch.get("latents.npy")
        sample = _header_sample(header, images, None if latents is None else latents[i])
        sample.pop("image_ext")  # the Parquet columns have none; metadata stays a JSON string
        sample["metadata"] = json.dumps(header["metadata"], sort_keys=True)
        for key, value in sample.items():
            out[key].append(value)
    return dict(out)


def read_mis(root: str, fmt: Format = "parquet", storage_cfg: StorageConfig | None = None,
             split: str | None = None):
    """The committed shards as a Ray Dataset with the sample columns (``latents`` as .npy bytes,
    ``metadata`` as a JSON string), read by Ray Data's own Parquet / WebDataset readers."""
    import ray

    uris = shard_uris(root, fmt, storage_cfg)
    if not uris:
        raise FileNotFoundError(f"no committed {fmt} shards under {root}/mis; build MIS first "
                                "(pipelines/build_mis.py) or check the format and the path")
    fs, _ = storage.pyarrow_filesystem(uris[0], storage_cfg)
    paths = [storage.split_uri(u)[1] for u in uris]
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=fs)
    else:
        ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None).map_batches(
            _wds_rows_to_samples, batch_format="default")
    if split is not None:
        ds = ds.filter(expr=f"split == {split!r}")
    return ds
