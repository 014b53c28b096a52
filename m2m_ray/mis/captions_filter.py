"""The workers of stage 1: one verdict per line (``FilterCaptions``), the global duplicate step
(``mark_duplicates``) and the per-shard writer (``write_shard``).

Verdicts, checked in this order: ``undecodable`` (not UTF-8) → ``malformed`` (not exactly two
tab-separated fields) → ``empty`` (caption blank after strip) → ``too_long`` (more than
``max_tokens`` CLIP tokens, BOS and EOS included) → ``duplicate`` (only with ``dedup``). A worker
never raises on a bad row: it records the row and why.
"""

from __future__ import annotations

import os
import time
import zlib
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from m2m_ray import storage
from m2m_ray.formats import ids
from m2m_ray.mis.captions_read import ReadUnit, iter_unit_lines
from m2m_ray.models.presets import load_tokenizer

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig
    from m2m_ray.mis.config import CaptionsConfig
    from m2m_ray.models.config import ModelConfig

REASONS = ("undecodable", "malformed", "empty", "too_long", "duplicate")

# Rows between the workers: one per input line; ``reason`` is null for a kept caption.
VERDICT_SCHEMA = pa.schema([
    ("shard_id", pa.int64()), ("caption_id", pa.int64()), ("file_index", pa.int32()),
    ("line_number", pa.int64()), ("reason", pa.string()), ("caption", pa.string()),
    ("url", pa.string()), ("num_tokens", pa.int32()), ("split", pa.string()),
    ("raw_text", pa.string()), ("detail", pa.string()), ("dedup_bucket", pa.int64()),
    ("task_s", pa.float64()),      # this row's share of its batch's read + verdict time
    ("task_cpu_s", pa.float64()),  # the same in CPU time of the worker process (all threads)
    ("tokenize_s", pa.float64()),  # this row's share of its batch's tokenizer call
])
CAPTION_COLUMNS = ("caption_id", "caption", "url", "num_tokens", "split", "source_file",
                   "line_number")
REJECT_COLUMNS = ("source_file", "line_number", "reason", "raw_text", "detail")


def normalize_for_dedup(caption: str) -> str:
    """Captions equal after lowercasing and collapsing whitespace are duplicates."""
    return " ".join(caption.lower().split())


def dedup_bucket(caption: str, num_buckets: int) -> int:
    """A stable (process-independent) bucket of the normalized caption."""
    return zlib.crc32(normalize_for_dedup(caption).encode()) % num_buckets


def tokenizer_definition(model: "ModelConfig") -> str:
    """The preset's CLIP tokenizer (``load_tokenizer``) as its Rust backend's JSON definition.

    Loaded once on the driver and shipped to the workers: they rebuild it with the light
    ``tokenizers`` package alone (≈ 0.3 s instead of importing transformers and torch, ≈ 5 s per
    worker) and need no model hub or cache of their own. Same ids as ``tokenizer(text)``."""
    return load_tokenizer(model).backend_tokenizer.to_str()


