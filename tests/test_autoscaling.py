"""Autoscaling on one machine: Ray's fake multinode provider with cluster/local/fake-multinode.yaml.

The head has no CPUs and no worker runs at the start. A job whose work asks for GPUs makes the
autoscaler start fake GPU nodes (Ray processes on this machine that advertise `GPU: 1` and the
pipelines' custom resource); the job finishes; the GPU nodes go away after the YAML's idle timeout.

The workload is a parameter (`WORKLOADS`): what a job runs does not change the harness.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import ray_turn
from ray_head import RayHead, free_port, start_head, wait_for_job

from m2m_ray.cluster import validate_cluster_yaml

ROOT = Path(__file__).resolve().parents[1]
FAKE_YAML = ROOT / "cluster/local/fake-multinode.yaml"


def start_fake_cluster(timeout_s: float = 120.0) -> tuple[RayHead, dict]:
    """A token-auth head on loopback whose autoscaler runs the fake multinode provider.

    The YAML is copied with `provider.gcs_address` set to this head's free port. Stopped like any
    test head: by its process group id (the fake nodes are children of its autoscaler)."""
    temp_dir = tempfile.mkdtemp(prefix="rayfake", dir="/tmp")
    gcs_port = free_port()
    config = yaml.safe_load(FAKE_YAML.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    config_path = Path(temp_dir, "fake-multinode.yaml")
    config_path.write_text(yaml.safe_dump(config))
    validate_cluster_yaml(config_path)
    head = start_head(num_cpus=0, gcs_port=gcs_port, temp_dir=temp_dir, timeout_s=timeout_s,
                      extra_args=(f"--autoscaling-config={config_path}",),
                      env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    return head, config


@dataclass
class FakeCluster:
    head: RayHead
    config: dict  # the YAML as the autoscaler reads it
    up_s: float  # seconds the head took to start


@pytest.fixture
def fake_cluster():
    """A fresh fake cluster, started in this test's Ray turn. Waiting for the turn (other pytest
    runs on the machine) happens here, outside the tests' timeouts, which are `func_only`: they
    time the test body, where a hang of the job or the autoscaler would show."""
    with ray_turn():
        started = time.monotonic()
        head, config = start_fake_cluster()
        try:
            yield FakeCluster(head, config, time.monotonic() - started)
        finally:
            head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)


def _get(head: RayHead, path: str):
    request = urllib.request.Request(head.dashboard_url + path, headers=head.auth_headers)
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def alive_worker_nodes(head: RayHead) -> dict[str, dict[str, float]]:
    """node id → total resources of every alive non-head node (the dashboard's state API)."""
    nodes = _get(head, "/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]
    return {n["node_id"]: n["resources_total"] for n in nodes
            if n["state"] == "ALIVE" and not n["is_head_node"]}


@dataclass
class NodeSampler:
    """Polls the alive worker nodes once a second in the background."""

    head: RayHead
    seen: dict[str, dict[str, float]] = field(default_factory=dict)
    max_gpu_nodes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "NodeSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                nodes = alive_worker_nodes(self.head)
            except OSError:
                nodes = {}
            self.seen.update(nodes)
            self.max_gpu_nodes = max(self.max_gpu_nodes,
                                     sum(1 for r in nodes.values() if r.get("GPU")))
            self._stop.wait(1.0)


@dataclass
class Workload:
    """A job for the fake cluster: its entrypoint, the custom resource its GPU work asks for,
    and a check of its logs."""

    name: str
    entrypoint: Callable[[Path], str]  # output folder → shell command run in the working dir
    gpu_resource: str | None
    check: Callable[[str, Path, dict[str, dict[str, float]]], None]  # logs, output, GPU nodes
    timeout_s: float = 180.0


def _build_mis(out: Path) -> str:
    """pipelines/build_mis.py on the tiny preset; its generation actors ask for a GPU and the
    generation node type's resource, as configs/build_mis.yaml does on a real cluster."""
    return ("python pipelines/build_mis.py --config configs/tiny/build_mis.yaml "
            f"--output_uri={out} --stages='[captions, generate]' --generate.actors.num_gpus=1 "
            "--generate.actors.resources='{gen_gpu: 1}' --generate.actors.min_actors=1 "
            "--generate.actors.max_actors=2 --generate.images_per_caption=4 "
            "--generate.num_inference_steps=2")


def _check_build_mis(logs: str, out: Path, gpu_nodes: dict[str, dict[str, float]]) -> None:
    from m2m_ray.formats.mis import MISLayout
    from m2m_ray.mis.verify import verify_mis

    assert "== stage generate done" in logs, logs[-3000:]
    problems, summary = verify_mis(str(out))
    assert problems == [] and summary["sets"] == 38, (problems, summary)
    # every shard was generated by an actor on one of the new GPU nodes
    nodes = {stats["ray_node_id"] for stats in MISLayout(str(out)).committed_stats().values()}
    assert nodes <= set(gpu_nodes), (nodes, gpu_nodes)


WORKLOADS = [
    Workload("build_mis", _build_mis, "gen_gpu", _check_build_mis, timeout_s=300.0),
]


def autoscaler_events(head: RayHead) -> list[str]:
    """The autoscaler's own account: 'Adding 2 node(s) of type X.', 'Removing 2 nodes of type X
    (idle).' from the head's monitor.log."""
    log = Path(head.temp_dir, "session_latest", "logs", "monitor.log")
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line.split(":event_summary:", 1)[1] for line in lines if ":event_summary:" in line]


def _event_types(events: list[str], verb: str) -> set[str]:
    return {m.group(1) for e in events if (m := re.match(rf"{verb} .* of type (\S+?)\.?( |$)", e))}


# A job that makes the request Ray Data's cluster autoscaler makes for one generation actor (Ray
# 2.60: per-actor ExecutionResources(num_cpus, num_gpus, memory) → request_resources bundle; the
# actor's custom resources are not part of it), waits for a GPU node, then withdraws the request.
_RAY_DATA_REQUEST = """
import json, sys, time
import ray
from ray.autoscaler.sdk import request_resources
from ray.data._internal.cluster_autoscaler.rate_based_cluster_autoscaler import _to_resource_bundle
from ray.data._internal.execution.interfaces import ExecutionResources
from m2m_ray.config import ActorPoolConfig
from m2m_ray.runtime import actor_pool_args

ray.init()
args = actor_pool_args(ActorPoolConfig(**json.loads(sys.argv[1])), "generate.actors")
bundle = _to_resource_bundle(ExecutionResources(cpu=args["num_cpus"], gpu=args["num_gpus"]))
print("Ray Data bundle:", bundle, "actor:", args["resources"], flush=True)
request_resources(bundles=[bundle])
deadline = time.monotonic() + 90
while not any(n["Alive"] and n["Resources"].get("GPU") for n in ray.nodes()):
    assert time.monotonic() < deadline, "no GPU node within 90 s"
    time.sleep(0.5)
request_resources(bundles=[])
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240, func_only=True)
def test_ray_data_gpu_request_launches_the_stage_node_type(fake_cluster, tmp_path):
    """Issue 28: Ray Data's scale-up request for a generation actor ({GPU: 1, gen_gpu: 1}) carries
    CPU and GPU only, so the autoscaler picks the node type by shape. It must pick gen_gpu_worker;
    with the old fake shapes (train_gpu_worker shaped like gen_gpu_worker) the tie went to
    train_gpu_worker every time."""
    script = tmp_path / "ray_data_request.py"
    script.write_text(_RAY_DATA_REQUEST)
    pool = {"num_gpus": 1, "num_cpus": 1, "resources": {"gen_gpu": 1}, "max_actors": 2}
    head = fake_cluster.head
    job_id = head.job_client().submit_job(entrypoint=f"python {script} '{json.dumps(pool)}'",
                                          runtime_env={"working_dir": str(ROOT)})
    status = wait_for_job(head, job_id, timeout_s=150)
    logs = head.job_client().get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "Ray Data bundle: {'CPU': 1.0, 'GPU': 1.0} actor: {'gen_gpu': 1.0}" in logs, logs
    for _ in range(20):  # the autoscaler's log may trail the node by an update interval
        added = _event_types(autoscaler_events(head), "Adding")
        if added:
            break
        time.sleep(0.5)
    assert added == {"gen_gpu_worker"}, autoscaler_events(head)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420, func_only=True)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_gpu_job_scales_fake_cluster_up_and_back_down(workload, fake_cluster, tmp_path):
    head, config = fake_cluster.head, fake_cluster.config
    assert alive_worker_nodes(head) == {}, "the cluster must start with no worker"
    idle_s = config["idle_timeout_minutes"] * 60
    with NodeSampler(head) as sampler:
        job_id = head.job_client().submit_job(
            entrypoint=workload.entrypoint(tmp_path / "out"),
            runtime_env={"working_dir": str(ROOT)})
        submitted = time.monotonic()
        status = wait_for_job(head, job_id, timeout_s=workload.timeout_s)
        logs = head.job_client().get_job_logs(job_id)
        info = head.job_client().get_job_info(job_id)
        assert status == "SUCCEEDED", f"{info.message}\n{logs[-5000:]}"
        finished = time.monotonic()
        # scale-down: every GPU node leaves once idle for idle_timeout_minutes
        while any(r.get("GPU") for r in alive_worker_nodes(head).values()):
            assert time.monotonic() < finished + idle_s + 60, (
                f"GPU nodes still alive {time.monotonic() - finished:.0f} s after the "
                f"job ended (idle timeout {idle_s:.0f} s): {alive_worker_nodes(head)}; "
                f"autoscaler: {autoscaler_events(head)}")
            time.sleep(1)
        gone_after_s = time.monotonic() - finished
    gpu_nodes = {n: r for n, r in sampler.seen.items() if r.get("GPU")}
    assert gpu_nodes, f"no GPU node was launched; saw {sampler.seen}; " \
        f"autoscaler: {autoscaler_events(head)}"
    node_types = config["available_node_types"]
    # the autoscaler itself says it added GPU node types and removed them as idle (its log
    # may trail the state API by an update interval)
    for _ in range(20):
        events = autoscaler_events(head)
        added = {t for t in _event_types(events, "Adding")
                 if node_types[t]["resources"].get("GPU")}
        idle = _event_types([e for e in events if e.endswith("(idle).")], "Removing")
        if added and added <= idle:
            break
        time.sleep(0.5)
    assert added and added <= idle, events
    if workload.gpu_resource:
        assert all(r.get(workload.gpu_resource) == r["GPU"] for r in gpu_nodes.values()), (
            f"GPU work asked for {workload.gpu_resource} but landed elsewhere: "
            f"{gpu_nodes}; autoscaler: {events}")
    workload.check(logs, tmp_path / "out", gpu_nodes)
    print(f"{workload.name}: head up in {fake_cluster.up_s:.0f} s; job ran "
          f"{finished - submitted:.0f} s on {len(gpu_nodes)} GPU nodes of {sorted(added)} "
          f"(at most {sampler.max_gpu_nodes} at once); all gone {gone_after_s:.0f} s "
          f"after the job ended (idle timeout {idle_s:.0f} s); autoscaler: {events}")
