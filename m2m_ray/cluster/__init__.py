"""Cluster files checked offline, before anything is launched or paid for.

``validate_cluster_yaml(path)`` runs Ray's own checks on a cluster-launcher YAML — ``prepare_config``
(merge the provider's defaults, as ``ray up`` does) then ``validate_config`` (Ray's JSON schema plus
its cross-field rules) — and then this project's rules: the custom resources the pipelines request
are offered by the right GPU node types, GPU node types scale to zero, and on clouds every node
runs with token authentication, the token arrives as a file (never in the YAML) and the dashboard
listens on loopback only. ``validate_kuberay_manifests(path)`` checks RayCluster/RayJob manifests
for the fields a RayJob needs and the same rules.

    python -m m2m_ray.cluster cluster/aws.yaml cluster/gcp.yaml cluster/kuberay/*.yaml
    python -m m2m_ray.cluster --strict cluster/aws.yaml   # also fail on REPLACE_ placeholders left
    python -m m2m_ray.cluster --job configs/build_mis.yaml cluster/aws.yaml  # its pools fit

The pipelines place their work with these custom resources (one unit per GPU of the node):
``gen_gpu`` for image generation (build_mis stage 2), ``train_gpu`` for training. Ray Data's own
scale-up requests drop them; ``placement`` checks where those land (shapes, and ``--job``: pool
sizes).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from m2m_ray.cluster.placement import pool_capacity_problems, stage_bundle_problems

# custom resource → the work that requests it; a GPU node type offers exactly one of them.
PIPELINE_RESOURCES = {"gen_gpu": "image generation (build_mis)", "train_gpu": "training (train)"}
# entry script → the resource its GPU work requests
SCRIPT_RESOURCES = {"build_mis": "gen_gpu", "train": "train_gpu"}
TOKEN_FILE = "~/.ray/auth_token"
PLACEHOLDER = "REPLACE_"
_LOOPBACK = ("127.0.0.1", "localhost")
# The wheel lacks this provider's defaults file, so prepare_config cannot run on it; the autoscaler
# reads such a YAML as it is, without merging defaults, so it must be complete already: these are
# the keys StandardAutoscaler reads without a default (Ray 2.60).
_NO_DEFAULTS_PROVIDERS = ("fake_multinode",)
_AUTOSCALER_KEYS = ("auth", "available_node_types", "cluster_name", "cluster_synced_files",
                    "file_mounts", "head_node_type", "idle_timeout_minutes", "max_workers",
                    "worker_setup_commands", "worker_start_ray_commands")
# fake multinode on one machine (Ray 2.60): nodes are processes, not hosts to SSH into
_FAKE_PROVIDER_FLAGS = ("use_node_id_as_ip", "disable_node_updaters", "disable_launch_config_check")


class ClusterConfigError(ValueError):
    """A cluster file that Ray or this project's rules reject; the message lists every problem."""


def _load_documents(path: str | Path) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc is not None]
    except yaml.YAMLError as err:
        raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def placeholders(path: str | Path) -> list[str]:
    """The ``REPLACE_...`` values (not comments) still left in a file: account, image, ref..."""
    return sorted({found for doc in _load_documents(path) for text in _strings(doc)
                   for found in re.findall(rf"{PLACEHOLDER}[A-Z0-9_]+", text)})


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher YAMLs (aws, gcp, fake multinode)
# ---------------------------------------------------------------------------------------------


