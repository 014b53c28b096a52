"""Live job progress (m2m_ray/progress.py): the figures, the line, progress.json — and a small MIS
build on a local Ray whose progress.json advances while it runs and ends equal to its stats, and
the generate job's progress in its summary."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest

from m2m_ray.formats.mis import MISLayout
from m2m_ray.mis.build import progress_uri, run_generate_stage
from m2m_ray.mis.captions import run_captions_stage
from m2m_ray.mis.config import BuildMISConfig
from m2m_ray.progress import JobProgress, progress_line

CAPTIONS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen",
            "a watercolor village", "a cartoon robot", "an old map of Paris"]


def test_figures_rate_eta_failures_and_resumed_work(tmp_path):
    uri = str(tmp_path / "out" / "progress.json")
    lines = io.StringIO()
    progress = JobProgress("build_mis", uri, total={"shards": 4, "sets": 8, "images": 80},
                           unit="images", interval_s=0, done_before={"shards": 1, "sets": 2,
                                                                       "images": 20},
                           stream=lines)
    first = json.loads(Path(uri).read_text())
    assert first["done"] == {"shards": 1, "sets": 2, "images": 20} and first["eta_s"] is None
    time.sleep(0.05)
    progress.update(shards=1, sets=2, images=20)
    progress.failure("round 1: RuntimeError: boom")
    now = json.loads(Path(uri).read_text())
    assert now["done"] == {"shards": 2, "sets": 4, "images": 40} and now["fraction"] == 0.5
    assert now["failures"] == 1 and now["last_failure"] == "round 1: RuntimeError: boom"
    # rate and ETA count this run's 20 images only, not the 20 of an earlier run
    rate = now["rate_per_s"]["images"]
    # (eta_s is stored to 0.1 s: on a fast run the ETA is ~0.1 s, so compare to that precision)
    assert 0 < rate <= 20 / 0.05 and now["eta_s"] == pytest.approx(40 / rate, rel=0.05, abs=0.051)
    final = progress.finish()
    assert final == json.loads(Path(uri).read_text()) and final["state"] == "done"
    text = lines.getvalue().splitlines()
    assert text[-1].startswith("[build_mis done] shards 2/4 · sets 4/8 · images 40/80 (50.0%)")
    assert "failures 1" in text[-1] and "ETA" in text[-1]


def test_interval_throttles_writes_and_unknown_totals(tmp_path):
    uri = str(tmp_path / "progress.json")
    progress = JobProgress("generate", uri, total={"sets": None, "images": None}, unit="images",
                           interval_s=3600, stream=io.StringIO())
    progress.update(sets=3, images=12)
    assert json.loads(Path(uri).read_text())["done"]["sets"] == 0  # within the interval
    final = progress.finish()
    assert final["done"] == {"sets": 3, "images": 12}
    assert final["fraction"] is None and final["eta_s"] is None
    assert "images 12/?" in progress_line(final)
    with pytest.raises(ValueError, match="job counts"):
        progress.update(shards=1)
    with pytest.raises(ValueError, match="not one of the totals"):
        JobProgress("x", uri, total={"sets": 1}, unit="images")


def _build_config(tmp: Path) -> BuildMISConfig:
    tsv = tmp / "cc12m.tsv"
    tsv.write_text("".join(f"http://img.example/{i}.jpg\t{c}\n" for i, c in enumerate(CAPTIONS)))
    return BuildMISConfig.model_validate({
        "output_uri": str(tmp / "mis"), "model": {"preset": "tiny"},
        "captions": {"inputs": [str(tsv)], "lines_per_shard": 1},
        "generate": {"num_inference_steps": 2, "height": 64, "width": 64, "images_per_caption": 2,
                     "captions_per_batch": 1, "formats": ["parquet"],
                     "actors": {"num_gpus": 0, "max_actors": 1}, "progress_interval_s": 0},
    })


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_progress_json_advances_during_a_build_and_ends_equal_to_the_stats(ray_local, tmp_path):
    cfg = _build_config(tmp_path)
    run_captions_stage(cfg)
    uri = Path(progress_uri(MISLayout(cfg.output_uri)))
    seen: list[dict] = []
    stop = threading.Event()

    def poll() -> None:  # an operator reading the file while the job runs
        while not stop.is_set():
            if uri.is_file():
                figures = json.loads(uri.read_text())  # never half-written: atomic replace
                if not seen or figures != seen[-1]:
                    seen.append(figures)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        stats = run_generate_stage(cfg)
    finally:
        stop.set()
        poller.join(5)
    final = json.loads(uri.read_text())
    assert stats["progress"] == final
    assert final["state"] == "done" and final["failures"] == 0 and final["eta_s"] == 0.0
    assert final["done"] == final["total"] == {"shards": 6, "sets": 6, "images": 12}
    assert final["done"]["images"] == stats["images"] == stats["this_run"]["images"]
    running = [f["done"]["shards"] for f in seen if f["state"] == "running"]
    assert len(set(running)) >= 3, running  # seen advancing while shards committed
    assert running == sorted(running) and running[0] < 6
    # a rerun has nothing left: all done before, no rate, ETA 0
    again = run_generate_stage(cfg)["progress"]
    assert again["done"] == final["total"] and again["rate_per_s"]["images"] == 0.0
    assert again["eta_s"] == 0.0


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.timeout(300)
def test_generate_job_progress_ends_equal_to_its_summary(tmp_path):
    from m2m_ray.config import load_config
    from m2m_ray.mis.synthetic import write_synthetic_mis
    from m2m_ray.sampling.config import GenerateJobConfig
    from m2m_ray.sampling.job import run_generate

    write_synthetic_mis(str(tmp_path / "mis"), num_shards=1, sets_per_shard=3,
                        formats=("parquet",))
    [shard] = (tmp_path / "mis" / "mis" / "parquet").iterdir()
    out = tmp_path / "gens"
    cfg = load_config(GenerateJobConfig, Path(__file__).parents[1] / "configs/tiny/generate.yaml", [
        "--inputs.mis_uri=null", f"--inputs.mis_shard={shard}", "--inputs.mis_split=null",
        "--inputs.context_images=2", "--inputs.max_sets=null", f"--output_uri={out}",
        "--model_path=null", "--model.preset=tiny", "--engine=local", "--sets_per_batch=1", "--contact_sheet_sets=0",
        "--sample.num_images=2", "--sample.num_inference_steps=2", "--progress_interval_s=0"])
    summary = run_generate(cfg)
    final = json.loads((out / "progress.json").read_text())
    assert summary["progress"] == final == json.loads((out / "summary.json").read_text())["progress"]
    assert final["done"] == final["total"] == {"sets": 3, "images": 6}
    assert final["state"] == "done" and final["failures"] == 0 and final["eta_s"] == 0.0
