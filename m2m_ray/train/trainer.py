"""The ``TorchTrainer`` of a ``TrainConfig`` and the whole run (fit, then export)::

    summary = run_training(load_config(TrainConfig, "configs/m2m-self.yaml"))

Ray Train V2: ``RunConfig(name=run_name, storage_path, storage_filesystem)`` (a pyarrow S3
filesystem with the configured endpoint for ``s3://`` paths), ``CheckpointConfig(num_to_keep)``,
``FailureConfig(max_failures)``, ``ScalingConfig(num_workers, use_gpu, resources_per_worker)``;
data through ``MISDataConfig`` (``ingest.py``). A second ``run_training`` with the same run name
and storage path continues from the run's last checkpoint (raise ``max_steps`` to train longer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from m2m_ray import storage
from m2m_ray.config import config_to_dict
from m2m_ray.data.training import use_stored_latents
from m2m_ray.formats.mis import CorruptShardError
from m2m_ray.runtime import check_pool_fits, started_local_ray, task_errors_as
from m2m_ray.train.checkpoint import resume_changes
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.export import export_pipeline
from m2m_ray.train.ingest import (
    MISDataConfig,
    counted_sets,
    start_error_counter,
    training_shards,
)
from m2m_ray.train.loop import train_loop_per_worker
from m2m_ray.train.state import latest_checkpoint, read_trainer_state, run_dir

log = logging.getLogger(__name__)


def resolve_run_length(cfg: TrainConfig, shards: list[dict[str, Any]]
                       ) -> tuple[TrainConfig, dict[str, Any]]:
    """``cfg`` with ``max_steps`` set, and how it was derived. With ``num_epochs`` (paper,
    Appendix A: one epoch): ``max_steps = floor(num_epochs × S / global_batch_size)`` where S counts
    the sets of ``data.split`` in ``shards`` (``training_shards``); the returned config has
    ``max_steps`` and no ``num_epochs``. Raises ``ValueError`` when that is under one step or the
    shards' stats cannot count S."""
    info: dict[str, Any] = {"shards": len(shards), "global_batch_size": cfg.global_batch_size}
    if cfg.num_epochs is None:
        return cfg, {**info, "max_steps": cfg.max_steps, "derived": False}
    sets = counted_sets(shards, "num_epochs")
    steps = math.floor(cfg.num_epochs * sets / cfg.global_batch_size)
    if steps < 1:
        raise ValueError(f"num_epochs {cfg.num_epochs} over {sets} sets of split "
                         f"{cfg.data.split!r} at global_batch_size {cfg.global_batch_size} is "
                         "under one optimizer step; raise num_epochs or use max_steps")
    info.update(num_epochs=cfg.num_epochs, sets=sets, max_steps=steps, derived=True)
    log.info("run length: %g epoch(s) over %d sets of split %r in %d shards = %d steps of %d sets",
             cfg.num_epochs, sets, cfg.data.split, len(shards), steps, cfg.global_batch_size)
    print(f"[train] run length: {cfg.num_epochs:g} epoch(s) × {sets} sets / "
          f"{cfg.global_batch_size} per step = {steps} steps", flush=True)
    return cfg.model_copy(update={"max_steps": steps, "num_epochs": None}), info


def build_trainer(cfg: TrainConfig, shards: list[dict[str, Any]] | None = None) -> TorchTrainer:
    """The run's trainer; ``fit`` it after ``start_error_counter(cfg)`` (``run_training`` does
    both), which the workers report skipped bad data to. ``shards``: ``training_shards(cfg)``
    (listed here when None). Raises ``ValueError`` while the run length is in epochs
    (``resolve_run_length`` first)."""
    if cfg.max_steps is None:
        raise ValueError("max_steps is derived from num_epochs by resolve_run_length; call it "
                         "(run_training does) before building the trainer")
    shards = training_shards(cfg) if shards is None else shards
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    if storage.is_remote(cfg.storage_path):
        filesystem, storage_path = storage.pyarrow_filesystem(cfg.storage_path, cfg.storage)
    else:
        filesystem, storage_path = None, storage.split_uri(cfg.storage_path)[1]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": config_to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": ray.data.from_items(shards)},
        dataset_config=MISDataConfig(cfg),
    )