def _ray_checks(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Ray's own offline validation; returns the config as ``ray up`` would use it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider = (raw.get("provider") or {}).get("type")
    try:
        prepared = (copy.deepcopy(raw) if provider in _NO_DEFAULTS_PROVIDERS
                    else prepare_config(copy.deepcopy(raw)))
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "top level"
        raise ClusterConfigError(f"{path}: Ray rejects the cluster config at {where}: "
                                 f"{err.message}") from None
    except (ValueError, RuntimeError, KeyError, TypeError, AssertionError,
            NotImplementedError) as err:
        raise ClusterConfigError(f"{path}: Ray rejects the cluster config: "
                                 f"{type(err).__name__}: {err}") from None
    return prepared


def _node_type_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    offered: set[str] = set()
    head = config["head_node_type"]
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        pipeline = sorted(set(resources) & set(PIPELINE_RESOURCES))
        gpus = resources.get("GPU", 0)
        if name == head:
            if gpus or pipeline:
                problems.append(f"head node type '{name}' offers {resources}; the head must stay "
                                "a CPU node so that no GPU runs while the cluster idles")
            continue
        if pipeline and not gpus:
            problems.append(f"node type '{name}' offers {pipeline} but declares no GPU count; "
                            "add resources.GPU")
        if gpus:
            if node_type.get("min_workers", 0) != 0:
                problems.append(f"GPU node type '{name}' has min_workers "
                                f"{node_type['min_workers']}; set 0 so idle GPUs are released")
            if len(pipeline) != 1 or resources[pipeline[0]] != gpus:
                problems.append(
                    f"GPU node type '{name}' offers {resources}; expected exactly one of "
                    f"{sorted(PIPELINE_RESOURCES)} with the same count as GPU ({gpus}), so the "
                    "pipelines land on the node type meant for them")
        offered.update(pipeline)
    problems += stage_bundle_problems({name: node_type.get("resources", {}) for name, node_type
                                       in config["available_node_types"].items() if name != head})
    for resource in sorted(set(PIPELINE_RESOURCES) - offered):
        problems.append(f"no node type offers '{resource}', which "
                        f"{PIPELINE_RESOURCES[resource]} requests; its jobs would never start")
    return problems


def _fake_provider_problems(config: dict[str, Any]) -> list[str]:
    problems = [f"missing '{key}': the autoscaler reads this file as it is (no defaults are "
                "merged for the fake provider)" for key in _AUTOSCALER_KEYS if key not in config]
    provider = config["provider"]
    for flag in _FAKE_PROVIDER_FLAGS:
        if provider.get(flag) is not True:
            problems.append(f"provider.{flag} is {provider.get(flag)!r}; the fake multinode "
                            "provider needs true")
    gcs = str(provider.get("gcs_address", ""))
    if not re.fullmatch(r"[\w.\-]+:\d+", gcs) or gcs.endswith(":6379"):
        problems.append(f"provider.gcs_address is {gcs!r}; give host:port of the head's --port, "
                        "off the default 6379 so a test cluster never meets a real one")
    return problems


def _security_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    if TOKEN_FILE not in config.get("file_mounts", {}):
        problems.append(f"file_mounts has no '{TOKEN_FILE}': every node needs the Ray auth token "
                        "as a file (`ray get-auth-token --generate` writes it locally)")
    if any("RAY_AUTH_TOKEN=" in text for text in _strings(config)):
        problems.append("the YAML sets RAY_AUTH_TOKEN=...: the token must not live in a file that "
                        f"is shared and logged; distribute it as {TOKEN_FILE} through file_mounts")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if re.search(r"\bray start\b", c)]
        if not starts:
            problems.append(f"{key} has no `ray start` command")
        for command in starts:
            if not re.search(r"\bRAY_AUTH_MODE=token\b", command.split("ray start")[0]):
                problems.append(f"{key}: `{command.strip()}` does not run with "
                                "RAY_AUTH_MODE=token; prefix it with `RAY_AUTH_MODE=token`")
            if key == "head_start_ray_commands":
                host = re.search(r"--dashboard-host[= ](\S+)", command)
                if host is None or host.group(1).strip("'\"") not in _LOOPBACK:
                    given = host.group(1) if host else "not set"
                    problems.append(
                        f"head `ray start` binds the dashboard to {given}; pass "
                        "--dashboard-host=127.0.0.1 and reach it with `ray dashboard <yaml>`")
    return problems


def validate_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """Ray's offline validation plus this project's rules; returns the prepared config."""
    documents = _load_documents(path)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ClusterConfigError(f"{path}: expected one YAML mapping (a Ray cluster config), "
                                 f"got {len(documents)} document(s)")
    prepared = _ray_checks(documents[0], path)
    if prepared["provider"]["type"] in _NO_DEFAULTS_PROVIDERS:
        problems = _fake_provider_problems(prepared)
        if problems:  # the node-type checks below need a complete config
            raise ClusterConfigError(f"{path}:\n  " + "\n  ".join(problems))
        problems = _node_type_problems(prepared)
    else:
        problems = _node_type_problems(prepared) + _security_problems(prepared)
    if problems:
        raise ClusterConfigError(f"{path}:\n  " + "\n  ".join(problems))
    return prepared


