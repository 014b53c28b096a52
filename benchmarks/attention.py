"""Image-set attention: time and peak memory vs a dense-mask implementation; M2M-Self step cost.

    python benchmarks/attention.py --preset tiny --threads 1             # CPU, a few seconds
    python benchmarks/attention.py --preset sd21-base-random             # SD-2.1-base widths
    python benchmarks/attention.py --preset sd21-base-random --what step --context 1 4 8

Runs unchanged on a GPU (plain PyTorch + diffusers, no Ray; bf16 there by default). Method, and
the numbers measured so far, in BENCHMARKS.md ("Image-set attention").

``--what attention``: one training set of N images (M = N targets, K = N context images,
offset 0, batch 1) at each UNet resolution of the preset, three ways of computing the same thing:
- ``ours``: ``image_set_attention`` — null token + context keys as a prefix, one SDPA call per
  target over the keys it may see, no mask;
- ``masked``: the prototype — keys replicated per target, a ``(B·M, 1, 1, 1+K·L)`` boolean mask
  (key length padded to a multiple of 8);
- ``dense``: the naive one — all N·h·w queries against 1+N·h·w keys with a dense boolean mask.
Peak memory is the extra over the inputs: CUDA's allocator peak on GPU, the process's peak RSS
on CPU (VmHWM, reset through /proc/self/clear_refs before each call). Each implementation's SDPA
kernel is read from the profiler; outputs are checked against ``ours`` where both ran.

``--what step``: one denoising step (M = 1 target) of the plain base UNet (with its text
cross-attention, 77 tokens), M2M-Self against a cache of K images, and M2M-Self uncached (the K
clean images re-run through the UNet every step).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2m_ray.models import presets  # noqa: E402
from m2m_ray.models.config import M2MConfig, ModelConfig  # noqa: E402
from m2m_ray.models.image_set_attention import image_set_attention, visible_context  # noqa: E402
from m2m_ray.models.m2m_unet import M2MUNet  # noqa: E402

IMPLEMENTATIONS = ("ours", "masked", "dense")


@dataclass(frozen=True)
class Site:
    name: str
    size: int   # latent side at this resolution
    width: int  # channels = inner dim
    heads: int


def sites_of(preset: str) -> list[Site]:
    cfg = presets.unet_config(ModelConfig(preset=preset))
    latent = presets.PRESETS[preset].resolution // 8
    heads = cfg["attention_head_dim"]  # diffusers: the number of heads
    heads = [heads] * len(cfg["block_out_channels"]) if isinstance(heads, int) else list(heads)
    sites = [Site(f"down{i}", latent >> i, width, heads[i])
             for i, (kind, width) in enumerate(zip(cfg["down_block_types"],
                                                   cfg["block_out_channels"]))
             if kind.startswith("CrossAttn")]
    last = len(cfg["block_out_channels"]) - 1
    return sites + [Site("mid", latent >> last, cfg["block_out_channels"][-1], heads[-1])]


def inputs(site: Site, n: int, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = site.size * site.size
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    return (make(1, n, tokens, site.width), make(1, n, tokens, site.width),
            make(1, n, tokens, site.width), make(site.width), make(site.width))


def _null_first(key, value, null_key, null_value, pad_to: int):
    batch, _, _, inner = key.shape
    keys = torch.cat([null_key.expand(batch, 1, inner), key.flatten(1, 2)], 1)  # (B, 1+K*L, C)
    values = torch.cat([null_value.expand(batch, 1, inner), value.flatten(1, 2)], 1)
    pad = (-keys.shape[1]) % pad_to
    return F.pad(keys, (0, 0, 0, pad)), F.pad(values, (0, 0, 0, pad)), pad


def _key_mask(num_targets, num_context, tokens, pad, device):
    """(M, 1 + K*L + pad) bool: the null column, each visible image's L columns, padding off."""
    visible = visible_context(num_targets, num_context, 0).repeat_interleave(tokens, 1)
    null = torch.ones(num_targets, 1, dtype=torch.bool)
    return torch.cat([null, visible, torch.zeros(num_targets, pad, dtype=torch.bool)], 1).to(device)


