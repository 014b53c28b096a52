"""Ray Train ingest of MIS: the trainer's ``train`` dataset is the list of committed shards, and
``MISDataConfig`` turns it into one deterministic, resumable stream per worker
(``m2m_ray.data.training``), served by ``ray.train.get_dataset_shard("train")``.

Why not ``streaming_split``: it hands blocks to whichever worker asks first, so which sets a worker
sees, and where a worker stands, depend on timing. Here worker r reads its own shards in a fixed
order, so every worker's stream is a pure function of (config, rank, world size), a checkpoint can
record each worker's position, and a resumed run continues each stream exactly where it stopped
(``StreamPosition``) — at the cost of static load balancing, the same trade WebDataset's
split-by-node makes.

``configure`` runs whenever a worker group starts (first start, ``FailureConfig`` restarts, a new
``fit`` of the same run): it reads the checkpoint Ray Train is about to restore and starts each
worker's stream at the position saved in it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
from ray.train import DataConfig

from m2m_ray.data.training import (
    StreamPosition,
    build_stream_dataset,
    describe_stream,
    plan_stream,
    use_stored_latents,
)
from m2m_ray.formats.mis import committed_shards, split_set_count
from m2m_ray.formats.rng import Salt
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.state import TrainerState, latest_checkpoint, read_trainer_state

log = logging.getLogger(__name__)


class BadDataTally:
    """Counts the sets and shards skipped as bad data (``data.on_bad_data: skip``); the run's
    ``DataErrorCounter`` actor."""

    def __init__(self):
        self.counts = {"sets": 0, "shards": 0}
        self.examples: list[str] = []
        self.seen: set[tuple[str, ...]] = set()

    def add(self, kind: str, uri: str, reason: str) -> None:
        """Count a bad shard once (by URI) and a bad set once (by shard and reason, which names
        the set), however often it is read: by task retries, by restarted workers, each epoch."""
        key = (kind, uri) if kind == "shard" else (kind, uri, reason)
        if key in self.seen:
            return
        self.seen.add(key)
        self.counts[f"{kind}s"] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind} in {uri}: {reason}")

    def totals(self) -> dict[str, Any]:
        return {**self.counts, "examples": list(self.examples)}


DataErrorCounter = ray.remote(num_cpus=0)(BadDataTally)


def error_counter_name(cfg: TrainConfig) -> str:
    return f"m2m_ray.data_errors.{cfg.run_name}"


def start_error_counter(cfg: TrainConfig):
    """The run's counter (created by the driver, so it outlives worker-group restarts)."""
    return DataErrorCounter.options(name=error_counter_name(cfg), get_if_exists=True).remote()


def error_counts(cfg: TrainConfig) -> dict[str, Any]:
    return ray.get(ray.get_actor(error_counter_name(cfg)).totals.remote())


class ReportToCounter:
    """A picklable ``BadDataReporter`` for read tasks: forwards to the run's counter actor."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, kind: str, uri: str, reason: str) -> None:
        ray.get_actor(self.name).add.remote(kind, uri, reason)


def training_shards(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The run's shards, listed once per ``fit`` (shards committed later do not change a running
    plan): ``{"shard": uri, "sets": n, "split_sets": m}`` per committed shard in shard order, where
    ``m`` counts the sets of ``data.split`` (None where the shard's stats predate per-split counts).
    With ``data.subset_sets``, only the shards of the subset (see ``choose_subset``). Raises
    ``FileNotFoundError`` when the dataset has no committed shard of ``data.format``."""
    rows = [{"shard": uri, "sets": stats["sets"], "split_sets": split_set_count(stats, cfg.data.split)}
            for uri, stats in committed_shards(cfg.data.uri, cfg.data.format, cfg.storage)]
    if not rows:
        raise FileNotFoundError(f"no committed {cfg.data.format} shards under {cfg.data.uri}/mis; "
                                "build MIS first (pipelines/build_mis.py) or check data.uri and "
                                "data.format")
    if cfg.data.subset_sets is not None:
        rows = choose_subset(rows, cfg.data.subset_sets, cfg.seed, "data.subset_sets")
    return rows


