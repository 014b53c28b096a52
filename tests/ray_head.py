"""A real Ray head on loopback for job and dashboard tests, with token authentication on.

Started with ``ray start --head --block`` in its own process group and stopped by that group's id —
never ``ray stop``, which would kill every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    process: subprocess.Popen
    dashboard_url: str
    gcs_address: str
    token: str
    temp_dir: str

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)

    def client_env(self) -> dict[str, str]:
        """Environment for a `ray job submit` subprocess talking to this head."""
        return dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                    RAY_ADDRESS=self.dashboard_url)

    def log(self) -> str:
        return Path(self.temp_dir, "head.log").read_text(errors="replace")

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM to the head's process group, SIGKILL after ``grace_s``. A short grace: with
        Ray 2.60, ``ray start --block`` had not exited a minute after SIGTERM (or SIGINT), so a
        longer one only waited (15 s per head before)."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


def start_head(num_cpus: int = 4, extra_args: tuple[str, ...] = (), env: dict | None = None,
               timeout_s: float = 120.0, gcs_port: int | None = None,
               temp_dir: str | None = None) -> RayHead:
    """Start a head and wait until its dashboard answers an authenticated request.

    `gcs_port` and `temp_dir` are for callers that must name them before the head starts (the
    fake multinode YAML carries the GCS address)."""
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    gcs_port = gcs_port or free_port()
    dash_port, agent_port = free_port(), free_port()
    token = secrets.token_hex(16)
    head_env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **(env or {}))
    head_env.pop("RAY_ADDRESS", None)
    cmd = ["ray", "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={temp_dir}",
           f"--num-cpus={num_cpus}", "--disable-usage-stats", "--block", *extra_args]
    log = open(Path(temp_dir, "head.log"), "w")
    process = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    head = RayHead(process, f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", token,
                   temp_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            request = urllib.request.Request(f"{head.dashboard_url}/api/version",
                                             headers=head.auth_headers)
            urllib.request.urlopen(request, timeout=2).read()
            return head
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                head.stop()
                raise RuntimeError(f"Ray head did not come up:\n{head.log()[-3000:]}")
            time.sleep(1)


def wait_for_job(head: RayHead, job_id: str, timeout_s: float) -> str:
    """Poll the Jobs API until the job ends; returns its final status name."""
    client = head.job_client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s:\n"
                       f"{client.get_job_logs(job_id)[-3000:]}")