def run(impl: str, query, key, value, null_key, null_value, heads):
    batch, m, tokens, inner = query.shape
    d = inner // heads
    if impl == "ours":
        return image_set_attention(query, key, value, null_key, null_value, heads, 0)
    keys, values, pad = _null_first(key, value, null_key, null_value, 8)  # (B, S, C)
    mask = _key_mask(m, key.shape[1], tokens, pad, query.device)  # (M, S)
    if impl == "masked":
        span = keys.shape[1]
        keys = keys[:, None].expand(batch, m, span, inner).reshape(batch * m, span, heads, d)
        values = values[:, None].expand(batch, m, span, inner).reshape(batch * m, span, heads, d)
        q = query.reshape(batch * m, tokens, heads, d).transpose(1, 2)  # (B*M, H, L, d)
        mask = mask[None].expand(batch, m, span).reshape(batch * m, 1, 1, span)
        out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, m, tokens, inner)
    q = query.reshape(batch, m * tokens, heads, d).transpose(1, 2)  # (B, H, M*L, d)
    dense = mask.repeat_interleave(tokens, 0)  # (M*L, S): the N·hw × N·hw mask
    out = F.scaled_dot_product_attention(q, keys.unflatten(-1, (heads, d)).transpose(1, 2),
                                         values.unflatten(-1, (heads, d)).transpose(1, 2),
                                         attn_mask=dense)
    return out.transpose(1, 2).reshape(batch, m, tokens, inner)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def uses_cpu_time(device) -> bool:
    """On CPU with one thread, time with the process's CPU time, which a machine shared with other
    jobs does not inflate (with more threads, spinning OpenMP workers would); else wall time."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def clock(device) -> float:
    return time.process_time() if uses_cpu_time(device) else time.perf_counter()


def sdpa_kernel(impl, site, n, device, dtype) -> str:
    from torch.profiler import profile

    args = inputs(site, n, device, dtype)
    with torch.no_grad(), profile() as prof:
        run(impl, *args, site.heads)
        _sync(device)
    names = {e.key for e in prof.key_averages()
             if "attention" in e.key and e.key.startswith("aten::_")}
    return ",".join(sorted(n.removeprefix("aten::_scaled_dot_product_") for n in names))


def _rss(field: str) -> int:
    """VmRSS / VmHWM (peak since the last reset) of this process, in bytes."""
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(x for x in status if x.startswith(field))
    return int(line.split()[1]) * 1024


def measure(impl, site, n, device, dtype, budget_s, repeats) -> dict:
    """Time (best of up to `repeats` runs within `budget_s`) and extra peak memory of one call."""
    args = inputs(site, n, device, dtype)
    with torch.no_grad():
        # Warm up on a small instance so that one-time set-up stays out of time and memory.
        run(impl, *inputs(Site(site.name, min(site.size, 4), site.width, site.heads), n, device,
                          dtype), site.heads)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            # Hand freed heap back to the OS first, or reused pages would hide this call's peak.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            before = _rss("VmRSS")
        start = clock(device)
        out = run(impl, *args, site.heads)
        _sync(device)
        times = [clock(device) - start]
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM")
        while len(times) <= repeats and sum(times) < budget_s:
            start = clock(device)
            run(impl, *args, site.heads)
            _sync(device)
            times.append(clock(device) - start)
    result = {"seconds": min(times[1:] or times), "peak_mb": max(peak - before, 0) / 2**20}
    if impl != "ours":  # same numbers as ours?
        ref = run("ours", *args, site.heads)
        result["max_diff"] = (out.float() - ref.float()).abs().max().item()
    return result


def dense_bytes(site: Site, n: int) -> int:
    """Lower bound of the dense version's extra memory: the bool mask plus its float form."""
    tokens = site.size * site.size
    return n * tokens * (1 + n * tokens) * 5


def available_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    return int(meminfo["MemAvailable"].split()[0]) * 1024


