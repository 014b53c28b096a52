"""Task datasets → training shards on Ray Data (paper §8.5 fine-tuning data).

    python pipelines/build_tasks.py --config configs/shapes/views_data.yaml

A source (``objaverse``: the Zero123 render layout; ``vgsi``: wikiHow's ``WikihowText_data.json``
and its image folder) is listed on the driver into *units* — an object folder, an article line —
cheap to list, each read by one call that yields its sets. Units are cut into shards of
``units_per_shard`` in listing order; the building package's one shard builder
(``m2m_ray.mis.shards``, as MIS stage 2) runs rounds over the pending shards, one Ray Data task
per shard that reads its units through the source's reader and writes and commits the shard once
(the MIS layout and commit protocol, plus the per-set ``task`` column of raw conditions of
``m2m_ray.formats.tasks``); a round that fails as a whole is retried over what is still pending,
up to ``max_shard_attempts`` rounds; progress goes to ``mis/progress.json``. Training reads the
output like a MIS (``data.uri``) with ``m2m.task_conditions`` set.

Ids: set ``k`` of unit ``u`` gets ``caption_id(u, k + 1)`` (``m2m_ray.formats.ids``), so ids and
the train/test split (``split_of(caption_id, test_fraction)``) are a pure function of the listing,
not of shard sizes, workers or rounds. Every unit is accounted for: written, or skipped with its
reason (``on_bad: skip``) in the shard's stats and the manifest; ``on_bad: error`` stops at the
first bad unit with the reader's error naming the file (a data error is not retried). A rerun
with the same config skips committed shards; with another config it is refused
(``m2m_ray.config.ResumeMismatchError`` naming each changed key).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any, Callable, Iterable, Literal

from PIL import Image
from pydantic import Field

from m2m_ray import storage
from m2m_ray.config import (
    RayConfig,
    StorageConfig,
    StrictModel,
    config_to_dict,
    refuse_resume,
    setting_changes,
)
from m2m_ray.formats.ids import caption_id, split_of
from m2m_ray.formats.images import fit_square
from m2m_ray.formats.mis import MISLayout, SetRecord, ShardWriter
from m2m_ray.formats.tasks import TaskDataError
from m2m_ray.mis.shards import build_shards, progress_uri, shard_row, write_shard
from m2m_ray.mis.tasks import TaskReadReport, TaskSet
from m2m_ray.mis.tasks.objaverse import list_objects, read_object
from m2m_ray.mis.tasks.vgsi import list_articles, read_article
from m2m_ray.progress import JobProgress

CONFIG_NAME = "task_dataset_config.json"
# Settings that change how the build runs, not what it writes: a rerun may change them.
HOW_NOT_WHAT = ("ray", "storage", "max_shard_attempts", "progress_interval_s")


class TaskDatasetConfig(StrictModel):
    """What ``pipelines/build_tasks.py`` reads and writes."""

    kind: Literal["objaverse", "vgsi"] = Field(..., description="Source layout.")
    source: str = Field(..., description="objaverse: the render root (<root>/<uid>/000.png ...); "
                        "vgsi: WikihowText_data.json. Local path or s3://.")
    image_root: str | None = Field(None, description="vgsi: the folder of step images.")
    output_uri: str = Field(..., description="Dataset root (then training's data.uri).")
    views: int = Field(12, ge=1, description="objaverse: views per object.")
    view_order: list[int] | None = Field(
        None, description="objaverse: the order views are stored in (None: 0 .. views-1).")
    min_steps: int = Field(2, ge=1, description="vgsi: fewer steps with images: a skipped set.")
    resolution: int | None = Field(
        None, ge=8, description="Store images resized (shorter side) and centre-cropped to this "
        "size as PNG; None: as the source stores them (training resizes to the model's size).")
    units_per_shard: int = Field(256, ge=1, description="Objects or articles per shard.")
    test_fraction: float = Field(0.05, ge=0, le=1, description="Share of sets in the test split.")
    formats: list[Literal["parquet", "webdataset"]] = Field(default_factory=lambda: ["parquet"])
    on_bad: Literal["error", "skip"] = Field(
        "error", description="A malformed unit: stop naming the file, or skip and count it.")
    max_units: int | None = Field(None, ge=1, description="Only the first N units (a trial).")
    max_shard_attempts: int = Field(
        3, ge=1, description="Rounds over the pending shards: a round that fails as a whole is "
        "followed by another over what is left (a data error with on_bad=error is not retried).")
    progress_interval_s: float = Field(
        30.0, gt=0, description="Seconds between progress lines and mis/progress.json updates.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


# --- sources: listing units on the driver, reading one unit in a task ----------------------------


def list_units(cfg: TaskDatasetConfig) -> list[Any]:
    """The source's units in a stable order (JSON-serializable)."""
    if cfg.kind == "objaverse":
        units: list[Any] = list_objects(cfg.source, cfg.storage)
    else:
        units = list_articles(cfg.source, cfg.storage)
    return units[: cfg.max_units] if cfg.max_units else units


