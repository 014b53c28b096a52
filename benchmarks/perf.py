"""What the benchmarks share to turn seconds into utilisation, next to the library's own
``m2m_ray.train.flops`` (training FLOPs per set, the measured matmul peak, MFU):

    count_flops(fn)                  FLOPs of everything ``fn`` runs (torch.utils.flop_counter)
    profile_summary(fn, device, n)   where the time goes: the top kernels or ops, share per kind

MFU (model FLOPs utilisation, as in PaLM and nanoGPT) = the model's FLOPs per second ÷ the peak.
The benchmarks take the peak from ``measure_peak_tflops`` in the same process (a large square
matmul): what this card, clock and library reach, where datasheets quote sparse or boosted figures.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import flop_counter


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts the CUDA attention kernels itself; the CPU's flash kernel needs its formula here.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 _sdpa_cpu_backward}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (multiply and add counted apart: 2 per multiply-add) of the matmuls, convolutions and
    attention that ``fn()`` runs, forward and backward, on any device including ``meta`` (shapes
    only, no compute). Elementwise work and normalisation are not counted, as in MFU."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Kernel or op name → what kind of work it is (first match wins), for the share of time per kind.
_KINDS = (("attention", ("flash", "attention", "fmha", "sdpa", "softmax")),
          ("convolution", ("conv", "implicit_gemm", "winograd", "cudnn")),
          ("matmul", ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                      "cutlass", "xmma", "nvjet")),
          ("normalisation", ("norm",)),
          ("copy / cast", ("copy", "cast", "to_copy", "memcpy", "memset", "cat")),
          ("elementwise", ("elementwise", "vectorized", "add", "mul", "silu", "gelu", "fill",
                           "pointwise", "triton")))


def _kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, words in _KINDS if any(w in lower for w in words)), "other")


def profile_summary(fn: Callable[[], object], device: torch.device | str, rows: int = 20) -> dict:
    """Run ``fn()`` once under ``torch.profiler`` and say where the time went: on a GPU the
    ``rows`` CUDA kernels with the most time, on the CPU the ``rows`` ops with the most self CPU
    time; each with calls, ms and share of the total, the share per kind of work (matmul,
    convolution, attention, normalisation, elementwise, copy / cast, other), and torch's table."""
    device = torch.device(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    if device.type == "cuda":  # the kernels themselves (ops would count their kernels twice)
        key = "self_device_time_total"
        timed = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                 and not e.is_user_annotation]
    else:
        key = "self_cpu_time_total"
        timed = list(events)
    total = sum(getattr(e, key) for e in timed) or 1
    kinds: dict[str, float] = {}
    for e in timed:
        kinds[_kind(e.key)] = kinds.get(_kind(e.key), 0) + getattr(e, key) / total
    top = sorted(timed, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return {
        "clock": key, "total_ms": round(total / 1e3, 2),
        "kinds": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "ops": [{"name": e.key, "kind": _kind(e.key), "calls": e.count,
                 "ms": round(getattr(e, key) / 1e3, 3), "share": round(getattr(e, key) / total, 4)}
                for e in top],
        "table": events.table(sort_by=key, row_limit=rows, max_name_column_width=60),
    }
