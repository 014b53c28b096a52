"""``train_loop_per_worker``: what every Ray Train worker runs.

Per step: a batch of ``global_batch_size / num_workers`` sets from this worker's MIS stream
(``ray.train.get_dataset_shard("train")``), the ε-loss of eq. 5 (``step.m2m_loss``; noise,
timesteps and context drops drawn for the whole batch from a generator of (seed, step, rank)), in
``gradient_accumulation_steps`` micro-batches (``step.accumulate_gradients``), backward through
DDP (``ray.train.torch.prepare_model``), gradient clipping, AdamW, the LR schedule, and on rank 0 the
EMA. bf16 autocast and gradient checkpointing on GPU (``precision``, ``gradient_checkpointing``).

Every ``log_every_steps`` all workers call ``ray.train.report`` with rank 0's metrics:
``train/loss`` (mean over the interval and the workers), ``train/lr``, ``train/grad_norm``,
``train/samples_per_s`` and ``train/images_per_s`` (sets and images trained on per second, all
workers, wall time of the interval), ``train/epoch``, ``train/step`` and, with
``data.on_bad_data: skip``, ``data/skipped_sets`` / ``data/skipped_shards``. Every
``checkpoint.every_steps`` (and at the last step) rank 0 also writes a checkpoint
(``checkpoint.py``) with a grid of EMA samples. A worker that starts with
``ray.train.get_checkpoint()`` restores it and continues at the step, the data position and the
RNG state it holds.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from m2m_ray import storage
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.presets import load_scheduler, load_vae
from m2m_ray.train.build import build_model
from m2m_ray.train.checkpoint import load_checkpoint, rng_state, save_checkpoint
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.ingest import error_counts
from m2m_ray.train.preview import sample_grid
from m2m_ray.train.state import TrainerState, checkpoint_dir_name, run_dir
from m2m_ray.train.step import (
    EMA,
    StepNoise,
    TrainBatch,
    accumulate_gradients,
    make_optimizer,
    step_generator,
)
from m2m_ray.train.tracking import Trackers

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config = {"train": TrainConfig as a dict}``."""
    context = ray.train.get_context()
    worker = Worker(TrainConfig.model_validate(config["train"]), context.get_world_rank(),
                    context.get_world_size(), ray.train.torch.get_device())
    try:
        worker.fit()
    finally:
        worker.trackers.close()


