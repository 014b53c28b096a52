"""Training pieces without Ray: MIS → samples (read_item), eq. 5, schedule, EMA, checkpoint round
trip, fine-tuning init, sample grid, export, configs. The Ray runs are in test_train_ray.py."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from m2m_ray.config import ConfigError, load_config
from m2m_ray.data.training import (
    StreamPosition,
    plan_stream,
    read_item,
    subset_indices,
    use_stored_latents,
)
from m2m_ray.formats.mis import CorruptShardError, MISLayout
from m2m_ray.formats.mis_fields import parquet_schema
from m2m_ray.mis.synthetic import write_synthetic_mis
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.models.presets import load_scheduler, load_vae
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.train.build import build_model
from m2m_ray.train.checkpoint import load_checkpoint, rng_state, save_checkpoint
from m2m_ray.train.config import OptimConfig, TrainConfig
from m2m_ray.train.export import export_pipeline
from m2m_ray.train.preview import sample_grid
from m2m_ray.train.state import TrainerState
from m2m_ray.train.step import (
    EMA,
    LRSchedule,
    TrainBatch,
    m2m_loss,
    make_optimizer,
    step_generator,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(preset="tiny")
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mis(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mis")
    write_synthetic_mis(str(root), num_shards=2, sets_per_shard=3, test_fraction=0.3)
    return str(root)


def _cfg(mis_root: str, tmp: Path, **overrides) -> TrainConfig:
    base = load_config(TrainConfig, ROOT / "configs/tiny/train.yaml").model_dump()
    base.update(data={**base["data"], "uri": mis_root}, storage_path=str(tmp / "train"),
                export_uri=None)
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            base[section] = {**base[section], field: value}
        else:
            base[key] = value
    return TrainConfig.model_validate(base)


def _stream(cfg: TrainConfig, start=None, rank=0, world_size=1):
    layout = MISLayout(cfg.data.uri)
    path = layout.parquet if cfg.data.format == "parquet" else layout.webdataset
    shards = tuple(path(sid) for sid in sorted(layout.committed_stats()))
    return plan_stream(cfg, shards, 3.0, use_stored_latents(cfg, shards), rank, world_size,
                       start, 0)


def _read(stream, index: int, report=None) -> dict[str, np.ndarray]:
    blocks = list(read_item({"id": np.array([index])}, stream, report))
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {}


# --- data ----------------------------------------------------------------------------------------


def test_subsets_are_ordered_random_and_new_each_epoch():
    a = subset_indices(0, 0, 12345, 8, 25)
    assert len(set(a.tolist())) == 8 and a.min() >= 0 and a.max() < 25
    assert np.array_equal(a, subset_indices(0, 0, 12345, 8, 25))          # reproducible
    epochs = {tuple(subset_indices(0, e, 12345, 8, 25)) for e in range(20)}
    assert len(epochs) == 20                                               # new every epoch
    assert not np.array_equal(a, np.sort(a))                               # order is random too
    with pytest.raises(ValueError, match="images_per_set"):
        subset_indices(0, 0, 1, 26, 25)


def test_read_item_rows_formats_variants_and_resume(mis, tmp_path):
    cfg = _cfg(mis, tmp_path)
    stream = _stream(cfg)
    assert stream.use_stored_latents
    rows = _read(stream, 0)
    n = cfg.data.images_per_set
    train_sets = rows["caption_id"].shape[0]
    assert 1 <= train_sets <= 3 and set(rows) == {"item", "row", "caption_id", "epoch",
                                                  "indices", "latents"}
    assert rows["latents"].shape == (train_sets, n, 4, 8, 8) and rows["latents"].dtype == np.float16
    assert rows["row"].tolist() == list(range(train_sets))
    # the subset is the one subset_indices draws, and latents are those images' stored latents
    epoch, uri = stream.shard_of(0)
    stored = {s["caption_id"]: s for s in pq.read_table(uri).to_pylist()}
    for cid, indices, latents in zip(rows["caption_id"], rows["indices"], rows["latents"]):
        assert np.array_equal(indices, subset_indices(cfg.seed, epoch, int(cid), n, 25))
        full = np.load(io.BytesIO(stored[int(cid)]["latents"]))
        assert np.array_equal(latents, full[indices])
        assert stored[int(cid)]["split"] == "train"
    # the same item of the next epoch: other subsets
    next_epoch = _read(stream, len(stream.shards))
    assert next_epoch["epoch"][0] == epoch + 1
    # webdataset + dino + VAE-encode path: pixels for the VAE and DINO pixels, same subsets
    dino = _cfg(mis, tmp_path, m2m={"variant": "dino"}, data__latents="encode",
                data__format="webdataset")
    wds_rows = _read(_stream(dino), 0)
    assert set(wds_rows) >= {"pixels", "dino_pixels"} and "latents" not in wds_rows
    assert wds_rows["pixels"].shape[1:] == (n, 3, 64, 64) and wds_rows["pixels"].dtype == np.uint8
    assert np.array_equal(wds_rows["indices"], rows["indices"])
    # resume inside an item: exactly the sets after the position, with their row numbers
    resumed = _read(replace(stream, start=StreamPosition(item=0, row=1)), 0)
    assert resumed["caption_id"].tolist() == rows["caption_id"][1:].tolist()
    assert resumed["row"].tolist() == rows["row"][1:].tolist()
    # rank 1 of 2 reads the odd items
    assert _stream(cfg, rank=1, world_size=2).item_at(3) == 7


def _corrupt_parquet_image(uri: str) -> int:
    table = pq.read_table(uri).to_pylist()
    for image_index in range(25):
        table[0]["images"][image_index] = b"not an image"
    pq.write_table(pa.Table.from_pylist(table, schema=parquet_schema()), uri)
    return table[0]["caption_id"]


def test_training_reads_resize_exactly_as_inference_inputs(tmp_path):
    """One square resize for training and inference (``fit_square``): a 96 px MIS image reaches
    training as the same 64 px pixels that M2MPipeline.preprocess gives the sampler."""
    from m2m_ray.formats.mis_read import iter_mis
    from m2m_ray.sampling.pipeline import M2MPipeline

    root = str(tmp_path / "mis96")
    write_synthetic_mis(root, num_shards=1, sets_per_shard=2, size=96, keep_latents=False)
    cfg = _cfg(root, tmp_path, data__latents="encode", data__split=None)
    rows = _read(_stream(cfg), 0)
    assert rows["pixels"].shape[-2:] == (64, 64)
    images = {s["caption_id"]: s["images"] for s in iter_mis(root)}
    pipe = M2MPipeline.from_preset(TINY)
    for cid, indices, pixels in zip(rows["caption_id"], rows["indices"], rows["pixels"]):
        decoded = [Image.open(io.BytesIO(images[int(cid)][i])) for i in indices]
        expected = (pipe.preprocess(decoded) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(pixels, expected)  # (N, 3, 64, 64), bit for bit


def test_bad_data_errors_name_the_shard_or_are_skipped_and_counted(tmp_path):
    root = str(tmp_path / "mis")
    write_synthetic_mis(root, num_shards=2, sets_per_shard=2)
    layout = MISLayout(root)
    bad_cid = _corrupt_parquet_image(layout.parquet(0))
    with open(layout.webdataset(1), "r+b") as tar:  # cut the tar in the middle of a member
        tar.truncate(Path(layout.webdataset(1)).stat().st_size // 2)
    # a corrupt image: dino needs pixels of every chosen image
    dino = _cfg(root, tmp_path, m2m={"variant": "dino"})
    stream = _stream(dino)
    item = next(i for i in range(2) if stream.shard_of(i)[1] == layout.parquet(0))
    with pytest.raises(CorruptShardError, match=rf"shard {layout.parquet(0)}: set {bad_cid} image"):
        _read(stream, item)
    reported = []
    skipping = replace(stream, on_bad_data="skip")
    rows = _read(skipping, item, lambda *event: reported.append(event))
    assert rows["caption_id"].tolist() != [] and bad_cid not in rows["caption_id"].tolist()
    assert reported[0][:2] == ("set", layout.parquet(0)) and "cannot be decoded" in reported[0][2]
    # a truncated shard
    wds = _stream(_cfg(root, tmp_path, data__format="webdataset"))
    item = next(i for i in range(2) if wds.shard_of(i)[1] == layout.webdataset(1))
    with pytest.raises(CorruptShardError, match=f"WebDataset shard {layout.webdataset(1)}"):
        _read(wds, item)
    reported.clear()
    _read(replace(wds, on_bad_data="skip"), item, lambda *event: reported.append(event))
    assert [e[:2] for e in reported] == [("shard", layout.webdataset(1))]


def _corrupt_parquet_latents(path: str) -> int:
    """Zero the first 16 bytes (the .npy magic) of the first set's stored latents."""
    table = pq.read_table(path)
    latents = table.column("latents").to_pylist()
    latents[0] = b"\0" * 16 + latents[0][16:]
    table = table.set_column(table.schema.get_field_index("latents"), "latents",
                             pa.array(latents, pa.binary()))
    pq.write_table(table, path)
    return int(table.column("caption_id")[0].as_py())