def bench_attention(args, device, dtype):
    rows = []
    for site in sites_of(args.preset):
        for impl in IMPLEMENTATIONS:
            row = {"site": site.name, "latent": f"{site.size}x{site.size}", "width": site.width,
                   "heads": site.heads, "impl": impl}
            if impl == "dense" and dense_bytes(site, args.n) > 0.6 * available_bytes(device):
                row["error"] = (f"skipped: needs > {dense_bytes(site, args.n) / 2**30:.1f} GiB, "
                                f"{available_bytes(device) / 2**30:.1f} GiB available")
            else:
                row.update(_guarded(impl, site, args.n, device, dtype, args.budget, args.repeats))
                if "error" not in row:
                    row["kernel"] = sdpa_kernel(impl, site if site.size <= 16 else
                                                Site(site.name, 8, site.width, site.heads),
                                                args.n, device, dtype)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'site':6} {'latent':>7} {'impl':7} {'ms':>10} {'peak MB':>9} {'× ours t':>9} "
          f"{'× ours mem':>10}  kernel")
    for row in rows:
        ours = next(r for r in rows if r["site"] == row["site"] and r["impl"] == "ours")
        if "error" in row:
            print(f"{row['site']:6} {row['latent']:>7} {row['impl']:7} {row['error']}")
            continue
        ratio_t = row["seconds"] / ours["seconds"] if "seconds" in ours else float("nan")
        ratio_m = (f"{row['peak_mb'] / ours['peak_mb']:10.1f}" if ours.get("peak_mb", 0) >= 1
                   else f"{'n/a':>10}")  # CPU RSS moves in pages: below ~1 MB it is noise
        print(f"{row['site']:6} {row['latent']:>7} {row['impl']:7} {row['seconds'] * 1e3:10.1f} "
              f"{row['peak_mb']:9.1f} {ratio_t:9.2f} {ratio_m}  {row.get('kernel', '')}")


def _guarded(*call) -> dict:
    """`measure`, with out-of-memory and kernel refusals reported as results."""
    try:
        return measure(*call)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(err).__name__}: {str(err)[:120]}"}


def bench_step(args, device, dtype):
    model_cfg = ModelConfig(preset=args.preset)
    base = presets.load_unet(model_cfg, device, dtype)
    m2m = M2MUNet.from_preset(model_cfg, M2MConfig(variant="self"), device, dtype)
    latent = presets.PRESETS[args.preset].resolution // 8
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 1, 4, latent, latent, generator=gen).to(device, dtype)
    text = torch.randn(1, 77, base.config.cross_attention_dim, generator=gen).to(device, dtype)
    steps = torch.full((1, 1), 500, device=device)

    def timed(fn):
        if device.type == "cuda":  # warm-up (on CPU one call takes seconds; set-up is noise)
            fn()
            _sync(device)
        times = []
        while len(times) < args.repeats and sum(times) < args.budget:
            start = clock(device)
            fn()
            _sync(device)
            times.append(clock(device) - start)
        return min(times)

    with torch.no_grad():
        plain = timed(lambda: base(noisy[:, 0], steps[:, 0], encoder_hidden_states=text))
        print(f"plain UNet step: {plain * 1e3:.1f} ms", flush=True)
        context = torch.randn(1, max(args.context), 4, latent, latent, generator=gen)
        context = context.to(device, dtype)
        encode = timed(lambda: m2m.encode_context(context))  # once per image in sampling
        full_cache = m2m.encode_context(context)
        print(f"encode {context.shape[1]} context images: {encode * 1e3:.1f} ms "
              f"({encode / context.shape[1] / plain:.2f}× a plain step per image)", flush=True)
        for k in args.context:
            cache = full_cache.window(k)
            cached = timed(lambda: m2m(noisy, steps, cache=cache, offset=k))
            uncached = timed(lambda: m2m(noisy, steps, context[:, -k:], offset=k))
            print(json.dumps({"K": k, "plain_ms": plain * 1e3, "cached_ms": cached * 1e3,
                              "uncached_ms": uncached * 1e3, "cached_x_plain": cached / plain,
                              "uncached_x_plain": uncached / plain,
                              "cache_mb": cache.nbytes() / 2**20}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS))
    parser.add_argument("--what", default="attention", choices=["attention", "step"])
    parser.add_argument("--n", type=int, default=8, help="training set size N (M = K = N)")
    parser.add_argument("--context", type=int, nargs="+", default=[1, 4, 8],
                        help="K for --what step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs at most")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs at most")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    timer = "process CPU time" if uses_cpu_time(device) else "wall time"
    print(f"# torch {torch.__version__}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads, {dtype}, preset {args.preset}, {timer}", flush=True)
    (bench_attention if args.what == "attention" else bench_step)(args, device, dtype)


if __name__ == "__main__":
    main()
