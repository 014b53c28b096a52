"""Build a task dataset for fine-tuning (paper §8.5): Objaverse renders in the Zero123 layout
(novel-view synthesis, camera per view) or VGSI / wikiHow procedures (visual procedure
generation, position per step) → training shards, with the building package's shard builder
(m2m_ray/mis/tasks/build.py).

    python pipelines/build_tasks.py --config configs/shapes/views_data.yaml
    python pipelines/build_tasks.py --config configs/objaverse-data.yaml \\
        --source=s3://bucket/views_release --output_uri=s3://bucket/objaverse-tasks

Any TaskDatasetConfig key can be overridden as --section.key=value. Then fine-tune with
pipelines/train.py on --data.uri=<output_uri> and m2m.task_conditions set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install

from m2m_ray.config import config_to_yaml, load_config  # noqa: E402
from m2m_ray.mis.tasks.build import TaskDatasetConfig, run_build_tasks  # noqa: E402
from m2m_ray.runtime import init_ray  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of a TaskDatasetConfig")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(TaskDatasetConfig, args.config, overrides)
    print(f"# resolved config ({args.config or 'defaults'} + overrides)\n{config_to_yaml(cfg)}",
          flush=True)
    print(init_ray(cfg.ray), flush=True)
    manifest = run_build_tasks(cfg)
    print(json.dumps({k: manifest[k] for k in ("sets", "images", "committed_shards",
                                                "expected_shards", "skipped")}))
    return manifest


if __name__ == "__main__":
    main()
