"""Starting or joining Ray, the same way for every entry script.

``python pipelines/X.py`` on a laptop starts a private local Ray; ``ray job submit -- python
pipelines/X.py`` runs with ``$RAY_ADDRESS`` set and joins that cluster.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2m_ray.config import RayConfig


def init_ray(cfg: "RayConfig") -> str:
    """Join ``cfg.address`` or ``$RAY_ADDRESS`` when set, else start a local Ray with
    ``cfg.num_cpus`` / ``cfg.num_gpus``. A Ray already initialized in this process is kept.
    Returns a one-line description of the cluster for the job's log."""
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    resources = ray.cluster_resources()
    return (f"Ray {ray.__version__} at {ray.get_runtime_context().gcs_address}: "
            f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