def read_unit(cfg: TaskDatasetConfig, unit: Any, report: TaskReadReport) -> list[TaskSet]:
    """The sets of one unit; raises ``TaskDataError`` naming the file (``on_bad: error``)."""
    if cfg.kind == "objaverse":
        return [read_object(cfg.source, unit, cfg.storage, views=cfg.views, order=cfg.view_order)]
    return read_article(cfg.source, unit, cfg.image_root, cfg.storage, on_bad=cfg.on_bad,
                        report=report, min_steps=cfg.min_steps)


# --- the job --------------------------------------------------------------------------------------


def _encode(image_bytes: bytes, size: int | None) -> tuple[bytes, str | None]:
    if size is None:
        return image_bytes, None
    with Image.open(io.BytesIO(image_bytes)) as image:
        buffer = io.BytesIO()
        fit_square(image.convert("RGB"), size).save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def to_record(task_set: TaskSet, unit_index: int, k: int, sid: int,
              cfg: TaskDatasetConfig) -> SetRecord:
    """A ``TaskSet`` as the shard's record: ids from (unit, k), images (optionally resized)."""
    cid = caption_id(unit_index, k + 1)
    images, exts = zip(*(_encode(image, cfg.resolution) for image in task_set.images))
    return SetRecord(
        caption_id=cid, shard_id=sid, split=split_of(cid, cfg.test_fraction),
        caption=task_set.caption or "", url=json.dumps(task_set.source, sort_keys=True),
        seeds=list(range(len(images))), images=list(images),
        image_ext=exts[0] or task_set.image_ext, latents=None,
        metadata={"task_dataset": cfg.kind, "set_id": task_set.set_id,
                  "image_format": "png" if exts[0] else task_set.image_ext},
        task=task_set.task())


