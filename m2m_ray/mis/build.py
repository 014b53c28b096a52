"""MIS stage 2: fan pending caption shards over SD generator actors into committed shards.

Ray is a thin distributor here (img2dataset's lesson): the work unit is one caption shard of
stage 1; a ``ShardWorker`` actor (one SD pipeline each, resources from ``generate.actors``)
generates the whole shard, encodes images on a thread pool while the GPU denoises the next batch,
and writes and commits the shard (``m2m_ray.mis.shards.write_shard``). The driver runs the
building package's one shard builder (``m2m_ray.mis.shards.build_shards``: rounds over pending
shards, exactly-once commit, manifest):

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
import json
import logging
import os
import time
from typing import Any

import numpy as np
import ray

from m2m_ray import storage
from m2m_ray.config import config_to_dict
from m2m_ray.formats.mis import MISLayout, ShardWriter
from m2m_ray.mis.captions import load_shard_captions, read_captions_stats
from m2m_ray.mis.config import BuildMISConfig
from m2m_ray.mis.generate import SDSetGenerator, encoded_sets
from m2m_ray.mis.resume import check_generate_resume, check_image_settings, shard_problems
from m2m_ray.mis.shards import build_shards, progress_uri, shard_row, write_shard
from m2m_ray.progress import JobProgress
from m2m_ray.runtime import actor_pool_args
from m2m_ray.storage import save_config

log = logging.getLogger(__name__)


class ShardWorker:
    """Ray Data callable class: ``{"shard_id": [...]}`` → one result row per shard
    (``m2m_ray.mis.shards.shard_row``)."""

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
        def fill(writer: ShardWriter) -> dict[str, Any]:
            start = time.perf_counter()
            rows = load_shard_captions(self.cfg.output_uri, sid, self.cfg.storage).to_pylist()
            timings: dict[str, float] = {}
            rejected: list[dict[str, Any]] = []  # sets with non-finite output: counted, not stored
            for records in encoded_sets(self.generator, rows, self.image_pool, self.batch_pool,
                                        timings, lambda _: self._maybe_crash(sid), rejected):
                writer.add(records)
            seconds = time.perf_counter() - start
            return {
                "seconds": round(seconds, 3),
                "generate_seconds": round(timings["generate_seconds"], 3),
                "images_per_second": round(writer.num_images / max(seconds, 1e-9), 3),
                "metadata": self.generator.metadata, "config": config_to_dict(self.cfg.generate),
                "host": os.uname().nodename, "device": str(self.generator.device),
                "ray_node_id": ray.get_runtime_context().get_node_id(),
                "captions_digest": self.captions_digest, "rejected_sets": rejected,
            }

        # None (skipped): committed by an earlier round or a racing retry
        return shard_row(sid, write_shard(self.layout, sid, self.cfg.generate.formats, fill))

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


def run_generate_stage(cfg: BuildMISConfig) -> dict[str, Any]:
    """Generate every pending shard; returns the manifest plus this run's totals (``this_run``)
    and the final progress figures (``progress``, equal to the last ``mis/progress.json``).

    Raises ``m2m_ray.config.ResumeMismatchError`` (before generating anything) when the
    config's caption or image settings differ from those of the dataset there, and
    ``RuntimeError`` naming the shards still pending after ``max_shard_attempts`` rounds or the
    committed shards that disagree with stage 1 (``progress.json`` then ends with
    ``"state": "failed"``). Sets rejected as non-finite are counted in ``rejected_sets`` (the
    manifest's and ``this_run``'s) and listed in their shard's stats."""

    layout = MISLayout(cfg.output_uri, cfg.storage)
    caption_stats = read_captions_stats(cfg.output_uri, cfg.storage)
    expected = sorted(int(sid) for sid in caption_stats["shards"])
    check_image_settings(cfg, json.loads(storage.read_bytes(layout.config, cfg.storage))["config"]
                         if storage.exists(layout.config, cfg.storage) else None)
    check_generate_resume(cfg, caption_stats, layout.committed_stats())
    gen = cfg.generate
    if gen.actors.num_gpus > 0 and not ray.cluster_resources().get("GPU"):
        log.warning("generate.actors.num_gpus=%s but the cluster has no GPU yet: the actors wait for "
                    "an autoscaler to add GPU nodes", gen.actors.num_gpus)
    start = time.perf_counter()
    rejected_now = 0
    progress = _start_progress(cfg, layout, caption_stats["shards"], expected)
    save_config(cfg, layout.config, cfg.storage)

    def run_round(shards: ray.data.Dataset, pending: int) -> ray.data.Dataset:
        return shards.map_batches(
            ShardWorker,
            fn_constructor_kwargs={"cfg": config_to_dict(cfg)},
            batch_size=1,
            # 2 in flight: an actor starts its next shard the moment one commits
            **actor_pool_args(gen.actors, "generate.actors", work_units=pending,
                              tasks_in_flight=2),
        )

    def on_commit(stats: dict[str, Any]) -> None:
        nonlocal rejected_now
        progress.update(shards=1, sets=stats["sets"], images=stats["images"])
        rejected_now += len(stats["rejected_sets"])

    def consistency(committed: dict[int, dict[str, Any]]) -> str | None:
        problems = shard_problems(caption_stats, committed)
        if not problems:
            return None
        return (
            f"MIS under {cfg.output_uri} disagrees with its captions in {len(problems)} ways: "
            f"{'; '.join(problems[:10])}. Check it with python -m m2m_ray.mis.verify "
            f"{cfg.output_uri}; remove the shards named (their mis/stats/<shard>.json first) and "
            "rerun to regenerate them")

    manifest, final = build_shards(
        layout, expected, lambda sid: {"shard_id": sid}, run_round, on_commit, progress,
        gen.max_shard_attempts,
        lambda committed: {
            "rejected_captions": sum(caption_stats["rejected"].values()),
            "kept_captions": caption_stats["kept"],
            "rejected_sets": sum(len(s.get("rejected_sets", [])) for s in committed.values())},
        consistency)
    seconds = time.perf_counter() - start
    return {**manifest, "progress": final,
            "this_run": {**progress.this_run, "rejected_sets": rejected_now,
                         "seconds": round(seconds, 3),
                         "images_per_second": round(progress.this_run["images"]
                                                    / max(seconds, 1e-9), 3)}}


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
