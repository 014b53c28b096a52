"""Evaluate generated image sets: per-k FID (two resizes), IS, CLIP text-image, CLIP image-image
and DINO image-image (Table 1), every backbone and resize named in the report.

Two entries. Generate, then evaluate (paper protocol, configs/evaluate.yaml: 10,000 random sets of
the MIS test split, K = 4 context images, M = 10 generated, seeded): the config's `generate`
section names the model and the MIS; generation runs on Ray Data actors into generate.output_uri,
then the evaluation reads that folder. Offline on the tiny preset (random models; see the YAML for
how its inputs are made) or on the shapes world (read-out extractors):

    python pipelines/evaluate.py --config configs/tiny/evaluate.yaml
    python pipelines/evaluate.py --config configs/shapes/evaluate.yaml

Or evaluate an existing generations folder (written by pipelines/generate.py, format in
m2m_ray/formats/generations.py), e.g. with tiny random extractors (their numbers mean nothing):

    python pipelines/evaluate.py --generations=outputs/tiny/generations --extractors.kind=tiny \\
        --actors.num_gpus=0

With the real Inception and CLIP weights (downloaded once, or local paths / s3:// copies):

    python pipelines/evaluate.py --generations=s3://bucket/gens \\
        --extractors.inception_weights=/models/pt_inception-2015-12-05-6726825d.pth \\
        --extractors.clip_model_id=/models/clip-vit-large-patch14

On a cluster (RAY_ADDRESS is set for the job, which joins that cluster):

    ray job submit --working-dir . -- python pipelines/evaluate.py --config configs/evaluate.yaml \\
        --generate.model_path=s3://bucket/m2m-self --generate.inputs.mis_uri=s3://bucket/mis \\
        --generate.output_uri=s3://bucket/gens

Any EvalConfig key can be overridden as --section.key=value (values are YAML; --generate=null drops
the section). Writes report.json, report.md and report.png to output_uri (default
<generations>/eval).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from m2m_ray.config import config_to_yaml, load_config  # noqa: E402
from m2m_ray.eval.config import EvalConfig  # noqa: E402
from m2m_ray.eval.job import evaluate_generations  # noqa: E402
from m2m_ray.eval.protocol import generation_for_eval
from m2m_ray.runtime import init_ray  # noqa: E402
from m2m_ray.sampling.job import run_generate  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of an EvalConfig (optional)")
    parser.add_argument("--generations",
                        help="generations folder (local path or s3://) with generations.jsonl; "
                        "without it, the config's generate section makes one first")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(EvalConfig, args.config, overrides)
    if args.generations and cfg.generate:
        parser.error("--generations evaluates an existing folder, but the config also has a "
                     "generate section; drop one of them (--generate=null)")
    generate = None if args.generations else generation_for_eval(cfg)
    print(f"# resolved config ({args.config or 'defaults'} + overrides)\n{config_to_yaml(cfg)}",
          flush=True)
    print(init_ray(cfg.ray), flush=True)
    if generate is not None:
        made = run_generate(generate)
        print(f"generated {made['sets']} sets ({made['generated_images']} images, "
              f"{len(made['skipped'])} skipped) with {made['model']} in {made['seconds']} s: "
              f"{made['index']}", flush=True)
    report = evaluate_generations(cfg, args.generations or generate.output_uri)
    summary = report["summary"]
    print(report["title"])
    counts = report["input"]
    print(f"sets: {counts['sets_evaluated']} evaluated of {counts['sets_total']} input sets, "
          f"{counts['sets_skipped']} skipped"
          + (f" {counts['skip_reasons']}" if counts["skip_reasons"] else "")
          + (f", {counts['sets_over_max_sets']} past protocol.max_sets"
             if counts["sets_over_max_sets"] else ""))
    titles = report["metric_titles"]  # the shapes world measures other things under these keys
    for key, stats in summary.items():
        mean, std = stats["mean"], stats["std"]
        print(f"{titles.get(key, key)}: "
              + ("n/a" if mean is None else f"{mean:.3f} ± {std:.3f} over k"))
    print("reports: " + ", ".join(report["files"].values()), flush=True)
    return report


if __name__ == "__main__":
    main()