def write_task_shard(row: dict[str, Any], cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Ray Data task: one shard's units → a committed shard (``m2m_ray.mis.shards.write_shard``:
    skipped when already committed); returns its ``m2m_ray.mis.shards.shard_row``, which carries
    the reader's ``TaskDataError`` (``on_bad: error``) or a ``FileNotFoundError`` (a missing
    image root) for the driver to raise."""
    cfg = TaskDatasetConfig.model_validate(cfg_dict)
    sid, first, units = int(row["shard_id"]), int(row["first_unit"]), json.loads(row["units"])

    def fill(writer: ShardWriter) -> dict[str, Any]:
        report = TaskReadReport()
        for offset, unit in enumerate(units):
            try:
                sets = read_unit(cfg, unit, report)
            except TaskDataError as err:
                if cfg.on_bad == "error":
                    raise
                report.skip(type(err).__name__, str(err))
                continue
            writer.add([to_record(s, first + offset, k, sid, cfg) for k, s in enumerate(sets)])
            report.sets += len(sets)
        return {"units": len(units), "task_read": report.to_dict()}

    try:
        stats = write_shard(MISLayout(cfg.output_uri, cfg.storage), sid, cfg.formats, fill)
    except (TaskDataError, FileNotFoundError) as err:  # the same in every round: not retried
        return shard_row(sid, error=err)
    return shard_row(sid, stats)


def run_build_tasks(cfg: TaskDatasetConfig,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or finish) the task dataset at ``cfg.output_uri``; returns the manifest (with the
    skip totals, ``skipped``) and the final progress figures (``progress``).

    Raises ``m2m_ray.config.ResumeMismatchError`` (before reading anything) when the output holds
    a dataset of another config, ``FileNotFoundError`` when the source has no units, the reader's
    ``TaskDataError`` naming the file (``on_bad: error``), and ``RuntimeError`` naming the shards
    still pending after ``max_shard_attempts`` rounds."""
    layout = MISLayout(cfg.output_uri, cfg.storage)
    check_config(cfg)
    units = list_units(cfg)
    if not units:
        raise FileNotFoundError(f"no {cfg.kind} units under {cfg.source}; check the path")
    chunks = [units[i: i + cfg.units_per_shard] for i in range(0, len(units),
                                                                cfg.units_per_shard)]
    expected = list(range(len(chunks)))
    before = {sid: stats for sid, stats in layout.committed_stats().items() if sid in expected}
    log(f"[tasks] {len(units)} {cfg.kind} units in {len(chunks)} shards; "
        f"{len(before)} already committed")
    progress = JobProgress(
        "build_tasks", progress_uri(layout), unit="units",
        total={"shards": len(chunks), "units": len(units), "sets": None},
        done_before={"shards": len(before), "units": sum(len(chunks[sid]) for sid in before),
                     "sets": sum(stats["sets"] for stats in before.values())},
        interval_s=cfg.progress_interval_s, storage_cfg=cfg.storage)

    def run_round(shards: Any, pending: int) -> Any:
        return shards.map(write_task_shard, fn_kwargs={"cfg_dict": config_to_dict(cfg)})

    def on_commit(stats: dict[str, Any]) -> None:
        progress.update(shards=1, units=stats["units"], sets=stats["sets"])

    manifest, final = build_shards(
        layout, expected,
        lambda sid: {"shard_id": sid, "first_unit": sid * cfg.units_per_shard,
                     "units": json.dumps(chunks[sid])},
        run_round, on_commit, progress, cfg.max_shard_attempts,
        lambda committed: {"task_dataset": cfg.kind, "units": len(units),
                           "skipped": skip_totals(committed.values())})
    log(f"[tasks] {manifest['sets']} sets ({manifest['images']} images) in "
        f"{manifest['committed_shards']} shards; skipped {manifest['skipped'] or 'none'}")
    return {**manifest, "progress": final}


def check_config(cfg: TaskDatasetConfig) -> None:
    """Write the config beside a new dataset; refuse (``ResumeMismatchError``) to continue one
    built with other settings (every key but ``HOW_NOT_WHAT``)."""
    uri = storage.join(cfg.output_uri, CONFIG_NAME)
    if not storage.exists(uri, cfg.storage):
        storage.save_config(cfg, uri, cfg.storage)
        return
    mine = {k: v for k, v in config_to_dict(cfg).items() if k not in HOW_NOT_WHAT}
    theirs = json.loads(storage.read_bytes(uri, cfg.storage))["config"]
    theirs = {k: v for k, v in theirs.items() if k not in HOW_NOT_WHAT}
    refuse_resume(f"{cfg.output_uri} holds a task dataset built with other settings",
                  setting_changes(theirs, mine),
                  "Build into a new output_uri, or remove the dataset there (its "
                  f"{storage.join(cfg.output_uri, 'mis')} folder and {uri}) and rerun; to finish "
                  f"it, rerun with the settings saved in {uri}.")


def skip_totals(shard_stats: Iterable[dict[str, Any]]) -> dict[str, int]:
    """What the readers skipped, by reason, summed over committed shards' stats."""
    total: Counter = Counter()
    for stats in shard_stats:
        total.update(stats.get("task_read", {}).get("skipped", {}))
    return dict(total)
