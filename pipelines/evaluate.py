"""Evaluate generated image sets: per-k FID, IS, CLIP text-image and CLIP image-image (Table 1).

For now this evaluates an existing generations folder (written by pipelines/generate.py, format in
m2m_ray/eval/generations.py); the generate-then-evaluate step comes with the sampler.

Locally (starts a private Ray; tiny random extractors run offline, their numbers mean nothing):

    python pipelines/evaluate.py --generations=outputs/tiny/generations --extractors.kind=tiny \\
        --num_gpus=0

With the real Inception and CLIP weights (downloaded once, or local paths / s3:// copies):

    python pipelines/evaluate.py --generations=s3://bucket/gens \\
        --extractors.inception_weights=/models/pt_inception-2015-12-05-6726825d.pth \\
        --extractors.clip_model_id=/models/clip-vit-large-patch14

On a cluster (RAY_ADDRESS is set for the job, which joins that cluster):

    ray job submit --working-dir . -- python pipelines/evaluate.py --config configs/<file>.yaml \\
        --generations=s3://bucket/gens --output_uri=s3://bucket/gens/eval --max_actors=8

Any EvalConfig key can be overridden as --section.key=value (values are YAML). Writes report.json,
report.md and report.png to output_uri (default <generations>/eval).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from m2m_ray.config import EvalConfig, config_to_yaml, load_config  # noqa: E402
from m2m_ray.eval.job import evaluate_generations  # noqa: E402
from m2m_ray.runtime import init_ray  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of an EvalConfig (optional)")
    parser.add_argument("--generations", required=True,
                        help="generations folder (local path or s3://) with generations.jsonl")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(EvalConfig, args.config, overrides)
    print(f"# resolved config ({args.config or 'defaults'} + overrides)\n{config_to_yaml(cfg)}",
          flush=True)
    print(init_ray(cfg.ray), flush=True)
    report = evaluate_generations(cfg, args.generations)
    summary = report["summary"]
    print(report["title"])
    print(f"sets: {report['input']['sets_evaluated']} evaluated, "
          f"{report['input']['sets_skipped']} skipped {report['input']['skip_reasons']}")
    for key, stats in summary.items():
        mean, std = stats["mean"], stats["std"]
        print(f"{key}: " + ("n/a" if mean is None else f"{mean:.3f} ± {std:.3f}"))
    print("reports: " + ", ".join(report["files"].values()), flush=True)
    return report


if __name__ == "__main__":
    main()
