"""MIS shards → training samples on Ray Data: one deterministic stream per Ray Train worker.

**Work items.** A run reads a sequence of items; item ``g`` is shard ``perm_e[g % S]`` of epoch
``e = g // S``, where ``perm_e`` is a permutation of the S committed shards seeded by ``(seed, e)``.
Worker ``r`` of ``W`` reads the items ``g ≡ r (mod W)`` in order (``SetStream``): a shard is the
unit of reading, each worker reads its own shards (no cross-worker exchange of samples), and every
worker's stream is a pure function of (config, rank, world size).

**One read task per item** (``read_item``) streams the shard, keeps the sets of ``data.split``,
draws for each set a random ordered subset of N of its images from ``(seed, epoch, caption_id)``
(``subset_indices``: a new subset every epoch, the same one on every rerun), and decodes only those:

- ``latents`` float16 ``[N, 4, h, w]``: the shard's stored SD latents (no image decoded at all for
  M2M-Self; Parquet reads no image bytes then), or, when the dataset has none, ``pixels`` uint8
  ``[N, 3, R, R]`` which ``VaeEncoder`` actors (GPU) turn into ``latents`` (posterior mean × the
  VAE's scaling factor, so encoding is deterministic);
- ``dino_pixels`` uint8 ``[N, 3, Rd, Rd]`` for M2M-DINO (the training worker runs the frozen DINOv2:
  see ``m2m_ray.models.context.DinoEncoder`` for why features are not shipped);
- ``caption_id``, ``epoch``, ``item``, ``row`` (the set's index among the rows its item emitted) and
  ``indices`` ``[N]`` (which of the 25 images, in order).

Images are resized (shorter side) and centre-cropped to the preset's resolution. ``(item, row)``
is a row's position in its worker's stream, so a checkpoint can store where each worker stands and
a resumed run starts exactly there (``SetStream.start``), skipping already-seen sets of a partly
read shard before decoding them.

**Bad data.** A corrupt image, a set without stored latents in a dataset that has them, or an
unreadable/truncated shard raises ``CorruptShardError`` naming the shard (``on_bad_data: error``),
or is skipped and counted through ``report_bad`` (``on_bad_data: skip``): never silent.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from PIL import Image

from m2m_ray.config import StorageConfig
from m2m_ray.data.config import TrainDataConfig
from m2m_ray.data.tasks import task_columns
from m2m_ray.formats.images import fit_square
from m2m_ray.formats.mis import CorruptShardError
from m2m_ray.formats.mis_read import check_set_count, decode_latents, iter_sets
from m2m_ray.formats.rng import Salt
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.presets import get_preset, load_vae, vae_scale_factor
from m2m_ray.runtime import actor_pool_args, pick_device, task_pool_args, torch_dtype

log = logging.getLogger(__name__)

class TrainRun(Protocol):
    """What a stream reads of its training run (``m2m_ray.train.config.TrainConfig`` is one):
    data/ never imports train/, the run's config is passed down as this."""

    data: TrainDataConfig
    model: ModelConfig
    m2m: M2MConfig
    storage: StorageConfig
    seed: int
    max_steps: int
    global_batch_size: int


# Reports one skipped set or shard: (kind "set" | "shard", shard URI, reason).
BadDataReporter = Callable[[str, str, str], None]


def subset_indices(seed: int, epoch: int, caption_id: int, count: int, total: int,
                   keep_order: bool = False) -> np.ndarray:
    """A random subset of ``count`` of ``range(total)`` in random order (``keep_order``: in
    increasing order), a pure function of its inputs."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot draw {count} of a set's {total} images; set "
                         f"data.images_per_set between 1 and {total}")
    rng = np.random.default_rng([seed, epoch, caption_id & (2**63 - 1)])
    chosen = rng.permutation(total)[:count]
    return np.sort(chosen) if keep_order else chosen


@dataclass(frozen=True)
class StreamPosition:
    """Where a worker's stream stands: the next row to read is row ``row`` of item ``item``."""

    item: int
    row: int = 0


