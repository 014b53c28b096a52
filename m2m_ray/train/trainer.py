"""The ``TorchTrainer`` of a ``TrainConfig`` and the whole run (fit, then export)::

    summary = run_training(load_config(TrainConfig, "configs/m2m-self.yaml"))

Ray Train V2: ``RunConfig(name=run_name, storage_path, storage_filesystem)`` (a pyarrow S3
filesystem with the configured endpoint for ``s3://`` paths), ``CheckpointConfig(num_to_keep)``,
``FailureConfig(max_failures)``, ``ScalingConfig(num_workers, use_gpu, resources_per_worker)``;
data through ``MISDataConfig`` (``ingest.py``). A second ``run_training`` with the same run name
and storage path continues from the run's last checkpoint (raise ``max_steps`` to train longer).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from m2m_ray import storage
from m2m_ray.config import config_to_dict
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.export import export_pipeline
from m2m_ray.train.ingest import MISDataConfig, shard_manifest, start_error_counter
from m2m_ray.train.loop import train_loop_per_worker
from m2m_ray.train.state import read_trainer_state, run_dir


def build_trainer(cfg: TrainConfig) -> TorchTrainer:
    """The run's trainer; ``fit`` it after ``start_error_counter(cfg)`` (``run_training`` does
    both), which the workers report skipped bad data to."""
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
        datasets={"train": shard_manifest(cfg)},
        dataset_config=MISDataConfig(cfg),
    )


def check_local_resources(cfg: TrainConfig, cpus: float) -> None:
    """Fail fast where Ray would wait forever: on a fixed-size local Ray of ``cpus`` logical CPUs
    (no autoscaler to add nodes), the training workers must leave room for one data read task.

    Raises ``ValueError`` naming the numbers and the keys that fix it."""
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    read = cfg.data.read.num_cpus
    if workers + read > cpus + 1e-9:
        raise ValueError(
            f"the local Ray has {cpus:g} CPUs; {cfg.scaling.num_workers} training workers × "
            f"{cfg.scaling.cpus_per_worker:g} CPUs leave {max(cpus - workers, 0):g} for the data "
            f"read tasks (data.read.num_cpus {read:g} each), so the run would wait forever. Raise "
            "ray.num_cpus (logical CPUs may exceed the cores), or lower scaling.cpus_per_worker "
            "or data.read.num_cpus")


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Fit (or continue) the run, export the final EMA model when ``export_uri`` is set, and
    return a summary: run folder, last checkpoint, step, epoch, last metrics, the kept checkpoints
    with their metrics, skipped bad data, export."""
    start = time.perf_counter()
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        check_local_resources(cfg, ray.cluster_resources().get("CPU", 0.0))
    counter = start_error_counter(cfg)  # held here: the actor lives as long as this handle
    result = build_trainer(cfg).fit()
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

