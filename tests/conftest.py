"""Shared fixtures: a private local Ray per module, a moto S3 server on loopback, a tiny synthetic
MIS and a tiny model folder for the session; the tiers' rules (tests/tier_rules.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ray_head.py and friends
# The `ray` CLI and friends of this interpreter's environment, also when pytest runs as
# `.venv/bin/python -m pytest` without an activated venv.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

from ray_head import free_port, start_head  # noqa: E402
from tier_rules import (  # noqa: E402,F401  (hooks: marker and duration rules)
    pytest_configure,
    pytest_runtest_call,
    pytest_runtest_makereport,
    pytest_runtest_setup,
)

# Dummy S3 credentials for the moto server, set before any Ray starts so its workers inherit them
# (moto accepts any key; real credentials a developer has set are left alone).
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)

# Ray-based tests of concurrent pytest runs on this machine take turns: two Rays on 2 cores starve
# each other into timeouts. Every fixture that starts Ray holds this lock while Ray runs.
_RAY_LOCK_PATH = os.path.join(tempfile.gettempdir(), "m2m_ray-tests-ray.lock")


@contextlib.contextmanager
def ray_turn():
    with open(_RAY_LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set for a block, then restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core CI box spinning OpenMP
    threads make them ~50x slower. For a module: `pytestmark = pytest.mark.usefixtures(...)`;
    the setting is restored for the next module."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray (4 logical CPUs, own temp dir) for one test module."""
    import ray

    with ray_turn():
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=4, _temp_dir=temp_dir, include_dashboard=False,
                 log_to_driver=True)
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with token auth and the dashboard (tests/ray_head.py)."""
    with ray_turn():
        head = start_head(num_cpus=4)
        try:
            yield head
        finally:
            head.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Credentials are dummies."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.3)
    try:
        yield endpoint
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields ``(endpoint, bucket)``."""
    import uuid

    import boto3

    bucket = f"m2m-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket=bucket)
    return s3_server, bucket


@pytest.fixture(scope="session")
def tiny_mis(tmp_path_factory) -> str:
    """The root of a committed synthetic MIS (m2m_ray/mis/synthetic.py, seed 0): 2 shards × 2 sets
    × 25 images of 64×64 px, Parquet and WebDataset, tiny-VAE latents, all sets train. Shared by
    the session, so read-only: a test that changes it works on ``copy_tree(tiny_mis, tmp_path)``."""
    from m2m_ray.mis.synthetic import write_synthetic_mis

    root = str(tmp_path_factory.mktemp("tiny_mis") / "mis")
    with torch_threads(1):
        write_synthetic_mis(root, num_shards=2, sets_per_shard=2)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The folder of an untrained tiny M2M-Self pipeline (``save_pretrained``; image-set attention
    at its zero init, so it ignores its context). Shared by the session, so read-only: copy it
    with ``copy_tree`` before changing it."""
    from m2m_ray.models.config import M2MConfig, ModelConfig
    from m2m_ray.sampling.pipeline import M2MPipeline

    folder = str(tmp_path_factory.mktemp("tiny_model") / "model")
    with torch_threads(1):
        pipe = M2MPipeline.from_preset(ModelConfig(preset="tiny"), M2MConfig(variant="self"))
        pipe.save_pretrained(folder)
    return folder


def copy_tree(source: str, parent: os.PathLike | str) -> str:
    """A private copy of a shared fixture's folder (``tiny_mis``, ``tiny_model``) under ``parent``
    (e.g. ``tmp_path``), named like the source; returns its path."""
    return shutil.copytree(source, os.path.join(parent, os.path.basename(source)))