def _cut_tar_after_first_set(path: str) -> None:
    """Truncate a WebDataset shard exactly at the header of its second set's first member: a
    valid tar of fewer sets, which readers used to take for the whole shard."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    first_key = members[0].name.split(".")[0]
    cut = next(m.offset for m in members if m.name.split(".")[0] != first_key)
    with open(path, "r+b") as f:
        f.truncate(cut)


def test_corrupt_latents_and_cut_shards_are_named_skipped_and_counted(tmp_path):
    """Corrupt stored latents used to raise numpy's bare "pickled data" ValueError (no shard
    named, skip mode could not skip them); a tar cut between two sets used to read as a valid,
    shorter shard. Both are the project's CorruptShardError naming the shard (and set), per set
    where the set is the unit, and the readers check a shard's set count against its stats."""
    from m2m_ray.formats.mis_read import iter_mis
    from m2m_ray.mis.verify import _check_set
    from m2m_ray.train.ingest import BadDataTally

    root = str(tmp_path / "mis")
    write_synthetic_mis(root, num_shards=2, sets_per_shard=3)
    layout = MISLayout(root)
    bad_cid = _corrupt_parquet_latents(layout.parquet(0))
    _cut_tar_after_first_set(layout.webdataset(1))
    counts = tuple(s["sets"] for _, s in sorted(layout.committed_stats().items()))
    cfg = _cfg(root, tmp_path)
    with pytest.raises(CorruptShardError, match=rf"set {bad_cid}: stored latents"):
        _stream(cfg)  # the probe of the dataset's first set already names it
    skip_cfg = _cfg(root, tmp_path, data__on_bad_data="skip")
    stream = replace(_stream(skip_cfg), shard_sets=counts, on_bad_data="error")
    assert stream.use_stored_latents  # decided from the next set that decodes
    item = next(i for i in range(2) if stream.shard_of(i)[1] == layout.parquet(0))
    with pytest.raises(CorruptShardError, match=rf"shard {layout.parquet(0)}: set {bad_cid}: "
                                                r"stored latents .* cannot be decoded"):
        _read(stream, item)
    reported = []
    rows = _read(replace(stream, on_bad_data="skip"), item, lambda *e: reported.append(e))
    assert len(rows["caption_id"]) == 2 and bad_cid not in rows["caption_id"].tolist()
    assert [e[:2] for e in reported] == [("set", layout.parquet(0))]  # a set, not the shard
    wds_cfg = _cfg(root, tmp_path, data__format="webdataset")
    wds = replace(_stream(wds_cfg), shard_sets=counts)
    item = next(i for i in range(2) if wds.shard_of(i)[1] == layout.webdataset(1))
    with pytest.raises(CorruptShardError, match=rf"shard {layout.webdataset(1)}: 1 sets read "
                                                "but its stats committed 3"):
        _read(wds, item)
    with pytest.raises(CorruptShardError, match="1 sets read but its stats committed 3"):
        list(iter_mis(root, "webdataset"))  # generation / evaluation / preview reads
    # verify decodes the latents iter_mis gives it (stored bytes) through the same guarded decode
    bad = next(s for s in iter_mis(root, "parquet") if s["caption_id"] == bad_cid)
    problems = _check_set(bad, {"images_per_caption": len(bad["seeds"]), "width": 64,
                                "height": 64, "base_seed": 0}, "verify")
    assert any(re.search(rf"set {bad_cid}: stored latents .* cannot be decoded", p)
               for p in problems), problems
    # a bad shard read again (task retries, restarts, epochs) is one bad shard
    tally = BadDataTally()
    for _ in range(5):
        tally.add("shard", layout.webdataset(1), "cut")
        tally.add("set", layout.parquet(0), f"set {bad_cid}: latents")
    assert {k: tally.totals()[k] for k in ("sets", "shards")} == {"sets": 1, "shards": 1}