class Worker:
    """The state of one training worker (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        on_gpu = device.type == "cuda"
        self.autocast = (torch.bfloat16 if cfg.precision == "bf16"
                         or (cfg.precision == "auto" and on_gpu) else None)
        self.model = build_model(cfg).to(device)
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.warmup) if rank == 0 else None
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg.optim, cfg.max_steps)
        self.state = TrainerState(step=0, epoch=0, world_size=world_size, positions=[])
        self.expected_start: tuple[int, int] | None = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                self.state = load_checkpoint(Path(folder), self.model, self.ema, self.optimizer,
                                             self.scheduler, rank, cfg)
            if self.state.world_size == world_size:
                self.expected_start = self.state.positions[rank]
            log.info("rank %d resumed from step %d", rank, self.state.step)
        if cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else on_gpu:
            self.model.enable_gradient_checkpointing()
        self.ddp = ray.train.torch.prepare_model(self.model, move_to_device=False)
        self.dino = (DinoEncoder.from_preset(cfg.model, device)
                     if cfg.m2m.variant == "dino" else None)
        self.alphas_cumprod = load_scheduler(cfg.model, "ddim").alphas_cumprod.to(device)
        self.vae = load_vae(cfg.model, device) if rank == 0 and cfg.samples.enabled else None
        self.preview: torch.Tensor | None = None  # latents of the sample grid's sets
        self.preview_task = None  # their task conditions (fine-tuning), [S, N]
        self.position = self.expected_start
        self.epoch = self.state.epoch
        self.trackers = Trackers(cfg, rank, world_size, self.model, self.dino, device,
                                 self.autocast, self.state.step)  # tracking.py: rank 0 only

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        cfg = self.cfg
        if self.state.step >= cfg.max_steps:
            log.info("run already at step %d of %d", self.state.step, cfg.max_steps)
            return
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=cfg.global_batch_size // self.world_size, drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches)
        window = Window()
        for columns in batches:
            self.check_start(columns)
            loss, grad_norm = self.train_step(columns)
            window.add(loss, grad_norm)
            step = self.state.step
            checkpoint_now = step % cfg.checkpoint.every_steps == 0 or step == cfg.max_steps
            if checkpoint_now or step % cfg.log_every_steps == 0:
                metrics = self.metrics(window)
                metrics.update(self.trackers.mfu(metrics))
                self.state.train_seconds += window.seconds()
                if self.rank == 0:  # Ray forwards worker stdout to the driver's console
                    print(progress_line(metrics, cfg.max_steps), flush=True)
                    self.trackers.log(metrics, step)
                if checkpoint_now:
                    self.report_checkpoint(metrics)
                else:
                    ray.train.report(metrics)
                window = Window()
            self.maybe_fail()
            if step >= cfg.max_steps:
                return
        raise RuntimeError(f"rank {self.rank}: the data stream ended after step {self.state.step} "
                           f"of {cfg.max_steps}; the data plan undercounted the sets of "
                           f"{cfg.data.uri} (many sets of another split, or skipped bad data?)")

    def train_step(self, columns: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        batch = TrainBatch.from_columns(columns, self.device, cfg.m2m.task_conditions)
        if self.rank == 0 and self.preview is None and cfg.samples.enabled:
            self.preview = batch.latents[:cfg.samples.num_sets].clone()  # (S, N, 4, h, w)
            self.preview_task = (None if batch.task is None else
                                 batch.select(slice(0, cfg.samples.num_sets)).task)
        generator = step_generator(cfg.seed, self.state.step, self.rank, self.device)
        draws = StepNoise.draw(generator, batch.latents.shape, self.alphas_cumprod.shape[0],
                               cfg.context_drop_prob, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(self.ddp, batch, self.alphas_cumprod, draws,
                                    cfg.gradient_accumulation_steps, self.dino, self.autocast)
        max_norm = cfg.optim.max_grad_norm or float("inf")  # inf: measure without clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.state.step)
        self.position = (int(columns["item"][-1]), int(columns["row"][-1]) + 1)
        self.epoch = max(self.epoch, int(columns["epoch"].max()))
        return loss, grad_norm.detach()

    def check_start(self, columns: dict[str, torch.Tensor]) -> None:
        """After a resume, the stream must start where the checkpoint left this worker: at that
        row, or at the first row of a later item when that item had no rows left."""
        if self.expected_start is None:
            return
        got = (int(columns["item"][0]), int(columns["row"][0]))
        item, row = self.expected_start
        exact = got == (item, row) or (got[0] > item and got[1] == 0)
        # skip mode may have dropped the very set the stream should start with
        if got < (item, row) or (self.cfg.data.on_bad_data == "error" and not exact):
            raise RuntimeError(
                f"rank {self.rank}: the data stream starts at (item, row) {got}, but the "
                f"checkpoint of step {self.state.step} left this worker at {(item, row)}; the "
                "stream and the restored checkpoint disagree")
        self.expected_start = None

    # --- reporting and checkpoints ---------------------------------------------------------------

    def metrics(self, window: "Window") -> dict[str, float]:
        cfg = self.cfg
        totals = torch.stack([window.loss_sum, torch.tensor(float(window.steps),
                                                            device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(totals)
        seconds = window.seconds()
        samples_per_s = window.steps * cfg.global_batch_size / max(seconds, 1e-9)
        metrics = {
            "train/step": self.state.step, "train/epoch": self.epoch,
            "train/loss": (totals[0] / totals[1]).item(),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": window.last_grad_norm.item(),
            "train/samples_per_s": samples_per_s,
            "train/images_per_s": samples_per_s * cfg.data.images_per_set,
        }
        if cfg.data.on_bad_data == "skip":
            counts = error_counts(cfg)
            metrics.update({"data/skipped_sets": counts["sets"],
                            "data/skipped_shards": counts["shards"]})
        return metrics

    def report_checkpoint(self, metrics: dict[str, float]) -> None:
        """Rank 0 writes the checkpoint; every worker reports (``report`` is a barrier)."""
        cfg, step = self.cfg, self.state.step
        mine = (self.position, self.epoch, rng_state())
        gathered = [mine] * self.world_size
        if dist.is_initialized():
            dist.all_gather_object(gathered, mine)
        name = checkpoint_dir_name(step)
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        state = TrainerState(step=step, epoch=max(g[1] for g in gathered),
                             world_size=self.world_size, positions=[g[0] for g in gathered],
                             train_seconds=self.state.train_seconds)
        grid = self.grid()
        self.trackers.log_image("samples", grid, step)
        with tempfile.TemporaryDirectory(prefix="m2m-ckpt-") as folder:
            save_checkpoint(Path(folder), self.model, self.ema, self.optimizer, self.scheduler,
                            state, cfg, [g[2] for g in gathered], grid)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)
        log.info("step %d: checkpoint %s, loss %.4f", step, name, metrics["train/loss"])

    def grid(self) -> bytes | None:
        samples = self.cfg.samples
        if not samples.enabled or self.preview is None:
            return None
        return sample_grid(self.ema.model, self.vae, self.dino, self.preview,
                           samples.context_images, samples.sample, self.preview_task)

    def maybe_fail(self) -> None:
        """Fault injection for tests: raise once per run right after ``fail_at_step``."""
        faults, step = self.cfg.fault_injection, self.state.step
        if faults.fail_at_step != step or faults.fail_rank != self.rank:
            return
        marker = storage.join(run_dir(self.cfg), "_faults", f"fail_at_step_{step}")
        if storage.exists(marker, self.cfg.storage):
            return
        storage.write_bytes(marker, b"injected\n", self.cfg.storage)
        raise RuntimeError(f"injected failure on rank {self.rank} after step {step} "
                           "(fault_injection.fail_at_step)")


def progress_line(metrics: dict[str, float], max_steps: int) -> str:
    """One console line per logging interval: ``[train] step 25/400 loss 0.1234 ...``."""
    return (f"[train] step {metrics['train/step']}/{max_steps} loss {metrics['train/loss']:.4f} "
            f"lr {metrics['train/lr']:.2e} grad_norm {metrics['train/grad_norm']:.3f} "
            f"{metrics['train/images_per_s']:.1f} images/s"
            + (f" mfu {metrics['train/mfu']:.2%}" if "train/mfu" in metrics else ""))


class Window:
    """Loss and timing accumulated over one logging interval (kept on device: no sync per step)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.loss_sum: torch.Tensor | float = 0.0
        self.last_grad_norm = torch.zeros(())

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss_sum = self.loss_sum + loss.float()
        self.last_grad_norm = grad_norm
        self.steps += 1

    def seconds(self) -> float:
        return time.perf_counter() - self.start
