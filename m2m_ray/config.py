"""Typed job configs, layered: class defaults → YAML file → dotted CLI overrides.

Every config is a pydantic v2 model with ``extra="forbid"``, so a misspelt key is an error, not a
silently ignored setting. ``load_config`` merges the layers and turns pydantic's errors into
messages that name the key, the value given and what was expected::

    cfg = load_config(BuildMISConfig, "configs/tiny.yaml", ["--captions.batch_size=4096"])

Credentials never live in configs: S3 keys come from the environment or the AWS profile only, so a
saved config (``save_config``) can be shared as it is.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem found."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------


class RayConfig(StrictModel):
    address: str | None = Field(
        None,
        description="Ray cluster to join. None: $RAY_ADDRESS when set (ray job submit sets it), "
        "else start a private local Ray.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray (ignored when joining a cluster)."
    )
    num_gpus: int | None = Field(None, ge=0, description="Logical GPUs of a local Ray.")


class StorageConfig(StrictModel):
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, moto, R2...). None: $AWS_ENDPOINT_URL_S3 or "
        "$AWS_ENDPOINT_URL when set, else AWS. Credentials come from the environment only.",
    )
    region: str | None = Field(None, description="S3 region; None: the AWS default chain.")
    anonymous: bool = Field(False, description="Unsigned S3 requests (public buckets).")


class ModelConfig(StrictModel):
    preset: Literal["sd21-base", "tiny", "sd21-base-shapes"] = Field(
        "sd21-base",
        description="sd21-base: real hub weights; tiny: small random models, offline; "
        "sd21-base-shapes: full-size architectures with random weights (benchmarks).",
    )
    sd_model_id: str | None = Field(
        None, description="Hub id or local diffusers folder overriding the preset's SD model."
    )
    dino_model_id: str | None = Field(
        None, description="Hub id or local folder overriding the preset's DINOv2 model."
    )
    seed: int = Field(0, description="Seed of the random weights of the tiny/shapes presets.")


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


# ---------------------------------------------------------------------------------------------
# Building MIS
# ---------------------------------------------------------------------------------------------


class CaptionsConfig(StrictModel):
    inputs: list[str] = Field(
        ..., min_length=1,
        description="CC12M-format files (url<TAB>caption, no header), local or s3://, globs "
        "allowed, .gz accepted.",
    )
    max_tokens: int = Field(77, ge=2, description="Keep captions of at most this many CLIP "
                            "tokens, BOS and EOS included (the text encoder's context).")
    dedup: bool = Field(False, description="Reject repeated captions as `duplicate` (the "
                        "paper keeps them).")
    lines_per_shard: int = Field(
        1000, ge=1,
        description="Input lines per caption shard; a shard is stage 2's unit of work and commit.",
    )
    range_bytes: int = Field(
        16 * 2**20, ge=1,
        description="Byte range of an uncompressed input read by one task (.gz: one task per "
        "file); 16 MiB ≈ 100k CC12M lines ≈ 10 s of one CPU, small enough to balance many CPUs.",
    )
    batch_size: int = Field(4096, ge=1, description="Captions per tokenizer call.")
    test_fraction: float = Field(
        0.001, ge=0.0, le=1.0,
        description="Fraction of captions put in the test split, by a hash of caption_id.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per caption task.")
    max_actors: int | None = Field(
        None, ge=1, description="Upper bound of the tokenizing actor pool; None: grow with the "
        "cluster's free CPUs.",
    )


class ActorPoolConfig(StrictModel):
    """Resources and bounds of a Ray Data actor pool (``m2m_ray.runtime.actor_pool_args``)."""

    num_gpus: float = Field(1.0, ge=0, description="GPUs per actor (0: CPU actors).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per actor, e.g. {gen_gpu: 1} to land on the "
        "generation node type of cluster/*.yaml rather than on a training node.",
    )
    min_actors: int = Field(1, ge=1, description="Actors the pool starts with.")
    max_actors: int = Field(1, ge=1, description="Upper bound of the actor pool; an autoscaling "
                            "cluster grows towards it.")

    @model_validator(mode="after")
    def _pool_bounds(self) -> "ActorPoolConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors}); "
                             "set max_actors >= min_actors")
        return self


class FaultInjectionConfig(StrictModel):
    """For tests of fault tolerance only; off by default."""

    crash_actor_on_shard: int | None = Field(
        None, description="Kill the generating actor's process mid-way through this shard_id, "
        "once (a marker file under the output records that it happened).",
    )


class GenerateConfig(ActorPoolConfig):
    images_per_caption: int = Field(25, ge=1, description="Images per set (paper: 25).")
    base_seed: int = Field(0, description="Base seed mixed into every per-image noise seed.")
    num_inference_steps: int = Field(50, ge=1)
    scheduler: Literal["euler", "ddim", "pndm", "dpmsolver++"] = Field(
        "euler", description="Paper §4: Euler discrete."
    )
    guidance_scale: float = Field(7.5, ge=1.0)
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Precision on GPU; CPU always runs float32."
    )
    captions_per_batch: int = Field(
        2, ge=1, description="Captions denoised together (each brings 2 × images_per_caption rows)."
    )
    formats: list[Literal["parquet", "webdataset"]] = Field(
        default_factory=lambda: ["parquet", "webdataset"], min_length=1
    )
    image_format: Literal["jpeg", "webp", "png"] = "jpeg"
    image_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality.")
    keep_latents: bool = Field(True, description="Store the fp16 SD latents beside the images.")
    vae_batch_size: int = Field(8, ge=1, description="Latents decoded per VAE call (bounds "
                                "decoder memory at 512 px).")
    channels_last: bool = Field(False, description="UNet in channels-last memory format on GPU; "
                                "measured 0.88x of contiguous on an H200 (BENCHMARKS.md).")
    encode_threads: int = Field(4, ge=1, description="Threads per actor encoding and writing "
                                "images while the GPU denoises the next batch.")
    max_shard_attempts: int = Field(3, ge=1, description="Rounds over pending shards before "
                                    "the job gives up.")
    fault_injection: FaultInjectionConfig = Field(default_factory=FaultInjectionConfig)


class BuildMISConfig(StrictModel):
    output_uri: str = Field(..., description="Root of the dataset: local path, file:// or s3://.")
    stages: list[Literal["captions", "generate"]] = Field(
        default_factory=lambda: ["captions", "generate"], min_length=1
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    captions: CaptionsConfig
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


# ---------------------------------------------------------------------------------------------
# Sampling (m2m_ray/sampling/, pipelines/generate.py)
# ---------------------------------------------------------------------------------------------


class SampleConfig(StrictModel):
    """How M2M samples: the arguments of ``M2MPipeline.__call__`` / ``generate``."""

    num_images: int = Field(4, ge=1, description="M: images generated per set, one after another.")
    context_window: int = Field(
        8, ge=1, description="W: a new image sees the last W images of its set (given ones first, "
        "then the generated ones as they join).")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps per image.")
    scheduler: Literal["ddim", "euler", "pndm", "dpmsolver++"] = Field(
        "ddim", description="Scheduler on SD-2.1's noise schedule (paper: DDIM).")
    guidance_scale: float = Field(
        3.0, description="s_I, image guidance (eq. 6): 1 = the conditional prediction alone (one "
        "UNet branch), 0 = ignore the context.")
    task_guidance_scale: float = Field(
        3.0, description="s_T, task guidance (eq. 7); used only when task conditions are given.")
    use_cache: bool = Field(
        True, description="Encode each context image once into per-site keys/values (same images "
        "as False, which re-encodes the context at every step: the paper's cost).")
    seed: int = Field(0, description="Base seed; set s draws its noises from a generator seeded "
                      "with m2m_ray.sampling.job.set_seed(set_id, seed).")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Precision on GPU; the CPU always runs float32.")
    resolution: int | None = Field(
        None, ge=8, multiple_of=8, description="Image size in pixels; None: the model preset's "
        "(512 for sd21-base, 64 for tiny).")
    vae_batch_size: int = Field(8, ge=1, description="Images per VAE encode/decode call.")


class GenerateInputsConfig(StrictModel):
    """Where the sets come from: exactly one of images, mis_uri, mis_shard, coco_annotations."""

    images: list[str] = Field(
        default_factory=list, description="Image files, folders or globs (local or s3://): one "
        "set whose context is all of them, in order.")
    caption: str | None = Field(None, description="Caption recorded for the `images` set.")
    mis_uri: str | None = Field(None, description="MIS dataset root: its sets of `mis_split`.")
    mis_shard: str | None = Field(None, description="One MIS shard file (.parquet or .tar).")
    mis_split: Literal["train", "test"] | None = Field(
        "test", description="Split of the MIS sets used (None: both).")
    mis_format: Literal["parquet", "webdataset"] = "parquet"
    coco_annotations: str | None = Field(
        None, description="MSCOCO instances_*.json: real-image sets by category (paper §8.3).")
    coco_images: str | None = Field(
        None, description="Folder of the COCO images; None: <dataset>/<split> beside "
        "<dataset>/annotations/instances_<split>.json.")
    coco_min_area_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Keep images whose dominant category covers at least "
        "this fraction of the image.")
    context_images: int = Field(
        4, ge=0, description="K: the first K images of each MIS / COCO set are the context (the "
        "`images` set uses all its images).")
    max_sets: int | None = Field(None, ge=1, description="Use only the first N sets.")

    @model_validator(mode="after")
    def _one_source(self) -> "GenerateInputsConfig":
        given = [k for k in ("images", "mis_uri", "mis_shard", "coco_annotations")
                 if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"inputs sets {given or 'nothing'}; set exactly one of images, "
                             "mis_uri, mis_shard, coco_annotations")
        return self


class GenerateSetsConfig(ActorPoolConfig):
    """What to generate with which model, and the actor pool that does it."""

    output_uri: str = Field(..., description="Generations folder (local or s3://): images, "
                            "generations.jsonl (m2m_ray/eval/generations.py), contact_sheet.png.")
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


class GenerateJobConfig(GenerateSetsConfig):
    """pipelines/generate.py."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