# --- loss, schedule, EMA -------------------------------------------------------------------------


def _batch(num_sets=2, n=4, seed=0, task=False) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_sets, n, 4, 8, 8, generator=gen)
    pixels = torch.randint(0, 256, (num_sets, n, 3, 64, 64), generator=gen, dtype=torch.uint8)
    position = torch.arange(n).float().expand(num_sets, -1) if task else None
    return TrainBatch(latents, pixels, None if position is None else TaskConditions(
        position=position))


def test_loss_is_eq5_and_context_drop_drops_tasks_jointly():
    model = M2MUNet.from_preset(TINY, M2MConfig(variant="self"))
    alphas = load_scheduler(TINY, "ddim").alphas_cumprod
    batch = _batch()
    loss = m2m_loss(model, batch, alphas, step_generator(0, 5, 1, CPU), 0.0)
    # by hand, with the same draws
    gen = step_generator(0, 5, 1, CPU)
    t = torch.randint(0, 1000, (2, 4), generator=gen)
    noise = torch.randn(batch.latents.shape, generator=gen)
    torch.rand(2, generator=gen)
    a = alphas[t].view(2, 4, 1, 1, 1)
    eps = model(a.sqrt() * batch.latents + (1 - a).sqrt() * noise, t, batch.latents[:, :3])
    expected = sum(((eps[:, i] - noise[:, i]) ** 2).mean(dim=(1, 2, 3)) for i in range(4)).mean()
    torch.testing.assert_close(loss, expected)
    # tasks (fine-tuning path): trained task projections change the loss unless the context drops
    tasked = M2MUNet.from_preset(TINY, M2MConfig(variant="self", task_conditions=["position"]))
    with torch.no_grad():
        for name, param in tasked.named_parameters():
            if "task_proj" in name or "attn2.to_out" in name:
                param.normal_(0, 0.2)
    with_task, without = _batch(task=True), _batch()
    args = (alphas, step_generator(0, 0, 0, CPU))
    plain = m2m_loss(tasked, without, *args, 0.0)
    assert not torch.allclose(m2m_loss(tasked, with_task, alphas, step_generator(0, 0, 0, CPU),
                                       0.0), plain)
    dropped = [m2m_loss(tasked, b, alphas, step_generator(0, 0, 0, CPU), 1.0)
               for b in (with_task, without)]
    torch.testing.assert_close(dropped[0], dropped[1])  # dropped context = dropped tasks
    with pytest.raises(ValueError, match="lacks columns"):
        TrainBatch.from_columns({"latents": torch.zeros(1, 2, 4, 8, 8)}, CPU, ["position"])


