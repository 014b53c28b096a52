"""Task fine-tuning end to end (paper §6.2, §8.5) on the shapes world's task layouts: the raw
datasets (VGSI JSON + images, Zero123 renders) → pipelines/build_tasks.py → training shards with a
task column → Ray Train fine-tuning with task conditions → generation with the sets' own or a
user's conditions and two guidance scales (eq. 7)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m2m_ray.config import load_config
from m2m_ray.data.tasks import relative_cameras, sequence_conditions, task_columns
from m2m_ray.formats import generations as gen
from m2m_ray.formats.mis import CorruptShardError
from m2m_ray.formats.mis_read import iter_mis
from m2m_ray.formats.tasks import TaskDataError
from m2m_ray.mis.tasks.build import TaskDatasetConfig, run_build_tasks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

import generate  # noqa: E402  pipelines/generate.py
import train  # noqa: E402  pipelines/train.py


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def test_relative_cameras_do_not_depend_on_the_world_frame():
    rng = np.random.default_rng(0)
    w2c = np.concatenate([np.stack([_rotation_z(a) for a in (0, 30, 60, 90)]),
                          rng.normal(size=(4, 3, 1))], axis=2)  # (4, 3, 4)
    world = np.eye(4)
    world[:3, :3], world[:3, 3] = _rotation_z(17.0), [1.0, -2.0, 0.5]
    moved = (np.concatenate([w2c, np.tile([[0, 0, 0, 1.0]], (4, 1, 1))], axis=1)
             @ np.linalg.inv(world))[:, :3]  # the same cameras in another world frame
    relative = relative_cameras(w2c)
    assert relative.shape == (4, 12) and relative.dtype == np.float32
    np.testing.assert_allclose(relative, relative_cameras(moved), atol=1e-5)
    np.testing.assert_allclose(relative[0], np.eye(4)[:3].reshape(-1), atol=1e-6)
    np.testing.assert_allclose(relative[2].reshape(3, 4)[:, :3], _rotation_z(60), atol=1e-6)


def test_stored_and_given_conditions_are_checked():
    task = {"camera": np.tile(np.eye(4)[:3], (5, 1, 1)).tolist(), "position": [0, 1, 2, 3, 4]}
    columns = task_columns(task, ("camera", "position"), np.array([3, 1]), 5, "shard s: set 7")
    assert columns["camera"].shape == (2, 12) and columns["position"].tolist() == [3.0, 1.0]
    with pytest.raises(CorruptShardError, match=r"shard s: set 7: .*position .*stores none"):
        task_columns({"camera": task["camera"]}, ("position",), np.array([0]), 5, "shard s: set 7")
    with pytest.raises(CorruptShardError, match=r"camera .*shape \(4, 3, 4\)"):
        task_columns({"camera": task["camera"][:4]}, ("camera",), np.array([0]), 5, "s")
    assert sequence_conditions(task, ["position"], 3, "set 1")["position"].tolist() == [0, 1, 2]
    # m2m.camera_frame=world: the extrinsics as stored (a canonical object frame), flattened
    world = np.concatenate([_rotation_z(40.0), [[1.0], [2.0], [3.0]]], axis=1)
    stored = {"camera": [np.eye(4)[:3].tolist(), world.tolist()]}
    got = sequence_conditions(stored, ["camera"], 2, "s", camera_frame="world")["camera"]
    np.testing.assert_allclose(got[1], world.reshape(-1), atol=1e-6)
    relative = sequence_conditions(stored, ["camera"], 2, "s")["camera"]
    np.testing.assert_allclose(relative[1], world.reshape(-1), atol=1e-6)  # first is identity
    stored["camera"][0] = world.tolist()
    assert np.allclose(sequence_conditions(stored, ["camera"], 2, "s")["camera"][1],
                       np.eye(4)[:3].reshape(-1), atol=1e-6)
    with pytest.raises(TaskDataError, match=r"set 1: .*6 are needed .*shape \(5,\)"):
        sequence_conditions(task, ["position"], 6, "set 1")


def _build(tmp_path: Path, kind: str) -> str:
    """A small shapes task dataset of ``kind`` through pipelines/build_tasks.py's job."""
    if kind == "procedures":
        from m2m_ray.shapes.procedures import write_vgsi_layout

        raw = write_vgsi_layout(str(tmp_path / "raw"), count=8, seed=0)
        source = [f"--source={raw.json_uri}", f"--image_root={raw.image_root}"]
    else:
        from m2m_ray.shapes.views import write_objaverse_layout

        write_objaverse_layout(str(tmp_path / "raw"), count=8, seed=0)
        source = [f"--source={tmp_path / 'raw'}"]
    out = str(tmp_path / "data")
    args = [*source, f"--output_uri={out}", "--units_per_shard=4", "--test_fraction=0.25"]
    cfg = load_config(TaskDatasetConfig, ROOT / f"configs/shapes/{kind}_data.yaml", args)
    manifest = run_build_tasks(cfg)
    assert (manifest["sets"], manifest["committed_shards"], manifest["skipped"]) == (8, 2, {})
    assert run_build_tasks(cfg)["sets"] == 8  # a rerun: every shard already committed
    with pytest.raises(ValueError, match="units_per_shard: 4 → 8"):
        run_build_tasks(cfg.model_copy(update={"units_per_shard": 8}))
    return out


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["procedures", "views"])
def test_build_finetune_and_generate_with_conditions(ray_local, tmp_path, kind):
    condition = "position" if kind == "procedures" else "camera"
    data = _build(tmp_path, kind)
    samples = list(iter_mis(data))
    assert len(samples) == 8 and {s["split"] for s in samples} == {"train", "test"}
    if kind == "procedures":
        assert all(s["task"]["position"] == list(range(len(s["images"]))) for s in samples)
    else:
        assert all(np.shape(s["task"]["camera"]) == (12, 3, 4) for s in samples)
    model = tmp_path / "model"
    summary = train.main([
        "--config", str(ROOT / "configs/tiny/train.yaml"), f"--data.uri={data}",
        f"--storage_path={tmp_path / 'runs'}", f"--export_uri={model}", "--run_name=task",
        f"--m2m.task_conditions=[{condition}]", "--data.split=null", "--data.images_per_set=4",
        f"--data.image_order={'set' if kind == 'procedures' else 'random'}", "--max_steps=4",
        "--checkpoint.every_steps=4", "--samples.sample.num_inference_steps=2"])
    assert summary["step"] == 4 and summary["export"]
    # generation: K = 2 context images, M = 2 targets conditioned on images 2 and 3 of each set
    pipe_dir = model
    _perturb_task_projections(pipe_dir)
    common = [f"--model_path={pipe_dir}", f"--inputs.mis_uri={data}", "--inputs.mis_split=null",
              "--inputs.context_images=2", "--inputs.max_sets=2", "--sample.num_images=2",
              "--sample.num_inference_steps=2", "--engine=local", "--actors.num_gpus=0"]
    # the sets' own conditions, read by Ray Data (engine=ray); a user's file below, engine=local
    made = generate.main([*common, f"--output_uri={tmp_path / 'g_stored'}", "--engine=ray",
                          "--actors.max_actors=1"])
    assert made["sets"] == 2 and not made["skipped"] and made["engine"] == "ray"
    records = gen.read_generations(str(tmp_path / "g_stored"))
    stored = {str(s["caption_id"]): s["task"] for s in samples}
    for record in records:
        expected = sequence_conditions(stored[record.set_id], [condition], 4, "x")[condition]
        np.testing.assert_allclose(record.meta["task_conditions"][condition], expected, atol=1e-6)
    # a user's conditions: another one changes the images; with s_T = 0 (eq. 7) it cannot
    images = {}
    for name, shift in (("a", 0), ("b", 3)):
        given = tmp_path / f"task_{name}.json"
        values = ({"position": [0, 1, 2 + shift, 3 + shift]} if condition == "position" else
                  {"camera": [_orbit(30 * (k + shift * (k > 1))) for k in range(4)]})
        given.write_text(json.dumps(values))
        for s_t in (3.0, 0.0):
            out = tmp_path / f"g_{name}_{s_t}"
            generate.main([*common, f"--output_uri={out}", f"--inputs.task_conditions={given}",
                           f"--sample.task_guidance_scale={s_t}"])
            images[name, s_t] = [np.asarray(gen.load_image(gen.image_uri(str(out), p)))
                                 for r in gen.read_generations(str(out)) for p in r.generated]
    assert any(not np.array_equal(x, y) for x, y in zip(images["a", 3.0], images["b", 3.0]))
    assert all(np.array_equal(x, y) for x, y in zip(images["a", 0.0], images["b", 0.0]))


def _orbit(azimuth: float) -> list:
    """World-to-camera [R|T] of a camera at ``azimuth`` degrees on a circle around the origin."""
    rotation = _rotation_z(azimuth).T
    return np.concatenate([rotation, [[0.0], [0.0], [-2.0]]], axis=1).tolist()


def _perturb_task_projections(pipe_dir: Path) -> None:
    """A few fine-tuning steps leave the zero-initialized task projections near zero: give them
    weights so that a condition visibly changes the output (as a longer fine-tuning does)."""
    from m2m_ray.models.m2m_unet import M2MUNet

    unet = M2MUNet.from_pretrained(pipe_dir / "unet")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "task_proj" in name or "attn2.to_out" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    unet.save_pretrained(pipe_dir / "unet")