# ---------------------------------------------------------------------------------------------
# Evaluation (m2m_ray/eval/)
# ---------------------------------------------------------------------------------------------


class EvalExtractorsConfig(StrictModel):
    kind: Literal["real", "tiny"] = Field(
        "real", description="real: FID Inception-v3 + CLIP weights; tiny: seeded random "
        "stand-ins for tests and the offline demo (reports say their numbers are meaningless).")
    inception_weights: str = Field(
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        description="The standard FID Inception weights (pt_inception-2015-12-05): local path, "
        "s3:// URI or http(s) URL (downloaded once to $TORCH_HOME/m2m_ray).")
    clip_model_id: str = Field(
        "openai/clip-vit-large-patch14",
        description="Hugging Face hub id or local folder of the CLIP model for CLIP scores.")
    image_batch_size: int = Field(64, ge=1, description="Images per extractor forward pass.")
    tiny_seed: int = Field(0, description="Seed of the tiny extractors' random weights.")


class EvalConfig(ActorPoolConfig):
    output_uri: str | None = Field(
        None, description="Folder for report.json / report.md / report.png; None: "
        "<generations>/eval.")
    context_images: int = Field(4, ge=1, description="K: real preceding images per set "
                                "(paper: 4); a set with more uses its last K.")
    generated_images: int = Field(10, ge=1, description="M: generated images per set evaluated, "
                                  "k = 1..M (paper: 10); a set with more uses its first M.")
    max_sets: int | None = Field(None, ge=1, description="Evaluate only the first N valid sets.")
    expected_split: Literal["train", "test"] | None = Field(
        "test", description="A set whose meta.split differs is a bad set; sets without "
        "meta.split are evaluated and counted as split 'unknown'. None: no check.")
    on_bad_set: Literal["skip", "error"] = Field(
        "skip", description="A set with fewer than K context / M generated images, an "
        "unreadable image or the wrong split: skip it (counted, with its reason, in the "
        "report) or stop with an error.")
    is_splits: int = Field(10, ge=1, description="Inception Score splits (mean ± std over "
                           "them); a set's split is a hash of its set_id.")
    clip_score_weight: float = Field(
        1.0, gt=0, description="w in CLIPScore = w·max(100·cos, 0): 1.0 is torchmetrics' "
        "convention (0–100); Hessel et al.'s original 2.5·max(cos, 0) is w = 0.025.")
    extractors: EvalExtractorsConfig = Field(default_factory=EvalExtractorsConfig)
    sets_per_batch: int = Field(8, ge=1, description="Image sets per extractor actor call.")
    reduce_batch_rows: int = Field(
        4096, ge=1, description="Image rows reduced to one partial statistic; keep it above "
        "the feature dimension (2048), or partial statistics outweigh the features.")
    read_threads: int = Field(8, ge=1, description="Threads per actor reading and decoding "
                              "images (S3 reads are latency-bound).")
    generate: GenerateSetsConfig | None = Field(
        None, description="Generate the sets first (pipelines/evaluate.py without "
        "--generations): model, source (e.g. inputs.mis_uri), sampling, actors and output_uri. "
        "K, M, the number of sets and the split are this config's context_images, "
        "generated_images, max_sets and expected_split (m2m_ray.sampling.job.generation_for_eval).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


# ---------------------------------------------------------------------------------------------
# Training (m2m_ray/train/, m2m_ray/data/training.py)
# ---------------------------------------------------------------------------------------------


class TrainDataConfig(StrictModel):
    """MIS shards → training sets (m2m_ray/data/training.py)."""

    uri: str = Field(..., description="MIS root (build_mis output_uri): local path or s3://.")
    format: Literal["parquet", "webdataset"] = Field(
        "parquet", description="Shard format read. Parquet reads only the columns a sample needs "
        "(no image bytes at all for M2M-Self on stored latents).")
    split: Literal["train", "test"] | None = Field("train", description="Use the sets of this "
                                                   "split only; None: all sets.")
    images_per_set: int = Field(
        8, ge=2, le=25, description="N: each training sample is a random ordered subset of N of a "
        "set's images, drawn from (seed, epoch, caption_id): a new subset every epoch.")
    latents: Literal["auto", "stored", "encode"] = Field(
        "auto", description="auto: the shard's stored SD latents when present and of the training "
        "size, else VAE encoding on actors; stored: require stored latents; encode: always encode.")
    on_bad_data: Literal["error", "skip"] = Field(
        "error", description="A corrupt image or an unreadable/truncated shard: stop with an error "
        "naming the shard, or skip the set (the rest of a truncated shard) and count it in the "
        "data/skipped_* metrics.")
    read_num_cpus: float = Field(1.0, gt=0, description="CPUs per read task (one shard of one "
                                 "epoch: read, choose N, decode, resize).")
    sets_per_block: int = Field(16, ge=1, description="Sets per block a read task emits.")
    vae_num_gpus: float = Field(1.0, ge=0, description="GPUs per VAE encoding actor (0: CPU).")
    vae_num_cpus: float = Field(1.0, gt=0, description="CPUs per VAE encoding actor.")
    vae_batch_size: int = Field(8, ge=1, description="Sets per VAE actor call.")
    vae_max_actors: int = Field(1, ge=1, description="VAE actors per training worker's stream.")
    prefetch_batches: int = Field(2, ge=0, description="Batches prefetched by each worker.")


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
    new_images: int = Field(2, ge=1, description="M images generated after them, one by one.")
    steps: int = Field(50, ge=1, description="DDIM steps per image.")
    guidance_scale: float = Field(3.0, description="Image guidance s_I (eq. 6).")


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


# ---------------------------------------------------------------------------------------------
# Loading, overriding, saving
# ---------------------------------------------------------------------------------------------


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c", "x"]`` → ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"cannot read command-line argument {arg!r}: expected --key.subkey=value "
                "(or --key.subkey value)"
            )
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} has no value: write --{key}=VALUE")
            raw = items[i + 1]
            i += 1
        i += 1
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier --{part}=...")
            node = child
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _known_keys(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at ``loc`` (a path into nested models), for 'did you mean' hints."""
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _explain(error: dict[str, Any], cls: type[BaseModel], source: str) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        known = _known_keys(cls, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        did_you_mean = f"; did you mean '{'.'.join([*map(str, loc[:-1]), hint[0]])}'?" if hint else ""
        return (f"unknown key '{key}' in {source}{did_you_mean} "
                f"(valid keys here: {', '.join(known)})")
    if error["type"] == "missing":
        return f"missing required key '{key}' in {source}"
    given = error.get("input")
    return f"'{key}' = {given!r} in {source}: {error['msg']}"


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then CLI ``overrides``."""
    data: dict[str, Any] = {}
    sources = []
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, "
                              f"got {type(loaded).__name__}")
        data = loaded
        sources.append(str(path))
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        sources.append("command-line overrides")
    source = " + ".join(sources) or "defaults"
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = "\n  ".join(_explain(e, cls, source) for e in err.errors())
        raise ConfigError(f"invalid {cls.__name__}:\n  {problems}") from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: BaseModel, uri: str, storage: StorageConfig | None = None) -> None:
    """Write the resolved config as JSON beside an output (configs hold no credentials)."""
    from m2m_ray.storage import write_bytes

    payload = json.dumps(
        {"config_class": type(cfg).__name__, "config": config_to_dict(cfg)}, indent=2
    )
    write_bytes(uri, payload.encode(), storage)
