"""The trainer state of a checkpoint and the run's latest checkpoint, without torch: the Ray Train
controller and ``MISDataConfig`` read them to start each worker's data stream where the checkpoint
left it.

``latest_checkpoint`` finds what Ray Train restores (its own snapshot of registered checkpoints,
read through the public ``ray.train.Result.from_path``), so the streams are positioned for exactly
the checkpoint the workers then load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from m2m_ray import storage
from m2m_ray.train.config import TrainConfig

STATE_NAME = "trainer_state.json"


@dataclass
class TrainerState:
    step: int                           # optimizer steps done
    epoch: int                          # data epoch of the latest set trained on
    world_size: int
    positions: list[tuple[int, int]]    # per rank: (item, row) of the next set of its stream
    train_seconds: float = 0.0          # wall time inside the training loop, all attempts

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        data = json.loads(text)
        data["positions"] = [tuple(p) for p in data["positions"]]
        return cls(**data)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def run_dir(cfg: TrainConfig) -> str:
    """``<storage_path>/<run_name>`` as a URI."""
    return storage.join(cfg.storage_path, cfg.run_name)


def latest_checkpoint(cfg: TrainConfig):
    """The checkpoint Ray Train resumes this run from (``ray.train.Checkpoint``), or None for a
    run that has none yet."""
    import ray.train

    fs, path = storage.pyarrow_filesystem(run_dir(cfg), cfg.storage)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # raised for a run folder, or its checkpoint snapshot, that does not exist
        return None
    return result.checkpoint


def read_trainer_state(checkpoint) -> TrainerState:
    """The ``trainer_state.json`` of a ``ray.train.Checkpoint`` (local or remote)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_NAME}") as f:
        return TrainerState.from_json(f.read().decode())
