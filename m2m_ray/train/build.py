"""The model a run starts from: pre-training (the preset's base UNet, SD-2.1-base for ``sd21-base``,
with fresh image-set attention) or fine-tuning (``init_from``: a trained M2M model; task embedders
it lacks start fresh, zero-initialized, so the fine-tuned model starts as the pre-trained one)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from m2m_ray import storage
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.train.config import TrainConfig


def build_model(cfg: TrainConfig) -> M2MUNet:
    """An ``M2MUNet`` on the CPU in float32, in training mode."""
    if cfg.init_from is None:
        return M2MUNet.from_preset(cfg.model, cfg.m2m).train()
    with tempfile.TemporaryDirectory(prefix="m2m-init-") as tmp:
        model = M2MUNet.from_pretrained(_unet_folder(cfg, Path(tmp)),
                                        task_conditions=cfg.m2m.task_conditions, seed=cfg.seed,
                                        camera_frame=cfg.m2m.camera_frame)
    if model.config.variant != cfg.m2m.variant:
        raise ValueError(f"init_from {cfg.init_from} holds an M2M-{model.config.variant} "
                         f"model but m2m.variant is {cfg.m2m.variant!r}; fine-tune the same "
                         "variant")
    if model.config != cfg.m2m:
        raise ValueError(f"init_from {cfg.init_from} holds m2m={model.config.model_dump()} but "
                         f"the run asks for m2m={cfg.m2m.model_dump()}; only task conditions "
                         "may be added when fine-tuning")
    return model.train()


def _unet_folder(cfg: TrainConfig, tmp: Path) -> Path:
    """The M2MUNet folder of ``init_from`` (an exported pipeline's ``unet/`` or the folder
    itself), copied to ``tmp`` when remote."""
    uri = cfg.init_from.rstrip("/")
    if storage.is_remote(uri):
        storage.download_dir(uri, tmp, cfg.storage)
        folder = tmp
    else:
        folder = Path(storage.split_uri(uri)[1])
    return folder / "unet" if (folder / "model_index.json").is_file() else folder
