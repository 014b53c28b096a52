"""The generation job behind pipelines/generate.py: image sets in → a generations folder out.

    sets (rows) ──► M2MSetGenerator (Ray Data actor pool, or in-process with engine=local)
                    decode K context images, generate M, save_set → one index record per set
           ──► driver: generations.jsonl (m2m_ray/eval/generations.py), contact_sheet.png

Sources (``GenerateInputsConfig``, exactly one):
- ``images``: files / folders / globs → one set (id ``input``) whose context is all of them;
  every file is decoded on the driver first, so an unreadable one stops the job naming it.
- ``mis_uri`` (+ ``mis_split``) or ``mis_shard``: MIS sets, context = their first K images; the
  Ray engine reads the dataset with Ray Data (``read_mis``), never through the driver.
- ``coco_annotations``: real-image sets by category (``m2m_ray.data.coco_sets``), first K images.

In a batch of many sets a set whose image cannot be decoded is skipped and listed with its reason
in the summary; the others go on. ``meta.split`` of a set is its MIS split, or ``external`` for
images that are not from MIS (user files, COCO): evaluate those with ``--expected_split=null``.
Set ``s`` is generated from ``torch.Generator().manual_seed(set_seed(s, sample.seed))``, so its
images do not depend on the batch it ran in, the actor, or how many sets the job has.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw

from m2m_ray import storage as st
from m2m_ray.config import GenerateJobConfig, config_to_dict, save_config
from m2m_ray.data.image_inputs import expand_image_specs, fit_square, open_image
from m2m_ray.eval import generations as gen
from m2m_ray.runtime import actor_pool_args

if TYPE_CHECKING:
    from m2m_ray.config import EvalConfig

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EXTERNAL_SPLIT = "external"


def set_seed(set_id: str, base_seed: int) -> int:
    """The noise seed of a set: a 63-bit hash of its id and the base seed."""
    digest = hashlib.blake2b(f"{base_seed}:{set_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --- sources -------------------------------------------------------------------------------------


def file_set_rows(cfg: GenerateJobConfig) -> list[dict[str, Any]]:
    """Rows ``{order, set_id, caption, split, meta, uris}`` of the images / COCO sources."""
    inputs = cfg.inputs
    if inputs.images:
        uris = expand_image_specs(inputs.images, cfg.storage)
        for uri in uris:  # fail now, naming the file, rather than inside an actor
            open_image(st.read_bytes(uri, cfg.storage), uri)
        return [{"order": 0, "set_id": "input", "caption": inputs.caption,
                 "split": EXTERNAL_SPLIT, "meta": json.dumps({"source": "images"}),
                 "uris": uris}]
    from m2m_ray.data.coco_sets import coco_sets

    K = inputs.context_images
    grouping = coco_sets(inputs.coco_annotations, inputs.coco_images, images_per_set=K or None,
                         min_images=max(K, 1), min_area_fraction=inputs.coco_min_area_fraction,
                         storage=cfg.storage)
    log.info("COCO grouping: %s", grouping.counts)
    sets = grouping.sets[: inputs.max_sets]
    return [{"order": i, "set_id": s.set_id, "caption": None, "split": EXTERNAL_SPLIT,
             "meta": json.dumps({"source": "coco", "category": s.category,
                                 "category_id": s.category_id, "image_ids": s.image_ids}),
             "uris": s.image_uris} for i, s in enumerate(sets)]


def _mis_set_row(sample: dict[str, Any], K: int) -> dict[str, Any]:
    return {"order": sample["caption_id"], "set_id": str(sample["caption_id"]),
            "caption": sample["caption"], "split": sample["split"],
            "meta": json.dumps({"source": "mis", "caption_id": sample["caption_id"],
                                "shard_id": sample["shard_id"],
                                "context_seeds": sample["seeds"][:K]}),
            "images": list(sample["images"][:K])}


def local_mis_rows(cfg: GenerateJobConfig) -> Iterator[dict[str, Any]]:
    """MIS sets read in this process (engine=local), in shard order."""
    from m2m_ray.data.mis import iter_mis, iter_shard

    inputs = cfg.inputs
    if inputs.mis_shard:
        samples: Iterable[dict] = (s for s in iter_shard(inputs.mis_shard, cfg.storage)
                                   if inputs.mis_split is None or s["split"] == inputs.mis_split)
    else:
        samples = iter_mis(inputs.mis_uri, inputs.mis_format, cfg.storage, inputs.mis_split)
    rows = (_mis_set_row(s, inputs.context_images) for s in samples)
    return itertools.islice(rows, inputs.max_sets)


def _mis_batch_to_sets(table, K: int):
    """Ray Data (pyarrow batches): MIS sample rows → set rows with the first K images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    metas = [json.dumps({"source": "mis", "caption_id": cid, "shard_id": sid,
                         "context_seeds": seeds[:K]})
             for cid, sid, seeds in zip(table["caption_id"].to_pylist(),
                                        table["shard_id"].to_pylist(),
                                        table["seeds"].to_pylist())]
    return pa.table({"order": table["caption_id"],
                     "set_id": pc.cast(table["caption_id"], pa.string()),
                     "caption": table["caption"], "split": table["split"],
                     "meta": pa.array(metas, pa.string()),
                     "images": pc.list_slice(table["images"], 0, K)})