def test_dino_loss_runs_through_the_frozen_encoder():
    from m2m_ray.models.context import DinoEncoder

    model = M2MUNet.from_preset(TINY, M2MConfig(variant="dino"))
    dino = DinoEncoder.from_preset(TINY)
    loss = m2m_loss(model, _batch(), load_scheduler(TINY, "ddim").alphas_cumprod,
                    step_generator(0, 0, 0, CPU), 0.1, dino)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is None for p in dino.parameters())
    assert model.unet.conv_out.weight.grad is not None


def test_lr_schedule_and_ema():
    warm = LRSchedule(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 14)
    assert [round(warm(s), 3) for s in (0, 3, 4, 9, 14, 20)] == [0.25, 1.0, 1.0, 0.55, 0.1, 0.1]
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1)
    torch.testing.assert_close(ema.model.weight, start + 0.1)
    assert EMA(model, 0.9999, warmup=True).decay_at(0) == pytest.approx(0.1)


# --- checkpoints, fine-tuning, grid, export ------------------------------------------------------


def _train(model, optimizer, scheduler, ema, steps, first=0):
    alphas = load_scheduler(TINY, "ddim").alphas_cumprod
    for step in range(first, first + steps):
        loss = m2m_loss(model, _batch(seed=step), alphas, step_generator(0, step, 0, CPU), 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(model, step + 1)


def _fresh(cfg):
    model = build_model(cfg)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.max_steps)
    return model, optimizer, scheduler, EMA(model, cfg.ema.decay, cfg.ema.warmup)


