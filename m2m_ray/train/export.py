"""Export the final EMA model of a run as an ``M2MPipeline`` folder (``M2MPipeline.save_pretrained``
writes the layout its ``from_pretrained`` reads)::

    <out>/model_index.json   {"_class_name": "M2MPipeline", "variant": ..., "preset": ...}
    <out>/unet/              the checkpoint's EMA weights (M2MUNet.save_pretrained)
    <out>/vae/               the preset's AutoencoderKL
    <out>/scheduler/         DDIMScheduler on SD-2.1's noise schedule
    <out>/dino/              Dinov2Model (M2M-DINO only)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from m2m_ray import storage
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.models.presets import load_scheduler, load_vae
from m2m_ray.sampling.pipeline import M2MPipeline
from m2m_ray.train.config import MODEL_SCHEDULER, TrainConfig


def export_pipeline(checkpoint_dir: Path, cfg: TrainConfig, out_uri: str) -> str:
    """Write the pipeline folder of ``checkpoint_dir``'s EMA model to ``out_uri`` (local or s3://);
    returns ``out_uri``."""
    unet = M2MUNet.from_pretrained(checkpoint_dir / "ema_unet")
    dino = DinoEncoder.from_preset(cfg.model) if unet.config.variant == "dino" else None
    pipeline = M2MPipeline(unet, load_vae(cfg.model), load_scheduler(cfg.model, MODEL_SCHEDULER),
                            dino)
    if not storage.is_remote(out_uri):
        pipeline.save_pretrained(storage.split_uri(out_uri)[1])
        return out_uri
    with tempfile.TemporaryDirectory(prefix="m2m-export-") as tmp:
        pipeline.save_pretrained(tmp)
        storage.upload_dir(tmp, out_uri, cfg.storage)
    return out_uri
