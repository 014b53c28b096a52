"""Where Ray Data's own scale-up requests land: placement rules checked offline (issue 28).

Ray Data's cluster autoscaler (Ray 2.60, ``RATE_BASED``) asks the autoscaler
(``ray.autoscaler.sdk.request_resources``) for bundles of one actor's CPU, GPU and memory — never
its custom resources — so autoscaler v1 places them by node-type shape alone.
``stage_bundle_problems`` checks that each such bundle scores best on its stage's own node type
(with Ray's own scorer); ``pool_capacity_problems`` that a job's pinned GPU pools never ask for
more than that node type offers. ``m2m_ray.cluster`` runs both.
"""

from __future__ import annotations

from typing import Any, Iterator

# resources pinning work that Ray Data runs as actor pools. Ray Data's own scale-up requests
# (``ray.autoscaler.sdk.request_resources``) carry only CPU/GPU/memory, never these, so the
# autoscaler places them by shape alone (``stage_bundle_problems``). Training places its GPU
# workers with Ray Train placement groups, whose bundles keep ``train_gpu``.
DATA_POOL_RESOURCES = ("gen_gpu",)


def _utilization_score(node: dict[str, float], bundle: dict[str, float]) -> tuple | None:
    """Autoscaler v1's score of launching ``node`` (a node type's resources) for ``bundle``, as its
    ``get_nodes_for`` computes it (Ray 2.60 ``_resource_based_utilization_scorer``); None: it does
    not fit. Higher wins; among equal scores the node type name that sorts last wins."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _resource_based_utilization_scorer,
    )

    return _resource_based_utilization_scorer(
        {k: float(v) for k, v in node.items()}, [bundle],
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))


def stage_bundle_problems(node_types: dict[str, dict[str, float]]) -> list[str]:
    """Where Ray Data's scale-up requests for a stage could launch another stage's node type.

    ``node_types``: node type name → its resources. For each GPU node type offering one of
    ``DATA_POOL_RESOURCES``, every bundle one actor of its stage (one GPU, as the project's pools
    ask) makes Ray Data request — ``{CPU: c, GPU: 1}``, the custom resource dropped, for c = 1 ..
    the node's CPUs per GPU — must score strictly best on that node type among all GPU node types
    (a tie goes to the name that sorts last: ``train_gpu_worker`` beats ``gen_gpu_worker``).
    Returns one line per node type where some bundle does not (naming the first)."""
    problems = []
    gpu_types = {name: r for name, r in node_types.items() if r.get("GPU", 0) > 0}
    for own, resources in gpu_types.items():
        if not set(resources) & set(DATA_POOL_RESOURCES):
            continue
        for cpus in range(1, int(resources.get("CPU", 0) // resources["GPU"]) + 1):
            bundle = {"CPU": float(cpus), "GPU": 1.0}
            own_score = _utilization_score(resources, bundle)
            rivals = sorted(other for other, r in gpu_types.items() if other != own
                            and (score := _utilization_score(r, bundle)) is not None
                            and score >= own_score)
            if rivals:
                problems.append(
                    f"Ray Data requests {bundle} (CPU and GPU of one actor; it drops custom "
                    f"resources) for work pinned to '{own}', and the autoscaler scores "
                    f"{', '.join(rivals)} at least as high, so it may launch that node type "
                    f"instead: give '{own}' the fewest CPUs and GPUs per node of the GPU node "
                    "types (other stages' types larger)")
                break
    return problems


def pool_capacity_problems(node_types: dict[str, tuple[dict[str, float], int]],
                           job: dict[str, Any]) -> list[str]:
    """Where a job's pinned GPU actor pools could make Ray Data ask for GPUs beyond their node type.

    Ray Data's scale-up requests for an actor pool are at most ``max_actors`` bundles of one
    actor's CPU and GPU, without its custom resource; once the pool's node type is at its
    ``max_workers`` the autoscaler places the rest on another GPU node type (which the actors
    cannot use, and which the standing request keeps alive). So every pool asking for GPUs and
    one of ``DATA_POOL_RESOURCES`` needs ``max_actors`` set, with ``max_actors`` × the units per
    actor ≤ ``max_workers`` × units per node of the node types offering it. ``node_types``:
    from ``node_types_of``; ``job``: a pipeline config mapping (e.g. configs/build_mis.yaml)."""
    problems = []
    for key, pool in _pinned_pools(job):
        for resource in sorted(set(pool["resources"]) & set(DATA_POOL_RESOURCES)):
            capacity = sum(r.get(resource, 0) * most for r, most in node_types.values())
            per_actor = float(pool["resources"][resource])
            most_actors = int(capacity // per_actor) if per_actor > 0 else 0
            if pool.get("max_actors") is None:
                problems.append(f"{key}.max_actors is not set: Ray Data then asks the autoscaler "
                                f"for GPUs without bound, and beyond the {capacity:g} {resource} "
                                "the cluster offers it launches other GPU node types; set "
                                f"{key}.max_actors to at most {most_actors}")
            elif pool["max_actors"] * per_actor > capacity:
                problems.append(f"{key}.max_actors={pool['max_actors']} asks for "
                                f"{pool['max_actors'] * per_actor:g} {resource} but the cluster "
                                f"offers at most {capacity:g} (max_workers of its node types): "
                                "Ray Data's requests for the rest would launch other GPU node "
                                f"types; set {key}.max_actors to at most {most_actors} or raise "
                                f"max_workers of the node type offering {resource}")
    return problems


def _pinned_pools(node: Any, key: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(config key, pool) of every actor pool in a job config that asks for GPUs and one of
    ``DATA_POOL_RESOURCES``."""
    if not isinstance(node, dict):
        return
    resources = node.get("resources")
    if (isinstance(resources, dict) and set(resources) & set(DATA_POOL_RESOURCES)
            and float(node.get("num_gpus") or 0) > 0):
        yield key, node
    for name, value in node.items():
        yield from _pinned_pools(value, f"{key}.{name}" if key else str(name))
