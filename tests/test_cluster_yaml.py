"""Cluster files pass Ray's own offline validation and this project's rules; broken ones do not."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from m2m_ray.cluster import (
    ClusterConfigError,
    main,
    node_types_of,
    placeholders,
    pool_capacity_problems,
    stage_bundle_problems,
    validate_cluster_yaml,
    validate_kuberay_manifests,
)

ROOT = Path(__file__).resolve().parents[1]
CLOUD_YAMLS = {"aws": ROOT / "cluster/aws.yaml", "gcp": ROOT / "cluster/gcp.yaml"}
FAKE_YAML = ROOT / "cluster/local/fake-multinode.yaml"
KUBERAY = sorted((ROOT / "cluster/kuberay").glob("*.yaml"))
# instance families per GPU node type: inference-class for generation, A100/H100 for training
GPU_FAMILIES = {
    "aws": {"gen_gpu": ("g6.", "g5.", "g6e."), "train_gpu": ("p4d.", "p4de.", "p5.")},
    "gcp": {"gen_gpu": ("g2-",), "train_gpu": ("a2-", "a3-")},
}


def _instance(provider: str, node_config: dict) -> str:
    return node_config["InstanceType" if provider == "aws" else "machineType"]


@pytest.mark.parametrize("provider", sorted(CLOUD_YAMLS))
def test_cloud_yaml_passes_ray_validation_and_places_gpu_work(provider):
    config = validate_cluster_yaml(CLOUD_YAMLS[provider])
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    by_resource = {}
    for name, node_type in types.items():
        for resource in ("gen_gpu", "train_gpu"):
            if resource in node_type["resources"]:
                by_resource[resource] = node_type
    assert set(by_resource) == {"gen_gpu", "train_gpu"}
    for resource, node_type in by_resource.items():
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1
        assert _instance(provider, node_type["node_config"]).startswith(
            GPU_FAMILIES[provider][resource])
    cpu_only = [t for t in types.values() if "GPU" not in t["resources"] and t is not head]
    assert cpu_only and all(t["min_workers"] == 0 for t in cpu_only)
    assert 0 < config["idle_timeout_minutes"] and config["max_workers"] >= sum(
        t["max_workers"] for n, t in types.items() if n != config["head_node_type"])
    # what `ray up` will run: token auth on every node, dashboard on loopback, token as a file
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("scripts/setup.sh" in c and "torch==2.13.0" in c for c in config["setup_commands"])
    if provider == "aws":
        # our own security group on every node: Ray's default one admits SSH from 0.0.0.0/0
        assert all(t["node_config"].get("SecurityGroupIds") for t in types.values())


def test_aws_profiles_let_the_head_launch_workers_and_nothing_more():
    """The head's profile may pass the workers' role (else RunInstances with a profile fails), and
    every profile reaches S3 on the data bucket only."""
    types = yaml.safe_load(CLOUD_YAMLS["aws"].read_text())["available_node_types"]
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
                for name, t in types.items()}
    assert profiles.pop("head") == "m2m-ray-head"
    assert set(profiles.values()) == {"m2m-ray-worker"}
    policies = {name: json.loads((ROOT / f"cluster/aws-iam/{name}-policy.json").read_text())
                for name in ("data-bucket", "autoscaler")}
    head = {st["Sid"]: st for st in policies["autoscaler"]["Statement"]}
    assert head["WorkersGetTheirOwnProfile"]["Resource"].endswith(":role/m2m-ray-worker")
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags"} <= set(
        head["AutoscalerLaunchesAndTerminatesNodes"]["Action"])
    for name, policy in policies.items():
        for statement in policy["Statement"]:
            actions = [statement["Action"]] if isinstance(statement["Action"], str) \
                else statement["Action"]
            assert statement["Effect"] == "Allow" and "*" not in actions, (name, statement)
            if any(a.startswith("s3:") for a in actions):
                assert name == "data-bucket" and all(a.startswith("s3:") for a in actions)
                assert statement["Resource"] in ("arn:aws:s3:::REPLACE_BUCKET",
                                                 "arn:aws:s3:::REPLACE_BUCKET/*"), (name, statement)


def test_fake_multinode_yaml_is_complete_for_the_autoscaler():
    config = validate_cluster_yaml(FAKE_YAML)
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    for key in ("use_node_id_as_ip", "disable_node_updaters", "disable_launch_config_check"):
        assert provider[key] is True
    assert not provider["gcs_address"].endswith(":6379")
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert placeholders(FAKE_YAML) == []


def _broken(tmp_path, source: Path, mutate) -> Path:
    config = copy.deepcopy(yaml.safe_load(source.read_text()))
    mutate(config)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(config))
    return path


def _set(path: str, value):
    def mutate(config):
        *parents, last = path.split("/")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    return mutate


def _replace_in(key: str, old: str, new: str):
    def mutate(config):
        config[key] = [c.replace(old, new) for c in config[key]]
    return mutate


BROKEN_CLOUD = {
    "unknown top-level key": (_set("idle_timeout_minute", 5), "idle_timeout_minute"),
    "bad type": (_set("max_workers", "many"), "max_workers"),
    "unknown node-type key": (_set("available_node_types/cpu_worker/min_worker", 0),
                              "min_worker"),
    "fractional resource": (_set("available_node_types/gen_gpu_worker/resources/GPU", 0.5),
                            "GPU"),
    "head type missing": (_set("head_node_type", "nope"), "head_node_type"),
    "GPU type kept warm": (_set("available_node_types/train_gpu_worker/min_workers", 1),
                           "min_workers 1"),
    "resource count != GPUs": (_set("available_node_types/train_gpu_worker/resources/train_gpu",
                                    1), "same count as GPU"),
    "public dashboard": (_replace_in("head_start_ray_commands", "--dashboard-host=127.0.0.1",
                                     "--dashboard-host=0.0.0.0"), "binds the dashboard to 0.0.0.0"),
    "worker without token auth": (_replace_in("worker_start_ray_commands", "RAY_AUTH_MODE=token ",
                                              ""), "RAY_AUTH_MODE=token"),
    "token in the YAML": (_replace_in("setup_commands", "chmod 600",
                                      "export RAY_AUTH_TOKEN=abc; chmod 600"),
                          "sets RAY_AUTH_TOKEN"),
    "token not mounted": (_set("file_mounts", {}), "~/.ray/auth_token"),
    "gen node as large as train": (
        _set("available_node_types/gen_gpu_worker/resources", {"CPU": 96, "GPU": 8, "gen_gpu": 8}),
        "scores train_gpu_worker at least as high"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CLOUD))
def test_broken_cloud_yaml_is_rejected(tmp_path, case):
    mutate, expected = BROKEN_CLOUD[case]
    path = _broken(tmp_path, CLOUD_YAMLS["aws"], mutate)
    with pytest.raises(ClusterConfigError) as err:
        validate_cluster_yaml(path)
    assert expected in str(err.value) and str(path) in str(err.value)


BROKEN_FAKE = {
    "provider flag": (_set("provider/use_node_id_as_ip", "yes"), "use_node_id_as_ip"),
    "default GCS port": (_set("provider/gcs_address", "127.0.0.1:6379"), "gcs_address"),
    "incomplete": (lambda config: config.pop("worker_start_ray_commands"),
                   "missing 'worker_start_ray_commands'"),
    "bad type": (_set("idle_timeout_minutes", "soon"), "idle_timeout_minutes"),
    # the shapes before issue 28: Ray Data's {CPU: 1, GPU: 1} tied and went to train_gpu_worker
    "train node shaped like gen": (
        _set("available_node_types/train_gpu_worker/resources",
             {"CPU": 1, "GPU": 1, "train_gpu": 1}), "scores train_gpu_worker at least as high"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FAKE))
def test_broken_fake_yaml_is_rejected(tmp_path, case):
    mutate, expected = BROKEN_FAKE[case]
    path = _broken(tmp_path, FAKE_YAML, mutate)
    with pytest.raises(ClusterConfigError) as err:
        validate_cluster_yaml(path)
    assert expected in str(err.value)


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_carries_what_a_rayjob_needs(path):
    (doc,) = validate_kuberay_manifests(path)
    cluster_spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["authOptions"] == {"mode": "token"}
    gpu_groups = [g for g in cluster_spec["workerGroupSpecs"] if g.get("resources")]
    assert gpu_groups and all(g["minReplicas"] == 0 for g in gpu_groups)
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        script = spec["entrypoint"].split()[1]
        assert script in ("pipelines/build_mis.py", "pipelines/train.py")
        assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0


def test_kuberay_has_a_cluster_and_jobs_for_build_mis_and_train():
    docs = [doc for p in KUBERAY for doc in validate_kuberay_manifests(p)]
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob"}
    entrypoints = {d["spec"]["entrypoint"].split()[1] for d in docs if d["kind"] == "RayJob"}
    assert entrypoints == {"pipelines/build_mis.py", "pipelines/train.py"}


def _job_mutation(mutate):
    def apply(doc):
        mutate(doc["spec"])
    return apply


BROKEN_RAYJOB = {
    "no shutdown": (_job_mutation(lambda s: s.pop("shutdownAfterJobFinishes")),
                    "shutdownAfterJobFinishes"),
    "negative ttl": (_job_mutation(lambda s: s.update(ttlSecondsAfterFinished=-1)),
                     "ttlSecondsAfterFinished"),
    "not a pipeline": (_job_mutation(lambda s: s.update(entrypoint="bash run.sh")), "entrypoint"),
    "runtime env not YAML": (_job_mutation(lambda s: s.update(runtimeEnvYAML="a: [")),
                             "runtimeEnvYAML"),
    "auth off": (_job_mutation(lambda s: s["rayClusterSpec"].pop("authOptions")), "authOptions"),
    "public head": (_job_mutation(lambda s: s["rayClusterSpec"]["headGroupSpec"].update(
        serviceType="LoadBalancer")), "ClusterIP"),
    "GPU group kept warm": (_job_mutation(lambda s: s["rayClusterSpec"]["workerGroupSpecs"][1]
                                          .update(minReplicas=1)), "minReplicas to 0"),
    "no autoscaling": (_job_mutation(lambda s: s["rayClusterSpec"].update(
        enableInTreeAutoscaling=False)), "enableInTreeAutoscaling"),
    "other Ray": (_job_mutation(lambda s: s["rayClusterSpec"].update(rayVersion="2.9.0")),
                  "rayVersion"),
    "gen_gpu not offered": (_job_mutation(lambda s: s["rayClusterSpec"]["workerGroupSpecs"][1]
                                          ["resources"].update({"gen_gpu": "2"})),
                            "equal to its GPUs"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYJOB))
def test_broken_rayjob_is_rejected(tmp_path, case):
    mutate, expected = BROKEN_RAYJOB[case]
    path = _broken(tmp_path, ROOT / "cluster/kuberay/rayjob-build-mis.yaml", mutate)
    with pytest.raises(ClusterConfigError) as err:
        validate_kuberay_manifests(path)
    assert expected in str(err.value)


def _autoscaler_picks(node_types: dict[str, dict], bundle: dict) -> str:
    """The node type autoscaler v1 launches for one request_resources bundle on an empty cluster
    (Ray 2.60 get_nodes_for with its default scorer)."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    types = {name: {"resources": r, "max_workers": 2} for name, r in node_types.items()}
    scorer = partial(_default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    added, left = get_nodes_for(types, {}, "head", 1, [bundle], utilization_scorer=scorer)
    assert left == [] and sum(added.values()) == 1, (added, left)
    return next(iter(added))


def test_stage_bundle_check_agrees_with_the_autoscaler():
    """The check flags exactly the shapes where Ray's own scheduler sends a generation actor's
    Ray Data bundle (CPU, GPU; no gen_gpu) to another node type."""
    bundle = {"CPU": 1.0, "GPU": 1.0}
    tied = {"gen_gpu_worker": {"CPU": 1, "GPU": 1, "gen_gpu": 1},
            "train_gpu_worker": {"CPU": 1, "GPU": 1, "train_gpu": 1}}
    assert _autoscaler_picks(tied, bundle) == "train_gpu_worker"
    assert "scores train_gpu_worker at least as high" in stage_bundle_problems(tied)[0]
    for path in (FAKE_YAML, *CLOUD_YAMLS.values(), ROOT / "cluster/kuberay/raycluster.yaml"):
        types = {name: r for name, (r, _) in node_types_of(path).items()}
        gen = next(name for name, r in types.items() if "gen_gpu" in r)
        assert stage_bundle_problems(types) == [], path
        cpus_per_gpu = int(types[gen]["CPU"] // types[gen]["GPU"])
        for cpus in range(1, cpus_per_gpu + 1):
            assert _autoscaler_picks(types, {"CPU": float(cpus), "GPU": 1.0}) == gen, (path, cpus)


def test_kuberay_gen_group_as_large_as_train_is_rejected(tmp_path):
    def mutate(doc):
        gen = next(g for g in doc["spec"]["workerGroupSpecs"] if "gen_gpu" in g.get("resources", {}))
        gen["resources"]["gen_gpu"] = "8"
        for container in gen["template"]["spec"]["containers"]:
            container["resources"]["limits"].update({"cpu": "90", "nvidia.com/gpu": "8"})
    path = _broken(tmp_path, ROOT / "cluster/kuberay/raycluster.yaml", mutate)
    with pytest.raises(ClusterConfigError, match="scores train-gpu-workers at least as high"):
        validate_kuberay_manifests(path)


def test_pinned_gpu_pools_fit_their_node_type():
    """configs/build_mis.yaml's generation pool fits every cluster that offers gen_gpu; a pool
    larger than its node type, or unbounded, is refused (Ray Data would ask for the rest and the
    autoscaler would launch training nodes for it)."""
    job = yaml.safe_load((ROOT / "configs/build_mis.yaml").read_text())
    for path in (*CLOUD_YAMLS.values(), ROOT / "cluster/kuberay/raycluster.yaml",
                 ROOT / "cluster/kuberay/rayjob-build-mis.yaml"):
        assert pool_capacity_problems(node_types_of(path), job) == [], path
    aws = node_types_of(CLOUD_YAMLS["aws"])
    gen_max = aws["gen_gpu_worker"][1]
    assert job["generate"]["actors"]["max_actors"] == gen_max
    too_many = copy.deepcopy(job)
    too_many["generate"]["actors"]["max_actors"] = gen_max + 1
    (problem,) = pool_capacity_problems(aws, too_many)
    assert f"generate.actors.max_actors={gen_max + 1}" in problem and f"at most {gen_max}" in problem
    unbounded = copy.deepcopy(job)
    unbounded["generate"]["actors"]["max_actors"] = None
    (problem,) = pool_capacity_problems(aws, unbounded)
    assert "generate.actors.max_actors is not set" in problem
    # a CPU pool, or a GPU pool not pinned to a node type, is not this check's concern
    tiny = yaml.safe_load((ROOT / "configs/tiny/build_mis.yaml").read_text())
    assert pool_capacity_problems(aws, tiny) == []


def test_cli_checks_files_and_placeholders(capsys):
    paths = [str(p) for p in (*CLOUD_YAMLS.values(), FAKE_YAML, *KUBERAY)]
    assert main(paths) == 0
    assert "REPLACE_GIT_REF" in capsys.readouterr().out
    # --strict: the committed cloud files still carry REPLACE_ values to fill in before `ray up`
    assert main(["--strict", str(CLOUD_YAMLS["aws"])]) == 1
    assert main(["--strict", str(FAKE_YAML)]) == 0
    # --job: the pipeline config's pinned GPU pools must fit each cluster
    build_mis = str(ROOT / "configs/build_mis.yaml")
    assert main(["--job", build_mis, *(str(p) for p in CLOUD_YAMLS.values())]) == 0
    assert main(["--job", build_mis, str(ROOT / "cluster/kuberay/rayjob-train.yaml")]) == 1
    assert "offers at most 0" in capsys.readouterr().err
