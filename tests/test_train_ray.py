"""Training on Ray Train, tiny preset, 2 CPU workers with gloo, one local Ray for the module:
learning (both variants), bit-exact resume after an injected failure, a second fit that continues,
S3 for data, checkpoints and export, bad data skipped and counted (Train) or named in the error
(Ray Data). Each fit costs ~40 s of start-up on 2 cores (processes importing torch and
diffusers), so the checks share few fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_tree
from safetensors.torch import load_file

from m2m_ray import storage
from m2m_ray.config import StorageConfig, load_config
from m2m_ray.data.training import build_stream_dataset, plan_stream
from m2m_ray.formats.mis import MISLayout
from m2m_ray.mis.synthetic import write_synthetic_mis
from m2m_ray.models.m2m_unet import WEIGHTS_NAME
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.state import latest_checkpoint, read_trainer_state
from m2m_ray.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16  # tiny M2M on the synthetic MIS halves its loss in ~12 steps at lr 2e-3


def _config(tmp: Path, mis: str, name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/tiny/train.yaml", [
        f"--run_name={name}", f"--data.uri={mis}", f"--storage_path={tmp / 'runs'}",
        "--export_uri=null", f"--max_steps={STEPS}", "--log_every_steps=4",
        "--checkpoint.every_steps=4", "--checkpoint.num_to_keep=8", "--optim.lr=2e-3",
        "--optim.warmup_steps=2", "--samples.sample.num_inference_steps=2", *overrides])


def _losses(summary: dict) -> list[float]:
    """train/loss of the kept checkpoints (every 4 steps), in step order."""
    return [c["train/loss"] for c in sorted(summary["checkpoints"], key=lambda c: c["train/step"])]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained and the EMA weights of a checkpoint."""
    return {f"{folder}.{name}": tensor for folder in ("unet", "ema_unet")
            for name, tensor in load_file(checkpoint / folder / WEIGHTS_NAME).items()}


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_self_learns_resumes_exactly_after_a_failure_and_continues(ray_local, tiny_mis, tmp_path):
    mis = tiny_mis  # read-only here: runs, checkpoints and faults go under tmp_path
    # uninterrupted reference run: learns, checkpoints with sample grids, exports
    straight = run_training(_config(tmp_path, mis, "straight"))
    assert straight["step"] == STEPS
    runs = tmp_path / "runs"
    metrics = straight["metrics"]
    assert metrics["train/samples_per_s"] > 0 and metrics["train/images_per_s"] == pytest.approx(
        4 * metrics["train/samples_per_s"])
    final = Path(straight["checkpoint"])
    assert sorted(p.name for p in final.iterdir()) == [
        "ema_unet", "lr_scheduler.pt", "optimizer.pt", "rng_state.pt", "samples.png",
        "train_config.json", "trainer_state.json", "unet"]
    losses = _losses(straight)  # learning: the last interval's loss is under half the first's
    assert len(losses) == STEPS // 4 and losses[-1] < 0.5 * losses[0], losses
    # the same run, failing once right after step 10 (checkpoint at 8): FailureConfig restarts the
    # workers from step 8, and the run ends with the same weights, EMA included
    interrupted = run_training(_config(tmp_path, mis, "interrupted",
                                       "--fault_injection.fail_at_step=10", "--max_failures=1"))
    assert (runs / "interrupted/_faults/fail_at_step_10").is_file()
    assert interrupted["step"] == STEPS
    reference, resumed = _weights(final), _weights(Path(interrupted["checkpoint"]))
    assert reference.keys() == resumed.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"
    # a second fit of the same run name + storage path continues from its last checkpoint
    more = run_training(_config(tmp_path, mis, "interrupted", f"--max_steps={STEPS + 2}",
                                "--fault_injection.fail_at_step=10", "--max_failures=0"))
    assert more["step"] == STEPS + 2
    assert (runs / "interrupted" / f"checkpoint_{STEPS + 2:08d}").is_dir()
    state = json.loads((Path(more["checkpoint"]) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["positions"]) == 2
    assert [c["train/step"] for c in more["checkpoints"]][-1] == STEPS + 2


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_dino_learns_on_s3_via_vae_actors_skipping_a_bad_set(ray_local, s3_bucket, tmp_path):
    """M2M-DINO from WebDataset shards without latents (VAE actors encode), MIS, checkpoints and
    export all on S3 (moto), one set of corrupt images skipped and counted; run length in epochs,
    gradient accumulation."""
    endpoint, bucket = s3_bucket
    local = tmp_path / "mis"
    write_synthetic_mis(str(local), num_shards=2, sets_per_shard=3, formats=("webdataset",),
                        keep_latents=False)
    _break_images(MISLayout(str(local)).webdataset(1))
    storage_cfg = StorageConfig(endpoint_url=endpoint)
    fs, _ = storage.fsspec_filesystem(f"s3://{bucket}", storage_cfg)
    fs.put(f"{local}/", f"{bucket}/mis/", recursive=True)
    # the paper's run-length and batch settings (Appendix A): epochs over the train sets (6 sets,
    # 4 per step: 10.7 epochs = 16 steps) and each worker's 2 sets in 2 accumulated micro-batches
    cfg = _config(tmp_path, f"s3://{bucket}/mis", "dino", "--m2m.variant=dino",
                  "--data.format=webdataset", "--data.on_bad_data=skip",
                  f"--storage_path=s3://{bucket}/runs", f"--export_uri=s3://{bucket}/model",
                  f"--storage.endpoint_url={endpoint}", "--max_steps=null", "--num_epochs=10.7",
                  "--gradient_accumulation_steps=2")
    summary = run_training(cfg)
    assert summary["run_length"] == {"shards": 2, "global_batch_size": 4, "num_epochs": 10.7,
                                     "sets": 6, "max_steps": STEPS, "derived": True}
    assert summary["step"] == STEPS and summary["checkpoint"].startswith(f"{bucket}/runs/dino/")
    assert summary["metrics"]["data/skipped_sets"] >= 1
    assert summary["skipped_data"]["sets"] >= 1 and summary["skipped_data"]["shards"] == 0
    assert "cannot be decoded" in summary["skipped_data"]["examples"][0]
    losses = _losses(summary)
    assert losses[-1] < 0.5 * losses[0], losses
    # what a resumed run would start from, found on S3 the way MISDataConfig finds it
    assert read_trainer_state(latest_checkpoint(cfg)).step == STEPS
    index = json.loads(fs.cat(f"{bucket}/model/model_index.json"))
    assert index == {"_class_name": "M2MPipeline", "variant": "dino", "preset": "tiny"}
    assert fs.exists(f"{bucket}/model/dino/config.json")  # the export carries DINOv2


def _break_images(tar_path: str) -> None:
    """Replace every image of the shard's first set with bytes that are no image."""
    import io
    import tarfile

    members = []
    with tarfile.open(tar_path) as tar:
        first_key = None
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            key = info.name.split(".")[0]
            first_key = first_key or key
            if key == first_key and info.name.endswith(".jpg"):
                data = b"not a jpeg"
            members.append((info.name, data))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_truncated_shard_fails_the_stream_naming_the_shard(ray_local, tiny_mis, tmp_path):
    mis = copy_tree(tiny_mis, tmp_path)  # its own copy: a shard is cut below
    layout = MISLayout(mis)
    truncated = layout.parquet(1)
    with open(truncated, "r+b") as f:
        f.truncate(Path(truncated).stat().st_size - 100)  # footer gone
    cfg = _config(tmp_path, mis, "bad")
    shards = (layout.parquet(0), truncated)
    stream = plan_stream(cfg, shards, 2.0, True, rank=0, world_size=1, start=None, first_step=0)
    dataset = build_stream_dataset(stream, cfg, report_bad=None)
    with pytest.raises(Exception) as failure:
        for _ in dataset.iter_batches(batch_size=2):
            pass
    assert f"cannot read Parquet shard {truncated}" in str(failure.value)
    assert "CorruptShardError" in str(failure.value)
    # through the trainer: the readers' error itself, not Ray Train's WorkerGroupError whose
    # message is the worker's traceback
    from m2m_ray.formats.mis import CorruptShardError

    with pytest.raises(CorruptShardError, match=rf"^cannot read Parquet shard {truncated}: "
                                                r"ArrowInvalid: .*data.on_bad_data=skip"):
        run_training(_config(tmp_path, mis, "bad_run", "--max_failures=0"))
