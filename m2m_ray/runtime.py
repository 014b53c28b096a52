"""Starting or joining Ray, the same way for every entry script.

``python pipelines/X.py`` on a laptop starts a private local Ray; ``ray job submit -- python
pipelines/X.py`` runs with ``$RAY_ADDRESS`` set and joins that cluster.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2m_ray.config import ActorPoolConfig, RayConfig


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


def actor_pool_args(pool: "ActorPoolConfig", work_units: int | None = None,
                    tasks_in_flight: int | None = None) -> dict:
    """``map_batches`` keyword arguments for an actor pool from its config: resources per actor and
    ``compute=ActorPoolStrategy(min, max)``, the bounds capped at ``work_units`` when given (no idle
    actors for a short round). ``tasks_in_flight`` > 1 lets an actor start its next unit the moment
    one ends, and Ray Data's pool autoscaler grows only pools whose actors can queue work."""
    import ray

    max_size = pool.max_actors if work_units is None else max(1, min(pool.max_actors, work_units))
    return {
        "num_gpus": pool.num_gpus,
        "num_cpus": pool.num_cpus,
        "resources": pool.resources or None,
        "compute": ray.data.ActorPoolStrategy(
            min_size=min(pool.min_actors, max_size), max_size=max_size,
            max_tasks_in_flight_per_actor=tasks_in_flight),
    }
