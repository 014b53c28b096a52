"""Stage 1 (CLIP-77 caption filter) on Ray Data vs plain single-process loops, captions/s.

    python benchmarks/caption_filter.py --rows 200000 --cpus 2

All three read the same synthetic CC12M-like TSV and give every line a verdict (undecodable /
malformed / empty / too_long / kept) with the real CLIP BPE tokenizer (`tiny` preset):
(a) one `tokenizer(caption)` call per row, (b) `tokenizer(captions)` per batch of `--batch-size`
rows, (b') like (b) through the tokenizer's Rust backend (`encode_batch_fast`, what the stage
calls), (c) `run_captions_stage` on a local Ray with `--cpus` CPUs, end to end (count pass, read,
tokenize, verdicts, Parquet shards, rejects, stats). The single-process loops let the tokenizer use
its default Rust thread pool (all cores); the Ray stage gives each 1-CPU actor one thread. (c) also
reports the time its workers spent inside tasks, so Ray's own overhead is visible, and projects the
time for CC12M (12.4M captions) on a 32-CPU node group from the measured per-core rates.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2m_ray.mis.captions import run_captions_stage  # noqa: E402
from m2m_ray.mis.config import BuildMISConfig  # noqa: E402
from m2m_ray.models.config import ModelConfig  # noqa: E402
from m2m_ray.models.presets import load_tokenizer  # noqa: E402

CC12M_CAPTIONS = 12_423_374  # lines of cc12m.tsv

_WORDS = (
    "a an the of in on at with and for from by to over under near beside behind during "
    "photo picture image illustration vector stock view close up portrait background "
    "man woman child girl boy people family couple group team crowd dog cat horse bird fish "
    "house street city town village road bridge river lake sea beach mountain forest garden park "
    "red blue green yellow white black old new small large beautiful modern vintage wooden "
    "sitting standing walking running holding looking playing wearing smiling eating reading "
    "table chair kitchen room window door car bike bus train boat plane tree flower grass sky "
    "sunset sunrise night morning winter summer autumn spring snow rain light shadow "
    "design pattern texture logo poster card book cover dress shirt shoes bag watch ring "
    "wedding birthday party concert festival game match stadium office school church museum"
).split()
_EXTRAS = ["<PERSON>", "<PERSON>", "2019", "3d", "10", "'s", ",", ",", ".", "-", "&", "(", ")",
           "\"", "Café", "Kyōto", "über", "naïve", "北京", "東京", "Москва", "🎉"]


def synthetic_caption(rng: random.Random) -> str:
    """A CC12M-like caption: log-normal word count (median ≈ 13, a few % over 77 tokens)."""
    n = min(150, max(2, int(rng.lognormvariate(2.55, 0.65))))
    words = [rng.choice(_EXTRAS) if rng.random() < 0.08 else rng.choice(_WORDS) for _ in range(n)]
    if rng.random() < 0.15:
        words[0] = "<PERSON>"
    caption = " ".join(words)
    return caption[0].upper() + caption[1:]


def write_synthetic_tsv(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` lines of ``url<TAB>caption``; about 0.2% bad rows of each kind."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(rows):
            url = f"https://img{i % 7}.example.com/{rng.getrandbits(48):012x}/{i}.jpg"
            r = rng.random()
            if r < 0.002:
                line = f"{url}\tCaf".encode() + b"\xe9 latin-1 bytes"
            elif r < 0.004:
                line = url.encode()
            elif r < 0.006:
                line = f"{url}\t  ".encode()
            else:
                line = f"{url}\t{synthetic_caption(rng)}".encode()
            f.write(line + b"\n")


def verdict_loop(path: Path, tokenizer, batch_size: int | None, max_tokens: int = 77,
                 backend: bool = False) -> dict[str, int]:
    """A plain single-process loop: per-row tokenizer calls (``batch_size=None``) or batched."""
    counts = {"kept": 0, "undecodable": 0, "malformed": 0, "empty": 0, "too_long": 0}
    encoder = tokenizer.backend_tokenizer if backend else None
    pending: list[str] = []

    def flush() -> None:
        if encoder is not None:
            lengths = [len(e) for e in encoder.encode_batch_fast(pending)]
        else:
            lengths = [len(ids) for ids in tokenizer(pending)["input_ids"]]
        for n in lengths:
            counts["too_long" if n > max_tokens else "kept"] += 1
        pending.clear()

    with open(path, "rb") as f:
        for raw in f:
            line = raw[:-1] if raw.endswith(b"\n") else raw
            line = line[:-1] if line.endswith(b"\r") else line
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                counts["undecodable"] += 1
                continue
            fields = text.split("\t")
            if len(fields) != 2:
                counts["malformed"] += 1
            elif not fields[1].strip():
                counts["empty"] += 1
            elif batch_size is None:
                n = len(tokenizer(fields[1])["input_ids"])
                counts["too_long" if n > max_tokens else "kept"] += 1
            else:
                pending.append(fields[1])
                if len(pending) == batch_size:
                    flush()
    if pending:
        flush()
    return counts


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, all threads, result)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, time.process_time() - cpu, result


def best_of(repeats: int, fn, *args, **kwargs) -> tuple[float, float, object, list[float]]:
    """Fastest of ``repeats`` runs (the least disturbed by other jobs on a shared machine):
    (wall s, CPU s, result, wall s of every run)."""
    runs = [timed(fn, *args, **kwargs) for _ in range(repeats)]
    seconds, cpu, result = min(runs, key=lambda run: run[0])
    return seconds, cpu, result, [round(run[0], 2) for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--range-mib", type=float, default=1.0, help="captions.range_bytes")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; the fastest "
                        "counts (Ray: the first run also starts Ray's worker processes)")
    parser.add_argument("--workdir", default=None, help="keep the TSV and outputs here")
    args = parser.parse_args()

    import ray

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="caption-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tsv = workdir / f"cc12m_synthetic_{args.rows}.tsv"
    if not tsv.exists():
        write_synthetic_tsv(tsv, args.rows)
    tokenizer = load_tokenizer(ModelConfig(preset="tiny"))
    tokenizer("warm up")
    rate: dict[str, float] = {}
    per_cpu: dict[str, float] = {}
    results: dict[str, dict] = {"load_average_before": os.getloadavg()[0]}

    for name, kwargs in (("a_per_row", {"batch_size": None}),
                         ("b_batched", {"batch_size": args.batch_size}),
                         ("b2_batched_backend", {"batch_size": args.batch_size, "backend": True})):
        seconds, cpu, counts, runs = best_of(args.repeats, verdict_loop, tsv, tokenizer, **kwargs)
        rate[name] = args.rows / seconds
        per_cpu[name] = args.rows / cpu
        results[name] = {"seconds": runs, "captions_per_s": round(rate[name]),
                         "captions_per_cpu_s": round(per_cpu[name]), "counts": counts}
        print(f"{name:20s} {rate[name]:8.0f} captions/s  {per_cpu[name]:8.0f} per CPU-s  "
              f"(runs {runs} s) {counts}", flush=True)

    # Ray on this 2-core machine takes turns with the test suites' Rays (tests/conftest.py).
    lock = open(os.path.join(tempfile.gettempdir(), "m2m_ray-tests-ray.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = BuildMISConfig(
        output_uri=str(workdir / "out"), stages=["captions"], model={"preset": "tiny"},
        captions={"inputs": [str(tsv)], "batch_size": args.batch_size,
                  "range_bytes": int(args.range_mib * 2**20)},
    )
    seconds, _, stats, runs = best_of(args.repeats, run_captions_stage, cfg)
    ray.shutdown()
    lock.close()
    t = stats["timings"]
    rate["c_ray_stage"] = args.rows / seconds
    steady = args.rows / t["filter_and_write_s"]
    per_cpu["c_ray_stage"] = t["lines_per_filter_cpu_s"]
    results["c_ray_stage"] = {"seconds": runs, "captions_per_s": round(rate["c_ray_stage"]),
                              "timings": t, "kept": stats["kept"], "rejected": stats["rejected"]}
    print(f"{'c_ray_stage':20s} {rate['c_ray_stage']:8.0f} captions/s  "
          f"{per_cpu['c_ray_stage']:8.0f} per CPU-s inside tasks  (runs {runs} s; best: "
          f"plan {t['plan_s']} s, filter+write {t['filter_and_write_s']} s = {steady:.0f} "
          f"captions/s; inside tasks {t['lines_per_filter_task_s']} lines/s per task-second, "
          f"tokenizer {t['tokenized_per_task_s']} captions/s per task-second)", flush=True)

    per_core = per_cpu["c_ray_stage"]
    projection_s = CC12M_CAPTIONS / (32 * per_core)
    print(f"\nratios: batched / per-row = {rate['b_batched'] / rate['a_per_row']:.2f}, "
          f"ray stage / batched = {rate['c_ray_stage'] / rate['b_batched']:.2f}, "
          f"ray stage / batched backend = {rate['c_ray_stage'] / rate['b2_batched_backend']:.2f}; "
          f"ray filter+write only / batched = {steady / rate['b_batched']:.2f}")
    print("per CPU-second: " + ", ".join(f"{k} {v:.0f}" for k, v in per_cpu.items()))
    print(f"projection: {CC12M_CAPTIONS / 1e6:.1f}M captions on 32 CPUs at {per_core:.0f} lines "
          f"per CPU-second inside tasks = {projection_s / 60:.1f} min of filtering "
          "(+ the fixed start-up measured above)")
    results["load_average_after"] = os.getloadavg()[0]
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "rows": args.rows, "results": results}, indent=1))


if __name__ == "__main__":
    main()
