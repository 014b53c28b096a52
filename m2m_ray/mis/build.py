"""MIS stage 2: fan pending caption shards over SD generator actors into committed shards.

Ray is a thin distributor here (img2dataset's lesson): the work unit is one caption shard of
stage 1; a ``ShardWorker`` actor (one SD pipeline each, resources from ``generate.actors``) generates the whole
shard, encodes images on a thread pool while the GPU denoises the next batch, writes the shard's files
and commits them (``m2m_ray.formats.mis.ShardWriter``). The driver only lists pending shards and starts rounds:

- a shard whose stats file exists is committed and never redone;
- an actor that dies mid-shard is restarted by Ray Data, which retries its task (the shard starts over
  in a fresh temporary folder; nothing partial was published);
- a round that fails as a whole (e.g. a shard that keeps failing) is followed by another round over
  what is still pending, up to ``generate.max_shard_attempts`` rounds;
- a killed driver is rerun with the same config and picks up the pending shards; a rerun whose
  caption or image settings differ from those of the committed shards is refused
  (``m2m_ray.mis.resume``), and a run that ends with shards that disagree with stage 1 fails;
- a set whose output is non-finite (NaN/Inf, after a float32 retry on GPU) is not stored: its
  caption id and reason go to the shard's stats (``rejected_sets``), the manifest and the summary.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from typing import Any

import numpy as np
import ray

from m2m_ray import storage
from m2m_ray.config import config_to_dict
from m2m_ray.formats.mis import MISLayout, ShardWriter, write_manifest
from m2m_ray.mis.captions import load_shard_captions, read_captions_stats
from m2m_ray.mis.config import BuildMISConfig
from m2m_ray.mis.generate import SDSetGenerator, encoded_sets
from m2m_ray.mis.resume import check_generate_resume, shard_problems
from m2m_ray.progress import JobProgress
from m2m_ray.runtime import actor_pool_args
from m2m_ray.storage import save_config

log = logging.getLogger(__name__)

# Settings that change the images: a dataset must not mix shards made with different values.
_IMAGE_SETTINGS = ("images_per_caption", "base_seed", "num_inference_steps", "scheduler",
                   "guidance_scale", "height", "width", "image_format", "image_quality",
                   "keep_latents")


class ShardWorker:
    """Ray Data callable class: ``{"shard_id": [...]}`` → one result row per shard."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = BuildMISConfig.model_validate(cfg)
        self.layout = MISLayout(self.cfg.output_uri, self.cfg.storage)
        self.generator = SDSetGenerator(self.cfg.model, self.cfg.generate)
        self.captions_digest = read_captions_stats(self.cfg.output_uri,
                                                   self.cfg.storage).get("captions_digest")
        # One thread assembles a batch's records while the GPU denoises the next batch; it fans the
        # image encoding out to a pool (PIL releases the GIL while encoding).
        self.batch_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="assemble")
        self.image_pool = cf.ThreadPoolExecutor(self.cfg.generate.encode_threads,
                                                thread_name_prefix="encode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.generate_shard(int(sid)) for sid in batch["shard_id"]]
        return {key: np.asarray([row[key] for row in rows]) for key in rows[0]}

    def generate_shard(self, sid: int) -> dict[str, Any]:
        if self.layout.is_committed(sid):  # committed by an earlier round or a racing retry
            return {"shard_id": sid, "status": "skipped", "sets": 0, "images": 0, "seconds": 0.0,
                    "rejected": 0}
        start = time.perf_counter()
        rows = load_shard_captions(self.cfg.output_uri, sid, self.cfg.storage).to_pylist()
        writer = ShardWriter(self.layout, sid, self.cfg.generate.formats)
        timings: dict[str, float] = {}
        rejected: list[dict[str, Any]] = []  # sets with non-finite output: counted, not stored
        try:
            for records in encoded_sets(self.generator, rows, self.image_pool, self.batch_pool,
                                        timings, lambda _: self._maybe_crash(sid), rejected):
                writer.add(records)
            seconds = time.perf_counter() - start
            writer.commit({
                "seconds": round(seconds, 3),
                "generate_seconds": round(timings["generate_seconds"], 3),
                "images_per_second": round(writer.num_images / max(seconds, 1e-9), 3),
                "metadata": self.generator.metadata, "config": config_to_dict(self.cfg.generate),
                "host": os.uname().nodename, "device": str(self.generator.device),
                "ray_node_id": ray.get_runtime_context().get_node_id(),
                "captions_digest": self.captions_digest, "rejected_sets": rejected,
            })
        except BaseException:
            writer.abort()
            raise
        return {"shard_id": sid, "status": "committed", "sets": writer.num_sets,
                "images": writer.num_images, "seconds": seconds, "rejected": len(rejected)}

    def _maybe_crash(self, sid: int) -> None:
        """Fault injection for tests: die mid-shard (after a batch was generated, before the
        shard commits) on the chosen shard, once."""
        if self.cfg.generate.fault_injection.crash_actor_on_shard != sid:
            return
        marker = self.layout.fault_marker(sid)
        if storage.exists(marker, self.cfg.storage):
            return
        storage.write_bytes(marker, b"crashed once on purpose\n", self.cfg.storage)
        log.warning("fault injection: killing generator actor mid-way through shard %d", sid)
        os._exit(1)


def _check_settings(layout: MISLayout, cfg: BuildMISConfig) -> None:
    """Refuse to add shards made with other image settings to an existing dataset."""
    if not storage.exists(layout.config, cfg.storage):
        return
    import json

    saved = json.loads(storage.read_bytes(layout.config, cfg.storage))["config"]
    saved_gen, gen = saved["generate"], config_to_dict(cfg.generate)
    changed = {k: (saved_gen.get(k), gen[k]) for k in _IMAGE_SETTINGS if saved_gen.get(k) != gen[k]}
    if saved["model"] != config_to_dict(cfg.model):
        changed["model"] = (saved["model"], config_to_dict(cfg.model))
    if changed:
        detail = ", ".join(f"{k}: dataset has {a!r}, config has {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"{cfg.output_uri} already holds MIS shards generated with other settings ({detail}). "
            "Resume with the same settings, or write to a new output_uri.")


def run_generate_stage(cfg: BuildMISConfig) -> dict[str, Any]:
    """Generate every pending shard; returns the manifest plus this run's totals (``this_run``)
    and the final progress figures (``progress``, equal to the last ``mis/progress.json``).

    Raises ``m2m_ray.mis.resume.ResumeMismatchError`` (before generating anything) when the
    config's caption or image settings differ from those of the dataset there, and
    ``RuntimeError`` naming the shards still pending after ``max_shard_attempts`` rounds or the
    committed shards that disagree with stage 1 (``progress.json`` then ends with
    ``"state": "failed"``). Sets rejected as non-finite are counted in ``rejected_sets`` (the
    manifest's and ``this_run``'s) and listed in their shard's stats."""

    layout = MISLayout(cfg.output_uri, cfg.storage)
    caption_stats = read_captions_stats(cfg.output_uri, cfg.storage)
    expected = sorted(int(sid) for sid in caption_stats["shards"])
    _check_settings(layout, cfg)
    check_generate_resume(cfg, caption_stats, layout.committed_stats())
    _sweep_partial_files(layout)
    save_config(cfg, layout.config, cfg.storage)
    gen = cfg.generate
    if gen.actors.num_gpus > 0 and not ray.cluster_resources().get("GPU"):
        log.warning("generate.actors.num_gpus=%s but the cluster has no GPU yet: the actors wait for "
                    "an autoscaler to add GPU nodes", gen.actors.num_gpus)
    start = time.perf_counter()
    rejected_now = 0
    progress = _start_progress(cfg, layout, caption_stats["shards"], expected)
    for attempt in range(1, gen.max_shard_attempts + 1):
        pending = [sid for sid in expected if not layout.is_committed(sid)]
        if not pending:
            break
        log.info("round %d: %d of %d shards pending", attempt, len(pending), len(expected))
        shards = ray.data.from_items([{"shard_id": sid} for sid in pending],
                                     override_num_blocks=len(pending))
        results = shards.map_batches(
            ShardWorker,
            fn_constructor_kwargs={"cfg": config_to_dict(cfg)},
            batch_size=1,
            # 2 in flight: an actor starts its next shard the moment one commits
            **actor_pool_args(gen.actors, "generate.actors", work_units=len(pending),
                              tasks_in_flight=2),
        )
        try:
            for row in results.iter_rows():
                if row["status"] == "committed":
                    progress.update(shards=1, sets=int(row["sets"]), images=int(row["images"]))
                    rejected_now += int(row["rejected"])
        except Exception as err:  # a round can fail as a whole; the next one retries what is left
            log.error("round %d failed (%s: %s); pending shards are retried", attempt,
                      type(err).__name__, err)
            progress.failure(f"round {attempt}: {type(err).__name__}: {err}"[:500])
    seconds = time.perf_counter() - start
    committed = layout.committed_stats()
    manifest = write_manifest(layout, expected, {
        "rejected_captions": sum(caption_stats["rejected"].values()),
        "kept_captions": caption_stats["kept"],
        "rejected_sets": sum(len(s.get("rejected_sets", [])) for s in committed.values()),
    })
    problems = shard_problems(caption_stats, committed)
    final = progress.finish("failed" if manifest["pending_shards"] or problems else "done")
    if manifest["pending_shards"]:
        raise RuntimeError(
            f"{len(manifest['pending_shards'])} shards still pending after "
            f"{gen.max_shard_attempts} rounds: {manifest['pending_shards'][:10]}; see the actor "
            "logs (Ray dashboard) and rerun the same command to retry them")
    if problems:
        raise RuntimeError(
            f"MIS under {cfg.output_uri} disagrees with its captions in {len(problems)} ways: "
            f"{'; '.join(problems[:10])}. Check it with python -m m2m_ray.mis.verify "
            f"{cfg.output_uri}; remove the shards named (their mis/stats/<shard>.json first) and "
            "rerun to regenerate them")
    return {**manifest, "progress": final,
            "this_run": {**progress.this_run, "rejected_sets": rejected_now,
                         "seconds": round(seconds, 3),
                         "images_per_second": round(progress.this_run["images"]
                                                    / max(seconds, 1e-9), 3)}}


def _sweep_partial_files(layout: MISLayout) -> None:
    """Remove what a killed local write left under ``mis/``: ``storage.put_file``'s
    ``<name>.partial`` copies and ``storage.write_bytes``' ``<name>.tmp-<hex>`` siblings (S3
    writes are single PUTs and leave none). Run by the driver before any actor starts."""
    if storage.is_remote(layout.root):
        return
    folders = [layout.mis] + [storage.join(layout.mis, f) for f in ("parquet", "webdataset",
                                                                     "stats")]
    for folder in folders:
        for uri in storage.list_files(folder, layout.storage):
            name = uri.rsplit("/", 1)[-1]
            if name.endswith(".partial") or ".tmp-" in name:
                log.info("removing %s, left by a killed write", uri)
                storage.remove(uri, layout.storage)


def progress_uri(layout: MISLayout) -> str:
    """``mis/progress.json``, beside the manifest."""
    return storage.join(layout.mis, "progress.json")


def _start_progress(cfg: BuildMISConfig, layout: MISLayout, kept: dict[str, int],
                    expected: list[int]) -> JobProgress:
    """Progress of stage 2 in ``mis/progress.json``: shards, sets (captions) and images of the
    whole dataset, counting shards committed by earlier runs as done (``kept``: stage 1's kept
    captions per shard id)."""
    per_set = cfg.generate.images_per_caption
    committed = [sid for sid in expected if layout.is_committed(sid)]
    sets_before = sum(kept[str(sid)] for sid in committed)
    total_sets = sum(kept[str(sid)] for sid in expected)
    return JobProgress(
        "build_mis", progress_uri(layout), unit="images",
        total={"shards": len(expected), "sets": total_sets, "images": total_sets * per_set},
        done_before={"shards": len(committed), "sets": sets_before,
                     "images": sets_before * per_set},
        interval_s=cfg.generate.progress_interval_s, storage_cfg=cfg.storage)