def ray_set_dataset(cfg: GenerateJobConfig):
    """The input sets as a Ray Dataset (MIS through Ray Data's readers)."""
    import ray

    from m2m_ray.data.mis import read_mis

    inputs = cfg.inputs
    if inputs.mis_shard:
        return ray.data.from_items(list(local_mis_rows(cfg)))  # one shard: read on the driver
    if not inputs.mis_uri:
        return ray.data.from_items(file_set_rows(cfg))
    ds = read_mis(inputs.mis_uri, inputs.mis_format, cfg.storage, inputs.mis_split)
    ds = ds.map_batches(_mis_batch_to_sets, fn_kwargs={"K": inputs.context_images},
                        batch_format="pyarrow")
    if inputs.max_sets:
        ds = ds.sort("order").limit(inputs.max_sets)  # the first N sets by caption_id, every run
    return ds


# --- the actor -----------------------------------------------------------------------------------


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def load_pipeline(cfg: GenerateJobConfig, device: torch.device):
    from m2m_ray.sampling.pipeline import M2MPipeline

    dtype = _DTYPES[cfg.sample.dtype] if device.type == "cuda" else torch.float32
    if cfg.model_path:
        pipe = M2MPipeline.from_pretrained(cfg.model_path, device=device, dtype=dtype,
                                           storage=cfg.storage)
    else:
        pipe = M2MPipeline.from_preset(cfg.model, cfg.m2m, device=device, dtype=dtype)
    pipe.set_scheduler(cfg.sample.scheduler)
    pipe.codec.vae_batch_size = cfg.sample.vae_batch_size
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
        self.device = pick_device(self.cfg.num_gpus)
        if self.device.type == "cpu":  # as Ray does for its actors (OMP_NUM_THREADS = num_cpus);
            torch.set_num_threads(max(1, int(self.cfg.num_cpus)))  # engine=local gets it too
        self.pipe = load_pipeline(self.cfg, self.device)
        self.model_label = (self.cfg.model_path
                            or f"untrained {self.pipe.name} ({self.cfg.model.preset} preset)")

    def _context(self, batch: dict[str, Any], i: int) -> list[Image.Image]:
        if "uris" in batch:
            items = [(uri, st.read_bytes(uri, self.cfg.storage)) for uri in batch["uris"][i]]
        else:
            items = [(f"set {batch['set_id'][i]} image {j}", data)
                     for j, data in enumerate(batch["images"][i])]
        return [fit_square(open_image(data, name), self.pipe.resolution) for name, data in items]

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        cfg, sample = self.cfg, self.cfg.sample
        count = len(batch["set_id"])
        contexts, good, errors = [], [], [""] * count
        for i in range(count):
            try:
                contexts.append(self._context(batch, i))
                good.append(i)
            except Exception as err:  # one bad set must not stop the batch; it is reported
                errors[i] = f"{type(err).__name__}: {err}"
        seeds = [set_seed(str(batch["set_id"][i]), sample.seed) for i in good]
        generated = self.pipe.generate(
            contexts, sample.num_images, guidance_scale=sample.guidance_scale,
            task_guidance_scale=sample.task_guidance_scale, context_window=sample.context_window,
            num_inference_steps=sample.num_inference_steps, use_cache=sample.use_cache,
            generator=[torch.Generator().manual_seed(s) for s in seeds]) if good else []
        records = [""] * count
        for i, context, images, seed in zip(good, contexts, generated, seeds):
            caption = batch["caption"][i]
            settings = sample.model_dump(mode="json", exclude={"seed", "dtype", "vae_batch_size"})
            meta = {**json.loads(batch["meta"][i]), **settings, "base_seed": sample.seed,
                    "seed": seed, "model": self.pipe.name, "model_path": self.model_label,
                    "split": batch["split"][i], "resolution": self.pipe.resolution,
                    "device": self.device.type, "dtype": str(self.pipe.unet.dtype)[6:]}
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


