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
from safetensors.torch import load_file

from m2m_ray.models.m2m_unet import WEIGHTS_NAME, M2MUNet
from m2m_ray.storage import save_config
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.state import STATE_NAME, TrainerState
from m2m_ray.train.step import EMA


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
                    optimizer: torch.optim.Optimizer, scheduler, rank: int) -> TrainerState:
    """Restore what ``save_checkpoint`` wrote into live objects; returns the trainer state. RNG
    states are restored when the world size is unchanged."""
    device = model.device
    model.load_state_dict(load_file(str(path / "unet" / WEIGHTS_NAME), device=str(device)))
    if ema is not None:
        ema.model.load_state_dict(load_file(str(path / "ema_unet" / WEIGHTS_NAME),
                                            device=str(device)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    state = TrainerState.from_json((path / STATE_NAME).read_text())
    rng_states = torch.load(path / "rng_state.pt", weights_only=True)
    if len(rng_states) == state.world_size and rank < len(rng_states):
        torch.set_rng_state(rng_states[rank]["torch"])
        if rng_states[rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_states[rank]["cuda"])
    return state


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
