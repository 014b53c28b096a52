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
from m2m_ray.formats.mis import MISLayout, latents_to_npy
from m2m_ray.formats.mis_read import decode_latents, iter_mis, read_mis
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
@pytest.mark.ray
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
        latents = decode_latents(s["latents"], f"set {cid}")
        assert latents.shape == (N_IMAGES, 4, 8, 8) and latents.dtype == np.float16
    assert {s["caption"] for s in sets.values()} == {c for c in CAPTIONS if c}


@pytest.mark.timeout(300)
@pytest.mark.ray
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
    # Ray Data's own readers, no project code
    import ray

    ray_parquet = ray.data.read_parquet(layout.parquet(0)).take_all()
    ray_wds = ray.data.read_webdataset(layout.webdataset(0), decoder=None).take_all()
    assert [list(r["images"]) for r in ray_parquet] == [
        [r[f"{i:02d}.jpg"] for i in range(N_IMAGES)] for r in ray_wds]
    # the project's Ray Dataset of MIS (read_mis: its guarded readers in Ray Data tasks), both
    # formats, same rows
    by_parquet = {r["caption_id"]: r for r in read_mis(cfg.output_uri, "parquet").take_all()}
    by_wds = {r["caption_id"]: r for r in read_mis(cfg.output_uri, "webdataset").take_all()}
    assert by_parquet.keys() == by_wds.keys() and len(by_parquet) == 7
    for cid, row in by_parquet.items():
        assert list(row["images"]) == list(by_wds[cid]["images"])
        assert json.loads(row["metadata"]) == json.loads(by_wds[cid]["metadata"])
    assert {r["caption_id"] for r in read_mis(cfg.output_uri, split="test").take_all()} == {
        cid for cid, s in _sets(cfg.output_uri).items() if s["split"] == "test"}


@pytest.mark.timeout(300)
@pytest.mark.ray
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
@pytest.mark.ray
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
@pytest.mark.ray
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
@pytest.mark.ray
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


# --- issue 17, dataset building: resume checks, temporaries, bit-exact regeneration, NaN ---------


def _stage1_files(root: str) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in Path(root).rglob("*") if p.is_file()
            and (p.name == "captions_stats.json" or "captions" in p.parts or "rejects" in p.parts)}


