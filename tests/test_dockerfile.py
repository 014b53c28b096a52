"""The KubeRay image (Dockerfile): parsed by Docker's own parser (the `dockerfile` package wraps
moby/buildkit's), linted by hadolint, and checked against pyproject.toml: the Ray base image is the
pinned Ray and Python, torch satisfies the project's range, the project is installed with extras
that exist, and everything `pip install .` needs is copied in and not docker-ignored."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def _args(commands) -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement(name: str) -> Requirement:
    (req,) = [Requirement(d) for d in _project()["dependencies"] if Requirement(d).name == name]
    return req


def test_base_image_is_the_pinned_ray_and_python():
    commands = _commands()
    assert [c.cmd for c in commands].count("FROM") == 1
    image = _args(commands)["RAY_IMAGE"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", image)
    assert match, f"{image}: expected rayproject/ray:<version>-py<XY>-gpu"
    ray = _requirement("ray")
    assert str(ray.specifier) == f"=={match[1]}", (ray, image)
    python = Version(f"{match[2]}.{match[3]}")
    assert python in SpecifierSet(_project()["requires-python"]), python


def test_installs_cuda_torch_in_range_then_the_project_with_existing_extras():
    commands = _commands()
    runs = [c.value[0] for c in commands if c.cmd == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    torch_version = _args(commands)["TORCH_VERSION"]
    assert torch_version in _requirement("torch").specifier, torch_version
    project_run = next(i for i, r in enumerate(runs) if re.search(r"pip install .*\"\.\[", r))
    assert torch_run < project_run, "torch must come first, pinned (see Dockerfile)"
    extras = re.search(r"\"\.\[([a-z,]+)\]\"", runs[project_run])[1].split(",")
    declared = _project()["optional-dependencies"]
    assert set(extras) <= set(declared), (extras, sorted(declared))
    assert {"wandb", "mlflow"} <= set(extras)  # report_to's trackers work on the cluster
    assert all("--no-cache-dir" in r for r in runs if "pip install" in r)


def test_copies_what_pip_install_needs_and_dockerignore_keeps_it():
    copied = {src for c in _commands() if c.cmd == "COPY" for src in c.value[:-1]}
    needed = {"pyproject.toml", "README.md", "m2m_ray"}  # readme = README.md in pyproject
    assert needed <= copied, needed - copied
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert not needed & set(ignored) and ".venv" in ignored and "outputs" in ignored


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
