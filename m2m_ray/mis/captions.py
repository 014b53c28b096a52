"""MIS stage 1: CC12M captions → CLIP-77 filter → caption shards, on Ray Data.

Reader → worker → writer, Ray as a thin distributor:

1. ``count_lines`` (tasks)          the lines every byte range owns; prefix sums on the driver turn
                                    ranges into work units of whole shards with exact line numbers
                                    (``captions_read``);
2. ``FilterCaptions`` (actor pool)  reads a unit, tokenizes in batches, gives every line its verdict
                                    and writes each shard once complete (``write_shards``: one
                                    kept-caption file and one reject file per shard, deterministic
                                    names); yields per-shard counts. No shuffle.
3. only with ``captions.dedup``: the verdicts go through two shuffles instead of being written in
   step 2: ``mark_duplicates`` per hash bucket of the normalized caption (keeps the lowest
   caption_id of each group of equal captions), then ``write_shards`` per shard_id.

The driver sums the per-shard counts into ``captions_stats.json``.

Output under ``output_uri``::

    captions/shard_id=<id>/<shard name>.parquet   kept captions, sorted by caption_id
    rejects/<shard name>.parquet                  source_file, line_number, reason, raw_text, detail
    captions_config.json                          the resolved config
    captions_stats.json                           written last: the stage's commit mark

A run first removes the previous run's stage-1 outputs (commit mark first), so a rerun into the same
output gives exactly the same files — unless MIS shards (stage 2) are committed there: then stage 1
is kept as it is when its inputs and settings are unchanged, and the run is refused naming what
changed otherwise (``m2m_ray.mis.resume``). ``captions_stats.json`` records that definition
(``definition``) and a digest of it and its result (``captions_digest``), which every MIS shard made
from it carries.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

import m2m_ray
from m2m_ray import storage
from m2m_ray.config import config_to_dict
from m2m_ray.formats.mis import MISLayout
from m2m_ray.mis.captions_filter import (
    REASONS,
    FilterCaptions,
    mark_duplicates,
    shard_captions_uri,
    tokenizer_definition,
    write_shards,
)
from m2m_ray.mis.captions_read import (
    CaptionInputError,
    ReadUnit,
    count_range_lines,
    plan_ranges,
    plan_shard_units,
    ranges_needing_count,
)
from m2m_ray.mis.resume import (
    captions_definition,
    captions_digest,
    check_captions_rerun,
)
from m2m_ray.runtime import actor_pool_args, task_errors_as
from m2m_ray.storage import save_config

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig
    from m2m_ray.mis.config import BuildMISConfig

log = logging.getLogger(__name__)

STATS_NAME = "captions_stats.json"
CONFIG_NAME = "captions_config.json"


def count_lines(units: pa.Table, storage_cfg: "StorageConfig | None") -> pa.Table:
    """Ray Data stage: the number of lines each byte range owns."""
    rows = ReadUnit.from_batch(units)
    return pa.table({
        "file_index": pa.array([u.file_index for u in rows], pa.int64()),
        "range_index": pa.array([u.range_index for u in rows], pa.int64()),
        "lines": pa.array([count_range_lines(u, storage_cfg) for u in rows], pa.int64()),
    })


def _units_dataset(units: list[ReadUnit], num_blocks: int):
    import ray.data

    return ray.data.from_items([u.to_row() for u in units],
                               override_num_blocks=max(1, min(num_blocks, len(units))))


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _plan_units(cfg: "BuildMISConfig", files: list[str]) -> list[ReadUnit]:
    """Byte ranges → line counts (on Ray) → work units of whole shards with exact line numbers."""
    ranges = plan_ranges(files, cfg.captions.range_bytes, cfg.storage)
    to_count = ranges_needing_count(ranges)
    counts: dict[tuple[int, int], int] = {}
    if to_count:
        # Counting newlines is I/O-bound and fast: a few ranges per task keep overheads low.
        with task_errors_as(CaptionInputError):  # the file named, not a worker's traceback
            counted = _units_dataset(to_count, 2 * _cluster_cpus()).map_batches(
                count_lines, batch_size=None, batch_format="pyarrow",
                fn_kwargs={"storage_cfg": cfg.storage}, num_cpus=cfg.captions.actors.num_cpus,
            ).take_all()
        counts = {(r["file_index"], r["range_index"]): r["lines"] for r in counted}
    return plan_shard_units(ranges, counts, cfg.captions.lines_per_shard)


def _clear_previous_run(output_uri: str, storage_cfg: "StorageConfig | None") -> None:
    """Un-commit first (the stats file), then remove the data it described."""
    storage.remove(storage.join(output_uri, STATS_NAME), storage_cfg)
    for folder in ("captions", "rejects"):
        storage.remove(storage.join(output_uri, folder), storage_cfg, recursive=True)


def _code_version() -> dict[str, str | None]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(m2m_ray.__file__).parent,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None  # not a git checkout (e.g. a `ray job submit` working_dir upload)
    return {"m2m_ray": m2m_ray.__version__, "git_commit": commit}


def _aggregate(shard_rows: list[dict[str, Any]], files: list[str]) -> dict[str, Any]:
    per_file = {uri: {"file_index": i, "input_lines": 0, "kept": 0,
                      "rejected": dict.fromkeys(REASONS, 0)} for i, uri in enumerate(files)}
    max_line: Counter = Counter()
    shards: dict[str, int] = {}
    for row in sorted(shard_rows, key=lambda r: r["shard_id"]):
        entry = per_file[files[row["file_index"]]]
        entry["input_lines"] += row["input_lines"]
        entry["kept"] += row["kept"]
        for reason in REASONS:
            entry["rejected"][reason] += row[reason]
        max_line[row["file_index"]] = max(max_line[row["file_index"]], row["max_line"])
        if row["kept"]:
            shards[str(row["shard_id"])] = row["kept"]
    for uri, entry in per_file.items():
        # Lines are numbered 1..N without gaps or repeats iff the last number equals the count.
        if max_line[entry["file_index"]] != entry["input_lines"]:
            raise RuntimeError(
                f"line numbering of {uri} is inconsistent: {entry['input_lines']} lines seen but "
                f"the highest line number is {max_line[entry['file_index']]}; was the file "
                "changed while the stage ran?"
            )
    rejected = {r: sum(e["rejected"][r] for e in per_file.values()) for r in REASONS}
    return {
        "input_lines": sum(e["input_lines"] for e in per_file.values()),
        "kept": sum(e["kept"] for e in per_file.values()),
        "rejected": rejected,
        "files": per_file,
        "shards": shards,
    }


def run_captions_stage(cfg: "BuildMISConfig") -> dict[str, Any]:
    """Run stage 1 on the current Ray (``m2m_ray.runtime.init_ray`` starts or joins one) and
    return the stats that it writes to ``captions_stats.json``.

    Over committed MIS shards stage 1 is not rebuilt: with the same inputs and settings the
    existing stats are returned (``"kept_as_is": True``); with others it raises
    ``m2m_ray.config.ResumeMismatchError`` naming what changed."""
    started = time.perf_counter()
    files = storage.expand_inputs(cfg.captions.inputs, cfg.storage)
    definition = captions_definition(cfg, files)
    stats_uri = storage.join(cfg.output_uri, STATS_NAME)
    previous = (json.loads(storage.read_bytes(stats_uri, cfg.storage))
                if storage.exists(stats_uri, cfg.storage) else None)
    committed = len(storage.list_files(storage.join(MISLayout(cfg.output_uri).mis, "stats"),
                                       cfg.storage, ".json"))
    if check_captions_rerun(cfg, previous, definition, committed):
        log.info("stage 1 kept as it is: %d MIS shards were generated from it and its inputs and "
                 "settings are unchanged", committed)
        return {**previous, "kept_as_is": True}
    _clear_previous_run(cfg.output_uri, cfg.storage)
    # Load the tokenizer on the driver while the line-count pass runs on the cluster.
    with ThreadPoolExecutor(1, thread_name_prefix="load-tokenizer") as pool:
        tokenizer = pool.submit(tokenizer_definition, cfg.model)
        units = _plan_units(cfg, files)
        tokenizer_json = tokenizer.result()
    planned = time.perf_counter()

    shard_rows: list[dict[str, Any]] = []
    if units:  # else only empty files
        pool = cfg.captions.actors
        ds = _units_dataset(units, len(units)).map_batches(
            FilterCaptions, batch_size=1, batch_format="pyarrow",
            **actor_pool_args(pool, "captions.actors", work_units=len(units),
                              initial_actors=int(_cluster_cpus() / pool.num_cpus)),
            fn_constructor_kwargs={"tokenizer": tokenizer_json,
                                   "captions": cfg.captions,
                                   "storage_cfg": cfg.storage, "output_uri": cfg.output_uri,
                                   "files": files, "dedup_buckets": len(units)},
        )
        if cfg.captions.dedup:
            ds = ds.groupby("dedup_bucket", num_partitions=len(units)).map_groups(
                mark_duplicates, batch_format="pyarrow", num_cpus=cfg.captions.actors.num_cpus,
            ).groupby("shard_id", num_partitions=len(units)).map_groups(
                write_shards, batch_format="pyarrow", num_cpus=cfg.captions.actors.num_cpus,
                fn_kwargs={"output_uri": cfg.output_uri, "storage_cfg": cfg.storage,
                           "files": files},
            )
        with task_errors_as(CaptionInputError):
            shard_rows = ds.take_all()
    finished = time.perf_counter()

    stats = _aggregate(shard_rows, files)
    rejected_total = sum(stats["rejected"].values())
    if stats["input_lines"] != stats["kept"] + rejected_total:  # never commit a broken account
        raise RuntimeError(f"{stats['input_lines']} input lines != {stats['kept']} kept + "
                           f"{rejected_total} rejected; not writing {STATS_NAME}")
    task_s = sum(r["task_s"] for r in shard_rows)
    task_cpu_s = sum(r["task_cpu_s"] for r in shard_rows)
    tokenize_s = sum(r["tokenize_s"] for r in shard_rows)
    tokenized = sum(r["tokenized"] for r in shard_rows)
    write_s = sum(r["write_s"] for r in shard_rows)
    total_s = finished - started
    stats["timings"] = {
        "plan_s": round(planned - started, 3),  # listing, clearing, line counts, tokenizer
        "filter_and_write_s": round(finished - planned, 3),
        "total_s": round(total_s, 3),
        "captions_per_s": round(stats["input_lines"] / total_s, 1),
        # Summed over workers, inside tasks (wall and CPU time): the cost of the work itself,
        # without Ray's start-up and scheduling; a CPU time well below the wall time means the
        # workers waited (I/O, or other jobs on the same cores).
        "filter_task_s": round(task_s, 3),
        "filter_task_cpu_s": round(task_cpu_s, 3),
        "tokenize_task_s": round(tokenize_s, 3),
        "write_task_s": round(write_s, 3),
        "tokenized_per_task_s": round(tokenized / tokenize_s, 1) if tokenize_s else None,
        "lines_per_filter_task_s": round(stats["input_lines"] / task_s, 1) if task_s else None,
        "lines_per_filter_cpu_s": (round(stats["input_lines"] / task_cpu_s, 1)
                                   if task_cpu_s else None),
    }
    stats["code_version"] = _code_version()
    stats["config"] = config_to_dict(cfg)
    stats["definition"] = definition
    stats["captions_digest"] = captions_digest(definition, stats["shards"])
    save_config(cfg, storage.join(cfg.output_uri, CONFIG_NAME), cfg.storage)
    storage.write_bytes(storage.join(cfg.output_uri, STATS_NAME),
                        json.dumps(stats, indent=2).encode(), cfg.storage)
    return stats


def read_captions_stats(output_uri: str, storage_cfg: "StorageConfig | None" = None
                        ) -> dict[str, Any]:
    """The stats of a completed stage 1; an error if the stage has not committed there."""
    uri = storage.join(output_uri, STATS_NAME)
    if not storage.exists(uri, storage_cfg):
        raise FileNotFoundError(
            f"{uri} not found: stage 1 (captions) has not completed under {output_uri}. Run "
            "pipelines/build_mis.py with `captions` in --stages first."
        )
    return json.loads(storage.read_bytes(uri, storage_cfg))


def load_shard_captions(output_uri: str, shard_id: int,
                        storage_cfg: "StorageConfig | None" = None) -> pa.Table:
    """The kept captions of one shard, sorted by caption_id, with a ``shard_id`` column."""
    uri = shard_captions_uri(output_uri, shard_id)
    if not storage.exists(uri, storage_cfg):
        raise FileNotFoundError(
            f"no kept captions for shard {shard_id} ({uri} missing); the shards with captions "
            f"are the keys of `shards` in {storage.join(output_uri, STATS_NAME)}"
        )
    fs, path = storage.pyarrow_filesystem(uri, storage_cfg)
    table = pq.read_table(path, filesystem=fs).sort_by("caption_id")
    return table.append_column("shard_id", pa.array([shard_id] * len(table), pa.int64()))