# ---------------------------------------------------------------------------------------------
# KubeRay manifests (RayCluster, RayJob)
# ---------------------------------------------------------------------------------------------


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return (template or {}).get("spec", {}).get("containers", [])


def _gpu_limit(template: dict[str, Any]) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in _containers(template))


def _ray_cluster_spec_problems(spec: dict[str, Any], where: str) -> list[str]:
    import ray

    problems = []
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"{where}.rayVersion is {spec.get('rayVersion')!r}; expected "
                        f"'{ray.__version__}', the Ray this project pins")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling must be true (GPU groups scale from 0)")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode must be 'token' (KubeRay then creates the "
                        "token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every pod)")
    head = spec.get("headGroupSpec") or {}
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}.headGroupSpec.serviceType is {head['serviceType']!r}; keep "
                        "ClusterIP and reach the dashboard with `kubectl port-forward`")
    if _gpu_limit(head.get("template", {})):
        problems.append(f"{where}.headGroupSpec asks for GPUs; the head must be a CPU pod")
    templates = [head.get("template", {})] + [g.get("template", {})
                                              for g in spec.get("workerGroupSpecs", [])]
    images = {c.get("image", "") for t in templates for c in _containers(t)}
    for image in sorted(images):
        if ":" not in image or image.endswith(":latest"):
            problems.append(f"{where}: image {image!r} is not pinned; use an explicit version tag")
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}.workerGroupSpecs is empty")
    problems += [f"{where}: {p}" for p in stage_bundle_problems(
        {name: resources for name, (resources, _) in _kuberay_node_types(spec).items()})]
    for group in groups:
        name = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        gpus = _gpu_limit(group.get("template", {}))
        resources = {k: int(v) for k, v in (group.get("resources") or {}).items()}
        pipeline = sorted(set(resources) & set(PIPELINE_RESOURCES))
        if group.get("minReplicas") is None or group.get("maxReplicas") is None:
            problems.append(f"{name} needs minReplicas and maxReplicas for the autoscaler")
        if gpus:
            if group.get("minReplicas") != 0 or group.get("replicas", 0) != 0:
                problems.append(f"{name} is a GPU group: set replicas and minReplicas to 0")
            if len(pipeline) != 1 or resources[pipeline[0]] != gpus:
                problems.append(f"{name} has {gpus} GPU(s) and resources {resources}; expected "
                                f"exactly one of {sorted(PIPELINE_RESOURCES)} equal to its GPUs")
        elif pipeline:
            problems.append(f"{name} offers {pipeline} without nvidia.com/gpu limits")
    return problems


def _cpu_limit(template: dict[str, Any]) -> float:
    def cores(value: Any) -> float:
        text = str(value)
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return sum(cores(c.get("resources", {}).get("limits", {}).get("cpu", 0))
               for c in _containers(template))


def _kuberay_node_types(spec: dict[str, Any]) -> dict[str, tuple[dict[str, float], int]]:
    """worker group name → (the Ray resources its pods advertise, maxReplicas)."""
    types = {}
    for group in spec.get("workerGroupSpecs") or []:
        template = group.get("template", {})
        resources = {"CPU": _cpu_limit(template), "GPU": float(_gpu_limit(template)),
                     **{k: float(v) for k, v in (group.get("resources") or {}).items()}}
        types[str(group.get("groupName"))] = (resources, int(group.get("maxReplicas") or 0))
    return types