def test_checkpoint_round_trip_continues_exactly_and_exports(mis, tmp_path):
    cfg = _cfg(mis, tmp_path)
    straight = _fresh(cfg)
    _train(*straight, steps=4)
    first = _fresh(cfg)
    _train(*first, steps=2)
    state = TrainerState(step=2, epoch=1, world_size=1, positions=[(3, 1)])
    spec = SampleConfig(num_images=2, num_inference_steps=2, guidance_scale=3.0)
    grid = sample_grid(first[3].model, load_vae(TINY), None, _batch().latents, 2, spec)
    assert Image.open(io.BytesIO(grid)).size == (4 * 64, 2 * 64)
    save_checkpoint(tmp_path / "ckpt", first[0], first[3], first[1], first[2], state, cfg,
                    [rng_state()], grid)
    resumed = _fresh(cfg)
    loaded = load_checkpoint(tmp_path / "ckpt", resumed[0], resumed[3], resumed[1], resumed[2], 0)
    assert loaded == state
    _train(*resumed, steps=2, first=2)
    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight[3].model.parameters(), resumed[3].model.parameters()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "ckpt/train_config.json").read_text())["config"]["run_name"]
    # export → an M2MPipeline folder; fine-tuning from it with a new task condition
    export_pipeline(tmp_path / "ckpt", cfg, str(tmp_path / "model"))
    index = json.loads((tmp_path / "model/model_index.json").read_text())
    assert index == {"_class_name": "M2MPipeline", "variant": "self", "preset": "tiny"}
    from m2m_ray.sampling.pipeline import M2MPipeline

    pipe = M2MPipeline.from_pretrained(tmp_path / "model")
    assert torch.equal(pipe.unet.unet.conv_out.weight, first[3].model.unet.conv_out.weight)
    tuned = build_model(_cfg(mis, tmp_path, init_from=str(tmp_path / "model"),
                             m2m={"variant": "self", "task_conditions": ["position"]}))
    batch = _batch()
    t = torch.randint(0, 1000, (2, 4), generator=torch.Generator().manual_seed(0))
    task = TaskConditions(position=torch.arange(4).float().expand(2, -1))
    with torch.no_grad():  # new task modules start as a no-op: same outputs as the export
        torch.testing.assert_close(
            tuned.eval()(batch.latents, t, batch.latents[:, :3], target_task=task,
                         context_task=task.select(slice(0, 3))),
            pipe.unet(batch.latents, t, batch.latents[:, :3]))
    with pytest.raises(ValueError, match="fine-tune the same variant"):
        build_model(_cfg(mis, tmp_path, init_from=str(tmp_path / "model"),
                         m2m={"variant": "dino"}))


