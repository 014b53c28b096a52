"""``BuildMISConfig`` (pipelines/build_mis.py): stage 1 (``captions``) and stage 2 (``generate``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from m2m_ray.config import (
    POOL_KEYS_IN_ACTORS,
    CPUActorPool,
    GPUActorPool,
    RayConfig,
    StorageConfig,
    StrictModel,
)
from m2m_ray.models.config import ModelConfig


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
    actors: CPUActorPool = Field(
        description="The tokenizing actor pool and the CPUs of every caption task (dedup, "
        "write); max_actors None: one actor per free CPU of the cluster.")

    renamed_keys: ClassVar[dict[str, str]] = {"num_cpus": "actors.num_cpus",
                                              "max_actors": "actors.max_actors"}


class FaultInjectionConfig(StrictModel):
    """For tests of fault tolerance only; off by default."""

    crash_actor_on_shard: int | None = Field(
        None, description="Kill the generating actor's process mid-way through this shard_id, "
        "once (a marker file under the output records that it happened).",
    )
    nan_unet_output_on_caption: int | None = Field(
        None, description="Make the UNet's output NaN for this caption_id's set, in every "
        "precision (the set is then rejected as non-finite and counted).",
    )


class GenerateConfig(StrictModel):
    actors: GPUActorPool = Field(description="The generating actor pool: one SD pipeline per actor.")
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
                                "decoder memory at 512 px); each set is cut into its own chunks "
                                "and the value is stored with it (it changes the last bits).")
    channels_last: bool = Field(False, description="UNet in channels-last memory format on GPU; "
                                "measured 0.88x of contiguous on an H200 (BENCHMARKS.md).")
    fuse_qkv: bool = Field(False, description="UNet attention with fused query/key/value "
                           "projections (diffusers `fuse_qkv_projections`): one matmul instead of "
                           "three; stored with each set (it may change the last bits).")
    compile: Literal["none", "default", "max-autotune-no-cudagraphs", "max-autotune",
                     "reduce-overhead"] = Field(
        "none", description="torch.compile mode of the UNet (`reduce-overhead` and `max-autotune` "
        "add CUDA graphs); compiles on the first batch, minutes for SD-2.1's UNet. Stored with "
        "each set: fused kernels change the last bits.")
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="The SDPA kernels the UNet's attention may use (torch.nn.attention."
        "sdpa_kernel); auto: torch picks. On the CPU only auto, flash and math exist.")
    encode_threads: int = Field(4, ge=1, description="Threads per actor encoding and writing "
                                "images while the GPU denoises the next batch.")
    max_shard_attempts: int = Field(3, ge=1, description="Rounds over pending shards before "
                                    "the job gives up.")
    progress_interval_s: float = Field(
        30.0, ge=0, description="Seconds between progress lines and rewrites of "
        "mis/progress.json (shards, sets, images done of the total, rate, ETA, failures); 0: at "
        "every committed shard.")
    fault_injection: FaultInjectionConfig = Field(default_factory=FaultInjectionConfig)

    renamed_keys: ClassVar[dict[str, str]] = POOL_KEYS_IN_ACTORS


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
