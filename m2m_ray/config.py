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


class FaultInjectionConfig(StrictModel):
    """For tests of fault tolerance only; off by default."""

    crash_actor_on_shard: int | None = Field(
        None, description="Kill the generating actor's process mid-way through this shard_id, "
        "once (a marker file under the output records that it happened).",
    )


class GenerateConfig(StrictModel):
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
    num_gpus: float = Field(1.0, ge=0, description="GPUs per generating actor (0: CPU actors).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per generating actor.")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1, description="Upper bound of the actor pool; an autoscaling "
                            "cluster grows towards it.")
    vae_batch_size: int = Field(8, ge=1, description="Latents decoded per VAE call (bounds "
                                "decoder memory at 512 px).")
    encode_threads: int = Field(4, ge=1, description="Threads per actor encoding and writing "
                                "images while the GPU denoises the next batch.")
    max_shard_attempts: int = Field(3, ge=1, description="Rounds over pending shards before "
                                    "the job gives up.")
    fault_injection: FaultInjectionConfig = Field(default_factory=FaultInjectionConfig)

    @model_validator(mode="after")
    def _pool_bounds(self) -> "GenerateConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(
                f"min_actors ({self.min_actors}) > max_actors ({self.max_actors}); "
                "set max_actors >= min_actors"
            )
        return self


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


class EvalConfig(StrictModel):
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
    num_gpus: float = Field(1.0, ge=0, description="GPUs per extractor actor (0: CPU actors).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per extractor actor.")
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    read_threads: int = Field(8, ge=1, description="Threads per actor reading and decoding "
                              "images (S3 reads are latency-bound).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _pool_bounds(self) -> "EvalConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors "
                             f"({self.max_actors}); set max_actors >= min_actors")
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