def _ray_job_problems(job: dict[str, Any], where: str) -> list[str]:
    spec = job.get("spec") or {}
    problems = []
    entrypoint = spec.get("entrypoint", "")
    match = re.match(r"python pipelines/(\w+)\.py --config \S+", entrypoint)
    if match is None:
        problems.append(f"{where}.entrypoint is {entrypoint!r}; expected "
                        "'python pipelines/<script>.py --config <yaml> ...'")
    try:
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError as err:
        runtime_env = None
        problems.append(f"{where}.runtimeEnvYAML is not valid YAML: {err}")
    if not isinstance(runtime_env, dict) or "working_dir" not in runtime_env:
        problems.append(f"{where}.runtimeEnvYAML must be a mapping with working_dir (the pinned "
                        "project archive the entrypoint runs in)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}.shutdownAfterJobFinishes must be true (release the GPUs)")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or ttl < 0:
        problems.append(f"{where}.ttlSecondsAfterFinished is {ttl!r}; expected seconds >= 0")
    cluster_spec = spec.get("rayClusterSpec")
    if not isinstance(cluster_spec, dict):
        problems.append(f"{where}.rayClusterSpec is missing (the job's own autoscaling cluster)")
        return problems
    problems += _ray_cluster_spec_problems(cluster_spec, f"{where}.rayClusterSpec")
    if match and match.group(1) in SCRIPT_RESOURCES:
        needed = SCRIPT_RESOURCES[match.group(1)]
        offered = {k for g in cluster_spec.get("workerGroupSpecs", [])
                   for k in (g.get("resources") or {})}
        if needed not in offered:
            problems.append(f"{where}: pipelines/{match.group(1)}.py requests '{needed}' but no "
                            "worker group offers it")
    return problems


def validate_kuberay_manifests(path: str | Path) -> list[dict[str, Any]]:
    """Check every RayCluster/RayJob in a manifest file; returns the parsed documents."""
    documents = _load_documents(path)
    problems = []
    if not documents:
        problems.append("no YAML documents")
    for i, doc in enumerate(documents):
        kind = doc.get("kind") if isinstance(doc, dict) else None
        where = f"{kind or 'document'} {(doc.get('metadata') or {}).get('name', i)}" \
            if isinstance(doc, dict) else f"document {i}"
        if kind not in ("RayCluster", "RayJob") or doc.get("apiVersion") != "ray.io/v1":
            problems.append(f"{where}: expected apiVersion ray.io/v1 and kind RayCluster or "
                            f"RayJob, got {doc.get('apiVersion') if isinstance(doc, dict) else doc!r}"
                            f" / {kind!r}")
            continue
        if kind == "RayCluster":
            problems += _ray_cluster_spec_problems(doc.get("spec") or {}, f"{where}.spec")
        else:
            problems += _ray_job_problems(doc, where)
    if problems:
        raise ClusterConfigError(f"{path}:\n  " + "\n  ".join(problems))
    return documents


# ---------------------------------------------------------------------------------------------
# A job's actor pools against a cluster's node types
# ---------------------------------------------------------------------------------------------


def node_types_of(path: str | Path) -> dict[str, tuple[dict[str, float], int]]:
    """node type (or KubeRay worker group) → (its Ray resources, its max_workers/maxReplicas),
    from a validated cluster YAML or KubeRay manifest (RayCluster, or a RayJob's cluster)."""
    if _is_kuberay(Path(path)):
        types = {}
        for doc in validate_kuberay_manifests(path):
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            types.update(_kuberay_node_types(spec))
        return types
    config = validate_cluster_yaml(path)
    return {name: (t.get("resources", {}), int(t.get("max_workers", 0)))
            for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]}


def _is_kuberay(path: Path) -> bool:
    documents = _load_documents(path)
    return bool(documents) and all(isinstance(d, dict) and "apiVersion" in d for d in documents)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--strict", action="store_true",
                        help="also fail when REPLACE_ placeholders are left (before `ray up`)")
    parser.add_argument("--job", type=Path, action="append", default=[],
                        help="a pipeline config (e.g. configs/build_mis.yaml) whose pinned GPU "
                             "actor pools must fit each cluster's node types; repeatable")
    args = parser.parse_args(argv)
    failed = False
    for path in args.paths:
        try:
            if _is_kuberay(path):
                validate_kuberay_manifests(path)
            else:
                validate_cluster_yaml(path)
            for job in args.job:
                problems = pool_capacity_problems(node_types_of(path), _load_documents(job)[0])
                if problems:
                    raise ClusterConfigError(f"{path} with {job}:\n  " + "\n  ".join(problems))
        except (ClusterConfigError, OSError) as err:
            print(f"FAIL {err}", file=sys.stderr)
            failed = True
            continue
        left = placeholders(path)
        if left and args.strict:
            print(f"FAIL {path}: fill in {', '.join(left)}", file=sys.stderr)
            failed = True
        else:
            print(f"ok   {path}" + (f" (still to fill in: {', '.join(left)})" if left else ""))
    return 1 if failed else 0
