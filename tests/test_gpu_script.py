"""The device call of issue 18 (``benchmarks/gpu_all.sh``) runs end to end on the CPU with the tiny
preset at its smallest settings: every default part exits 0 and writes what BENCHMARKS.md's "GPU
plan" says it does. A GPU session has 15 minutes; a script that broke here would waste them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_device_script_dry_runs_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "PRESET": "tiny", "DEVICE": "cpu", "SCALE": "0",
           "OUT": str(out)}
    done = subprocess.run(["bash", "benchmarks/gpu_all.sh"], cwd=ROOT, env=env, timeout=840,
                          capture_output=True, text=True)
    log = (out / "all.log").read_text() if (out / "all.log").exists() else ""
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{log[-5000:]}"
    for part in ("generation", "train_step", "sampling"):
        assert f"=== {part}: rc=0" in log
    generation = json.loads((out / "generation.json").read_text())
    assert set(generation["ours"]) == {"c2", "c2-bf16", "c2-fused", "c2-fused-compile"}
    assert all(row["mfu"] > 0 for row in generation["ours"].values())
    assert generation["flops"]["per_image"] > 0 and generation["profile"]["ops"]
    steps = [json.loads(line) for line in (out / "train_step.txt").read_text().splitlines()]
    assert [s["variant"] for s in steps] == ["self"] * 3 + ["dino"]
    assert all(s["mfu"] > 0 and s["paper_plan"]["accumulation_steps"] == 16 for s in steps)
    assert sum(s["profile"] is not None for s in steps) == 1
    sampling = json.loads((out / "sampling.json").read_text())
    assert {"plain K=0", "dino K=8"} == set(sampling["profile"])
    assert all(row["mfu"] > 0 for row in sampling["results"])
    assert len(list(out.iterdir())) <= 8  # what one device call brings back
