"""The model a run starts from: pre-training (the preset's base UNet, SD-2.1-base for ``sd21-base``,
with fresh image-set attention) or fine-tuning (``init_from``: a trained M2M model; task embedders
it lacks start fresh, zero-initialized, so the fine-tuned model starts as the pre-trained one)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from m2m_ray import storage
from m2m_ray.config import TrainConfig
from m2m_ray.models.m2m_unet import M2MUNet

# State-dict prefixes of the task-condition modules (embedders, per-site projections).
TASK_PARAMETERS = ("task_embedder.", "dino_task_proj.")
TASK_SITE_PARAMETER = ".processor.task_proj."


def build_model(cfg: TrainConfig) -> M2MUNet:
    """An ``M2MUNet`` on the CPU in float32, in training mode."""
    if cfg.init_from is None:
        return M2MUNet.from_preset(cfg.model, cfg.m2m).train()
    with tempfile.TemporaryDirectory(prefix="m2m-init-") as tmp:
        pretrained = M2MUNet.from_pretrained(_unet_folder(cfg, Path(tmp)))
    if pretrained.config.variant != cfg.m2m.variant:
        raise ValueError(f"init_from {cfg.init_from} holds an M2M-{pretrained.config.variant} "
                         f"model but m2m.variant is {cfg.m2m.variant!r}; fine-tune the same "
                         "variant")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 7)
        model = M2MUNet(pretrained.base_config, cfg.m2m, pretrained.model_config,
                        pretrained.dino_hidden_size)
    missing, unexpected = model.load_state_dict(pretrained.state_dict(), strict=False)
    not_task = [n for n in missing if not _is_task_parameter(n)]
    if unexpected or not_task:
        raise ValueError(f"init_from {cfg.init_from} does not fit m2m={cfg.m2m.model_dump()}: "
                         f"missing {not_task[:5]}, unexpected {unexpected[:5]}. Only task "
                         "conditions may be added when fine-tuning; remove none")
    return model.train()


def _is_task_parameter(name: str) -> bool:
    return name.startswith(TASK_PARAMETERS) or TASK_SITE_PARAMETER in name


def _unet_folder(cfg: TrainConfig, tmp: Path) -> Path:
    """The M2MUNet folder of ``init_from`` (an exported pipeline's ``unet/`` or the folder
    itself), copied to ``tmp`` when remote."""
    uri = cfg.init_from.rstrip("/")
    if storage.is_remote(uri):
        fs, path = storage.fsspec_filesystem(uri, cfg.storage)
        fs.get(path + "/", str(tmp) + "/", recursive=True)
        folder = tmp
    else:
        folder = Path(storage.split_uri(uri)[1])
    return folder / "unet" if (folder / "model_index.json").is_file() else folder
