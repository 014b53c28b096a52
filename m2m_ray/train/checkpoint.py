"""Checkpoint folders of an M2M training run, written by rank 0 and registered with Ray Train.

Layout of ``<storage_path>/<run_name>/checkpoint_<step>/``::

    unet/                 M2MUNet.save_pretrained: the trained weights (config.json + safetensors)
    ema_unet/             the same for the EMA weights (what the export publishes)
    optimizer.pt          AdamW state_dict           (torch.save; loaded with weights_only=True)
    lr_scheduler.pt       LambdaLR state_dict
    rng_state.pt          per rank: torch CPU (and CUDA) RNG states
    trainer_state.json    step, epoch, world size, per-rank data stream positions, train seconds
    train_config.json     the resolved TrainConfig (m2m_ray.storage.save_config format)
    samples.png           a grid of EMA samples: K context images, then M generated ones per row

The trainer state and the run's latest checkpoint are read without torch in ``state.py`` (the
Ray Train controller and the data config need them, not the model).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from m2m_ray.config import refuse_resume, setting_changes
from m2m_ray.models.m2m_unet import WEIGHTS_NAME, M2MUNet
from m2m_ray.storage import save_config
from m2m_ray.train.config import OptimConfig, TrainConfig
from m2m_ray.train.state import STATE_NAME, TrainerState, run_dir
from m2m_ray.train.step import EMA, LRSchedule


def save_checkpoint(path: Path, model: M2MUNet, ema: EMA, optimizer: torch.optim.Optimizer,
                    scheduler, state: TrainerState, cfg: TrainConfig,
                    rng_states: list[dict], grid_png: bytes | None) -> None:
    """Write the layout of the module docstring into the local folder ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path / "unet")
    ema.model.save_pretrained(path / "ema_unet")
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "lr_scheduler.pt")
    torch.save(rng_states, path / "rng_state.pt")
    (path / STATE_NAME).write_text(json.dumps(asdict(state), indent=2))
    save_config(cfg, str(path / "train_config.json"))
    if grid_png is not None:
        (path / "samples.png").write_bytes(grid_png)


def load_checkpoint(path: Path, model: M2MUNet, ema: EMA | None,
                    optimizer: torch.optim.Optimizer, scheduler, rank: int,
                    cfg: TrainConfig | None = None) -> TrainerState:
    """Restore what ``save_checkpoint`` wrote into live objects; returns the trainer state. RNG
    states are restored when the world size is unchanged. With ``cfg`` (the resuming run's
    config), its optimizer settings and LR schedule replace the checkpoint's
    (``apply_optim_settings``): a resume with a new ``max_steps`` or schedule follows the new one
    (``resume_changes`` lists and logs what changed; the driver refuses what cannot change)."""
    device = model.device
    model.load_state_dict(load_file(str(path / "unet" / WEIGHTS_NAME), device=str(device)))
    if ema is not None:
        ema.model.load_state_dict(load_file(str(path / "ema_unet" / WEIGHTS_NAME),
                                            device=str(device)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    if cfg is not None:
        apply_optim_settings(optimizer, scheduler, cfg.optim, cfg.max_steps)
    state = TrainerState.from_json((path / STATE_NAME).read_text())
    rng_states = torch.load(path / "rng_state.pt", weights_only=True)
    if len(rng_states) == state.world_size and rank < len(rng_states):
        torch.set_rng_state(rng_states[rank]["torch"])
        if rng_states[rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_states[rank]["cuda"])
    return state


def apply_optim_settings(optimizer: torch.optim.Optimizer, scheduler, optim: OptimConfig,
                         max_steps: int) -> None:
    """Make a restored AdamW and ``LambdaLR`` follow ``optim`` and ``max_steps`` from the restored
    step on: hyper-parameters of every param group, base learning rates and the schedule object
    (which ``LambdaLR.load_state_dict`` had replaced by the checkpoint's), and the current lr =
    base lr × schedule(step), as ``LambdaLR`` computes it. The moments of AdamW are kept."""
    for group in optimizer.param_groups:
        group.update(betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                     initial_lr=optim.lr)
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    scheduler.lr_lambdas = [LRSchedule(optim, max_steps) for _ in optimizer.param_groups]
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = optim.lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# A resumed run may change how it continues (applied and logged), not what it trains: these
# settings define the model, the data stream positions and the seeded draws of the checkpoint.
FIXED_ON_RESUME = ("model", "m2m", "seed", "data.uri", "data.format", "data.split",
                   "data.subset_sets", "data.images_per_set")


def resume_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """``"key: old → new"`` for every setting of ``cfg`` that differs from ``saved`` (the
    checkpoint's ``train_config.json`` payload ``config``). Raises
    ``m2m_ray.config.ResumeMismatchError`` naming the settings of ``FIXED_ON_RESUME`` that
    changed (old → new) and how to start a new run instead."""
    new = _flat(cfg.model_dump(mode="json"))
    old = _flat(saved)
    # A setting added to the schema after the checkpoint was written is read at its default, as
    # loading that run's export reads it; otherwise every old run would refuse to resume.
    try:
        filled = _flat(type(cfg).model_validate(saved).model_dump(mode="json"))
    except ValidationError:  # a key since removed: compare what both versions know
        filled = {}
    old.update({key: value for key, value in filled.items() if key not in old})
    changed = [key for key in sorted(set(new) | set(old)) if new.get(key) != old.get(key)]
    # bookkeeping of the run length and of the resolved max_steps is not a change of the run
    changed = [key for key in changed if key not in ("num_epochs",)]
    fixed = [key for key in changed if any(key == f or key.startswith(f + ".")
                                           for f in FIXED_ON_RESUME)]
    refuse_resume(f"run {cfg.run_name!r} resumes from a checkpoint trained with other settings "
                  "that cannot change mid-run", setting_changes(old, new, fixed),
                  "Start a new run (another --run_name), or remove the run folder "
                  f"{run_dir(cfg)} (its checkpoints) to start this one over, or fine-tune from "
                  "its export with --init_from.")
    return setting_changes(old, new, changed)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