@pytest.mark.timeout(300)
@pytest.mark.ray
def test_rerun_with_other_caption_settings_or_inputs_is_refused(built):
    """Issue 17.1: lines_per_shard 3 → 4 (or changed input bytes) over committed shards is refused
    with what changed and how to start over; an unchanged rerun keeps stage 1 untouched; stage 2
    with other caption settings is refused; a dataset that disagrees with stage 1 fails the run."""
    from m2m_ray.config import ResumeMismatchError

    cfg, _ = built
    root = cfg.output_uri
    before = _stage1_files(root)
    kept = run_captions_stage(cfg)  # nothing changed: kept as it is, not deleted and rewritten
    assert kept["kept_as_is"] and _stage1_files(root) == before

    other = cfg.model_copy(deep=True)
    other.captions.lines_per_shard = 4
    with pytest.raises(ResumeMismatchError, match=r"captions\.lines_per_shard: 3 → 4.*new "
                                                  r"output_uri"):
        run_captions_stage(other)
    with pytest.raises(ResumeMismatchError, match=r"lines_per_shard: stage 1 ran with 3"):
        run_generate_stage(other)
    for key, value in (("max_tokens", 20), ("dedup", True), ("test_fraction", 0.5)):
        changed = cfg.model_copy(deep=True)
        setattr(changed.captions, key, value)
        with pytest.raises(ResumeMismatchError, match=f"captions.{key}"):
            run_captions_stage(changed)

    tsv = Path(cfg.captions.inputs[0])
    data, stat = tsv.read_bytes(), tsv.stat()
    try:
        tsv.write_bytes(data + b"http://img.example/9.jpg\ta new caption\n")
        with pytest.raises(ResumeMismatchError, match=f"input {tsv} changed: size {len(data)}"):
            run_captions_stage(cfg)
    finally:
        tsv.write_bytes(data)
        os.utime(tsv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _stage1_files(root) == before and verify_mis(root)[0] == []

    # A run never ends in success over shards that disagree with stage 1.
    layout = MISLayout(root)
    stats_uri = Path(layout.stats(0))
    saved = stats_uri.read_bytes()
    try:
        stats_uri.write_text(json.dumps({**json.loads(saved), "sets": 2}))
        with pytest.raises(RuntimeError, match="2 sets \\+ 0 rejected, but stage 1 kept 3"):
            run_generate_stage(cfg)
        stats_uri.write_text(json.dumps({**json.loads(saved), "captions_digest": "other"}))
        with pytest.raises(ResumeMismatchError, match="another stage-1 output"):
            run_generate_stage(cfg)
    finally:
        stats_uri.write_bytes(saved)
    assert run_generate_stage(cfg)["this_run"]["shards"] == 0


_DYING_WRITER = """
import os, sys, time
from m2m_ray.formats.mis import MISLayout, ShardWriter
writer = ShardWriter(MISLayout(sys.argv[1]), 7, ["parquet", "webdataset"])
open(os.path.join(writer._tmp, "shard.partial-bytes"), "wb").write(b"x" * 1000)
print(writer._tmp, flush=True)
if sys.argv[2] == "die":
    os._exit(1)  # a killed actor: no abort, no cleanup
time.sleep(60)
"""


def test_killed_writers_temporaries_are_swept(tmp_path):
    """Issue 17.2: a killed process's partial shard is removed when the next writer starts; a
    live writer's folder is left alone."""
    from m2m_ray.formats.mis import ShardWriter, shard_temp_root

    def start(mode: str) -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen([sys.executable, "-c", _DYING_WRITER, str(tmp_path), mode],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        return proc, Path(proc.stdout.readline().strip())

    live, live_tmp = start("live")
    dead, dead_tmp = start("die")  # its writer leaves the live one's folder alone
    dead.wait(timeout=60)
    try:
        assert dead_tmp.is_dir() and live_tmp.is_dir()
        assert str(dead_tmp).startswith(shard_temp_root())
        writer = ShardWriter(MISLayout(str(tmp_path)), 8, ["parquet"])
        assert not dead_tmp.parent.exists(), "the dead writer's temporaries were not swept"
        assert live_tmp.is_dir(), "a live writer's temporaries were swept"
        writer.abort()
        assert not Path(writer._tmp).exists()
    finally:
        live.kill()
        live.wait()


def _generator(**overrides):
    from m2m_ray.mis.config import GenerateConfig
    from m2m_ray.mis.generate import SDSetGenerator
    from m2m_ray.models.config import ModelConfig

    cfg = GenerateConfig(**{"images_per_caption": N_IMAGES, "num_inference_steps": 3,
                            "height": 64, "width": 64, "actors": {"num_gpus": 0},
                            "captions_per_batch": 2, "image_format": "png", **overrides})
    return SDSetGenerator(ModelConfig(preset="tiny"), cfg)


def _records(generator, captions: list[str]) -> tuple[list, list]:
    import concurrent.futures as cf

    from m2m_ray.mis.generate import encoded_sets

    rows = [{"caption_id": i + 1, "caption": c, "split": "train", "url": "", "shard_id": 0}
            for i, c in enumerate(captions)]
    rejected: list[dict] = []
    with cf.ThreadPoolExecutor(2) as images, cf.ThreadPoolExecutor(1) as batches:
        records = [r for batch in encoded_sets(generator, rows, images, batches, {},
                                               rejected=rejected) for r in batch]
    return records, rejected


@pytest.fixture
def single_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_every_regenerated_image_is_bit_exact(single_thread):
    """Issue 17.3: PNG, one thread, captions_per_batch=2 and a vae_batch_size (3) that does not
    divide the set (25): every image of several sets regenerates exactly, alone."""
    import torch

    generator = _generator(vae_batch_size=3)
    records, rejected = _records(generator, [c for c in CAPTIONS if c][:4])
    assert rejected == [] and len(records) == 4
    for record in records:
        assert record.metadata["vae_batch_size"] == 3
        regenerated = regenerate_set(record.caption, record.caption_id, record.metadata)
        for index, (image, stored) in enumerate(zip(regenerated, record.images)):
            assert np.array_equal(np.asarray(image),
                                  np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))), (
                f"set {record.caption_id} image {index} differs from its regeneration")
    # The kind, at the float level: a set decodes to the same bits alone as in any batch.
    latents = torch.randn(3, N_IMAGES, 4, 8, 8)
    together = generator.decode_sets(latents)
    for i in range(3):
        assert torch.equal(together[i], generator.decode_sets(latents[i:i + 1])[0])


