"""How M2M samples (``SampleConfig``: the one sampling spec, from YAML down to the sampler loop) and
the generation job of pipelines/generate.py (``GenerateJobConfig``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from m2m_ray.config import (
    POOL_KEYS_IN_ACTORS,
    GPUActorPool,
    RayConfig,
    StorageConfig,
    StrictModel,
)
from m2m_ray.data.config import GenerateInputsConfig
from m2m_ray.models.config import M2MConfig, ModelConfig


class SampleConfig(StrictModel):
    """How M2M samples: the arguments of ``M2MPipeline.__call__`` / ``generate``.

    ``sampler.sample`` reads what the loop needs (M, W, steps, scheduler, s_I, s_T, use_cache);
    seed, dtype, resolution and vae_batch_size decide the run around it and are applied by its
    callers: ``M2MPipeline.generate`` (and so ``__call__`` and the generate job) honours all of
    them, training previews (``m2m_ray/train/preview.py``) honour seed, dtype and vae_batch_size
    and refuse a resolution."""

    num_images: int = Field(4, ge=1, description="M: images generated per set, one after another.")
    context_window: int = Field(
        8, ge=1, description="W: a new image sees the last W images of its set (given ones first, "
        "then the generated ones as they join).")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps per image.")
    scheduler: Literal["ddim", "euler", "pndm", "dpmsolver++"] | None = Field(
        None, description="Scheduler on the model's noise schedule; None: the model's own (the "
        "one saved in its folder; DDIM, the paper's, for a preset model and training previews).")
    guidance_scale: float = Field(
        3.0, description="s_I, image guidance (eq. 6): 1 = the conditional prediction alone (one "
        "UNet branch), 0 = ignore the context.")
    task_guidance_scale: float = Field(
        3.0, description="s_T, task guidance (eq. 7); used only when task conditions are given.")
    use_cache: bool = Field(
        True, description="Encode each context image once into per-site keys/values (same images "
        "as False, which re-encodes the context at every step: the paper's cost).")
    seed: int = Field(0, description="Base seed; set s draws its noises from a generator seeded "
                      "with m2m_ray.sampling.sampler.set_seed(set_id, seed).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Precision on GPU; the CPU always runs float32. The pipeline's "
        "weights must have it (load them in it); previews autocast to it.")
    resolution: int | None = Field(
        None, ge=8, multiple_of=8, description="Image size in pixels; None: the model preset's "
        "(512 for sd21-base, 64 for tiny).")
    vae_batch_size: int = Field(8, ge=1, description="Images per VAE encode/decode call.")


class GenerateSetsConfig(StrictModel):
    """What to generate with which model, and the actor pool that does it."""

    actors: GPUActorPool = Field(description="The sampling actor pool (engine=ray): one "
                              "M2MPipeline per actor.")
    output_uri: str = Field(..., description="Generations folder (local or s3://): images, "
                            "generations.jsonl (m2m_ray/formats/generations.py), contact_sheet.png.")
    model_path: str | None = Field(
        None, description="M2MPipeline folder (local or s3://, written by save_pretrained or the "
        "training export). None: a fresh model from `model` + `m2m`, untrained image-set "
        "attention (demos and tests only).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    m2m: M2MConfig = Field(default_factory=M2MConfig)
    inputs: GenerateInputsConfig
    sample: SampleConfig = Field(default_factory=SampleConfig)
    engine: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Data with an actor pool (many sets, a cluster); local: in "
        "this process, no Ray (a few sets on this machine).")
    sets_per_batch: int = Field(4, ge=1, description="Sets denoised together in one UNet batch.")
    image_format: Literal["png", "jpeg"] = "png"
    contact_sheet_sets: int = Field(8, ge=0, description="Sets shown in contact_sheet.png "
                                    "(inputs | generated); 0: no sheet.")
    progress_interval_s: float = Field(
        30.0, ge=0, description="Seconds between progress lines and rewrites of "
        "<output_uri>/progress.json (sets and images done of the total, rate, ETA, skipped "
        "sets); 0: at every finished batch.")

    renamed_keys: ClassVar[dict[str, str]] = POOL_KEYS_IN_ACTORS


class GenerateJobConfig(GenerateSetsConfig):
    """pipelines/generate.py."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