def _arrow_tile(size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(tile)
    mid, width = size // 2, max(1, size // 24)
    draw.line([(size // 5, mid), (size * 4 // 5, mid)], fill="black", width=width)
    draw.polygon([(size * 4 // 5, mid - size // 8), (size * 9 // 10, mid),
                  (size * 4 // 5, mid + size // 8)], fill="black")
    return tile


def write_contact_sheet(output_uri: str, records: list[gen.GenerationSet], storage=None,
                        thumb: int = 96) -> str:
    """contact_sheet.png: one row per set, its context images → its generated images."""
    from m2m_ray.mis.preview import contact_sheet

    rows = []
    for record in records:
        context = [gen.load_image(gen.image_uri(output_uri, p), storage) for p in record.context]
        generated = [gen.load_image(gen.image_uri(output_uri, p), storage)
                     for p in record.generated]
        label = record.meta.get("category") or record.caption or ""
        rows.append((f"[{record.set_id}] {label}  ({len(context)} inputs -> "
                     f"{len(generated)} generated)", context + [_arrow_tile(thumb)] + generated))
    buffer = io.BytesIO()
    contact_sheet(rows, thumb).save(buffer, format="PNG")
    uri = st.join(output_uri, "contact_sheet.png")
    st.write_bytes(uri, buffer.getvalue(), storage)
    return uri


def run_generate(cfg: GenerateJobConfig) -> dict[str, Any]:
    """Generate every input set into ``cfg.output_uri``; returns a summary (also written as
    ``summary.json``). Ray engine: on the current Ray cluster (``init_ray`` first)."""
    started = time.perf_counter()
    cfg_dict = config_to_dict(cfg)
    outputs: list[dict[str, Any]] = []
    # Sources first: bad inputs (unreadable image files, no such MIS) fail before anything is written.
    if cfg.engine == "local":
        rows = (file_set_rows(cfg) if cfg.inputs.images or cfg.inputs.coco_annotations
                else local_mis_rows(cfg))
    else:
        sets = ray_set_dataset(cfg)
    save_config(cfg, st.join(cfg.output_uri, "generate_config.json"), cfg.storage)
    if cfg.engine == "local":
        generator = M2MSetGenerator(cfg_dict)
        for batch in _batches(rows, cfg.sets_per_batch):
            result = generator(batch)
            outputs.extend(dict(zip(result, values)) for values in zip(*result.values()))
    else:
        import ray

        generated = sets.map_batches(
            M2MSetGenerator, fn_constructor_kwargs={"cfg_dict": cfg_dict},
            batch_size=cfg.sets_per_batch, batch_format="numpy", **actor_pool_args(cfg))
        for batch in generated.iter_batches(batch_format="numpy", batch_size=256):
            outputs.extend(dict(zip(batch, values)) for values in zip(*batch.values()))
    outputs.sort(key=lambda row: (int(row["order"]), str(row["set_id"])))
    records = [gen.GenerationSet.from_obj(json.loads(row["record"]), f"set {row['set_id']}")
               for row in outputs if row["record"]]
    skipped = [{"set_id": str(row["set_id"]), "reason": str(row["error"])}
               for row in outputs if not row["record"]]
    if not records:
        raise RuntimeError(f"no set was generated ({len(skipped)} skipped: "
                           f"{skipped[:3]}); check the inputs")
    index_uri = gen.write_index(cfg.output_uri, records, cfg.storage)
    sheet = (write_contact_sheet(cfg.output_uri, records[: cfg.contact_sheet_sets], cfg.storage)
             if cfg.contact_sheet_sets else None)
    seconds = time.perf_counter() - started
    images = sum(len(r.generated) for r in records)
    summary = {"output_uri": cfg.output_uri, "index": index_uri, "contact_sheet": sheet,
               "sets": len(records), "generated_images": images, "skipped": skipped,
               "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 4),
               "model": records[0].meta.get("model"), "engine": cfg.engine}
    st.write_bytes(st.join(cfg.output_uri, "summary.json"),
                   json.dumps(summary, indent=2).encode(), cfg.storage)
    return summary


# --- generate, then evaluate ---------------------------------------------------------------------


def generation_for_eval(cfg: "EvalConfig") -> GenerateJobConfig:
    """The generation job of an evaluation (``cfg.generate``) with the evaluation's protocol: K =
    ``context_images``, M = ``generated_images``, ``max_sets`` and ``expected_split``. Setting
    one of those differently in the generate section is an error, not silently overridden."""
    from m2m_ray.config import ConfigError

    spec = cfg.generate
    if spec is None:
        raise ConfigError("no generate section: give --generations=<folder> to evaluate existing "
                          "generations, or a generate section (model_path, inputs.mis_uri, ...)")
    protocol = [("inputs", "context_images", "context_images", cfg.context_images),
                ("sample", "num_images", "generated_images", cfg.generated_images),
                ("inputs", "max_sets", "max_sets", cfg.max_sets),
                ("inputs", "mis_split", "expected_split", cfg.expected_split)]
    conflicts = [f"generate.{section}.{key} = {getattr(getattr(spec, section), key)!r} but "
                 f"{eval_key} = {value!r}"
                 for section, key, eval_key, value in protocol
                 if key in getattr(spec, section).model_fields_set
                 and getattr(getattr(spec, section), key) != value]
    if conflicts:
        raise ConfigError("the generate section disagrees with the evaluation protocol: "
                          + "; ".join(conflicts) + ". Set these on the evaluation only (they are "
                          "passed on to the generation)")
    if not (spec.inputs.mis_uri or spec.inputs.mis_shard) and cfg.expected_split is not None:
        raise ConfigError(f"generated sets of images / COCO inputs have split {EXTERNAL_SPLIT!r}, "
                          f"so expected_split={cfg.expected_split!r} would skip them all; set "
                          "--expected_split=null to evaluate them")
    data = spec.model_dump(mode="json")
    data["inputs"].update(context_images=cfg.context_images, max_sets=cfg.max_sets,
                          mis_split=cfg.expected_split)
    data["sample"]["num_images"] = cfg.generated_images
    data.update(storage=cfg.storage.model_dump(mode="json"), ray=cfg.ray.model_dump(mode="json"))
    return GenerateJobConfig.model_validate(data)