@pytest.mark.timeout(300)
def test_speed_levers_are_stored_and_regenerate_exactly(single_thread):
    """Issue 18: fused QKV projections and a pinned SDPA kernel (opt-in levers of the generator)
    are stored with each set, move pixels by at most a grey level or so, and the set regenerates
    bit-exactly from its metadata; a kernel the CPU lacks is refused by name."""
    plain, _ = _records(_generator(images_per_caption=4), CAPTIONS[:1])
    generator = _generator(images_per_caption=4, fuse_qkv=True, attention_backend="math")
    assert {type(p).__name__ for p in generator.pipe.unet.attn_processors.values()} == {
        "FusedAttnProcessor2_0"}
    fused, _ = _records(generator, CAPTIONS[:1])
    record = fused[0]
    assert record.metadata["fuse_qkv"] is True and record.metadata["attention_backend"] == "math"
    assert record.metadata["compile"] == "none" and plain[0].metadata["fuse_qkv"] is False
    for a, b in zip(plain[0].images, record.images):
        diff = np.abs(np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
                      - np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16))
        assert diff.max() <= 2, "fusing the projections changed the math, not just the kernels"
    again = regenerate_set(record.caption, record.caption_id, record.metadata)
    assert all(np.array_equal(np.asarray(a), np.asarray(Image.open(io.BytesIO(b))))
               for a, b in zip(again, record.images))
    with pytest.raises(ValueError, match="attention_backend 'efficient'.*CPU"):
        _generator(attention_backend="efficient")


@pytest.mark.timeout(300)
def test_non_finite_sets_are_retried_in_float32_or_rejected(single_thread, monkeypatch):
    """Issue 17.4: NaN from the UNet never becomes a stored black image: in float32 the set is
    rejected with its reason (the other set of the batch is kept); in a lower precision it is made
    again in float32 and stored as such, and regenerates exactly from its metadata."""
    import torch

    from m2m_ray.mis.generate import _nan_unet_rows

    generator = _generator(images_per_caption=4, fault_injection={"nan_unet_output_on_caption": 2})
    records, rejected = _records(generator, CAPTIONS[:3])
    assert [r.caption_id for r in records] == [1, 3]
    assert rejected == [{"caption_id": 2, "reason": "non-finite latents and pixels (NaN/Inf) in "
                         "float32; no safer precision to retry in"}]

    half = _generator(images_per_caption=4)
    half.pipe.to(dtype=torch.bfloat16)
    half.dtype = torch.bfloat16
    poison = _nan_unet_rows(half.pipe.unet, 2, 4, 1)  # set 2 of each batch of 2, bf16 only
    poison.__enter__()
    try:
        out = half.generate(CAPTIONS[:2], [1, 2])
    finally:
        poison.__exit__(None, None, None)
    assert out.rejected == [None, None]
    assert out.metadata[0]["dtype"] == "bfloat16" and out.metadata[1]["dtype"] == "float32"
    assert out.metadata[1]["retried"].startswith("non-finite latents and pixels (NaN/Inf) in bf")
    assert np.isfinite(out.latents).all() and out.pixels[1].max() > 0
    again = regenerate_set(CAPTIONS[1], 2, out.metadata[1])
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(again, out.pixels[1]))


@pytest.mark.timeout(600)
@pytest.mark.ray
def test_build_counts_rejected_sets_and_verifies(ray_local, tmp_path):
    """Issue 17.4 through stage 2: the NaN set is not stored, its shard's stats list it, the
    manifest and the run's summary count it, and verify accepts the dataset (but not NaN
    latents)."""
    cfg = _config(tmp_path, str(tmp_path / "out"), images_per_caption=4,
                  fault_injection={"nan_unet_output_on_caption": 2})
    cfg.captions.lines_per_shard = 8
    run_captions_stage(cfg)
    summary = run_generate_stage(cfg)
    assert summary["sets"] == 6 and summary["rejected_sets"] == 1
    assert summary["this_run"]["rejected_sets"] == 1
    stats = MISLayout(cfg.output_uri).committed_stats()[0]
    assert [r["caption_id"] for r in stats["rejected_sets"]] == [2]
    assert 2 not in _sets(cfg.output_uri)
    assert verify_mis(cfg.output_uri)[0] == []
    assert verify_mis(cfg.output_uri)[1]["rejected_sets"] == 1
    from m2m_ray.mis.verify import _check_set

    sample = next(iter(iter_mis(cfg.output_uri)))
    settings = json.loads(Path(MISLayout(cfg.output_uri).config).read_text())["config"]["generate"]
    assert _check_set(sample, settings, "here") == []
    latents = decode_latents(sample["latents"], "here")
    latents[1, 0, 0, 0] = np.nan
    sample["latents"] = latents_to_npy(latents)
    assert _check_set(sample, settings, "here") == [
        f"here: set {sample['caption_id']} has non-finite latents (NaN/Inf) in images [1]: its "
        "images are not what the model made; regenerate it"]
