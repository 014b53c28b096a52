"""The model's configs: which base weights (``ModelConfig``: the preset) and the M2M architecture
(``M2MConfig``), saved in every checkpoint and pipeline folder beside the weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from m2m_ray.config import StrictModel

#: Preset names that were renamed → their new name (a config with the old one is refused with it).
RENAMED_PRESETS = {"sd21-base-shapes": "sd21-base-random"}


class ModelConfig(StrictModel):
    preset: Literal["sd21-base", "shapes", "tiny", "sd21-base-random"] = Field(
        "sd21-base",
        description="sd21-base: real hub weights; shapes: the shapes world's toy VAE and "
        "text-to-image teacher, trained weights shipped in the repository (offline, images that "
        "mean something); tiny: small random models, offline (fast tests); sd21-base-random: "
        "SD-2.1-base-size architectures with random weights (speed benchmarks).",
    )
    sd_model_id: str | None = Field(
        None, description="Hub id or local diffusers folder overriding the preset's SD model."
    )
    dino_model_id: str | None = Field(
        None, description="Hub id or local folder overriding the preset's DINOv2 model."
    )
    seed: int = Field(0, description="Seed of the random weights of the tiny/random presets and "
                      "of the shapes preset's DINO encoder.")

    @field_validator("preset", mode="before")
    @classmethod
    def _renamed_preset(cls, value: object) -> object:
        if isinstance(value, str) and value in RENAMED_PRESETS:
            raise ValueError(f"preset {value!r} was renamed to {RENAMED_PRESETS[value]!r} (SD-2.1-"
                             "base shapes with random weights); the 'shapes' preset is the shapes "
                             "world's trained toy models")
        return value


class M2MConfig(StrictModel):
    """Architecture of the M2M UNet (m2m_ray.models.m2m_unet); saved in every checkpoint."""

    variant: Literal["self", "dino"] = Field(
        "self",
        description="self: context = the UNet's own hidden states of clean latents (t=0) at each "
        "image-set attention site; dino: context = DINOv2 last hidden states of clean images.",
    )
    task_conditions: list[Literal["camera", "position"]] = Field(
        default_factory=list,
        description="Per-image task conditions (paper §6.2): camera = MLP over camera extrinsics "
        "(novel view synthesis), position = sinusoidal index + MLP (visual procedures). Empty for "
        "pre-training on MIS.",
    )
    camera_frame: Literal["relative", "world"] = Field(
        "relative",
        description="What the camera MLP is given (m2m_ray.data.tasks.camera_inputs): relative = "
        "each image's 3 x 4 world-to-camera extrinsics relative to the first image of the "
        "sequence (independent of the dataset's world frame); world = the extrinsics as the "
        "dataset stores them (for datasets whose world frame is the object's own, canonical "
        "one). Training and sampling read it from the model, so they agree.",
    )
    task_embed_dim: int = Field(
        256, ge=8, multiple_of=2,
        description="Width of the task-condition embedding before its zero-initialized per-site "
        "projections.",
    )

    @model_validator(mode="after")
    def _unique_conditions(self) -> "M2MConfig":
        if len(set(self.task_conditions)) != len(self.task_conditions):
            raise ValueError(f"task_conditions {self.task_conditions} repeats a condition; "
                             "list each of camera/position at most once")
        return self