@dataclass(frozen=True)
class SetStream:
    """Everything a read task needs (picklable): the shards, the rank's items, the sample shape."""

    shards: tuple[str, ...]
    rank: int
    world_size: int
    start: StreamPosition
    num_items: int
    seed: int
    split: str | None
    images_per_set: int
    resolution: int
    dino_resolution: int | None         # None: no DINO inputs (self variant)
    use_stored_latents: bool
    on_bad_data: str
    sets_per_block: int
    storage_cfg: StorageConfig | None = None
    shard_sets: tuple[int, ...] | None = None  # per shard: the set count its stats committed
    task_kinds: tuple[str, ...] = ()   # task conditions the model takes (task datasets only)
    keep_order: bool = False           # data.image_order == "set"
    camera_frame: str = "relative"     # m2m.camera_frame

    def item_at(self, index: int) -> int:
        """Global item id of the ``index``-th item of this rank's stream."""
        return self.start.item + index * self.world_size

    def shard_of(self, item: int) -> tuple[int, str]:
        """``(epoch, shard URI)`` of a global item id."""
        epoch, index = self.shard_index(item)
        return epoch, self.shards[index]

    def shard_index(self, item: int) -> tuple[int, int]:
        """``(epoch, index into shards)`` of a global item id."""
        epoch, slot = divmod(item, len(self.shards))
        order = np.random.default_rng([self.seed, epoch, Salt.SHARD_ORDER]).permutation(len(self.shards))
        return epoch, int(order[slot])


def plan_stream(cfg: TrainRun, shards: tuple[str, ...], mean_sets: float, stored_latents: bool,
                rank: int, world_size: int, start: StreamPosition | None,
                first_step: int, shard_sets: tuple[int, ...] | None = None) -> SetStream:
    """The stream of worker ``rank`` from ``start`` (None: its first item) to ``cfg.max_steps``;
    ``mean_sets``: mean sets per shard (all splits); ``stored_latents``: ``use_stored_latents``;
    ``shard_sets``: each shard's committed set count, checked when it is read (None: unchecked)."""
    data = cfg.data
    sets_needed = (cfg.max_steps - first_step) * cfg.global_batch_size // world_size
    # Items are cheap rows and a read task runs only when its sets are needed, so plan generously
    # (2x, for test-split sets and short shards); a stream that still runs dry is a clear error.
    num_items = 2 * math.ceil(sets_needed / max(mean_sets, 1.0)) + 2
    preset = get_preset(cfg.model)
    return SetStream(
        shards=shards, rank=rank, world_size=world_size,
        start=start or StreamPosition(item=rank), num_items=num_items, seed=cfg.seed,
        split=data.split, images_per_set=data.images_per_set, resolution=preset.resolution,
        dino_resolution=preset.dino_resolution if cfg.m2m.variant == "dino" else None,
        use_stored_latents=stored_latents, on_bad_data=data.on_bad_data,
        sets_per_block=data.sets_per_block, storage_cfg=cfg.storage, shard_sets=shard_sets,
        task_kinds=tuple(cfg.m2m.task_conditions), keep_order=data.image_order == "set",
        camera_frame=cfg.m2m.camera_frame)


def use_stored_latents(cfg: TrainRun, shards: tuple[str, ...]) -> bool:
    """Whether the dataset's stored latents are used, decided once per dataset from its first
    readable set (``build_mis`` refuses to mix keep_latents settings in one dataset)."""
    mode = cfg.data.latents
    if mode == "encode":
        return False
    found, latents, where = False, None, shards[0]
    for where in shards:  # the first set whose latents decode (skip mode passes bad ones by)
        try:
            for sample in iter_sets(where, cfg.storage, ["caption_id", "latents"]):
                try:
                    latents = None if sample["latents"] is None else decode_latents(
                        sample["latents"], f"shard {where}: set {sample['caption_id']}")
                except CorruptShardError:
                    if cfg.data.on_bad_data == "error":
                        raise
                    continue
                found = True
                break
        except CorruptShardError:
            if cfg.data.on_bad_data == "error":
                raise
        if found:
            break
    size = get_preset(cfg.model).resolution // vae_scale_factor(cfg.model)
    usable = latents is not None and tuple(latents.shape[-2:]) == (size, size)
    if mode == "stored" and not usable:
        found = "none" if latents is None else f"shape {tuple(latents.shape)}"
        raise ValueError(f"data.latents=stored but shard {where} has {found}; expected "
                         f"[25, 4, {size}, {size}] for the {cfg.model.preset} preset. Use "
                         "data.latents=auto or encode to encode images with the VAE")
    return usable


