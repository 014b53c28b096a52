"""MIS stage 2 end to end on the tiny preset with a local Ray: shards in both formats, faults,
resumability, standard readers, regeneration, S3."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.formats.ids import image_seed
from m2m_ray.formats.mis import MISLayout, iter_mis, read_mis
from m2m_ray.mis.build import run_generate_stage
from m2m_ray.mis.captions import run_captions_stage
from m2m_ray.mis.config import BuildMISConfig
from m2m_ray.mis.generate import regenerate_set
from m2m_ray.mis.preview import preview
from m2m_ray.mis.verify import main as verify_main
from m2m_ray.mis.verify import verify_mis

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a red fox in the snow", "a lighthouse on a rocky coast at dusk",
    'He said "hello to the crowd', "a bowl of ramen", "", "a watercolor village",
    "a cartoon robot holding a balloon", "an old map of Paris",
]
N_IMAGES = 25


def _write_tsv(path: Path) -> Path:
    lines = [f"http://img.example/{i}.jpg\t{c}" for i, c in enumerate(CAPTIONS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(tmp: Path, output_uri: str, **generate) -> BuildMISConfig:
    tsv = _write_tsv(tmp / "cc12m.tsv")
    overrides = {"num_inference_steps": 3, "height": 64, "width": 64,
                 "actors": {"num_gpus": 0, "max_actors": 2},
                 "captions_per_batch": 2, "images_per_caption": N_IMAGES,
                 **generate}
    return BuildMISConfig.model_validate({
        "output_uri": output_uri, "model": {"preset": "tiny"},
        "captions": {"inputs": [str(tsv)], "lines_per_shard": 3, "test_fraction": 0.3},
        "generate": overrides,
    })


def _sets(root: str, fmt: str = "parquet", storage_cfg=None) -> dict[int, dict]:
    return {s["caption_id"]: s for s in iter_mis(root, fmt, storage_cfg)}


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """One dataset built with an injected actor crash mid-way through a shard."""
    tmp = tmp_path_factory.mktemp("mis")
    cfg = _config(tmp, str(tmp / "out"))
    cfg.generate.fault_injection.crash_actor_on_shard = 1  # shard 1 = lines 4..6
    run_captions_stage(cfg)
    summary = run_generate_stage(cfg)
    return cfg, summary


@pytest.mark.timeout(600)
def test_build_survives_actor_crash_and_verifies(built):
    cfg, summary = built
    layout = MISLayout(cfg.output_uri)
    assert storage.exists(layout.fault_marker(1)), "the injected crash did not happen"
    problems, verified = verify_mis(cfg.output_uri)
    assert problems == []
    assert verified["sets"] == 7 and summary["sets"] == 7  # 8 lines, one empty caption rejected
    assert summary["images"] == 7 * N_IMAGES and summary["pending_shards"] == []
    assert verify_main([cfg.output_uri]) == 0
    sets = _sets(cfg.output_uri)
    assert len(sets) == 7
    for cid, s in sets.items():
        assert s["seeds"] == [image_seed(cid, i, 0) for i in range(N_IMAGES)]
        assert s["latents"].shape == (N_IMAGES, 4, 8, 8) and s["latents"].dtype == np.float16
    assert {s["caption"] for s in sets.values()} == {c for c in CAPTIONS if c}


@pytest.mark.timeout(300)
def test_formats_agree_and_standard_tools_read_them(built):
    import webdataset as wds

    cfg, _ = built
    layout = MISLayout(cfg.output_uri)
    assert _sets(cfg.output_uri, "parquet").keys() == _sets(cfg.output_uri, "webdataset").keys()
    for a, b in zip(iter_mis(cfg.output_uri, "parquet"), iter_mis(cfg.output_uri, "webdataset")):
        assert a["images"] == b["images"] and a["seeds"] == b["seeds"]
        assert np.array_equal(a["latents"], b["latents"]) and a["metadata"] == b["metadata"]
    # webdataset library, no project code: 25 images + the json of each set
    sample = next(iter(wds.WebDataset(layout.webdataset(0), shardshuffle=False)))
    header = json.loads(sample["json"])
    images = [sample[f"{i:02d}.jpg"] for i in range(N_IMAGES)]
    assert Image.open(io.BytesIO(images[0])).size == (64, 64)
    assert header["seeds"] == [image_seed(header["caption_id"], i, 0) for i in range(N_IMAGES)]
    # pyarrow, no project code
    table = pq.read_table(layout.parquet(0))
    assert table.num_rows == 3 and len(table.column("images")[0]) == N_IMAGES
    # Ray Data's own readers, both formats, same rows
    by_parquet = {r["caption_id"]: r for r in read_mis(cfg.output_uri, "parquet").take_all()}
    by_wds = {r["caption_id"]: r for r in read_mis(cfg.output_uri, "webdataset").take_all()}
    assert by_parquet.keys() == by_wds.keys() and len(by_parquet) == 7
    for cid, row in by_parquet.items():
        assert list(row["images"]) == list(by_wds[cid]["images"])
        assert json.loads(row["metadata"]) == json.loads(by_wds[cid]["metadata"])
    assert {r["caption_id"] for r in read_mis(cfg.output_uri, split="test").take_all()} == {
        cid for cid, s in _sets(cfg.output_uri).items() if s["split"] == "test"}


@pytest.mark.timeout(300)
def test_regenerated_set_is_identical_and_preview(built, tmp_path):
    cfg, _ = built
    sample = next(iter(iter_mis(cfg.output_uri)))
    regenerated = regenerate_set(sample["caption"], sample["caption_id"], sample["metadata"])
    stored = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in sample["images"]]
    # JPEG: compare after the same encoding the stored images went through
    for image, ref in zip(regenerated, stored):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=sample["metadata"]["image_quality"])
        assert np.array_equal(np.asarray(Image.open(buffer).convert("RGB")), ref)
    out = tmp_path / "sheet.png"
    assert preview(cfg.output_uri, str(out), num_sets=3) == 3
    assert Image.open(out).size[0] > 25 * 96


@pytest.mark.timeout(300)
def test_rerun_skips_committed_and_refuses_other_settings(built):
    cfg, _ = built
    layout = MISLayout(cfg.output_uri)
    before = {sid: s["seconds"] for sid, s in layout.committed_stats().items()}
    summary = run_generate_stage(cfg)
    assert summary["this_run"]["shards"] == 0
    assert {sid: s["seconds"] for sid, s in layout.committed_stats().items()} == before
    other = cfg.model_copy(deep=True)
    other.generate.guidance_scale = 3.0
    with pytest.raises(ValueError, match="guidance_scale"):
        run_generate_stage(other)


@pytest.mark.timeout(600)
def test_killed_driver_rerun_equals_uninterrupted_run(built, ray_local, tmp_path):
    """Kill build_mis.py (a job on the test's Ray) once a shard is committed, rerun it: the result
    equals the dataset built without interruption."""
    cfg, _ = built
    out = tmp_path / "killed"
    tsv = Path(cfg.captions.inputs[0])
    args = [sys.executable, str(REPO / "pipelines" / "build_mis.py"),
            "--config", str(REPO / "configs" / "tiny" / "build_mis.yaml"),
            f"--output_uri={out}", f"--captions.inputs=[{tsv}]", "--captions.lines_per_shard=3",
            "--captions.test_fraction=0.3", "--stages=[captions, generate]",
            "--generate.num_inference_steps=3", "--generate.height=64", "--generate.width=64",
            "--generate.actors.num_gpus=0", "--generate.captions_per_batch=2",
            "--generate.actors.max_actors=1",
            f"--generate.images_per_caption={N_IMAGES}"]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    first = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    layout = MISLayout(str(out))
    deadline = time.monotonic() + 300
    while not layout.committed_stats():
        assert first.poll() is None, "build_mis.py ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert len(layout.committed_stats()) < 3, "the run finished before it was killed"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert verify_mis(str(out))[0] == []
    resumed, reference = _sets(str(out)), _sets(cfg.output_uri)
    assert resumed.keys() == reference.keys()
    for cid in reference:
        assert resumed[cid]["images"] == reference[cid]["images"]
        assert resumed[cid]["seeds"] == reference[cid]["seeds"]


@pytest.mark.timeout(600)
def test_s3_output(ray_local, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    cfg = _config(tmp_path, f"s3://{bucket}/mis", images_per_caption=4, formats=["webdataset"])
    cfg.captions.lines_per_shard = 8
    cfg.storage = StorageConfig(endpoint_url=endpoint)
    run_captions_stage(cfg)
    summary = run_generate_stage(cfg)
    assert summary["sets"] == 7 and summary["committed_shards"] == 1
    assert verify_mis(cfg.output_uri, cfg.storage)[0] == []
    sets = _sets(cfg.output_uri, "webdataset", cfg.storage)
    assert len(sets) == 7 and all(len(s["images"]) == 4 for s in sets.values())
