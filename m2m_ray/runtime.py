"""Where work runs: starting or joining Ray (the same way for every entry script), the
``map_batches`` arguments of a stage's ``ActorPoolConfig``, and the torch device and dtype of a
worker.

``python pipelines/X.py`` on a laptop starts a private local Ray; ``ray job submit -- python
pipelines/X.py`` runs with ``$RAY_ADDRESS`` set and joins that cluster.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, Iterator, Literal

if TYPE_CHECKING:
    import torch

    from m2m_ray.config import ActorPoolConfig, RayConfig

#: True once ``init_ray`` started a local Ray in this process: a fixed-size cluster, no autoscaler
#: to add the nodes an actor pool waits for (``check_pool_fits``).
_started_local = False


def init_ray(cfg: "RayConfig") -> str:
    """Join ``cfg.address`` or ``$RAY_ADDRESS`` when set, else start a local Ray with
    ``cfg.num_cpus`` / ``cfg.num_gpus``. A Ray already initialized in this process is kept.
    Returns a one-line description of the cluster for the job's log."""
    import ray

    global _started_local
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
            _started_local = True
    resources = ray.cluster_resources()
    return (f"Ray {ray.__version__} at {ray.get_runtime_context().gcs_address}: "
            f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")


def started_local_ray() -> bool:
    """Whether ``init_ray`` started the Ray of this process as a local one: a fixed-size cluster
    with no autoscaler, where work asking for more than it has waits forever."""
    return _started_local


def actor_pool_args(pool: "ActorPoolConfig", key: str, work_units: int | None = None,
                    tasks_in_flight: int | None = None, initial_actors: int | None = None) -> dict:
    """``map_batches`` keyword arguments for an actor pool from its config: resources per actor and
    ``compute=ActorPoolStrategy(min, max)``, the bounds capped at ``work_units`` when given (no idle
    actors for a short round; ``max_actors`` None: no bound but that one). ``tasks_in_flight`` > 1
    lets an actor start its next unit the moment one ends, and Ray Data's pool autoscaler grows only
    pools whose actors can queue work. ``initial_actors``: the pool's size at start. ``key``: the
    pool's config key (e.g. ``generate.actors``), named by ``check_pool_fits``'s error, which is
    raised here on a local Ray this process started."""
    import ray

    if started_local_ray():
        check_pool_fits(pool, key, ray.cluster_resources())

    bounds = [n for n in (pool.max_actors, work_units) if n is not None]
    max_size = max(1, min(bounds)) if bounds else None
    min_size = pool.min_actors if max_size is None else min(pool.min_actors, max_size)
    if initial_actors is not None:
        initial_actors = max(min_size, initial_actors if max_size is None
                             else min(initial_actors, max_size))
    return {**_resources(pool), "compute": ray.data.ActorPoolStrategy(
        min_size=min_size, max_size=max_size, initial_size=initial_actors,
        max_tasks_in_flight_per_actor=tasks_in_flight)}


def check_pool_fits(pool: "ActorPoolConfig", key: str, cluster: dict[str, float]) -> None:
    """Fail fast where Ray would wait forever: raise ``ValueError`` when one actor (or task) of
    ``pool`` asks for more of a resource than the whole fixed-size ``cluster``
    (``ray.cluster_resources()``) has — GPU actors on a CPU-only local Ray hung with only an
    autoscaler warning. The message names ``key`` and the settings that fix it."""
    asked = {"GPU": pool.num_gpus, "CPU": pool.num_cpus, **pool.resources}
    short = {name: amount for name, amount in asked.items()
             if amount > 0 and amount > cluster.get(name, 0.0) + 1e-9}
    if not short:
        return
    have = ", ".join(f"{name} {cluster.get(name, 0.0):g}" for name in short)
    want = ", ".join(f"{name} {amount:g}" for name, amount in short.items())
    fixes = []
    if "GPU" in short:
        fixes.append(f"run on the CPU with --{key}.num_gpus=0, or start the local Ray with "
                     "GPUs (--ray.num_gpus=N on a machine that has them)")
    if "CPU" in short:
        fixes.append(f"lower --{key}.num_cpus or raise --ray.num_cpus")
    if set(short) - {"GPU", "CPU"}:
        fixes.append(f"drop the custom resources of {key}.resources (they name node types of an "
                     "autoscaling cluster, cluster/*.yaml)")
    raise ValueError(
        f"{key} asks for {want} per actor but this local Ray has {have} in all, so its actors "
        f"would wait forever (no autoscaler adds nodes to a local Ray): {'; '.join(fixes)}; or "
        "submit the job to a cluster that has them (ray job submit, or --ray.address)")


def task_pool_args(pool: "ActorPoolConfig") -> dict:
    """``map_batches`` keyword arguments for a stage run as Ray Data tasks: resources per task, and
    at most ``max_actors`` tasks in flight (None: as many as Ray Data schedules)."""
    import ray

    args = _resources(pool)
    if pool.max_actors is not None:
        args["compute"] = ray.data.TaskPoolStrategy(size=pool.max_actors)
    return args


def _resources(pool: "ActorPoolConfig") -> dict:
    return {"num_gpus": pool.num_gpus, "num_cpus": pool.num_cpus,
            "resources": pool.resources or None}


DType = Literal["float16", "bfloat16", "float32"]


def pick_device(num_gpus: float, what: str = "this stage") -> "torch.device":
    """CUDA when the worker asked for a GPU and one is really there; else the CPU, with a warning
    when a GPU was asked for (fake GPU nodes in autoscaling tests, misconfigured images)."""
    import torch

    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    if num_gpus > 0:
        warnings.warn(f"{what} asked for num_gpus={num_gpus:g} but no CUDA device is present: "
                      "running on the CPU in float32", RuntimeWarning, stacklevel=2)
    return torch.device("cpu")


def torch_dtype(name: DType, device: "torch.device") -> "torch.dtype":
    """The compute dtype of a config's ``dtype`` on ``device``: the CPU always runs float32."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


@contextlib.contextmanager
def task_errors_as(*kinds: type[BaseException]) -> Iterator[None]:
    """Inside: an error of a Ray task or actor (``RayTaskError``, as Ray Data raises it on the
    driver) or of a Ray Train worker (``WorkerGroupError.worker_failures``) whose cause is one of
    ``kinds`` is raised as that kind with the cause's own message, not a message that is the
    worker's whole traceback; ``raise ... from`` keeps that traceback. Other errors pass."""
    try:
        yield
    except Exception as err:
        cause = next((c for c in _causes(err) if c is not err and isinstance(c, kinds)
                      and type(c).__module__ != "ray.exceptions"), None)
        if cause is None:
            raise
        raise type(cause)(*cause.args) from err


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what caused it: Ray's ``cause``, ``__cause__``, Ray Train's worker failures."""
    seen, stack = set(), [err]
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        failures = getattr(error, "worker_failures", None) or {}
        stack += [c for c in (*failures.values(), error.__cause__, getattr(error, "cause", None))
                  if isinstance(c, BaseException)]