def build_stream_dataset(stream: SetStream, cfg: TrainRun,
                         report_bad: BadDataReporter | None):
    """The Ray Dataset of one worker's stream (see the module docstring)."""
    import ray

    data = cfg.data
    ds = ray.data.range(stream.num_items, override_num_blocks=stream.num_items)
    ds = ds.map_batches(read_item, batch_size=1, **task_pool_args(data.read),
                        fn_kwargs={"stream": stream, "report_bad": report_bad})
    if not stream.use_stored_latents:
        ds = ds.map_batches(
            VaeEncoder, fn_constructor_kwargs={"model": cfg.model.model_dump(),
                                               "num_gpus": data.vae_actors.num_gpus,
                                               "batch_size": data.vae_batch_size * data.images_per_set},
            batch_size=data.vae_batch_size, **actor_pool_args(data.vae_actors, "data.vae_actors"))
    return ds


# --- reading one item ----------------------------------------------------------------------------


def read_item(batch: dict[str, np.ndarray], stream: SetStream,
              report_bad: BadDataReporter | None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data generator UDF: one item (``batch["id"]``, an index into the rank's items) → its
    sets. ``row`` numbers the item's sets of ``split`` (a skipped bad set keeps its number)."""
    (index,) = batch["id"].tolist()
    item = stream.item_at(int(index))
    epoch, shard = stream.shard_index(item)
    uri = stream.shards[shard]
    skip = stream.start.row if item == stream.start.item else 0
    rows: list[dict[str, Any]] = []
    row_number, read = -1, 0
    try:
        for sample in iter_sets(uri, stream.storage_cfg, _set_columns(stream)):
            read += 1
            if stream.split is not None and sample["split"] != stream.split:
                continue
            row_number += 1
            if row_number < skip:  # read before the checkpoint this run resumed from
                continue
            try:
                rows.append({"item": item, "row": row_number,
                             **_sample_row(sample, stream, epoch, uri)})
            except CorruptShardError as err:
                _bad(stream, report_bad, "set", uri, err)
            if len(rows) == stream.sets_per_block:
                yield _stack(rows)
                rows = []
        # a file cut between two sets (a tar between members) reads as a valid, shorter shard
        if stream.shard_sets is not None:
            check_set_count(uri, read, stream.shard_sets[shard])
    except CorruptShardError as err:  # unreadable or truncated shard: its remaining sets are lost
        _bad(stream, report_bad, "shard", uri, err)
    if rows:
        yield _stack(rows)


def _set_columns(stream: SetStream) -> list[str]:
    """The MIS fields a training set is read with (``iter_sets``)."""
    return ["caption_id", "split", "latents", *(["images"] if _wants_images(stream) else []),
            *(["task"] if stream.task_kinds else [])]


def _wants_images(stream: SetStream) -> bool:
    return stream.dino_resolution is not None or not stream.use_stored_latents


def _bad(stream: SetStream, report_bad: BadDataReporter | None, kind: str, uri: str,
         err: CorruptShardError) -> None:
    if stream.on_bad_data == "error":
        raise CorruptShardError(f"{err} (data.on_bad_data=skip skips and counts such data)") \
            from err
    log.warning("skipping bad %s in %s: %s", kind, uri, err)
    if report_bad is not None:
        report_bad(kind, uri, str(err))


def _sample_row(sample: dict[str, Any], stream: SetStream, epoch: int, uri: str) -> dict:
    cid = int(sample["caption_id"])
    where = f"shard {uri}: set {cid}"
    stored, images = sample["latents"], sample.get("images")  # stored: .npy bytes or None
    latents = None  # (25, 4, h, w), decoded once where needed
    if stored is not None and (stream.use_stored_latents or images is None):
        latents = decode_latents(stored, where)
    if images is None and latents is None:
        raise CorruptShardError(f"{where} has neither images nor latents")
    total = len(images) if images is not None else latents.shape[0]
    indices = subset_indices(stream.seed, epoch, cid, stream.images_per_set, total,
                             stream.keep_order)
    row: dict[str, Any] = {"caption_id": cid, "epoch": epoch, "indices": indices}
    if stream.task_kinds:
        if sample["task"] is None:
            raise CorruptShardError(f"{where} has no task conditions: it is a MIS set, not a task "
                                    "dataset's (m2m_ray.mis.tasks.build writes those); train "
                                    "with m2m.task_conditions only on a task dataset")
        row.update(task_columns(sample["task"], stream.task_kinds,
                                indices, total, where, stream.camera_frame))
    if stream.use_stored_latents:
        if latents is None:
            raise CorruptShardError(f"{where} has no stored latents, unlike the dataset's first "
                                    "set; rebuild the shard or use data.latents=encode")
        if latents.shape[0] != total:
            raise CorruptShardError(f"{where} stores {latents.shape[0]} latents for {total} "
                                    "images")
        row["latents"] = latents[indices].astype(np.float16)  # (N, 4, h, w)
    if _wants_images(stream):
        decoded = [_decode(images[i], uri, cid, int(i)) for i in indices]
        if not stream.use_stored_latents:
            row["pixels"] = np.stack([_square(im, stream.resolution) for im in decoded])
        if stream.dino_resolution is not None:
            row["dino_pixels"] = np.stack([_square(im, stream.dino_resolution) for im in decoded])
    return row


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0]}


