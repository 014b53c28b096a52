"""The generation job behind pipelines/generate.py: image sets in → a generations folder out.

    sets (rows) ──► M2MSetGenerator (Ray Data actor pool, or in-process with engine=local)
                    decode K context images, generate M, save_set → one index record per set
           ──► driver: generations.jsonl (m2m_ray/formats/generations.py), contact_sheet.png

The sets come from ``m2m_ray.data.sets`` (user files, MIS, COCO; ``GenerateInputsConfig``) and are
sampled by the one sampling spec, ``cfg.sample`` (``SampleConfig``). In a batch of many sets a set
whose image cannot be decoded is skipped and listed with its reason in the summary; the others go
on.
Set ``s`` is generated from ``torch.Generator().manual_seed(set_seed(s, sample.seed))``, so its
images do not depend on the batch it ran in, the actor, or how many sets the job has.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from m2m_ray import storage as st
from m2m_ray.config import config_to_dict
from m2m_ray.data.image_inputs import fit_square, open_image
from m2m_ray.data.sets import local_set_rows, ray_set_dataset
from m2m_ray.data.tasks import decode_task_file, sequence_conditions
from m2m_ray.formats import generations as gen
from m2m_ray.formats.mis import CorruptShardError, committed_shards, split_set_count
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.progress import JobProgress
from m2m_ray.runtime import actor_pool_args, pick_device, task_errors_as, torch_dtype
from m2m_ray.sampling.config import GenerateJobConfig
from m2m_ray.storage import save_config
from m2m_ray.viz import arrow_tile, contact_sheet, png_bytes

log = logging.getLogger(__name__)


def set_seed(set_id: str, base_seed: int) -> int:
    """The noise seed of a set: a 63-bit hash of its id and the base seed."""
    digest = hashlib.blake2b(f"{base_seed}:{set_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --- the actor -----------------------------------------------------------------------------------


def load_pipeline(cfg: GenerateJobConfig, device: torch.device):
    from m2m_ray.sampling.pipeline import M2MPipeline

    dtype = torch_dtype(cfg.sample.dtype, device)
    if cfg.model_path:
        pipe = M2MPipeline.from_pretrained(cfg.model_path, device=device, dtype=dtype,
                                           storage=cfg.storage)
    else:
        pipe = M2MPipeline.from_preset(cfg.model, cfg.m2m, device=device, dtype=dtype)
    if cfg.sample.resolution:
        pipe.resolution = cfg.sample.resolution
    return pipe


class M2MSetGenerator:
    """Ray Data callable class: a batch of sets → one index record per set (images saved).

    Input columns: ``order``, ``set_id``, ``caption``, ``split``, ``meta`` (JSON) and either
    ``images`` (encoded bytes) or ``uris`` (read here). Output: ``order``, ``set_id``, ``record``
    (the set's ``GenerationSet`` as JSON, empty when skipped) and ``error`` (why it was skipped).
    """

    def __init__(self, cfg_dict: dict[str, Any]):
        self.cfg = GenerateJobConfig.model_validate(cfg_dict)
        self.device = pick_device(self.cfg.actors.num_gpus, "the sampling actor pool")
        if self.device.type == "cpu":  # as Ray does for its actors (OMP_NUM_THREADS = num_cpus);
            torch.set_num_threads(max(1, int(self.cfg.actors.num_cpus)))  # engine=local gets it too
        self.pipe = load_pipeline(self.cfg, self.device)
        self.task_kinds = list(self.pipe.unet.config.task_conditions)
        self.given_task = (None if not self.cfg.inputs.task_conditions else decode_task_file(
            self.cfg.inputs.task_conditions, self.cfg.storage))
        self.model_label = (self.cfg.model_path
                            or f"untrained {self.pipe.name} ({self.cfg.model.preset} preset)")

    def _context(self, batch: dict[str, Any], i: int) -> list[Image.Image]:
        if "uris" in batch:
            items = [(uri, st.read_bytes(uri, self.cfg.storage)) for uri in batch["uris"][i]]
        else:
            items = [(f"set {batch['set_id'][i]} image {j}", data)
                     for j, data in enumerate(batch["images"][i])]
        return [fit_square(open_image(data, name), self.pipe.resolution) for name, data in items]

    def _conditions(self, batch: dict[str, Any], i: int, K: int) -> dict[str, np.ndarray]:
        """A task-conditioned model's inputs for set ``i``'s K context images and M targets (the
        user's ``inputs.task_conditions``, else the set's stored ones); {} for other models."""
        if not self.task_kinds:
            return {}
        tasks = batch.get("task")  # absent for image-file and COCO sets
        stored = "" if tasks is None else tasks[i]
        raw = self.given_task if self.given_task is not None else (
            json.loads(stored) if stored else None)
        return sequence_conditions(raw, self.task_kinds, K + self.cfg.sample.num_images,
                                   f"set {batch['set_id'][i]}",
                                   self.pipe.unet.config.camera_frame)

    def _stack_conditions(self, conditions: list[dict[str, np.ndarray]],
                          contexts: list[list]) -> tuple[TaskConditions | None, ...]:
        """``(context_task [S, K], target_task [S, M])``; (None, None) without task kinds."""
        if not self.task_kinds or not conditions:
            return None, None
        K = len(contexts[0])
        if any(len(c) != K for c in contexts):
            raise ValueError("task conditions need every set of a batch to have K context images")
        stacked = {kind: torch.from_numpy(np.stack([c[kind] for c in conditions]))
                   for kind in self.task_kinds}  # (S, K + M, ...)
        return (TaskConditions(**{k: v[:, :K] for k, v in stacked.items()}),
                TaskConditions(**{k: v[:, K:] for k, v in stacked.items()}))

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        cfg, sample = self.cfg, self.cfg.sample
        count = len(batch["set_id"])
        contexts, conditions, good, errors = [], [], [], [""] * count
        for i in range(count):
            try:
                context = self._context(batch, i)
                conditions.append(self._conditions(batch, i, len(context)))
                contexts.append(context)
                good.append(i)
            except Exception as err:  # one bad set must not stop the batch; it is reported
                errors[i] = f"{type(err).__name__}: {err}"
        seeds = [set_seed(str(batch["set_id"][i]), sample.seed) for i in good]
        context_task, target_task = self._stack_conditions(conditions, contexts)
        generated = self.pipe.generate(
            contexts, sample, [torch.Generator().manual_seed(s) for s in seeds],
            context_task=context_task, target_task=target_task,
            on_non_finite="skip") if good else []
        records = [""] * count
        for i, context, images, seed, condition in zip(good, contexts, generated, seeds,
                                                       conditions):
            if images is None:  # never saved as black images: skipped with its reason, counted
                errors[i] = (f"non-finite latents or pixels (NaN/Inf) in "
                             f"{str(self.pipe.unet.dtype).removeprefix('torch.')}; rerun the set "
                             "with --sample.dtype=float32")
                continue
            caption = batch["caption"][i]
            # vae_batch_size stays: it changes the last bits of the images (chunks within a set)
            settings = sample.model_dump(mode="json", exclude={"seed", "dtype"})
            meta = {**json.loads(batch["meta"][i]), **settings, "base_seed": sample.seed,
                    "seed": seed, "model": self.pipe.name, "model_path": self.model_label,
                    "split": batch["split"][i], "resolution": self.pipe.resolution,
                    "device": self.device.type, "dtype": str(self.pipe.unet.dtype)[6:],
                    # the model's inputs, K context images then M targets (relative cameras)
                    **({"task_conditions": {k: v.tolist() for k, v in condition.items()}}
                       if condition else {})}
            record = gen.save_set(cfg.output_uri, str(batch["set_id"][i]),
                                  caption if isinstance(caption, str) else None, context,
                                  images, meta=meta, storage=cfg.storage,
                                  image_format=cfg.image_format)
            records[i] = record.to_json()
        return {"order": np.asarray(batch["order"], dtype=np.int64),
                "set_id": np.array([str(s) for s in batch["set_id"]], dtype=object),
                "record": np.array(records, dtype=object), "error": np.array(errors, dtype=object)}


# --- the job -------------------------------------------------------------------------------------


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[dict[str, list]]:
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield {key: [row[key] for row in chunk] for key in chunk[0]}


def write_contact_sheet(output_uri: str, records: list[gen.GenerationSet], storage=None,
                        thumb: int = 96) -> str:
    """contact_sheet.png: one row per set, its context images → its generated images."""
    rows = []
    for record in records:
        context = [gen.load_image(gen.image_uri(output_uri, p), storage) for p in record.context]
        generated = [gen.load_image(gen.image_uri(output_uri, p), storage)
                     for p in record.generated]
        label = record.meta.get("category") or record.caption or ""
        rows.append((f"[{record.set_id}] {label}  ({len(context)} inputs -> "
                     f"{len(generated)} generated)", context + [arrow_tile(thumb)] + generated))
    uri = st.join(output_uri, "contact_sheet.png")
    st.write_bytes(uri, png_bytes(contact_sheet(rows, thumb)), storage)
    return uri


def _named_read_errors(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The Ray engine's output batches; a MIS shard that cannot be read raises the readers'
    ``CorruptShardError`` naming it (and what to do), not a worker's traceback."""
    with task_errors_as(CorruptShardError):
        yield from batches


def _count_input_sets(cfg: GenerateJobConfig, sets) -> int | None:
    """Sets the Ray engine will generate, without reading images: Ray's count of an in-memory
    dataset, or the MIS shard stats (``sets``, ``split_sets``) for a MIS read by Ray Data. None
    (unknown: progress without ETA) for a split of shards whose stats predate ``split_sets``."""
    inputs = cfg.inputs
    if not inputs.mis_uri or inputs.mis_shard:
        return sets.count()  # from_items: metadata only
    counts = [split_set_count(s, inputs.mis_split)
              for _, s in committed_shards(inputs.mis_uri, inputs.mis_format, cfg.storage)]
    if None in counts:
        return None
    return min(sum(counts), inputs.max_sets) if inputs.max_sets else sum(counts)


def run_generate(cfg: GenerateJobConfig) -> dict[str, Any]:
    """Generate every input set into ``cfg.output_uri``; returns a summary (also written as
    ``summary.json``) whose ``progress`` equals the last ``progress.json`` (sets and images done
    of the total, rate, ETA, failures = skipped sets; ``m2m_ray.progress``), which the job
    rewrites every ``progress_interval_s`` while it runs. Ray engine: on the current Ray cluster
    (``init_ray`` first)."""
    started = time.perf_counter()
    cfg_dict = config_to_dict(cfg)
    outputs: list[dict[str, Any]] = []
    # Sources first: bad inputs (unreadable image files, no such MIS) fail before anything is written.
    if cfg.engine == "local":
        rows = list(local_set_rows(cfg.inputs, cfg.storage))
        total = len(rows)
    else:
        with task_errors_as(CorruptShardError):  # a bad shard named, not a worker's traceback
            sets = ray_set_dataset(cfg.inputs, cfg.storage)
        total = _count_input_sets(cfg, sets)
    save_config(cfg, st.join(cfg.output_uri, "generate_config.json"), cfg.storage)
    progress = JobProgress(
        "generate", st.join(cfg.output_uri, "progress.json"), unit="images",
        total={"sets": total, "images": None if total is None else total * cfg.sample.num_images},
        interval_s=cfg.progress_interval_s, storage_cfg=cfg.storage)
    if cfg.engine == "local":
        generator = M2MSetGenerator(cfg_dict)
        batches: Iterable[dict[str, Any]] = (generator(batch)
                                             for batch in _batches(rows, cfg.sets_per_batch))
    else:
        generated = sets.map_batches(
            M2MSetGenerator, fn_constructor_kwargs={"cfg_dict": cfg_dict},
            batch_size=cfg.sets_per_batch, batch_format="numpy",
            **actor_pool_args(cfg.actors, "actors"))
        batches = _named_read_errors(  # as they come
            generated.iter_batches(batch_format="numpy", batch_size=None))
    for batch in batches:
        rows_done = [dict(zip(batch, values)) for values in zip(*batch.values())]
        outputs.extend(rows_done)
        failed = [row for row in rows_done if not row["record"]]
        done = len(rows_done) - len(failed)
        progress.update(sets=done, images=done * cfg.sample.num_images)
        if failed:
            progress.failure(f"set {failed[-1]['set_id']}: {failed[-1]['error']}"[:500],
                             len(failed))
    outputs.sort(key=lambda row: (int(row["order"]), str(row["set_id"])))
    records = [gen.GenerationSet.from_obj(json.loads(row["record"]), f"set {row['set_id']}")
               for row in outputs if row["record"]]
    skipped = [{"set_id": str(row["set_id"]), "reason": str(row["error"])}
               for row in outputs if not row["record"]]
    if not records:
        progress.finish("failed")
        raise RuntimeError(f"no set was generated ({len(skipped)} skipped: "
                           f"{skipped[:3]}); check the inputs")
    index_uri = gen.write_index(cfg.output_uri, records, cfg.storage, skipped)
    sheet = (write_contact_sheet(cfg.output_uri, records[: cfg.contact_sheet_sets], cfg.storage)
             if cfg.contact_sheet_sets else None)
    seconds = time.perf_counter() - started
    images = sum(len(r.generated) for r in records)
    summary = {"output_uri": cfg.output_uri, "index": index_uri, "contact_sheet": sheet,
               "input_sets": len(outputs), "sets": len(records), "generated_images": images,
               "skipped": skipped,
               "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 4),
               "model": records[0].meta.get("model"), "engine": cfg.engine,
               "progress": progress.finish()}
    st.write_bytes(st.join(cfg.output_uri, "summary.json"),
                   json.dumps(summary, indent=2).encode(), cfg.storage)
    return summary
