"""``TrainConfig`` (pipelines/train.py): pre-training and fine-tuning on Ray Train.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from m2m_ray.config import RayConfig, StorageConfig, StrictModel, with_defaults
from m2m_ray.data.config import TrainDataConfig
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.sampling.config import SampleConfig

PreviewSample = with_defaults(SampleConfig, num_images=2)


class OptimConfig(StrictModel):
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; "
                                        "None: no clipping (the norm is still reported).")
    warmup_steps: int = Field(1000, ge=0, description="Linear warm-up from 0 to lr.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="After warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: final lr / peak lr.")


class EMAConfig(StrictModel):
    decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay per optimizer step.")
    warmup: bool = Field(True, description="Use min(decay, (1 + s) / (10 + s)) at step s, so the "
                         "EMA follows the model early on (a pure 0.9999 needs ~10k steps).")


class TrainCheckpointConfig(StrictModel):
    every_steps: int = Field(1000, ge=1, description="Checkpoint (and sample grid) interval; the "
                             "last step always checkpoints.")
    num_to_keep: int | None = Field(3, ge=1, description="Ray Train CheckpointConfig.num_to_keep.")


class SampleGridConfig(StrictModel):
    """The PNG grid of EMA samples written with every checkpoint."""

    enabled: bool = True
    num_sets: int = Field(2, ge=1, description="Rows: sets from the training stream.")
    context_images: int = Field(2, ge=0, description="K real images per row as context.")
    sample: PreviewSample = Field(
        description="How the M images after the context are sampled: the same spec as "
        "generation (m2m_ray.sampling.config.SampleConfig); num_images is M.")

    renamed_keys: ClassVar[dict[str, str]] = {
        "new_images": "sample.num_images", "steps": "sample.num_inference_steps",
        "guidance_scale": "sample.guidance_scale"}


class TrainScalingConfig(StrictModel):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one GPU each with use_gpu).")
    use_gpu: bool = True
    cpus_per_worker: float = Field(2.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0, description="With use_gpu.")


class TrainFaultInjectionConfig(StrictModel):
    """For tests of fault tolerance only; off by default."""

    fail_at_step: int | None = Field(
        None, ge=1, description="Raise in one worker right after this step, once per run (a "
        "marker under <storage_path>/<run_name>/_faults records that it happened).")
    fail_rank: int = Field(0, ge=0, description="The worker that raises.")


class TrainConfig(StrictModel):
    run_name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                          description="Ray Train run name: rerunning with the same name and "
                          "storage_path continues from the run's last checkpoint.")
    storage_path: str = Field(..., description="Checkpoints and run state: local or s3://.")
    init_from: str | None = Field(
        None, description="Fine-tuning: an M2M model folder (an export with unet/, or an "
        "M2MUNet folder) whose weights start the run; task embedders that it lacks start "
        "fresh (zero-initialized). None: pre-training from the preset (SD-2.1-base).")
    export_uri: str | None = Field(None, description="Write the final EMA model here as an "
                                   "M2MPipeline folder (local or s3://); None: no export.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    m2m: M2MConfig = Field(default_factory=M2MConfig)
    data: TrainDataConfig
    scaling: TrainScalingConfig = Field(default_factory=TrainScalingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    checkpoint: TrainCheckpointConfig = Field(default_factory=TrainCheckpointConfig)
    samples: SampleGridConfig = Field(default_factory=SampleGridConfig)
    global_batch_size: int = Field(256, ge=1, description="Sets per optimizer step, all workers "
                                   "together (paper: 256).")
    max_steps: int = Field(..., ge=1, description="Optimizer steps of the whole run.")
    seed: int = Field(0, description="Seeds new weights, subsets, noise, timesteps, dropout.")
    context_drop_prob: float = Field(0.1, ge=0, le=1, description="Probability that a set sees "
                                     "no context (and no task conditions): paper 10%.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU. Weights stay fp32.")
    gradient_checkpointing: bool | None = Field(None, description="None: on GPU only.")
    log_every_steps: int = Field(50, ge=1, description="Metrics interval (ray.train.report).")
    max_failures: int = Field(3, ge=-1, description="Ray Train FailureConfig.max_failures.")
    fault_injection: TrainFaultInjectionConfig = Field(default_factory=TrainFaultInjectionConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        workers = self.scaling.num_workers
        if self.global_batch_size % workers:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"scaling.num_workers {workers}; every worker takes the same share")
        if self.samples.context_images > self.data.images_per_set:
            raise ValueError(f"samples.context_images {self.samples.context_images} > "
                             f"data.images_per_set {self.data.images_per_set}: the grid's "
                             "context comes from one training sample")
        return self