def _decode(data: bytes, uri: str, cid: int, index: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises many types for a broken file
        raise CorruptShardError(f"shard {uri}: set {cid} image {index} ({len(data)} bytes) cannot "
                                f"be decoded: {type(err).__name__}: {err}") from err


def _square(image: Image.Image, size: int) -> np.ndarray:
    """``fit_square`` (the same resize as inference inputs) → uint8 ``[3, size, size]``."""
    return np.asarray(fit_square(image, size), dtype=np.uint8).transpose(2, 0, 1)


# --- VAE encoding stage --------------------------------------------------------------------------


class VaeEncoder:
    """Ray Data actor: ``pixels`` uint8 ``[B, N, 3, R, R]`` → ``latents`` float16 ``[B, N, 4, R/8,
    R/8]`` (posterior mean × scaling factor, the space SD's UNet denoises in), through the
    project's one VAE codec (``m2m_ray.models.codec.ImageCodec``)."""

    def __init__(self, model: dict, num_gpus: float, batch_size: int):
        # local: models.codec imports torch and diffusers (seconds); every read task imports this
        # module and needs neither, only the VAE actors do
        from m2m_ray.models.codec import ImageCodec

        device = pick_device(num_gpus, "data.vae_actors")
        vae = load_vae(ModelConfig.model_validate(model), device, torch_dtype("bfloat16", device))
        self.codec = ImageCodec(vae, vae_batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = torch.from_numpy(batch.pop("pixels")).float() / 255  # (B, N, 3, R, R) in [0, 1]
        batch["latents"] = self.codec.encode(pixels).cpu().numpy().astype(np.float16)
        return batch


def describe_stream(stream: SetStream) -> str:
    return json.dumps({"rank": stream.rank, "world_size": stream.world_size,
                       "start": [stream.start.item, stream.start.row], "items": stream.num_items,
                       "shards": len(stream.shards), "stored_latents": stream.use_stored_latents})
