"""Build MIS: stage 1 filters CC12M captions to CLIP's 77 tokens, stage 2 generates the image sets.

Locally (starts a private Ray; `configs/tiny/build_mis.yaml` runs offline on the `tiny` preset):

    python pipelines/build_mis.py --config configs/tiny/build_mis.yaml
    python pipelines/build_mis.py --config configs/tiny/build_mis.yaml \\
        --captions.range_bytes=4096 --output_uri=outputs/tiny/mis

On a cluster (RAY_ADDRESS is set for the job, which joins that cluster):

    ray job submit --working-dir . -- python pipelines/build_mis.py --config configs/<file>.yaml \\
        --output_uri=s3://bucket/mis --captions.inputs='[s3://bucket/cc12m.tsv]'

Any config key can be overridden as --section.key=value (values are YAML). Stages run in the order
of `stages` in the config; `--stages='[captions]'` runs stage 1 alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from m2m_ray.config import config_to_yaml, load_config  # noqa: E402
from m2m_ray.mis.build import run_generate_stage  # noqa: E402
from m2m_ray.mis.captions import run_captions_stage  # noqa: E402
from m2m_ray.mis.config import BuildMISConfig  # noqa: E402
from m2m_ray.runtime import init_ray  # noqa: E402

STAGES: dict[str, Callable[[BuildMISConfig], dict[str, Any]]] = {
    "captions": run_captions_stage,
    "generate": run_generate_stage,
}


def summarize(name: str, stats: dict[str, Any]) -> str:
    if name == "captions":
        timings = stats["timings"]
        rejected = ", ".join(f"{k} {v}" for k, v in stats["rejected"].items())
        if stats.get("kept_as_is"):
            return (f"captions: kept as they were (MIS shards were generated from them; inputs and "
                    f"settings unchanged): {stats['input_lines']} lines → {stats['kept']} kept in "
                    f"{len(stats['shards'])} shards; rejected: {rejected}")
        return (f"captions: {stats['input_lines']} lines → {stats['kept']} kept in "
                f"{len(stats['shards'])} shards; rejected: {rejected}; "
                f"{timings['total_s']} s ({timings['captions_per_s']} captions/s)")
    if name == "generate":
        run = stats["this_run"]
        return (f"generate: {stats['sets']} sets, {stats['images']} images in "
                f"{stats['committed_shards']}/{stats['expected_shards']} committed shards "
                f"(this run: {run['shards']} shards, {run['images']} images in {run['seconds']} s, "
                f"{run['images_per_second']} images/s); {stats['rejected_captions']} captions "
                f"rejected in stage 1; {stats['rejected_sets']} sets rejected as non-finite "
                f"({run['rejected_sets']} this run; listed in mis/stats/<shard>.json)")
    return f"{name}: " + json.dumps(stats)[:500]


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of a BuildMISConfig")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(BuildMISConfig, args.config, overrides)
    print(f"# resolved config ({args.config} + overrides)\n{config_to_yaml(cfg)}", flush=True)
    print(init_ray(cfg.ray), flush=True)

    results: dict[str, dict[str, Any]] = {}
    for name in cfg.stages:
        started = time.perf_counter()
        print(f"== stage {name}", flush=True)
        results[name] = STAGES[name](cfg)
        print(f"== stage {name} done in {time.perf_counter() - started:.1f} s", flush=True)

    print("\n# summary  (output: " + cfg.output_uri + ")")
    for name, stats in results.items():
        print(summarize(name, stats))
    return results


if __name__ == "__main__":
    main()
