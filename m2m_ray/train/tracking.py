"""Experiment tracking of a training run: the metrics of every ``log_every_steps`` interval and
each checkpoint's sample grid, written by rank 0 through the trackers of ``report_to`` (diffusers'
``--report_to``; Ray Train V2 leaves tracking to the training function, rank 0 only):

| tracker | library | where | the resolved config as |
|---|---|---|---|
| ``tensorboard`` (default) | ``torch.utils.tensorboard.SummaryWriter`` | ``tracking.logging_dir``, default ``<storage_path>/<run_name>/tensorboard`` (local, or s3:// through a local folder uploaded every ``tracking.sync_every_s`` and at each checkpoint) | text ``config`` (YAML) |
| ``wandb`` | ``wandb`` | W&B run ``<run_name>-<hash of the run folder>`` of project ``tracking.project_name`` (resumed by a resumed run) | the run's config |
| ``mlflow`` | ``mlflow.tracking.MlflowClient`` | run named ``run_name`` in experiment ``tracking.project_name`` at ``tracking.mlflow.tracking_uri``, found again by its tag ``m2m_ray.run_dir`` | params (dotted keys, first start) + artifact ``train_config.json`` |

Scalars are the keys of the loop's metrics (``train/loss``, ``train/lr``, ``train/images_per_s``,
``train/mfu``, ...) at the optimizer step; the sample grid is the image ``samples``.
``Trackers.mfu`` adds ``train/mfu`` and ``train/tflops_per_s`` (achieved per worker) to a
metrics dict (``flops.py``). On ranks other than 0 every method does nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from m2m_ray import storage
from m2m_ray.config import config_to_dict, config_to_yaml
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.flops import measure_peak_tflops, mfu, train_flops_per_set
from m2m_ray.train.state import run_dir

log = logging.getLogger(__name__)


def logging_dir(cfg: TrainConfig) -> str:
    """The TensorBoard folder of a run (``tensorboard --logdir`` it)."""
    return cfg.tracking.logging_dir or storage.join(run_dir(cfg), "tensorboard")


def run_key(cfg: TrainConfig) -> str:
    """``<run_name>-<8 hex>``: one id per run folder, so a resumed run continues its W&B run and
    two runs of the same name in different storage paths do not collide."""
    digest = hashlib.blake2b(run_dir(cfg).encode(), digest_size=4).hexdigest()
    return f"{cfg.run_name.replace('.', '-')}-{digest}"


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim.lr": "5e-05", ...}``: a nested config as dotted string parameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class TensorBoardTracker:
    def __init__(self, cfg: TrainConfig, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.uri, self.storage = logging_dir(cfg), cfg.storage
        self.remote, self.sync_every_s = storage.is_remote(self.uri), cfg.tracking.sync_every_s
        local = (tempfile.mkdtemp(prefix="m2m-tensorboard-") if self.remote
                 else storage.split_uri(self.uri)[1])
        # a resumed worker group hides what the failed attempt logged after its checkpoint
        self.writer = SummaryWriter(local, purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```yaml\n" + config_to_yaml(cfg) + "\n```", start_step)
        self.last_sync = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.sync(force=False)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.sync(force=True)

    def sync(self, force: bool) -> None:
        self.writer.flush()
        if self.remote and (force or time.monotonic() - self.last_sync >= self.sync_every_s):
            storage.upload_dir(self.writer.log_dir, self.uri, self.storage)
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.sync(force=True)
        self.writer.close()


def _import(module: str, extra: str):
    """``module`` of an optional tracker, or ``ImportError`` naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"report_to has {extra} but {module} is not installed on the training "
                          f"workers: pip install 'm2m-ray[{extra}]' (the cluster image has it)"
                          ) from err


class WandbTracker:
    def __init__(self, cfg: TrainConfig, start_step: int):
        wandb = _import("wandb", "wandb")

        settings = cfg.tracking.wandb
        self.wandb = wandb
        self.run = wandb.init(project=cfg.tracking.project_name, entity=settings.entity,
                              name=cfg.run_name, id=run_key(cfg), resume="allow",
                              dir=settings.dir, mode=settings.mode, config=config_to_dict(cfg))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        self.run.log({key: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, cfg: TrainConfig, start_step: int):
        import os

        MlflowClient = _import("mlflow.tracking", "mlflow").MlflowClient
        from mlflow.entities import Param

        uri = cfg.tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("report_to has mlflow but no tracking URI is set: give "
                             "tracking.mlflow.tracking_uri (http://host:5000 of an MLflow "
                             "server, or file:/path) or MLFLOW_TRACKING_URI in the workers' "
                             "environment")
        self.client = MlflowClient(tracking_uri=uri)
        name = cfg.tracking.project_name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name))
        folder = run_dir(cfg)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`m2m_ray.run_dir` = '{folder}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(
                experiment_id, run_name=cfg.run_name,
                tags={"m2m_ray.run_dir": folder}).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(config_to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config_to_dict(cfg), "train_config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in metrics.items()])

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker}


class Trackers:
    """The trackers of ``cfg.report_to`` on rank 0 (none elsewhere) and the run's MFU terms."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, model: M2MUNet,
                 dino: DinoEncoder | None, device: torch.device, dtype: torch.dtype | None,
                 start_step: int):
        self.cfg, self.world_size = cfg, world_size
        self.trackers = ([TRACKERS[name](cfg, start_step) for name in cfg.report_to]
                         if rank == 0 else [])
        self.flops_per_set = self.peak_tflops = None
        if rank == 0:
            self.flops_per_set = train_flops_per_set(model, cfg.data.images_per_set, dino)
            # A matmul rate measured on shared CPU cores while the workers and the data tasks
            # start is no peak (it gave "MFU 144%" on 2 cores): measured on GPUs only, otherwise
            # MFU needs tracking.peak_tflops and the run reports train/tflops_per_s alone.
            self.peak_tflops = cfg.tracking.peak_tflops or (
                measure_peak_tflops(device, dtype or torch.float32)
                if device.type == "cuda" else None)
            peak = ("none on CPU without tracking.peak_tflops: no train/mfu"
                    if self.peak_tflops is None else f"{self.peak_tflops:.1f} TFLOP/s per worker ("
                    + ("tracking.peak_tflops" if cfg.tracking.peak_tflops else "measured matmul")
                    + ")")
            log.info("MFU terms: %.3g TFLOP per set (forward + backward), peak %s",
                     self.flops_per_set / 1e12, peak)

    def mfu(self, metrics: dict[str, float]) -> dict[str, float]:
        """``train/mfu`` and ``train/tflops_per_s`` (per worker) for metrics with
        ``train/samples_per_s``; {} on ranks other than 0."""
        if self.flops_per_set is None:
            return {}
        samples_per_s = metrics["train/samples_per_s"]
        out = {"train/tflops_per_s": self.flops_per_set * samples_per_s / self.world_size / 1e12}
        if self.peak_tflops is not None:
            out["train/mfu"] = mfu(self.flops_per_set, samples_per_s, self.world_size,
                                   self.peak_tflops)
        return out

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at optimizer step ``step`` to every tracker."""
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def log_image(self, key: str, png: bytes | None, step: int) -> None:
        """A PNG (a checkpoint's sample grid) as image ``key``; None or ``log_images`` off:
        nothing."""
        if png is None or not self.cfg.tracking.log_images or not self.trackers:
            return
        image = Image.open(io.BytesIO(png))
        image.load()
        for tracker in self.trackers:
            tracker.log_image(key, image, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
