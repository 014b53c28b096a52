"""Ray Jobs and the dashboard as users meet them: a token-auth head on loopback (one for the
module), the Jobs SDK and the `ray job` CLI with RAY_AUTH_MODE/RAY_AUTH_TOKEN in the environment,
the dashboard's REST API."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from ray_head import wait_for_job

ROOT = Path(__file__).resolve().parents[1]
TINY_BUILD_MIS = "configs/tiny/build_mis.yaml"


def _ray_cli(head, *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], env=head.client_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def _rest(head, path: str, headers: dict[str, str] | None):
    request = urllib.request.Request(head.dashboard_url + path, headers=headers or {})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_head_requires_token_and_runs_a_job(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401
    client = ray_head.job_client()
    job_id = client.submit_job(entrypoint="python -c 'import ray; ray.init(); print(42)'")
    assert wait_for_job(ray_head, job_id, timeout_s=180) == "SUCCEEDED"
    assert "42" in client.get_job_logs(job_id)


@pytest.mark.ray
@pytest.mark.timeout(360)
def test_build_mis_job_submitted_with_cli_and_listed_by_dashboard(ray_head, tmp_path):
    output = tmp_path / "mis"
    submission_id = f"build-mis-tiny-{uuid.uuid4().hex[:8]}"
    submitted = _ray_cli(
        ray_head, "job", "submit", "--submission-id", submission_id, "--working-dir", ".", "--",
        "python", "pipelines/build_mis.py", "--config", TINY_BUILD_MIS, f"--output_uri={output}",
        timeout_s=300)
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-5000:]
    assert f"Job '{submission_id}' succeeded" in log, log[-5000:]

    # every stage of the tiny config ran, and stage 1 committed its output
    stages = yaml.safe_load((ROOT / TINY_BUILD_MIS).read_text())["stages"]
    logs = _ray_cli(ray_head, "job", "logs", submission_id, timeout_s=60)
    assert logs.returncode == 0, logs.stderr[-3000:]
    for stage in stages:
        assert f"== stage {stage} done" in logs.stdout, logs.stdout[-5000:]
    assert "# summary" in logs.stdout
    assert (output / "captions_stats.json").is_file()

    # the dashboard's REST API, with the token, lists the job as SUCCEEDED
    jobs = {job["submission_id"]: job
            for job in _rest(ray_head, "/api/jobs/", ray_head.auth_headers)}
    assert jobs[submission_id]["status"] == "SUCCEEDED", jobs[submission_id]
    assert "pipelines/build_mis.py" in jobs[submission_id]["entrypoint"]
    job = _rest(ray_head, f"/api/jobs/{submission_id}", ray_head.auth_headers)
    assert job["status"] == "SUCCEEDED" and job["end_time"] >= job["start_time"]

    # without the token: refused (401); with a wrong one: forbidden (403)
    for path in ("/api/jobs/", f"/api/jobs/{submission_id}", "/api/v0/nodes"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            _rest(ray_head, path, headers=None)
        assert missing.value.code == 401, path
    with pytest.raises(urllib.error.HTTPError) as wrong:
        _rest(ray_head, "/api/jobs/", {"Authorization": "Bearer " + "0" * 32})
    assert wrong.value.code == 403


@pytest.mark.ray
@pytest.mark.timeout(360)
def test_train_job_submitted_with_cli_writes_a_checkpoint(ray_head, tiny_mis, tmp_path):
    mis = tiny_mis  # read-only here: runs and the export go under tmp_path
    submission_id = f"train-tiny-{uuid.uuid4().hex[:8]}"
    submitted = _ray_cli(
        ray_head, "job", "submit", "--submission-id", submission_id, "--working-dir", ".", "--",
        "python", "pipelines/train.py", "--config", "configs/tiny/train.yaml",
        f"--data.uri={mis}", f"--storage_path={tmp_path / 'runs'}",
        f"--export_uri={tmp_path / 'model'}", "--run_name=job", "--max_steps=2",
        "--checkpoint.every_steps=2", "--log_every_steps=2", "--samples.sample.num_inference_steps=2", timeout_s=300)
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0 and f"Job '{submission_id}' succeeded" in log, log[-5000:]
    assert "# summary" in log and '"step": 2' in log, log[-5000:]
    checkpoint = tmp_path / "runs" / "job" / "checkpoint_00000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
    assert (checkpoint / "ema_unet" / "diffusion_pytorch_model.safetensors").is_file()
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "M2MPipeline" and index["variant"] == "self"
