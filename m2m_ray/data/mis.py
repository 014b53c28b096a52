"""Reading MIS back: both shard formats give the same in-memory sample.

A sample is a dict::

    caption_id int, shard_id int, split str, caption str, url str, seeds list[int],
    images list[bytes] (encoded, in seed order), image_ext str,
    latents np.ndarray float16 [N, 4, h, w] | None, metadata dict

Only committed shards (those with a stats file, ``MISLayout``) are read. ``read_mis`` gives the same
rows as a Ray Dataset for training and evaluation jobs.
"""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.mis.shards import MISLayout, npy_to_latents

Format = Literal["parquet", "webdataset"]


class CorruptShardError(ValueError):
    """A shard file that cannot be read as MIS; the message names the shard."""


def shard_uris(root: str, fmt: Format, storage_cfg: StorageConfig | None = None) -> list[str]:
    """URIs of the committed shards of ``fmt`` under a MIS root, in shard order."""
    layout = MISLayout(root, storage_cfg)
    committed = layout.committed_stats()
    path = layout.parquet if fmt == "parquet" else layout.webdataset
    return [path(sid) for sid, stats in sorted(committed.items()) if fmt in stats["formats"]]


def _parquet_row_to_sample(row: dict[str, Any], image_ext: str | None = None) -> dict[str, Any]:
    metadata = json.loads(row["metadata"])
    return {
        "caption_id": int(row["caption_id"]), "shard_id": int(row["shard_id"]),
        "split": row["split"], "caption": row["caption"], "url": row["url"],
        "seeds": [int(s) for s in row["seeds"]], "images": list(row["images"]),
        "image_ext": image_ext or _ext_of(metadata),
        "latents": None if row["latents"] is None else npy_to_latents(row["latents"]),
        "metadata": metadata,
    }


def _ext_of(metadata: dict[str, Any]) -> str:
    return {"jpeg": "jpg", "webp": "webp", "png": "png"}[metadata["image_format"]]


def iter_parquet_shard(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[dict]:
    """Row group by row group, a few sets at a time: a 512 px shard of 1,000 sets is ~2 GB."""
    fs, path = storage.pyarrow_filesystem(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8):
                for row in batch.to_pylist():
                    yield _parquet_row_to_sample(row)
    except (OSError, pa.ArrowException) as err:
        raise CorruptShardError(f"cannot read Parquet shard {uri}: {type(err).__name__}: {err}") from err


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
    return {
        "caption_id": int(header["caption_id"]), "shard_id": int(header["shard_id"]),
        "split": header["split"], "caption": header["caption"], "url": header["url"],
        "seeds": [int(s) for s in header["seeds"]], "images": images, "image_ext": ext,
        "latents": None if latents is None else npy_to_latents(latents),
        "metadata": header["metadata"],
    }


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
        ext = header["image_ext"]
        out["caption_id"].append(int(header["caption_id"]))
        out["shard_id"].append(int(header["shard_id"]))
        out["split"].append(header["split"])
        out["caption"].append(header["caption"])
        out["url"].append(header["url"])
        out["seeds"].append([int(s) for s in header["seeds"]])
        out["images"].append([batch[f"{j:02d}.{ext}"][i] for j in range(len(header["seeds"]))])
        latents = batch.get("latents.npy")
        out["latents"].append(None if latents is None else latents[i])
        out["metadata"].append(json.dumps(header["metadata"], sort_keys=True))
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