@pytest.mark.slow
def test_resume_follows_the_new_schedule_and_refuses_what_cannot_change(mis, tmp_path):
    """Train 10 steps of a cosine schedule with max_steps=10, resume with max_steps=20: the lr
    goes on from the new schedule (lr × LRSchedule(new)(10) ≈ 5.9e-4 here, down to ≈ 7.6e-6 at step
    19) instead of staying at the checkpoint's 0.0; changed AdamW settings apply too. A changed
    seed or model is refused, naming the key."""
    from m2m_ray.train.checkpoint import resume_changes
    from m2m_ray.train.step import LRSchedule

    optim = {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.0}
    cfg = _cfg(mis, tmp_path, max_steps=10, optim=optim)
    first = _fresh(cfg)
    _train(*first, steps=10)
    assert first[2].get_last_lr()[0] == pytest.approx(0.0)
    state = TrainerState(step=10, epoch=0, world_size=1, positions=[(0, 0)])
    save_checkpoint(tmp_path / "ckpt", first[0], first[3], first[1], first[2], state, cfg,
                    [rng_state()], None)
    longer = _cfg(mis, tmp_path, max_steps=20, optim={**optim, "weight_decay": 0.05})
    resumed = _fresh(longer)
    load_checkpoint(tmp_path / "ckpt", resumed[0], resumed[3], resumed[1], resumed[2], 0, longer)
    expected = 1e-3 * LRSchedule(longer.optim, 20)(10)
    assert resumed[2].get_last_lr()[0] == pytest.approx(expected) == pytest.approx(5.87e-4, rel=0.01)
    assert resumed[1].param_groups[0]["weight_decay"] == 0.05
    assert resumed[1].state_dict()["state"]  # AdamW's moments were restored, not reset
    _train(*resumed, steps=9, first=10)
    last = resumed[1].param_groups[0]["lr"]
    assert last == pytest.approx(1e-3 * LRSchedule(longer.optim, 20)(19)) == pytest.approx(7.6e-6,
                                                                                         rel=0.01)
    # without the new config the checkpoint's schedule comes back: the fault this guards against
    stale = _fresh(longer)
    load_checkpoint(tmp_path / "ckpt", stale[0], stale[3], stale[1], stale[2], 0)
    assert stale[2].get_last_lr()[0] == pytest.approx(0.0)
    saved = json.loads((tmp_path / "ckpt/train_config.json").read_text())["config"]
    changes = resume_changes(saved, longer)
    assert "max_steps: 10 → 20" in changes and "optim.weight_decay: 0.01 → 0.05" in changes
    with pytest.raises(ValueError, match=r"seed: 0 → 1.*another --run_name"):
        resume_changes(saved, _cfg(mis, tmp_path, max_steps=20, optim=optim, seed=1))
    with pytest.raises(ValueError, match="m2m.variant"):
        resume_changes(saved, _cfg(mis, tmp_path, max_steps=20, optim=optim,
                                   m2m={"variant": "dino"}))
    # a checkpoint written before a setting existed resumes with that setting at its default
    # (a demo run from before m2m.camera_frame was refused with "None → 'relative'")
    older = json.loads(json.dumps(saved))
    del older["m2m"]["camera_frame"]
    assert resume_changes(older, longer) == changes
    with pytest.raises(ValueError, match="m2m.camera_frame: 'relative' → 'world'"):
        resume_changes(older, _cfg(mis, tmp_path, max_steps=20, optim=optim,
                                   m2m={"camera_frame": "world"}))


def test_relative_local_paths_reach_the_workers_absolute(mis, tmp_path, monkeypatch):
    """Ray Train runs workers in their own folder: a relative storage_path put the demo's
    TensorBoard events under /tmp/ray/session_*/artifacts. The driver makes local paths absolute;
    s3:// stays."""
    from m2m_ray.train.trainer import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(mis, tmp_path, storage_path="runs/here", init_from="models/m",
               tracking={"logging_dir": "tb"})
    resolved = with_absolute_paths(cfg)
    assert resolved.storage_path == str(tmp_path / "runs/here")
    assert resolved.init_from == str(tmp_path / "models/m")
    assert resolved.tracking.logging_dir == str(tmp_path / "tb")
    remote = with_absolute_paths(_cfg(mis, tmp_path, storage_path="s3://bucket/runs"))
    assert remote.storage_path == "s3://bucket/runs" and remote.init_from is None