def check_local_resources(cfg: TrainConfig, cluster: dict[str, float]) -> None:
    """Fail fast where Ray would wait forever: on a fixed-size local Ray whose resources are
    ``cluster`` (``ray.cluster_resources()``; no autoscaler to add nodes), the training workers
    must fit and leave room for one data read task (``run_training`` checks the VAE actors once it
    knows whether the dataset's stored latents are used).

    Raises ``ValueError`` naming the numbers and the keys that fix it."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    scaling = cfg.scaling
    if scaling.use_gpu and scaling.num_workers * scaling.gpus_per_worker > gpus + 1e-9:
        raise ValueError(
            f"the local Ray has {gpus:g} GPUs; {scaling.num_workers} training workers × "
            f"{scaling.gpus_per_worker:g} GPUs (scaling.use_gpu) would wait forever. Train on the "
            "CPU with --scaling.use_gpu=false, lower scaling.num_workers, or submit the job to a "
            "cluster with GPU nodes (ray job submit, or --ray.address)")
    workers = scaling.num_workers * scaling.cpus_per_worker
    read = cfg.data.read.num_cpus
    if workers + read > cpus + 1e-9:
        raise ValueError(
            f"the local Ray has {cpus:g} CPUs; {scaling.num_workers} training workers × "
            f"{scaling.cpus_per_worker:g} CPUs leave {max(cpus - workers, 0):g} for the data "
            f"read tasks (data.read.num_cpus {read:g} each), so the run would wait forever. Raise "
            "ray.num_cpus (logical CPUs may exceed the cores), or lower scaling.cpus_per_worker "
            "or data.read.num_cpus")


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its local relative paths made absolute against the driver's working directory:
    Ray Train runs each worker in its own folder (``/tmp/ray/session_*/artifacts/<run>``), so a
    relative ``storage_path``, ``tracking.logging_dir`` or ``init_from`` would land there (the
    TensorBoard events of ``storage_path: outputs/shapes/train`` did). URIs (s3://) stay."""
    def absolute(uri: str | None) -> str | None:
        if uri is None or storage.is_remote(uri):
            return uri
        return os.path.abspath(storage.split_uri(uri)[1])

    tracking = cfg.tracking.model_copy(update={"logging_dir": absolute(cfg.tracking.logging_dir)})
    return cfg.model_copy(update={"storage_path": absolute(cfg.storage_path),
                                  "init_from": absolute(cfg.init_from), "tracking": tracking})


def check_resume(cfg: TrainConfig) -> list[str]:
    """When the run already has a checkpoint: the settings that differ from the ones it was
    trained with, printed (the workers apply them: ``checkpoint.apply_optim_settings``); raises
    ``m2m_ray.config.ResumeMismatchError`` for settings that cannot change mid-run
    (``checkpoint.resume_changes``)."""
    checkpoint = latest_checkpoint(cfg)
    if checkpoint is None:
        return []
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/train_config.json") as f:
        saved = json.loads(f.read().decode())["config"]
    changes = resume_changes(saved, cfg)
    step = read_trainer_state(checkpoint).step
    for change in changes:
        print(f"[train] resuming {cfg.run_name} at step {step} with a changed setting: {change}",
              flush=True)
    return changes


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Fit (or continue) the run, export the final EMA model when ``export_uri`` is set, and
    return a summary: run folder, last checkpoint, step, epoch, last metrics, the kept checkpoints
    with their metrics, skipped bad data, export."""
    start = time.perf_counter()
    local = started_local_ray()
    if local:
        check_local_resources(cfg, ray.cluster_resources())
    cfg = with_absolute_paths(cfg)
    # Ray Train V2 patches print() on its workers to also log through the root logger, and tees
    # to stdout when Ray has wrapped it: every progress line reached the driver twice. Workers
    # inherit this variable from the driver (Ray Train propagates it); a user's setting wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    shards = training_shards(cfg)
    if local and not use_stored_latents(cfg, tuple(row["shard"] for row in shards)):
        # The workers' streams encode with VAE actors: one must fit the fixed-size local Ray.
        check_pool_fits(cfg.data.vae_actors, "data.vae_actors", ray.cluster_resources())
    cfg, run_length = resolve_run_length(cfg, shards)
    check_resume(cfg)
    counter = start_error_counter(cfg)  # held here: the actor lives as long as this handle
    with task_errors_as(CorruptShardError):  # a bad shard named, not a worker's traceback
        result = build_trainer(cfg, shards).fit()
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"run {cfg.run_name} ended without a checkpoint under "
                           f"{run_dir(cfg)}; see the worker logs above")
    state = read_trainer_state(checkpoint)
    summary: dict[str, Any] = {
        "run_dir": run_dir(cfg),
        "checkpoint": checkpoint.path,
        "step": state.step,
        "epoch": state.epoch,
        "run_length": run_length,
        "metrics": result.metrics,
        "checkpoints": [{"path": kept.path, **metrics}
                        for kept, metrics in result.best_checkpoints or []],
        "skipped_data": ray.get(counter.totals.remote()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if cfg.export_uri is not None:
        with checkpoint.as_directory() as folder:
            summary["export"] = export_pipeline(Path(folder), cfg, cfg.export_uri)
    return summary

