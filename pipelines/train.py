"""Train M2M on MIS with Ray Train: pre-training (m2m.variant self | dino) or fine-tuning from a
trained M2M model (init_from, with m2m.task_conditions for the task datasets).

Locally (starts a private Ray; the tiny config runs offline on configs/tiny/build_mis.yaml's MIS):

    python pipelines/train.py --config configs/tiny/train.yaml
    python pipelines/train.py --config configs/tiny/train.yaml --m2m.variant=dino --max_steps=20

On a cluster (RAY_ADDRESS is set for the job, which joins that cluster):

    ray job submit --working-dir . -- python pipelines/train.py --config configs/m2m-self.yaml
    ray job submit --working-dir . -- python pipelines/train.py --config configs/m2m-dino.yaml \\
        --storage_path=s3://bucket/m2m/train --data.uri=s3://bucket/m2m/mis/v1

Submitting again with the same run_name and storage_path continues from the last checkpoint
(raise --max_steps to train longer). Fine-tuning: --init_from=<exported model folder> with a new
--run_name. Any config key can be overridden as --section.key=value (values are YAML).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from m2m_ray.config import config_to_yaml, load_config  # noqa: E402
from m2m_ray.runtime import init_ray  # noqa: E402
from m2m_ray.train.config import TrainConfig  # noqa: E402
from m2m_ray.train.trainer import run_training  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file of a TrainConfig")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(TrainConfig, args.config, overrides)
    print(f"# resolved config ({args.config} + overrides)\n{config_to_yaml(cfg)}", flush=True)
    print(init_ray(cfg.ray), flush=True)
    summary = run_training(cfg)
    metrics = {k: round(v, 5) if isinstance(v, float) else v
               for k, v in (summary.pop("metrics") or {}).items()}
    print("\n# summary\n" + json.dumps({**summary, "last_metrics": metrics}, indent=2,
                                       default=str), flush=True)
    return summary


if __name__ == "__main__":
    main()
