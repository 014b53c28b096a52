"""Seconds per generated image: M2M-Self with and without the context cache, M2M-DINO, and the
plain UNet of the same size without image-set attention, at K context images (paper Figure 9).

    # CPU, tiny preset (this repo's CI machine)
    python benchmarks/sampling.py --preset tiny --device cpu --steps 10 --threads 1
    # GPU, full SD-2.1-base / DINOv2-giant shapes with random weights (no Ray, no download)
    python benchmarks/sampling.py --preset sd21-base-random --device cuda --out sampling.json
    # FLOPs only, any preset, on the meta device (no weights, no compute: seconds on any machine)
    python benchmarks/sampling.py --preset sd21-base-random --flops-only --steps 50

What one measurement is: the steady state of an auto-regressive run with K images in the context
window (W = K). One generated image per set = ``steps`` denoising steps (DDIM, image guidance
s_I = 3: two branches per UNet batch, as SD's classifier-free guidance), the VAE decode of the
result, and what makes it join the context: M2M-Self cached, one clean UNet pass (t = 0) of the
new latents; M2M-DINO, one DINOv2 forward on the decoded image and the per-site projections;
uncached, nothing (the clean pass of all K context images runs at every step instead). The window
then drops its oldest image, so every timed repeat starts from K images again.

Methods: ``plain`` = the base UNet with attn2 removed (no cross-attention at all), two rows per
step; ``sd-text`` = the base UNet with SD's 77-token text cross-attention (reference: what plain
SD sampling costs, text encoder excluded); ``self-cached``, ``self-uncached``, ``dino`` = M2M.

FLOPs per generated image are counted (torch.utils.flop_counter; SDPA on CPU via a registered
formula): steps × one guided UNet evaluation + the join. The FLOP floor of M2M is what it must
compute: per step one plain UNet row (the unconditional branch, which sees the null token only) and
one row with image-set attention, plus the join. Self-cached's floor time is the plain time scaled
by that: t_plain · F_floor / F_plain, the time it would take at the plain UNet's FLOP/s.
Timed rows also give TFLOP/s and MFU against a matmul rate measured in the same process, in the
sampling precision (``peak_tflops``). Output: a Markdown table and a self-describing JSON
(machine, settings, rows, goals; with ``--profile``, where plain's and DINO's time goes).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.perf import count_flops, profile_summary, sync  # noqa: E402
from m2m_ray.models import presets  # noqa: E402
from m2m_ray.models.codec import ImageCodec  # noqa: E402
from m2m_ray.models.config import M2MConfig, ModelConfig  # noqa: E402
from m2m_ray.models.context import DinoEncoder  # noqa: E402
from m2m_ray.models.m2m_unet import M2MUNet  # noqa: E402
from m2m_ray.sampling.guidance import guidance_branches  # noqa: E402
from m2m_ray.sampling.sampler import (  # noqa: E402
    ContextState,
    GuidedDenoiser,
    denoise_image,
    latent_shape,
)
from m2m_ray.train.flops import measure_peak_tflops  # noqa: E402

GUIDANCE = 3.0
GOALS = {"dino_vs_plain_at_8": 1.15, "cache_speedup_at_8": 3.0, "self_cached_vs_floor_at_8": 1.2}


def _skip_attn2(unet: torch.nn.Module) -> torch.nn.Module:
    for module in unet.modules():
        if hasattr(module, "attn2"):
            module.attn2 = None
    return unet


class Case:
    """One method at one K in the steady state: ``eps`` is one guided UNet evaluation, ``join`` what
    follows a finished image (VAE decode, and for M2M its joining the context), ``run(steps)``
    generates one image per set with the library's denoising loop."""

    def __init__(self, args, method: str, num_context: int, parts: dict):
        self.args, self.method, self.K = args, method, num_context
        self.device, self.dtype = parts["device"], parts["dtype"]
        self.scheduler = presets.load_scheduler(parts["model"], "ddim")
        self.codec: ImageCodec = parts["codec"]
        size = parts["resolution"]
        gen = torch.Generator().manual_seed(0)
        self.noise = torch.randn(args.batch, *latent_shape(self.codec, size, size),
                                 generator=gen).to(self.device)
        self.plain = method in ("plain", "sd-text")
        if self.plain:
            self.unet = parts["plain"] if method == "plain" else parts["sd"]
            width = self.unet.config.cross_attention_dim
            self.text = (None if method == "plain" else
                         torch.randn(2 * args.batch, 77, width, generator=gen).to(self.device,
                                                                                 self.dtype))
            return
        self.model: M2MUNet = parts["self" if method.startswith("self") else "dino"]
        self.state = ContextState(self.model, window=num_context,
                                  use_cache=method != "self-uncached")
        pixels = torch.rand(args.batch, num_context, 3, size, size, generator=gen).to(self.device)
        with torch.no_grad():
            latents = self.codec.encode(pixels) if self.codec.variant == "self" else None
            self.state.add(self.codec.context_of(latents, pixels))
        self.branches = guidance_branches(GUIDANCE)

    @torch.no_grad()
    def eps(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.plain:
            return GuidedDenoiser(self.model, self.state, self.branches, latents.shape[0])(latents,
                                                                                          t)
        rows = torch.cat([latents] * 2).to(self.dtype)  # (2B, 4, h, w): the guidance branches
        uncond, cond = self.unet(rows, t, encoder_hidden_states=self.text).sample.float().chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    @torch.no_grad()
    def join(self, latents: torch.Tensor) -> None:
        pixels = self.codec.decode(latents[:, None])  # (B, 1, 3, H, W): the output image
        if not self.plain:
            self.state.add(self.codec.context_of(latents[:, None], pixels))  # the oldest leaves

    @torch.no_grad()
    def run(self, steps: int) -> None:
        if self.plain:
            self.scheduler.set_timesteps(steps, device=self.device)
            latents = self.noise.clone()
            for t in self.scheduler.timesteps:
                latents = self.scheduler.step(self.eps(latents, t), t, latents).prev_sample
        else:
            latents = denoise_image(self.model, self.scheduler, self.state, self.noise, steps,
                                    self.branches)
        self.join(latents)

    def flops(self, steps: int) -> float:
        """FLOPs per generated image: ``steps`` guided evaluations + the join."""
        t = torch.tensor(500, device=self.device)
        return (steps * count_flops(lambda: self.eps(self.noise, t))
                + count_flops(lambda: self.join(self.noise))) / self.args.batch

    def floor_flops(self, steps: int, plain_unet: torch.nn.Module) -> float:
        """The FLOPs M2M needs per image: per step one plain UNet row (the unconditional branch,
        whose image-set attention sees the null token only) and one row with image-set attention;
        plus the join."""
        t = torch.tensor(500, device=self.device)
        conditional = GuidedDenoiser(self.model, self.state, guidance_branches(1.0),
                                     self.noise.shape[0])
        step = (count_flops(lambda: conditional(self.noise, t))
                + count_flops(lambda: plain_unet(self.noise.to(self.dtype), t,
                                                 encoder_hidden_states=None)))
        return (steps * step + count_flops(lambda: self.join(self.noise))) / self.args.batch


def measure(case: Case, args, plain_unet: torch.nn.Module) -> dict:
    row = {"method": case.method, "K": case.K, "gflops_per_image": case.flops(args.steps) / 1e9}
    if not case.plain:
        row["floor_gflops_per_image"] = case.floor_flops(args.steps, plain_unet) / 1e9
    if args.flops_only:
        return row
    for _ in range(args.warmup):  # kernels, allocator and autotuning: the step count is moot
        case.run(args.warmup_steps or args.steps)
    sync(case.device)
    # CPU: process CPU time (robust on a shared machine with --threads 1); GPU: synchronised wall.
    clock = time.process_time if case.device.type == "cpu" else time.perf_counter
    times = []
    for _ in range(args.repeats):
        started = clock()
        case.run(args.steps)
        sync(case.device)
        times.append((clock() - started) / args.batch)
    row.update(seconds_per_image=statistics.median(times),
               seconds_all=[round(t, 4) for t in times])
    if case.device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return row


def build_parts(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type in ("cuda", "meta") else torch.float32
    model = ModelConfig(preset=args.preset)
    with torch.device(device):  # random weights initialised where they run (fast on a GPU)
        sd = presets.load_unet(model, device, dtype)
        parts = {"device": device, "dtype": dtype, "model": model,
                 "resolution": presets.PRESETS[args.preset].resolution,
                 "sd": sd, "plain": _skip_attn2(copy.deepcopy(sd)),
                 "self": M2MUNet.from_preset(model, M2MConfig(variant="self"), device, dtype),
                 "dino": M2MUNet.from_preset(model, M2MConfig(variant="dino"), device, dtype)}
        vae = presets.load_vae(model, device, dtype)
        dino = DinoEncoder.from_preset(model, device, dtype)
    parts["codec_self"] = ImageCodec(vae, "self")
    parts["codec_dino"] = ImageCodec(vae, "dino", dino)
    return parts


def run(args) -> dict:
    parts = build_parts(args)
    peak = None if args.flops_only else measure_peak_tflops(
        parts["device"], parts["dtype"], seconds=1.0)  # the MFU denominator, this process
    results: list[dict] = []
    report = {"benchmark": "sampling", "machine": machine(args), "settings": vars(args),
              "peak_tflops": peak, "results": results, "partial": True}
    uncached = args.contexts if args.uncached_contexts is None else args.uncached_contexts
    plan = [("plain", 0), ("sd-text", 0)] + [
        (m, k) for k in args.contexts for m in ("self-cached", "self-uncached", "dino")
        if m != "self-uncached" or k in uncached]
    profiled = {("plain", 0), ("dino", max(args.contexts))}
    cases = {}  # the profiled ones only: each holds its context (GBs at full size)
    for method, num_context in plan:
        parts["codec"] = parts["codec_dino" if method == "dino" else "codec_self"]
        case = Case(args, method, num_context, parts)
        if (method, num_context) in profiled:
            cases[method, num_context] = case
        row = measure(case, args, parts["plain"])
        if peak is not None:
            tflops = row["gflops_per_image"] / row["seconds_per_image"] / 1e3  # tiny: ~0.01
            row["tflops"], row["mfu"] = round(tflops, 4), round(tflops / peak, 4)
        results.append(row)
        if args.out:  # a run cut short by the device call's timeout keeps its rows
            Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        seconds = "" if args.flops_only else f"{row['seconds_per_image']:.4f} s/image, "
        print(f"{method:>14} K={num_context}: {seconds}{row['gflops_per_image']:.1f} GFLOP/image",
              flush=True)
    report.update(partial=False, goals={} if args.flops_only else goals(results))
    if args.profile and not args.flops_only:  # where DINO's time goes next to plain's
        report["profile"] = {
            f"{method} K={k}": profile_summary(lambda: case.run(args.profile_steps),
                                               parts["device"])
            for (method, k), case in sorted(cases.items(), key=lambda item: item[0][0] != "plain")}
        for name, summary in report["profile"].items():
            print(f"--- {name}, {args.profile_steps} steps\n{summary.pop('table')}", flush=True)
    return report


def goals(results: list[dict]) -> dict:
    """The issue's three goals at K = 8."""
    at = {(r["method"], r["K"]): r for r in results}
    if ("dino", 8) not in at:
        return {}
    plain, dino = at[("plain", 0)], at[("dino", 8)]
    cached, uncached = at[("self-cached", 8)], at[("self-uncached", 8)]
    seconds = "seconds_per_image"
    floor = plain[seconds] * cached["floor_gflops_per_image"] / plain["gflops_per_image"]
    values = {"dino_vs_plain_at_8": (dino[seconds] / plain[seconds], "<="),
              "cache_speedup_at_8": (uncached[seconds] / cached[seconds], ">="),
              "self_cached_vs_floor_at_8": (cached[seconds] / floor, "<=")}
    out = {}
    for name, (value, op) in values.items():
        target = GOALS[name]
        met = value >= target if op == ">=" else value <= target
        out[name] = {"value": round(value, 3), "goal": f"{op} {target}", "met": met}
    out["self_cached_floor_seconds_at_8"] = round(floor, 4)
    return out


def table(report: dict) -> str:
    plain = next(r for r in report["results"] if r["method"] == "plain")
    timed = "seconds_per_image" in plain
    head = ["method", "K"] + (["s / image", "× plain"] if timed else []) + [
        "GFLOP / image", "× plain FLOPs", "floor × plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        floor = (f"{r['floor_gflops_per_image'] / plain['gflops_per_image']:.3f}"
                 if "floor_gflops_per_image" in r else "")
        cells = [r["method"], str(r["K"])]
        if timed:
            cells += [f"{r['seconds_per_image']:.4f}",
                      f"{r['seconds_per_image'] / plain['seconds_per_image']:.2f}"]
        cells += [f"{r['gflops_per_image']:.1f}",
                  f"{r['gflops_per_image'] / plain['gflops_per_image']:.3f}", floor]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(args) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd21-base-random"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16", help="on CUDA; the CPU runs float32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--contexts", type=lambda s: [int(k) for k in s.split(",")],
                        default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=1, help="sets generated together")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="denoising steps of a warm-up run (default: --steps)")
    parser.add_argument("--uncached-contexts", type=lambda s: [int(k) for k in s.split(",")],
                        default=None, help="the Ks at which self-uncached runs (default: all); "
                        "it is the slowest by far")
    parser.add_argument("--profile", action="store_true",
                        help="profile plain and dino at the largest K (where the time goes)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); "
                        "use 1 on a shared CPU, where spinning OpenMP threads distort timings")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta "
                        "device, no timings (full-size shapes without a GPU)")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.flops_only:
        args.device = "meta"
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    print(table(report))
    print(json.dumps(report["goals"], indent=2, ensure_ascii=False))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