def counted_sets(rows: list[dict[str, Any]], why: str) -> int:
    """Total ``split_sets`` of the rows; ``ValueError`` naming a shard without per-split counts."""
    unknown = [row["shard"] for row in rows if row["split_sets"] is None]
    if unknown:
        raise ValueError(f"{why} counts the sets of one split, but the stats of {len(unknown)} "
                         f"shard(s) (e.g. {unknown[0]}) have no per-split counts (split_sets): "
                         "the dataset was built before they were recorded. Rebuild it into a new "
                         "output_uri, set data.split=null to count all sets, or give max_steps "
                         "and no data.subset_sets")
    return sum(row["split_sets"] for row in rows)


def choose_subset(rows: list[dict[str, Any]], subset_sets: int, seed: int,
                  why: str) -> list[dict[str, Any]]:
    """Whole shards in an order seeded by ``seed``, until their sets of the split reach
    ``subset_sets`` (all of them if they never do), returned in shard order; a pure function of
    the shard list and the seed, so every rerun and resume trains on the same subset."""
    counted_sets(rows, why)
    order = np.random.default_rng([seed, Salt.INGEST_ORDER]).permutation(len(rows))
    chosen, total = [], 0
    for index in order:
        if total >= subset_sets:
            break
        chosen.append(int(index))
        total += rows[index]["split_sets"]
    if total < subset_sets:
        log.warning("%s=%d but the dataset has only %d sets of the split: training on all of them",
                    why, subset_sets, total)
    return [rows[i] for i in sorted(chosen)]


def stream_starts(state: TrainerState | None, world_size: int,
                  num_shards: int) -> list[StreamPosition | None]:
    """Per rank, where its stream starts: the checkpoint's positions; with another world size
    (the streams are then different), the start of the epoch after the checkpoint's."""
    if state is None:
        return [None] * world_size
    if state.world_size == world_size:
        return [StreamPosition(*position) for position in state.positions]
    epoch = state.epoch + 1
    log.warning("resuming a run of %d workers with %d: data restarts at epoch %d",
                state.world_size, world_size, epoch)
    return [StreamPosition(item=epoch * num_shards + rank) for rank in range(world_size)]


class MISDataConfig(DataConfig):
    """See the module docstring; ``datasets["train"]`` must be ``ray.data.from_items`` of
    ``training_shards(cfg)``."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(datasets_to_split=[])
        self.cfg = cfg

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles,
                  worker_node_ids, **kwargs) -> list[dict[str, Any]]:
        manifest = datasets["train"].take_all()
        shards = tuple(row["shard"] for row in manifest)
        checkpoint = latest_checkpoint(self.cfg)
        state = None if checkpoint is None else read_trainer_state(checkpoint)
        starts = stream_starts(state, world_size, len(shards))
        mean_sets = sum(row["sets"] for row in manifest) / len(manifest)
        report_bad = (ReportToCounter(error_counter_name(self.cfg))
                      if self.cfg.data.on_bad_data == "skip" else None)
        stored_latents = use_stored_latents(self.cfg, shards)
        shard_sets = tuple(int(row["sets"]) for row in manifest)
        output = []
        for rank in range(world_size):
            stream = plan_stream(self.cfg, shards, mean_sets, stored_latents, rank, world_size,
                                 starts[rank], 0 if state is None else state.step, shard_sets)
            log.info("train stream of rank %d: %s", rank, describe_stream(stream))
            dataset = build_stream_dataset(stream, self.cfg, report_bad)
            options = self._resolve_execution_options("train")
            options.preserve_order = True  # a worker's stream order is part of its position
            dataset.context.execution_options = options
            dataset.context.enable_progress_bars = False  # one bar per worker is noise in a job log
            output.append({"train": dataset.iterator()})
        return output
