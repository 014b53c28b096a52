"""``EvalConfig`` (pipelines/evaluate.py): the protocol, the extractors and the actor pool, and
optionally the generation that makes the sets first.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from m2m_ray.config import (
    POOL_KEYS_IN_ACTORS,
    GPUActorPool,
    RayConfig,
    StorageConfig,
    StrictModel,
    moved_to,
)
from m2m_ray.sampling.config import GenerateSetsConfig


class EvalExtractorsConfig(StrictModel):
    kind: Literal["real", "tiny", "shapes"] = Field(
        "real", description="real: FID Inception-v3 + CLIP weights; tiny: seeded random "
        "stand-ins for tests (reports say their numbers are meaningless); shapes: the shapes "
        "world's attribute read-out (m2m_ray/eval/shapes_extractors.py), for shapes-world models.")
    inception_weights: str = Field(
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        description="The standard FID Inception weights (pt_inception-2015-12-05): local path, "
        "s3:// URI or http(s) URL (downloaded once to $TORCH_HOME/m2m_ray).")
    fid_resizes: list[Literal["legacy_pytorch", "clean"]] = Field(
        ["legacy_pytorch", "clean"], min_length=1,
        description="FID input resizes, one FID column each (clean-fid's mode names; "
        "m2m_ray/eval/inception.py): legacy_pytorch = pytorch-fid's bilinear, clean = "
        "clean-fid's PIL bicubic. Each costs one Inception pass per image; IS uses the first.")
    clip_model_id: str = Field(
        "openai/clip-vit-large-patch14",
        description="Hugging Face hub id or local folder of the CLIP model for CLIP-T / CLIP-I: "
        "openai/clip-vit-large-patch14 (ViT-L/14, default) or openai/clip-vit-base-patch32 "
        "(ViT-B/32); reports name the backbone.")
    dino_model_id: str | None = Field(
        "facebook/dino-vits16",
        description="Hub id or local folder of the DINO ViT for the DINO image-image score "
        "(DreamBench: ViT-S/16 = facebook/dino-vits16); null: no DINO column.")
    image_batch_size: int = Field(64, ge=1, description="Images per extractor forward pass.")
    tiny_seed: int = Field(0, description="Seed of the tiny extractors' random weights.")

    @field_validator("fid_resizes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"fid_resizes {value} names a resize twice")
        return value


class EvalProtocolConfig(StrictModel):
    """The evaluation protocol, written once (paper §8.4, Table 1): K real preceding images per
    set, M generated after them, evaluated per k-th generated image; the split and the number of
    sets. A generate-then-evaluate run passes it to its generation (``generation_for_eval``)."""

    context_images: int = Field(4, ge=1, description="K: real preceding images per set "
                                "(paper: 4); a set with more uses its last K.")
    generated_images: int = Field(10, ge=1, description="M: generated images per set evaluated, "
                                  "k = 1..M (paper: 10); a set with more uses its first M.")
    max_sets: int | None = Field(None, ge=1, description="Evaluate only the first N valid sets.")
    split: Literal["train", "test"] | None = Field(
        "test", description="A set whose meta.split differs is a bad set; sets without "
        "meta.split are evaluated and counted as split 'unknown'. None: no check.")


class EvalConfig(StrictModel):
    output_uri: str | None = Field(
        None, description="Folder for report.json / report.md / report.png; None: "
        "<generations>/eval.")
    protocol: EvalProtocolConfig = Field(
        default_factory=EvalProtocolConfig,
        description="K, M, the split and the number of sets (paper §8.4); a generate section "
        "gets them from here.")
    actors: GPUActorPool = Field(description="The feature-extractor actor pool (Inception, CLIP).")
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
        "K, M, the number of sets and the split come from `protocol` "
        "(m2m_ray.eval.protocol.generation_for_eval).")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    renamed_keys: ClassVar[dict[str, str]] = {
        **POOL_KEYS_IN_ACTORS,
        **moved_to("protocol", ("context_images", "generated_images", "max_sets")),
        "expected_split": "protocol.split"}