def test_configs_load_and_validate(tmp_path):
    for name, variant in (("m2m-self", "self"), ("m2m-dino", "dino")):
        cfg = load_config(TrainConfig, ROOT / f"configs/{name}.yaml")
        assert (cfg.m2m.variant, cfg.global_batch_size, cfg.model.preset) == (variant, 256,
                                                                              "sd21-base")
        assert cfg.context_drop_prob == 0.1 and cfg.samples.sample.num_inference_steps == 50
    tiny = load_config(TrainConfig, ROOT / "configs/tiny/train.yaml")
    assert tiny.model.preset == "tiny" and tiny.export_uri == "outputs/tiny/model"
    with pytest.raises(ConfigError, match="multiple of scaling.num_workers"):
        load_config(TrainConfig, ROOT / "configs/tiny/train.yaml", ["--global_batch_size=5"])


def test_preview_honours_seed_and_dtype_and_refuses_resolution():
    """The sample grid follows its spec's seed (row r is set "r"), runs float32 on the CPU
    whatever ``dtype`` says, and refuses ``resolution`` (in the config and in the call)."""
    model, vae, latents = M2MUNet.from_preset(TINY, M2MConfig()), load_vae(TINY), _batch().latents
    spec = SampleConfig(num_images=1, num_inference_steps=2, seed=5)

    def grid(spec):
        return sample_grid(model, vae, None, latents, 2, spec)

    assert grid(spec) == grid(spec)
    assert grid(spec) != grid(spec.model_copy(update={"seed": 6}))
    assert grid(spec) == grid(spec.model_copy(update={"dtype": "float32"}))  # CPU: float32
    with pytest.raises(ValueError, match="samples.sample.resolution is 32"):
        grid(spec.model_copy(update={"resolution": 32}))
    with pytest.raises(ConfigError, match="samples.sample.resolution is 32.*remove the key"):
        load_config(TrainConfig, ROOT / "configs/tiny/train.yaml",
                    ["--samples.sample.resolution=32"])


@pytest.mark.slow
def test_train_step_benchmark_reports_json():
    """benchmarks/train_step.py's measurement, one step per variant (the numbers: BENCHMARKS.md)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks/train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for variant in ("self", "dino"):
        args = argparse.Namespace(preset="tiny", device="cpu", variant=variant, batch_size=1,
                                  images_per_set=2, steps=1, warmup=0, precision="fp32",
                                  gradient_checkpointing=None, ema=True, seed=0, threads=None,
                                  compile=None, fused_adamw=variant == "dino", profile=False)
        result = json.loads(json.dumps(bench.measure(args)))
        assert result["samples_per_s"] > 0 and result["peak_memory"]["bytes"] > 0
        assert result["flops_per_step"] > 0 and result["mfu"] > 0
        assert result["paper_plan"]["accumulation_steps"] == 32  # 32 sets per GPU, 1 at a time
        assert (result["dino_forward_s"] is None) == (variant == "self")
        assert result["settings"]["gradient_checkpointing"] is False  # CPU default


def test_a_local_ray_too_small_for_workers_and_reads_fails_fast_with_the_fix():
    """Found running the shapes demo: 2 workers × 1 CPU on a 2-CPU local Ray left no CPU for the
    read tasks and Ray Train waited forever. Now it is an error that names the keys to change."""
    from m2m_ray.config import load_config
    from m2m_ray.train.config import TrainConfig
    from m2m_ray.train.trainer import check_local_resources

    cfg = load_config(TrainConfig, Path(__file__).parents[1] / "configs/shapes/m2m-self.yaml", [])
    check_local_resources(cfg, {"CPU": 4.0})
    check_local_resources(cfg, {"CPU": 2.25})  # exactly room for one read task
    with pytest.raises(ValueError, match=r"has 2 CPUs.*ray\.num_cpus"):
        check_local_resources(cfg, {"CPU": 2.0})
    # GPU workers on a CPU-only local Ray waited forever too.
    gpu = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"use_gpu": True})})
    with pytest.raises(ValueError, match=r"has 0 GPUs; 2 training workers × 1 GPUs.*"
                                         r"--scaling\.use_gpu=false"):
        check_local_resources(gpu, {"CPU": 8.0})
    check_local_resources(gpu, {"CPU": 8.0, "GPU": 2.0})
