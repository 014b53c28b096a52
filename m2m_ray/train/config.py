"""``TrainConfig`` (pipelines/train.py): pre-training and fine-tuning on Ray Train.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from m2m_ray.config import RayConfig, StorageConfig, StrictModel, with_defaults
from m2m_ray.data.config import TrainDataConfig
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.sampling.config import SampleConfig

MODEL_SCHEDULER = "ddim"  # a trained model's own scheduler (paper): export saves it, previews too
# A preview autocasts to its spec's dtype on a GPU: bf16 by default, as training (precision auto).
PreviewSample = with_defaults(SampleConfig, num_images=2, dtype="bfloat16")


def check_preview_spec(spec: SampleConfig) -> None:
    """Refuse what a training preview cannot honour: ``resolution`` (the size of the training
    images decides it)."""
    if spec.resolution is not None:
        raise ValueError(f"samples.sample.resolution is {spec.resolution}, but a training preview "
                         "samples at the size of the training images (their latents); remove the "
                         "key")


class OptimConfig(StrictModel):
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; "
                                        "None: no clipping (the norm is still reported).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from 0 to lr (paper, "
                              "Appendix A: none).")
    schedule: Literal["constant", "cosine"] = Field("constant", description="After warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: final lr / peak lr.")
    fused: bool = Field(False, description="torch's fused AdamW kernel (CUDA): one kernel for "
                        "all parameters instead of a few per tensor group; same update.")


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


Tracker = Literal["tensorboard", "wandb", "mlflow"]


def _one_or_many(value):
    """``--report_to=wandb`` (diffusers' spelling) or a list."""
    return [value] if isinstance(value, str) else value


class WandbConfig(StrictModel):
    """Weights & Biases (``report_to: [wandb]``; ``pip install 'm2m-ray[wandb]'``). The API key
    comes from ``WANDB_API_KEY`` or ``wandb login``, never from a config."""

    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: WANDB_MODE, else online. offline: files only, `wandb sync` "
        "uploads them later.")
    entity: str | None = Field(None, description="Team or user; None: the key's default.")
    dir: str | None = Field(None, description="Local folder for W&B's files on the rank-0 "
                            "worker; None: WANDB_DIR, else ./wandb in the worker's directory.")


class MLflowConfig(StrictModel):
    """MLflow (``report_to: [mlflow]``; ``pip install 'm2m-ray[mlflow]'``)."""

    tracking_uri: str | None = Field(
        None, description="An MLflow server (http://host:5000) or a file store (file:/path; "
        "MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true in the workers' environment for it). "
        "None: MLFLOW_TRACKING_URI.")


class TrackingConfig(StrictModel):
    """Where ``report_to``'s trackers write (``m2m_ray/train/tracking.py``), and MFU's peak."""

    project_name: str = Field("m2m_ray", description="W&B project / MLflow experiment "
                              "(diffusers' --tracker_project_name).")
    logging_dir: str | None = Field(
        None, description="TensorBoard event files (local or s3://); None: "
        "<storage_path>/<run_name>/tensorboard.")
    sync_every_s: float = Field(60.0, ge=0, description="s3:// logging_dir: upload the event "
                                "files at most this often, and at every checkpoint.")
    log_images: bool = Field(True, description="Log each checkpoint's sample grid (samples.png) "
                             "as the image `samples`.")
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak TFLOP/s of one worker's device in the training precision "
        "(datasheet, e.g. 989 for an H100's dense bf16) for train/mfu; None: measured at start "
        "with a matmul on GPUs (m2m_ray/train/flops.py), no train/mfu on CPUs (a rate measured on "
        "shared cores is no peak).")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)


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
                                   "and accumulation steps together (paper: 256).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step on each worker: a worker holds "
        "global_batch_size / num_workers / gradient_accumulation_steps sets at a time; the update "
        "is the same as without accumulation (the step's noise is drawn for the whole batch).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps of the whole run; "
                                  "exactly one of max_steps and num_epochs.")
    num_epochs: float | None = Field(
        None, gt=0, description="Run length in passes over the training sets (of data.split, "
        "within data.subset_sets): max_steps = floor(num_epochs × sets / global_batch_size), "
        "derived from the dataset's shard stats when the run starts and logged (paper: 1 epoch).")
    seed: int = Field(0, description="Seeds new weights, subsets, noise, timesteps, dropout.")
    context_drop_prob: float = Field(0.1, ge=0, le=1, description="Probability that a set sees "
                                     "no context (and no task conditions): paper 10%.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU. Weights stay fp32.")
    gradient_checkpointing: bool | None = Field(None, description="None: on GPU only.")
    log_every_steps: int = Field(50, ge=1, description="Metrics interval (ray.train.report "
                                 "and the trackers of report_to).")
    report_to: Annotated[list[Tracker], BeforeValidator(_one_or_many)] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers written by "
        "rank 0: tensorboard, wandb, mlflow (diffusers' --report_to; one name or a list; []: "
        "none). Settings in `tracking`.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    max_failures: int = Field(3, ge=-1, description="Ray Train FailureConfig.max_failures.")
    fault_injection: TrainFaultInjectionConfig = Field(default_factory=TrainFaultInjectionConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        workers, accumulation = self.scaling.num_workers, self.gradient_accumulation_steps
        if self.global_batch_size % (workers * accumulation):
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"scaling.num_workers × gradient_accumulation_steps = {workers} × "
                             f"{accumulation}; every worker and micro-batch takes the same share")
        if (self.max_steps is None) == (self.num_epochs is None):
            raise ValueError(f"set exactly one of max_steps ({self.max_steps}) and num_epochs "
                             f"({self.num_epochs}): the run's length in optimizer steps or in "
                             "passes over the training sets (override a config's num_epochs "
                             "with --max_steps=N --num_epochs=null)")
        if self.samples.context_images > self.data.images_per_set:
            raise ValueError(f"samples.context_images {self.samples.context_images} > "
                             f"data.images_per_set {self.data.images_per_set}: the grid's "
                             "context comes from one training sample")
        check_preview_spec(self.samples.sample)
        wanted = self.samples.context_images + self.samples.sample.num_images
        if (self.m2m.task_conditions and self.samples.enabled
                and wanted > self.data.images_per_set):
            raise ValueError(f"samples.context_images + samples.sample.num_images = {wanted} > "
                             f"data.images_per_set {self.data.images_per_set}: a task model's "
                             "grid takes its targets' conditions from the same training sample")
        return self

    @property
    def micro_batch_size(self) -> int:
        """Sets one worker holds in one forward/backward."""
        return (self.global_batch_size // self.scaling.num_workers
                // self.gradient_accumulation_steps)