def token_counter(definition: str):
    """A tokenizer from ``tokenizer_definition``: BOS/EOS added, never truncated or padded."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(definition)
    backend.no_truncation()
    backend.no_padding()
    return backend


class FilterCaptions:
    """Ray Data stage: read the lines of one work unit (whole shards), tokenize in batches, give
    every line its verdict. Without dedup it also writes the unit's shards (``write_shards``) and
    yields their counts; with dedup it yields the verdict rows (``VERDICT_SCHEMA``) for the global
    duplicate step."""

    def __init__(self, tokenizer: str, captions: "CaptionsConfig",
                 storage_cfg: "StorageConfig | None", output_uri: str, files: list[str],
                 dedup_buckets: int):
        # The tokenizer's Rust thread pool: as many threads as CPUs this worker reserved.
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(captions.actors.num_cpus))))
        self.encoder = token_counter(tokenizer)
        self.cfg = captions
        self.storage_cfg = storage_cfg
        self.output_uri = output_uri
        self.files = files
        self.dedup_buckets = dedup_buckets

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        for unit in ReadUnit.from_batch(units):
            verdicts = self.unit_verdicts(unit)
            if self.cfg.dedup:
                yield from verdicts
            else:
                yield from self._write_as_completed(verdicts)

    def _write_as_completed(self, verdicts: Iterator[pa.Table]) -> Iterator[pa.Table]:
        """Write each shard as soon as its last line has a verdict (shard ids grow with lines)."""
        pending: pa.Table | None = None
        for table in verdicts:
            pending = table if pending is None else pa.concat_tables([pending, table])
            last = pending["shard_id"][-1]
            done = pc.less(pending["shard_id"], last)
            if pc.any(done).as_py():
                yield write_shards(pending.filter(done), self.output_uri, self.storage_cfg,
                                   self.files)
                pending = pending.filter(pc.invert(done))
        if pending is not None:
            yield write_shards(pending, self.output_uri, self.storage_cfg, self.files)

    def unit_verdicts(self, unit: ReadUnit) -> Iterator[pa.Table]:
        batch: list[bytes] = []
        line_number = unit.begin_line
        started = time.perf_counter(), time.process_time()
        for line in iter_unit_lines(unit, self.storage_cfg):
            batch.append(line)
            if len(batch) == self.cfg.batch_size:
                table = self.verdicts(batch, unit.file_index, line_number, started)
                line_number += len(batch)
                batch = []
                yield table
                started = time.perf_counter(), time.process_time()  # downstream is not ours
        if batch:
            yield self.verdicts(batch, unit.file_index, line_number, started)

    def verdicts(self, lines: list[bytes], file_index: int, first_line: int,
                 started: tuple[float, float]) -> pa.Table:
        """Verdict rows of consecutive lines; ``started``: (wall, CPU) clock when reading began."""
        n = len(lines)
        columns: dict[str, list[Any]] = {name: [None] * n for name in VERDICT_SCHEMA.names}
        reason, detail, raw_text = columns["reason"], columns["detail"], columns["raw_text"]
        texts: list[str | None] = [None] * n
        candidates: list[int] = []
        for i, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = line[:-1]
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                reason[i] = "undecodable"
                detail[i] = (f"invalid UTF-8 at byte {err.start} "
                             f"({line[err.start:err.end + 3]!r}...)")
                raw_text[i] = line.decode("utf-8", errors="replace")
                continue
            texts[i] = text
            fields = text.split("\t")
            if len(fields) != 2:
                reason[i] = "malformed"
                detail[i] = f"{len(fields)} tab-separated field(s); expected 2 (url<TAB>caption)"
                continue
            if not fields[1].strip():
                reason[i] = "empty"
                detail[i] = "caption is blank after stripping whitespace"
                continue
            columns["url"][i], columns["caption"][i] = fields
            candidates.append(i)

        tokenize_started = time.perf_counter()
        encodings = self.encoder.encode_batch_fast([columns["caption"][i] for i in candidates])
        tokenize_s = time.perf_counter() - tokenize_started
        for i, encoding in zip(candidates, encodings):
            count = len(encoding)
            columns["num_tokens"][i] = count
            columns["tokenize_s"][i] = tokenize_s / len(candidates)
            if count > self.cfg.max_tokens:
                reason[i] = "too_long"
                detail[i] = (f"{count} CLIP tokens (BOS/EOS included) > "
                             f"max_tokens={self.cfg.max_tokens}")

        for i in range(n):
            line_number = first_line + i
            cid = ids.caption_id(file_index, line_number)
            columns["caption_id"][i] = cid
            columns["shard_id"][i] = ids.shard_id(file_index, line_number,
                                                  self.cfg.lines_per_shard)
            columns["file_index"][i] = file_index
            columns["line_number"][i] = line_number
            if reason[i] is None:
                columns["split"][i] = ids.split_of(cid, self.cfg.test_fraction)
                if self.cfg.dedup:
                    columns["dedup_bucket"][i] = dedup_bucket(columns["caption"][i],
                                                              self.dedup_buckets)
            else:
                if raw_text[i] is None:
                    raw_text[i] = texts[i]
                columns["caption"][i] = columns["url"][i] = None
                if self.cfg.dedup:  # rejects only ride along: spread them by line
                    columns["dedup_bucket"][i] = cid % self.dedup_buckets
        columns["task_s"] = [(time.perf_counter() - started[0]) / n] * n
        columns["task_cpu_s"] = [(time.process_time() - started[1]) / n] * n
        return pa.Table.from_pydict(columns, schema=VERDICT_SCHEMA)


def mark_duplicates(group: pa.Table) -> pa.Table:
    """Ray Data global step (one dedup bucket per call): among kept captions equal after
    normalization, keep the lowest caption_id and reject the others as ``duplicate``."""
    kept = pc.is_null(group["reason"]).to_pylist()
    cids = group["caption_id"].to_pylist()
    captions = group["caption"].to_pylist()
    first: dict[str, int] = {}
    for is_kept, cid, caption in zip(kept, cids, captions):
        if is_kept:
            key = normalize_for_dedup(caption)
            first[key] = min(first.get(key, cid), cid)
    reason, detail, raw_text = (group[c].to_pylist() for c in ("reason", "detail", "raw_text"))
    urls = group["url"].to_pylist()
    for i, (is_kept, cid, caption) in enumerate(zip(kept, cids, captions)):
        keep_id = first[normalize_for_dedup(caption)] if is_kept else cid
        if keep_id != cid:
            reason[i] = "duplicate"
            detail[i] = (f"same caption as caption_id {keep_id} after lowercasing and "
                         "collapsing whitespace")
            raw_text[i] = f"{urls[i]}\t{caption}"
    for name, values in (("reason", reason), ("detail", detail), ("raw_text", raw_text)):
        group = group.set_column(group.schema.get_field_index(name), name,
                                 pa.array(values, pa.string()))
    return group


def _write_parquet(table: pa.Table, uri: str, storage_cfg: "StorageConfig | None") -> None:
    storage.makedirs(uri.rsplit("/", 1)[0], storage_cfg)
    fs, path = storage.pyarrow_filesystem(uri, storage_cfg)
    pq.write_table(table, path, filesystem=fs)


def shard_captions_uri(output_uri: str, sid: int) -> str:
    return storage.join(output_uri, "captions", f"shard_id={sid}",
                        f"{ids.shard_name(sid)}.parquet")


def shard_rejects_uri(output_uri: str, sid: int) -> str:
    return storage.join(output_uri, "rejects", f"{ids.shard_name(sid)}.parquet")


def write_shards(verdicts: pa.Table, output_uri: str, storage_cfg: "StorageConfig | None",
                 files: list[str]) -> pa.Table:
    """Write whole shards: kept captions to ``captions/shard_id=<id>/<shard name>.parquet``,
    rejects to ``rejects/<shard name>.parquet`` (deterministic names: a rerun overwrites).
    Returns one row of counts per shard for the stats. Also the writer of the dedup path's
    ``groupby("shard_id").map_groups``."""
    started = time.perf_counter()
    verdicts = verdicts.sort_by("caption_id")
    sids = verdicts["shard_id"].to_numpy()
    bounds = [0, *(np.flatnonzero(np.diff(sids)) + 1).tolist(), len(sids)]
    rows = [_write_shard(verdicts.slice(a, b - a), output_uri, storage_cfg, files)
            for a, b in zip(bounds[:-1], bounds[1:])]
    stats = pa.Table.from_pylist(rows)
    per_shard_s = (time.perf_counter() - started) / len(rows)
    return stats.append_column("write_s", pa.array([per_shard_s] * len(rows), pa.float64()))


def _write_shard(group: pa.Table, output_uri: str, storage_cfg: "StorageConfig | None",
                 files: list[str]) -> dict[str, Any]:
    sid = group["shard_id"][0].as_py()
    file_index = group["file_index"][0].as_py()
    source = pa.array([files[file_index]] * len(group), pa.string())
    group = group.append_column("source_file", source)
    is_kept = pc.is_null(group["reason"])
    kept = group.filter(is_kept).select(list(CAPTION_COLUMNS))
    rejects = group.filter(pc.invert(is_kept)).select(list(REJECT_COLUMNS))
    if len(kept):
        _write_parquet(kept, shard_captions_uri(output_uri, sid), storage_cfg)
    if len(rejects):
        _write_parquet(rejects, shard_rejects_uri(output_uri, sid), storage_cfg)
    by_reason = Counter(rejects["reason"].to_pylist())
    return {
        "shard_id": sid, "file_index": file_index, "input_lines": len(group), "kept": len(kept),
        "max_line": pc.max(group["line_number"]).as_py(),
        "task_s": pc.sum(group["task_s"]).as_py(),
        "task_cpu_s": pc.sum(group["task_cpu_s"]).as_py(),
        "tokenize_s": pc.sum(group["tokenize_s"]).as_py() or 0.0,
        "tokenized": len(group) - group["num_tokens"].null_count,
        **{reason: by_reason.get(reason, 0) for reason in REASONS},
    }
