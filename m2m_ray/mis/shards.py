"""The one shard builder of the building package: MIS stage 2 (``build.py``) and task datasets
(``tasks/build.py``) both fan their pending shards over Ray Data in rounds and commit each shard
exactly once in the MIS layout (``m2m_ray.formats.mis``).

- ``write_shard`` (in a Ray task or actor): a shard whose stats file exists is committed and is
  skipped (a later round, a racing retry); otherwise its sets are written by ``fill`` into a
  ``ShardWriter`` and committed (files published, then the stats JSON, the commit mark); an error
  aborts the writer, so nothing partial is published.
- ``build_shards`` (on the driver): removes what killed local writes left, then runs rounds over
  the shards still pending, up to ``max_rounds``: a round that fails as a whole (a shard that
  keeps failing, a lost node) is logged and counted as a progress failure, and the next round
  retries what is left; a data error that a retry cannot mend, which the worker returns in its
  row (``shard_row(sid, error=...)``: Ray Data would hide it behind a ``UserCodeException``),
  is raised on the driver as itself and stops the build at once. Every shard committed in a round is reported once (``on_commit``, with its
  stats) — also one whose result row was lost with a failed round or to a retry that found it
  committed. Then the manifest is rewritten from the committed shards' stats, progress ends
  ``done`` or ``failed``, and shards still pending (or a ``consistency`` problem) raise.
- A killed driver is rerun with the same config and picks up the pending shards; a rerun with
  other settings is refused before any round (``m2m_ray.config.refuse_resume``, by the callers).
"""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any, Callable, Sequence

import ray

from m2m_ray import storage
from m2m_ray.formats.mis import MISLayout, ShardWriter, write_manifest
from m2m_ray.progress import JobProgress

log = logging.getLogger(__name__)


def write_shard(layout: MISLayout, sid: int, formats: Sequence[str],
                fill: Callable[[ShardWriter], dict[str, Any]]) -> dict[str, Any] | None:
    """Build and commit shard ``sid`` once: ``fill(writer)`` adds the sets and returns the extra
    stats to commit with them. Returns the committed stats, or None when the shard was committed
    already (nothing is done). Whatever ``fill`` raises aborts the writer and propagates."""
    if layout.is_committed(sid):
        return None
    writer = ShardWriter(layout, sid, list(formats))
    try:
        return writer.commit(fill(writer))
    except BaseException:
        writer.abort()
        raise


def shard_row(sid: int, stats: dict[str, Any] | None = None,
              error: Exception | None = None) -> dict[str, Any]:
    """A worker's result row for ``build_shards``: the shard id, its committed stats as JSON
    (``write_shard``'s return; empty when the shard was committed already) and, pickled, a data
    error that stops the build (empty when there is none)."""
    return {"shard_id": sid, "stats": "" if stats is None else json.dumps(stats),
            "error": b"" if error is None else pickle.dumps(error)}


def build_shards(layout: MISLayout, expected: Sequence[int],
                 work_item: Callable[[int], dict[str, Any]],
                 run_round: Callable[[ray.data.Dataset, int], ray.data.Dataset],
                 on_commit: Callable[[dict[str, Any]], None], progress: JobProgress,
                 max_rounds: int,
                 manifest_extra: Callable[[dict[int, dict[str, Any]]], dict[str, Any]],
                 consistency: Callable[[dict[int, dict[str, Any]]], str | None] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build every pending shard of ``expected`` (shard ids) and return ``(manifest, final
    progress figures)``.

    Each round turns the pending shards into ``work_item(sid)`` rows (one block each) and maps
    them with ``run_round(dataset, number_pending)`` (tasks or an actor pool calling
    ``write_shard`` and returning ``shard_row``); ``on_commit(stats)`` is called once for each
    shard this run commits. ``manifest_extra(committed)`` adds job fields to the manifest;
    ``consistency(committed)`` returns a problem message or None.

    Raises the error a worker returned in its row as soon as it arrives; ``RuntimeError`` naming
    the shards still pending after ``max_rounds`` rounds, or ``consistency``'s problem (progress
    ends ``failed`` in each case)."""
    sweep_partial_files(layout)
    reported: set[int] = set()

    def report(sid: int, stats: dict[str, Any]) -> None:
        if sid not in reported:
            reported.add(sid)
            on_commit(stats)

    for attempt in range(1, max_rounds + 1):
        pending = [sid for sid in expected if not layout.is_committed(sid)]
        if not pending:
            break
        log.info("round %d: %d of %d shards pending", attempt, len(pending), len(expected))
        dataset = ray.data.from_items([work_item(sid) for sid in pending],
                                      override_num_blocks=len(pending))
        error = None
        try:
            for row in run_round(dataset, len(pending)).iter_rows():
                if row["error"]:
                    error = pickle.loads(row["error"])
                    break
                if row["stats"]:
                    report(int(row["shard_id"]), json.loads(row["stats"]))
        except Exception as err:  # a round can fail as a whole; the next one retries what is left
            log.error("round %d failed (%s: %s); pending shards are retried", attempt,
                      type(err).__name__, err)
            progress.failure(f"round {attempt}: {type(err).__name__}: {err}"[:500])
        if error is not None:
            progress.finish("failed")
            raise error
        for sid in pending:  # committed, but the row was lost (a failed round, a retry)
            if sid not in reported and layout.is_committed(sid):
                report(sid, json.loads(storage.read_bytes(layout.stats(sid), layout.storage)))
    committed = layout.committed_stats()  # one listing of the stats (object stores)
    manifest = write_manifest(layout, list(expected), manifest_extra(committed), committed)
    problem = consistency(committed) if consistency is not None else None
    final = progress.finish("failed" if manifest["pending_shards"] or problem else "done")
    if manifest["pending_shards"]:
        raise RuntimeError(
            f"{len(manifest['pending_shards'])} shards still pending after {max_rounds} rounds: "
            f"{manifest['pending_shards'][:10]}; see the worker logs (Ray dashboard) and rerun "
            "the same command to retry them")
    if problem:
        raise RuntimeError(problem)
    return manifest, final


def sweep_partial_files(layout: MISLayout) -> None:
    """Remove what a killed local write left under ``mis/``: ``storage.put_file``'s
    ``<name>.partial`` copies and ``storage.write_bytes``' ``<name>.tmp-<hex>`` siblings (S3
    writes are single PUTs and leave none). Run by the driver before any worker starts."""
    if storage.is_remote(layout.root):
        return
    folders = [layout.mis] + [storage.join(layout.mis, f) for f in ("parquet", "webdataset",
                                                                     "stats")]
    for folder in folders:
        for uri in storage.list_files(folder, layout.storage):
            name = uri.rsplit("/", 1)[-1]
            if name.endswith(".partial") or ".tmp-" in name:
                log.info("removing %s, left by a killed write", uri)
                storage.remove(uri, layout.storage)


def progress_uri(layout: MISLayout) -> str:
    """``mis/progress.json``, beside the manifest."""
    return storage.join(layout.mis, "progress.json")
