"""The GPU benchmarks' arithmetic, checked on the CPU (issue 18): generation FLOPs counted on the
meta device (how the full-size counts are made without a GPU) equal those counted while really
computing, the generation variants parse or fail by name, and the profiler summary accounts for all
the time. (Training FLOPs: tests/test_tracking.py.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.perf import count_flops, profile_summary  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generation_flops_and_variants():
    from m2m_ray.models import presets
    from m2m_ray.models.config import ModelConfig

    bench = _load("generation")
    args = bench.argparse.Namespace(preset="tiny", size=None, steps=7, images_per_caption=5)
    flops = bench.generation_flops(args)
    unet = presets.load_unet(ModelConfig(preset="tiny"))
    size = presets.PRESETS["tiny"].resolution // 8
    with torch.no_grad():
        step = count_flops(lambda: unet(torch.randn(2, 4, size, size), torch.tensor(500),
                                        encoder_hidden_states=torch.randn(
                                            2, 77, unet.config.cross_attention_dim)))
    assert flops["parts"]["unet"] == 7 * step
    assert flops["per_image"] == sum(flops["parts"].values())
    assert bench.parse_variant("c4-bf16-fused-compile:max_autotune-sdpa:flash-vae3-nocl") == {
        "captions_per_batch": 4, "dtype": "bfloat16", "fuse_qkv": True,
        "compile": "max-autotune", "attention_backend": "flash", "vae_batch_size": 3,
        "channels_last": False}
    assert bench.parse_variant("c2-compile") == {"captions_per_batch": 2, "compile": "default"}
    with pytest.raises(ValueError, match="cannot read 'fast'"):
        bench.parse_variant("c2-fast")


def test_profile_summary_accounts_for_the_time():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8),
                                torch.nn.Flatten(), torch.nn.LazyLinear(4))
    x = torch.randn(4, 3, 16, 16)
    model(x)
    summary = profile_summary(lambda: model(x).sum().backward(), "cpu", rows=50)
    assert abs(sum(summary["kinds"].values()) - 1) < 0.01
    assert {"convolution", "normalisation", "matmul"} <= set(summary["kinds"])
    assert summary["ops"][0]["ms"] >= summary["ops"][-1]["ms"] and "Self CPU" in summary["table"]


def test_out_of_memory_is_a_result_that_the_device_script_reads(monkeypatch):
    """gpu_all.sh retries the no-checkpointing training step at 1 set when the line it gets says
    ``"oom": true``: the benchmark must print exactly that, not crash."""
    import argparse
    import json

    bench = _load("train_step")

    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(bench, "_measure", out_of_memory)
    args = argparse.Namespace(variant="self", preset="tiny", batch_size=2, images_per_set=8,
                              gradient_checkpointing=False, compile=None)
    line = json.dumps(bench.measure(args))
    assert '"oom": true' in line and "Tried to allocate 20.00 GiB" in line
    script = (ROOT / "benchmarks/gpu_all.sh").read_text()
    assert "*'\"oom\": true'*" in script
