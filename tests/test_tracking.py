"""Experiment tracking of a training run (m2m_ray/train/tracking.py, flops.py): one tiny Ray Train
run reports to TensorBoard, W&B (offline) and MLflow (local file store) at once, and each is read
back with its own library's reader: loss, lr, MFU at the logged steps, the sample grids, the
resolved config. Plus the FLOP count against a real forward/backward."""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from m2m_ray.config import load_config
from m2m_ray.train.build import build_model
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.flops import mfu, train_flops_per_set
from m2m_ray.train.tracking import logging_dir, run_key
from m2m_ray.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 4  # metrics and a checkpoint with its sample grid at steps 4 and 8


def _config(tmp: Path, mis: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/tiny/train.yaml", [
        "--run_name=tracked", f"--data.uri={mis}", f"--storage_path={tmp / 'runs'}",
        "--export_uri=null", f"--max_steps={STEPS}", f"--log_every_steps={EVERY}",
        f"--checkpoint.every_steps={EVERY}", "--samples.sample.num_inference_steps=2",
        "--report_to=[tensorboard,wandb,mlflow]", "--tracking.wandb.mode=offline",
        f"--tracking.wandb.dir={tmp}", f"--tracking.mlflow.tracking_uri=file:{tmp / 'mlruns'}",
        # CPU runs report train/mfu only against a given peak (a rate measured on shared cores
        # is no peak): a nominal 1 TFLOP/s per worker
        "--tracking.peak_tflops=1.0", *overrides])


@pytest.fixture(scope="module")
def mlflow_file_store():
    """MLflow 3 refuses a file store without this; set before Ray starts so workers inherit it."""
    old = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    yield
    if old is None:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE")
    else:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = old


@pytest.fixture(scope="module")
def tracked_run(mlflow_file_store, tiny_mis, request, tmp_path_factory):
    request.getfixturevalue("ray_local")  # after the environment above
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = _config(tmp, tiny_mis)
    summary = run_training(cfg)
    assert summary["step"] == STEPS
    return cfg, tmp, summary


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_tensorboard_events_hold_loss_lr_mfu_grids_and_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, tmp, summary = tracked_run
    folder = logging_dir(cfg)
    assert folder == str(tmp / "runs" / "tracked" / "tensorboard")
    events = EventAccumulator(folder, size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [EVERY, STEPS]
    assert loss[-1].value == pytest.approx(summary["metrics"]["train/loss"], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(
        [c["train/lr"] for c in sorted(summary["checkpoints"], key=lambda c: c["train/step"])])
    mfus = [e.value for e in events.Scalars("train/mfu")]
    tflops = [e.value for e in events.Scalars("train/tflops_per_s")]
    assert all(0 < value < 1 for value in mfus), mfus
    assert mfus == pytest.approx([value / 1.0 for value in tflops], rel=1e-5)  # over the peak
    assert summary["metrics"]["train/mfu"] == pytest.approx(mfus[-1], rel=1e-6)  # Ray Train too
    images = events.Images("samples")
    assert [e.step for e in images] == [EVERY, STEPS]
    grid = Path(summary["checkpoint"]) / "samples.png"
    from PIL import Image

    width, height = Image.open(grid).size
    assert (images[-1].width, images[-1].height) == (width, height)
    assert "config/text_summary" in tags["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "run_name: tracked" in text and "report_to:" in text


def _wandb_records(path: str):
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``,
    magic, version), then LevelDB log blocks of 32 KiB holding (crc32c, length, type) + data
    chunks; each full record is a ``wandb_internal_pb2.Record``. wandb ≥ 0.19 ships no Python
    reader of its own files."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is zero padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_wandb_offline_run_holds_loss_lr_grids_and_config(tracked_run):
    cfg, tmp, summary = tracked_run
    runs = glob.glob(str(tmp / "wandb" / f"offline-run-*-{run_key(cfg)}"))
    assert len(runs) == 1, runs
    history, config = [], {}
    for record in _wandb_records(glob.glob(f"{runs[0]}/run-*.wandb")[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json)
                           for item in record.run.config.update})
    logged = [row for row in history if "train/loss" in row]
    assert [row["_step"] for row in logged] == [EVERY, STEPS]
    assert logged[-1]["train/loss"] == pytest.approx(summary["metrics"]["train/loss"])
    assert all(row["train/lr"] > 0 and 0 < row["train/mfu"] < 1 for row in logged)
    grids = [row for row in history if row.get("samples/_type") == "image-file"]
    assert [row["_step"] for row in grids] == [EVERY, STEPS]
    assert all((Path(runs[0]) / "files" / row["samples/path"]).is_file() for row in grids)
    assert config["run_name"] == "tracked" and config["max_steps"] == STEPS


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_mlflow_file_store_holds_loss_lr_grids_and_params(tracked_run):
    from mlflow.tracking import MlflowClient

    cfg, tmp, summary = tracked_run
    client = MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")
    experiment = client.get_experiment_by_name(cfg.tracking.project_name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [EVERY, STEPS]
    assert loss[-1].value == pytest.approx(summary["metrics"]["train/loss"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] == [EVERY,
                                                                                          STEPS]
    params = run.data.params
    assert params["run_name"] == "tracked" and params["optim.lr"] == str(cfg.optim.lr)
    assert json.loads(params["report_to"]) == ["tensorboard", "wandb", "mlflow"]
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert sum(p.endswith(".png") and "+step+" in p for p in images) == 2, images
    names = [f.path for f in client.list_artifacts(run.info.run_id)]
    assert "train_config.json" in names


@pytest.mark.usefixtures("one_torch_thread")
def test_flops_per_set_match_a_real_forward_backward_and_mfu():
    cfg = load_config(TrainConfig, ROOT / "configs/tiny/train.yaml", [])
    model = build_model(cfg)
    counted = train_flops_per_set(model, 4)
    size = model.base_config["sample_size"]
    targets, context = torch.randn(1, 4, 4, size, size), torch.randn(1, 3, 4, size, size)
    # the math kernel is what the meta device counts (fused CPU attention has no FLOP formula)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(targets, torch.zeros(1, 4, dtype=torch.long), context, offset=0).pow(2).mean().backward()
    assert counted == counter.get_total_flops() > 0
    assert train_flops_per_set(model, 8) > 2 * counted  # quadratic attention over the set
    with pytest.raises(ValueError, match="at least 2 images"):
        train_flops_per_set(model, 1)
    assert mfu(1e12, 10.0, 2, 10.0) == pytest.approx(0.5)  # 10 TFLOP/s over 2 × 10 TFLOP/s
    # on a CPU without tracking.peak_tflops: FLOP/s, no MFU (nothing measured as a "peak")
    from m2m_ray.train.tracking import Trackers

    quiet = cfg.model_copy(update={"report_to": []})
    terms = Trackers(quiet, 0, 2, model, None, torch.device("cpu"), None, 0).mfu(
        {"train/samples_per_s": 4.0})
    assert set(terms) == {"train/tflops_per_s"}
    assert terms["train/tflops_per_s"] == pytest.approx(counted * 4.0 / 2 / 1e12)
