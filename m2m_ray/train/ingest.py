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

import ray
from ray.train import DataConfig

from m2m_ray.data.training import (
    StreamPosition,
    build_stream_dataset,
    describe_stream,
    plan_stream,
    use_stored_latents,
)
from m2m_ray.formats.mis import committed_shards
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.state import TrainerState, latest_checkpoint, read_trainer_state

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class DataErrorCounter:
    """Counts the sets and shards skipped as bad data (``data.on_bad_data: skip``)."""

    def __init__(self):
        self.counts = {"sets": 0, "shards": 0}
        self.examples: list[str] = []

    def add(self, kind: str, uri: str, reason: str) -> None:
        self.counts[f"{kind}s"] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind} in {uri}: {reason}")

    def totals(self) -> dict[str, Any]:
        return {**self.counts, "examples": list(self.examples)}


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


def shard_manifest(cfg: TrainConfig):
    """The trainer's ``train`` dataset: one row per committed shard, ``{"shard": uri, "sets": n}``,
    listed once per ``fit`` (shards committed later do not change a running plan)."""
    rows = [{"shard": uri, "sets": stats["sets"]}
            for uri, stats in committed_shards(cfg.data.uri, cfg.data.format, cfg.storage)]
    if not rows:
        raise FileNotFoundError(f"no committed {cfg.data.format} shards under {cfg.data.uri}/mis; "
                                "build MIS first (pipelines/build_mis.py) or check data.uri and "
                                "data.format")
    return ray.data.from_items(rows)


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
    """See the module docstring; ``datasets["train"]`` must be ``shard_manifest(cfg)``."""

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
        output = []
        for rank in range(world_size):
            stream = plan_stream(self.cfg, shards, mean_sets, stored_latents, rank, world_size,
                                 starts[rank], 0 if state is None else state.step)
            log.info("train stream of rank %d: %s", rank, describe_stream(stream))
            dataset = build_stream_dataset(stream, self.cfg, report_bad)
            options = self._resolve_execution_options("train")
            options.preserve_order = True  # a worker's stream order is part of its position
            dataset.context.execution_options = options
            dataset.context.enable_progress_bars = False  # one bar per worker is noise in a job log
            output.append({"train": dataset.iterator()})
        return output
