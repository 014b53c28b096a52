"""Data sections: training sets from MIS (``TrainDataConfig``) and the image sets a generation job
reads (``GenerateInputsConfig``: user files, MIS, COCO).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from m2m_ray.config import CPUActorPool, GPUActorPool, StrictModel


class TrainDataConfig(StrictModel):
    """MIS shards → training sets (m2m_ray/data/training.py)."""

    uri: str = Field(..., description="MIS root (build_mis output_uri): local path or s3://.")
    format: Literal["parquet", "webdataset"] = Field(
        "parquet", description="Shard format read. Parquet reads only the columns a sample needs "
        "(no image bytes at all for M2M-Self on stored latents).")
    split: Literal["train", "test"] | None = Field("train", description="Use the sets of this "
                                                   "split only; None: all sets.")
    subset_sets: int | None = Field(
        None, ge=1, description="Train on a subset of about this many sets of `split` (paper: "
        "9M sets for M2M-Self, 6M for M2M-DINO): whole shards in an order seeded by `seed`, "
        "until their sets reach the number (the run logs the sets it got); None: every shard.")
    images_per_set: int = Field(
        8, ge=2, le=25, description="N: each training sample is a random ordered subset of N of a "
        "set's images, drawn from (seed, epoch, caption_id): a new subset every epoch.")
    image_order: Literal["random", "set"] = Field(
        "random", description="Order of the N images of a training sample: random (MIS; novel "
        "views) or the set's own order (visual procedures: preceding steps come first).")
    latents: Literal["auto", "stored", "encode"] = Field(
        "auto", description="auto: the shard's stored SD latents when present and of the training "
        "size, else VAE encoding on actors; stored: require stored latents; encode: always encode.")
    on_bad_data: Literal["error", "skip"] = Field(
        "error", description="A corrupt image or an unreadable/truncated shard: stop with an error "
        "naming the shard, or skip the set (the rest of a truncated shard) and count it in the "
        "data/skipped_* metrics.")
    read: CPUActorPool = Field(
        description="The read stage (Ray Data tasks, one shard of one epoch each: read, choose N, "
        "decode, resize): resources per task; max_actors bounds the tasks in flight (None: Ray "
        "Data decides).")
    sets_per_block: int = Field(16, ge=1, description="Sets per block a read task emits.")
    vae_actors: GPUActorPool = Field(
        description="VAE encoding actors per training worker's stream (used when the MIS has no "
        "stored latents of the training size).")
    vae_batch_size: int = Field(8, ge=1, description="Sets per VAE actor call.")
    prefetch_batches: int = Field(2, ge=0, description="Batches prefetched by each worker.")

    renamed_keys: ClassVar[dict[str, str]] = {
        "read_num_cpus": "read.num_cpus", "vae_num_gpus": "vae_actors.num_gpus",
        "vae_num_cpus": "vae_actors.num_cpus", "vae_max_actors": "vae_actors.max_actors"}


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
    max_sets: int | None = Field(
        None, ge=1, description="Use only N sets: of MIS, a random choice of N sets of the split "
        "(the N smallest seeded hashes of their caption ids: reproducible, uniform, independent of "
        "shard order, no shuffle of the split; paper §8.4: 10,000 random test sets); of COCO, the "
        "first N category sets.")
    selection_seed: int = Field(0, description="Seeds the random choice of max_sets MIS sets.")
    task_conditions: str | None = Field(
        None, description="For a task-conditioned model (fine-tuned for novel views or "
        "procedures): a JSON file {\"camera\": [K+M][3][4] world-to-camera extrinsics} and/or "
        "{\"position\": [K+M] step indices} giving the K context images' conditions, then the M "
        "targets' (local or s3://); used for every input set. None: a task dataset's sets "
        "(mis_uri) bring their own (images K .. K+M-1 are the targets).")

    @model_validator(mode="after")
    def _one_source(self) -> "GenerateInputsConfig":
        given = [k for k in ("images", "mis_uri", "mis_shard", "coco_annotations")
                 if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"inputs sets {given or 'nothing'}; set exactly one of images, "
                             "mis_uri, mis_shard, coco_annotations")
        return self
