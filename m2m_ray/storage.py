"""One place that turns a URI into a filesystem, for fsspec and pyarrow users alike.

Accepted: plain local paths, ``file://`` URIs and ``s3://bucket/key``. S3-compatible servers (MinIO,
moto, R2) are reached through an explicit endpoint (``StorageConfig.endpoint_url`` or
``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``): pyarrow's S3 filesystem ignores the environment
variable, so the endpoint is always passed to it explicitly here. Credentials are never read from
or written to configs; both libraries take them from the environment / AWS profile.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import fsspec

if TYPE_CHECKING:
    import pyarrow.fs
    from pydantic import BaseModel

    from m2m_ray.config import StorageConfig


def _endpoint(storage: "StorageConfig | None") -> str | None:
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, path)``: ``("s3", "bucket/key")`` or ``("file", "/abs/path")``."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 URI {uri!r} has no bucket: expected s3://bucket/key")
        return "s3", f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "file":
        return "file", os.path.abspath(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise ValueError(
            f"unsupported storage URI {uri!r}: use a local path, file://... or s3://bucket/key"
        )
    return "file", os.path.abspath(os.path.expanduser(uri))


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] != "file"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    uri = str(uri).rstrip("/")
    return posixpath.join(uri, *parts) if is_remote(uri) else os.path.join(uri, *parts)


def fsspec_filesystem(
    uri: str, storage: "StorageConfig | None" = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for ``uri``, for fsspec/s3fs users."""
    scheme, path = split_uri(uri)
    if scheme == "s3":
        kwargs: dict = {"anon": bool(storage and storage.anonymous)}
        endpoint = _endpoint(storage)
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if storage is not None and storage.region:
            kwargs["client_kwargs"] = {"region_name": storage.region}
        return fsspec.filesystem("s3", **kwargs), path
    return fsspec.filesystem("file"), path


def pyarrow_filesystem(
    uri: str, storage: "StorageConfig | None" = None
) -> tuple["pyarrow.fs.FileSystem", str]:
    """``(filesystem, path inside it)`` for ``uri``, for pyarrow and Ray Data readers/writers."""
    import pyarrow.fs as pafs

    scheme, path = split_uri(uri)
    if scheme == "s3":
        kwargs: dict = {"anonymous": bool(storage and storage.anonymous)}
        endpoint = _endpoint(storage)
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
            # An S3-compatible server on a custom endpoint needs no region; pyarrow would
            # otherwise try to resolve the bucket's region against AWS.
            kwargs["region"] = (storage.region if storage and storage.region else "us-east-1")
        elif storage is not None and storage.region:
            kwargs["region"] = storage.region
        return pafs.S3FileSystem(**kwargs), path
    return pafs.LocalFileSystem(), path


def exists(uri: str, storage: "StorageConfig | None" = None) -> bool:
    fs, path = fsspec_filesystem(uri, storage)
    return fs.exists(path)


def makedirs(uri: str, storage: "StorageConfig | None" = None) -> None:
    """Create a folder; a no-op on object stores, which have no folders."""
    fs, path = fsspec_filesystem(uri, storage)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str, storage: "StorageConfig | None" = None) -> bytes:
    fs, path = fsspec_filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage: "StorageConfig | None" = None) -> None:
    """Write a whole file so that readers never see it half-written.

    Local: write a temporary sibling and rename it (atomic on POSIX). S3: one PUT, which makes the
    object visible only once complete.
    """
    fs, path = fsspec_filesystem(uri, storage)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def rename(src_uri: str, dst_uri: str, storage: "StorageConfig | None" = None) -> None:
    """Move a file into place: atomic ``os.replace`` locally, copy + delete on S3 (the
    destination object appears whole)."""
    fs, src = fsspec_filesystem(src_uri, storage)
    _, dst = fsspec_filesystem(dst_uri, storage)
    if is_remote(src_uri):
        fs.mv(src, dst)
    else:
        os.replace(src, dst)


def remove(uri: str, storage: "StorageConfig | None" = None, recursive: bool = False) -> None:
    fs, path = fsspec_filesystem(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_files(uri: str, storage: "StorageConfig | None" = None,
               suffix: str = "") -> list[str]:
    """URIs of the files directly under ``uri`` (sorted), optionally those ending in ``suffix``."""
    fs, path = fsspec_filesystem(uri, storage)
    if not fs.exists(path):
        return []
    scheme = split_uri(uri)[0]
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffix))
    return [f"s3://{p}" if scheme == "s3" else p for p in names]


def expand_inputs(patterns: list[str], storage: "StorageConfig | None" = None) -> list[str]:
    """Expand globs into a sorted, de-duplicated list of file URIs; an unmatched pattern is an
    error (a typo must not silently shrink the dataset)."""
    found: list[str] = []
    for pattern in patterns:
        fs, path = fsspec_filesystem(pattern, storage)
        scheme = split_uri(pattern)[0]
        matches = sorted(m for m in fs.glob(path) if fs.isfile(m)) if fs.exists(path) or any(
            c in path for c in "*?[") else []
        if not matches:
            raise FileNotFoundError(
                f"input {pattern!r} matches no file; check the path (globs like data/*.tsv are "
                "allowed) and, for s3://, the endpoint and credentials"
            )
        found.extend(f"s3://{m}" if scheme == "s3" else m for m in matches)
    return sorted(dict.fromkeys(found))


def put_file(local_path: str, uri: str, storage: "StorageConfig | None" = None) -> None:
    """Move a finished local file to ``uri`` without a window where a partial file shows: one
    object PUT on S3 (visible only once complete), copy + atomic rename locally."""
    fs, path = fsspec_filesystem(uri, storage)
    if is_remote(uri):
        fs.put_file(local_path, path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial"
    shutil.copyfile(local_path, tmp)  # may cross filesystems; the rename below is atomic
    os.replace(tmp, path)


def download_dir(uri: str, local_dir: str | os.PathLike,
                 storage: "StorageConfig | None" = None) -> None:
    """Copy the folder ``uri`` (local or s3://) and everything under it into ``local_dir``."""
    fs, path = fsspec_filesystem(uri, storage)
    if not fs.isdir(path):
        raise FileNotFoundError(f"no folder at {uri}; check the path (and, for s3://, the "
                                "endpoint and credentials)")
    fs.get(path.rstrip("/") + "/", str(local_dir).rstrip("/") + "/", recursive=True)


def upload_dir(local_dir: str | os.PathLike, uri: str,
               storage: "StorageConfig | None" = None) -> None:
    """Copy the local folder ``local_dir`` and everything under it to the folder ``uri``."""
    fs, path = fsspec_filesystem(uri, storage)
    fs.put(str(local_dir).rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def save_config(cfg: "BaseModel", uri: str, storage: "StorageConfig | None" = None) -> None:
    """Write a resolved config as JSON beside an output, ``{"config_class", "config"}`` (configs
    hold no credentials); the one format of every saved config: shards, generations, checkpoints."""
    payload = {"config_class": type(cfg).__name__, "config": cfg.model_dump(mode="json")}
    write_bytes(uri, json.dumps(payload, indent=2).encode(), storage)
