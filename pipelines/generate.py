"""Generate image sets with M2M: K context images per set → M new ones, one after another.

Your own photos (files, folders or globs, any size and mode), in this process without Ray:

    python pipelines/generate.py --config configs/tiny/generate.yaml \\
        --inputs.mis_uri=null --inputs.images='[photos/]' --output_uri=outputs/tiny/my_photos \\
        --engine=local

A trained model on the MIS test split, on a local Ray (configs/tiny/generate.yaml runs offline):

    python pipelines/generate.py --config configs/tiny/generate.yaml

Real-image sets from MSCOCO by category (paper §8.3 zero-shot), on a cluster with GPU actors
(RAY_ADDRESS is set for the job, which joins that cluster):

    ray job submit --working-dir . -- python pipelines/generate.py \\
        --config configs/tiny/generate.yaml --model_path=s3://bucket/m2m-self \\
        --inputs.mis_uri=null \\
        --inputs.coco_annotations=s3://bucket/coco/annotations/instances_val2017.json \\
        --inputs.context_images=4 --output_uri=s3://bucket/gens/coco --actors.max_actors=8 \\
        --actors.num_gpus=1 --sample.num_images=10

Any GenerateJobConfig key can be overridden as --section.key=value (values are YAML). Writes the
generations folder of m2m_ray/formats/generations.py (images/<set>/..., generations.jsonl),
contact_sheet.png (inputs → generated), summary.json and generate_config.json to output_uri;
pipelines/evaluate.py --generations=<output_uri> evaluates it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from m2m_ray.config import config_to_yaml, load_config  # noqa: E402
from m2m_ray.runtime import init_ray  # noqa: E402
from m2m_ray.sampling.config import GenerateJobConfig  # noqa: E402
from m2m_ray.sampling.job import run_generate  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of a GenerateJobConfig")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(GenerateJobConfig, args.config, overrides)
    print(f"# resolved config ({args.config or 'defaults'} + overrides)\n{config_to_yaml(cfg)}",
          flush=True)
    if cfg.engine == "ray":
        print(init_ray(cfg.ray), flush=True)
    summary = run_generate(cfg)
    print(f"{summary['model']}: {summary['sets']} sets, {summary['generated_images']} images in "
          f"{summary['seconds']} s ({summary['images_per_s']} images/s); "
          f"{len(summary['skipped'])} sets skipped")
    for skipped in summary["skipped"][:10]:
        print(f"  skipped {skipped['set_id']}: {skipped['reason']}")
    print(f"generations: {summary['index']}\ncontact sheet: {summary['contact_sheet']}", flush=True)
    return summary


if __name__ == "__main__":
    main()
