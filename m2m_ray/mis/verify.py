"""Validate a MIS dataset; exits non-zero with a readable list of problems.

    python -m m2m_ray.mis.verify <dataset root> [--endpoint-url http://127.0.0.1:9000]

Checks, for every committed shard and every format it was written in: each set has the configured
number of decodable images of the configured size; its seeds equal the seed function; its stored
latents are finite; its captions are exactly stage 1's kept captions of that shard less the sets
its stats list as rejected (non-finite output), with no gaps or extras; it was generated from the
stage-1 output that is there (``captions_digest``); no caption appears twice in
the dataset; Parquet and WebDataset agree; the manifest lists exactly the committed shards with their
counts; every shard stage 1 produced is committed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.formats.ids import image_seed, shard_name
from m2m_ray.formats.mis import CorruptShardError, MISLayout
from m2m_ray.formats.mis_read import decode_latents, iter_shard
from m2m_ray.mis.captions import load_shard_captions, read_captions_stats
from m2m_ray.mis.resume import shard_problems as stats_problems

MAX_PROBLEMS_PER_SHARD = 20


def _check_set(sample: dict[str, Any], settings: dict[str, Any], where: str) -> list[str]:
    problems = []
    cid = sample["caption_id"]
    n, size = settings["images_per_caption"], (settings["width"], settings["height"])
    if len(sample["images"]) != n:
        problems.append(f"{where}: set {cid} has {len(sample['images'])} images, expected {n}")
    expected_seeds = [image_seed(cid, i, settings["base_seed"]) for i in range(n)]
    if sample["seeds"] != expected_seeds:
        problems.append(f"{where}: set {cid} seeds differ from image_seed(caption_id, i, "
                        f"base_seed={settings['base_seed']})")
    for i, data in enumerate(sample["images"]):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if image.size != size:
                    problems.append(f"{where}: set {cid} image {i} is {image.size}, expected {size}")
        except Exception as err:
            problems.append(f"{where}: set {cid} image {i} does not decode ({err})")
    try:
        latents = None if sample["latents"] is None else decode_latents(
            sample["latents"], f"{where}: set {cid}")
    except CorruptShardError as err:
        return [*problems, str(err)]
    if settings.get("keep_latents") and latents is None:
        problems.append(f"{where}: set {cid} has no latents although keep_latents is on")
    factor = sample["metadata"].get("vae_scale_factor", 8)  # sets made before it was stored: 8
    if latents is not None and latents.shape != (n, 4, size[1] // factor, size[0] // factor):
        problems.append(f"{where}: set {cid} latents have shape {latents.shape}")
    if latents is not None and not np.isfinite(latents).all():
        bad = sorted({int(i) for i in np.nonzero(~np.isfinite(latents))[0]})
        problems.append(f"{where}: set {cid} has non-finite latents (NaN/Inf) in images "
                        f"{bad[:10]}: its images are not what the model made; regenerate it")
    return problems


def verify_mis(root: str, storage_cfg: StorageConfig | None = None) -> tuple[list[str], dict]:
    """``(problems, summary)``; an empty problem list means the dataset is whole."""
    layout = MISLayout(root, storage_cfg)
    problems: list[str] = []
    if not storage.exists(layout.config, storage_cfg):
        return [f"{layout.config} missing: no MIS generation ever ran under {root}"], {}
    saved = json.loads(storage.read_bytes(layout.config, storage_cfg))["config"]
    settings = saved["generate"]
    caption_stats = read_captions_stats(root, storage_cfg)
    expected = {int(sid): count for sid, count in caption_stats["shards"].items()}
    committed = layout.committed_stats()
    seen: Counter[int] = Counter()
    for sid in sorted(set(expected) - set(committed)):
        problems.append(f"shard {shard_name(sid)} ({expected[sid]} captions) is not committed")
    problems += stats_problems(caption_stats, committed)  # unknown shards, stale, counts
    for sid, stats in sorted(committed.items()):
        if sid not in expected:
            continue
        wanted = load_shard_captions(root, sid, storage_cfg)
        captions = dict(zip(wanted.column("caption_id").to_pylist(),
                            wanted.column("caption").to_pylist()))
        rejected = {int(r["caption_id"]) for r in stats.get("rejected_sets", [])}
        wanted_ids = [cid for cid in captions if cid not in rejected]  # sorted, as stage 1 wrote
        ids_by_format = {}
        for fmt in stats["formats"]:
            uri = layout.parquet(sid) if fmt == "parquet" else layout.webdataset(sid)
            where = f"{shard_name(sid)} ({fmt})"
            shard_problems: list[str] = []
            ids = []
            try:
                for sample in iter_shard(uri, storage_cfg):
                    ids.append(sample["caption_id"])
                    shard_problems += _check_set(sample, settings, where)
                    if captions.get(sample["caption_id"]) != sample["caption"]:
                        shard_problems.append(f"{where}: set {sample['caption_id']} caption differs "
                                              "from stage 1's")
            except (CorruptShardError, FileNotFoundError) as err:
                shard_problems.append(f"{where}: {err}")
            if sorted(ids) != wanted_ids:
                missing = sorted(set(wanted_ids) - set(ids))
                extra = sorted(set(ids) - set(wanted_ids))
                shard_problems.append(f"{where}: sets differ from stage 1's captions of the shard "
                                      f"({len(ids)} sets; missing {missing[:5]}, extra {extra[:5]}, "
                                      f"{len(ids) - len(set(ids))} repeated)")
            if len(ids) != stats["sets"]:
                shard_problems.append(f"{where}: {len(ids)} sets but its stats say {stats['sets']}")
            problems += shard_problems[:MAX_PROBLEMS_PER_SHARD]
            if len(shard_problems) > MAX_PROBLEMS_PER_SHARD:
                problems.append(f"{where}: ... and {len(shard_problems) - MAX_PROBLEMS_PER_SHARD} more")
            ids_by_format[fmt] = ids
        if len({tuple(v) for v in ids_by_format.values()}) > 1:
            problems.append(f"{shard_name(sid)}: Parquet and WebDataset hold different sets")
        seen.update(next(iter(ids_by_format.values()), []))
    problems += [f"caption {cid} appears in {count} sets" for cid, count in seen.items() if count > 1]
    if storage.exists(layout.manifest, storage_cfg):
        manifest = json.loads(storage.read_bytes(layout.manifest, storage_cfg))
        listed = {int(s["shard_id"]): s for s in manifest["shards"]}
        if set(listed) != set(committed):
            problems.append(f"manifest lists {len(listed)} shards, {len(committed)} are committed "
                            f"(differ: {sorted(set(listed) ^ set(committed))[:10]})")
        problems += [f"manifest: shard {shard_name(sid)} has {s['sets']} sets, stats say "
                     f"{committed[sid]['sets']}" for sid, s in listed.items()
                     if sid in committed and s["sets"] != committed[sid]["sets"]]
    else:
        problems.append(f"{layout.manifest} missing")
    summary = {"committed_shards": len(committed), "expected_shards": len(expected),
               "sets": sum(seen.values()), "images": sum(s["images"] for s in committed.values()),
               "rejected_sets": sum(len(s.get("rejected_sets", [])) for s in committed.values())}
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="dataset root (the build's output_uri)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    args = parser.parse_args(argv)
    problems, summary = verify_mis(args.root, StorageConfig(endpoint_url=args.endpoint_url))
    print(json.dumps(summary))
    if problems:
        print(f"MIS at {args.root}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"MIS at {args.root} is whole: {summary['sets']} sets in "
          f"{summary['committed_shards']} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
