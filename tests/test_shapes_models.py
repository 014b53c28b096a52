"""The shapes world's shipped models: they load through the preset's from_pretrained path, the
read-out reads renders, the VAE keeps the attributes, the teacher follows its caption, and
build_mis on shapes captions gives a verified MIS. Thresholds sit well below the figures measured
on the shipped weights (BENCHMARKS.md) and far above what random weights reach."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from m2m_ray.fidelity.scoring import teacher_agreement
from m2m_ray.models import presets
from m2m_ray.models.config import ModelConfig
from m2m_ray.shapes import evaluate, world
from m2m_ray.shapes.readout import AttributeReadout

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ModelConfig(preset="shapes")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shipped_weights_load_through_the_preset_as_float32():
    preset = presets.get_preset(SHAPES)
    assert preset.pretrained and preset.sd_model_id == str(presets.SHAPES_WEIGHTS)
    vae, unet = presets.load_vae(SHAPES), presets.load_unet(SHAPES)
    text = presets.load_text_encoder(SHAPES)
    assert {vae.dtype, unet.dtype, text.dtype} == {torch.float32}
    assert unet.config.cross_attention_dim == text.config.hidden_size
    assert vae.config.scaling_factor != 1.0  # set from the trained latents' spread
    assert presets.load_tokenizer(SHAPES)("a red cross").input_ids[0] == 49406  # the CLIP BPE
    with pytest.raises(ValueError, match="renamed to 'sd21-base-random'"):
        ModelConfig(preset="sd21-base-shapes")


def test_readout_reads_held_out_renders():
    accuracy = evaluate.readout_accuracy(AttributeReadout.load(), seed=4242, count=300)
    assert min(accuracy.values()) >= 0.97, accuracy


def test_vae_reconstructions_keep_the_attributes():
    result = evaluate.vae_agreement(presets.load_vae(SHAPES), AttributeReadout.load(), seed=4243,
                                    count=200)
    assert min(result[a] for a in world.SCORED) >= 0.93, result


@pytest.mark.slow
def test_teacher_follows_its_caption_through_the_stage_2_generator():
    import itertools

    keys = [k for k in itertools.product(world.SHAPES, world.COLOURS, world.BACKGROUNDS)
            if k not in world.HELD_OUT][::3]  # 15 combinations, every attribute value among them
    rng = np.random.default_rng(11)
    captions, targets = [], []
    for shape, colour, background in keys:
        attributes = world.sample_attributes(rng, shape=shape, colour=colour,
                                             background=background)
        captions.append(world.caption(attributes, rng))
        targets.append({"shape": shape, "colour": colour, "background": background})
    result = teacher_agreement("shapes", captions, targets, images_per_caption=4, steps=20)
    print("teacher agreement", result["agreement"])
    _above_floors(result["agreement"])
    assert result["diversity"] > 0.3 * result["renderer_diversity"]  # sets are not one image
    for name in world.SCORED:  # the split by caption value adds up to the overall figure
        split = result["by_value"][name]
        assert sum(v["sets"] for v in split.values()) == len(captions)
        right = sum(v["sets"] * v["generated"].get(value, 0) for value, v in split.items())
        assert right / len(captions) == pytest.approx(result["agreement"][name], abs=2e-3)


# What the shipped teacher (8,000 steps) reliably reaches, below its measured figures
# (BENCHMARKS.md, guidance 7.5: shape 0.907, colour 1.00, background 1.00) and far above the first
# 4,000-step teacher's shape (0.74) and random weights (chance: shape 0.25, colour 0.25, background
# 0.33); this test measured 0.83, 1.00, 1.00 and the build test (30 images) 0.97, 1.00, 1.00.
TEACHER_FLOORS = {"colour": 0.9, "background": 0.9, "shape": 0.7}


def _above_floors(agreement: dict) -> None:
    low = {a: agreement[a] for a, floor in TEACHER_FLOORS.items() if agreement[a] < floor}
    assert not low, f"agreement {agreement} below the floors {TEACHER_FLOORS}"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_build_mis_on_shapes_captions_gives_a_verified_mis_that_follows_them(ray_local, tmp_path):
    from m2m_ray.config import load_config
    from m2m_ray.fidelity.config import MISReportConfig
    from m2m_ray.fidelity.mis_report import run_mis_report
    from m2m_ray.mis.build import run_generate_stage
    from m2m_ray.mis.captions import run_captions_stage
    from m2m_ray.mis.config import BuildMISConfig
    from m2m_ray.mis.verify import verify_mis

    tsv = tmp_path / "shapes.tsv"
    world.write_caption_tsv(str(tsv), seed=5, count=6, exclude=world.HELD_OUT)
    cfg = load_config(BuildMISConfig, ROOT / "configs/shapes/build_mis.yaml", [
        f"--output_uri={tmp_path / 'mis'}", f"--captions.inputs=[{tsv}]",
        "--captions.lines_per_shard=3", "--generate.images_per_caption=5",
        "--generate.num_inference_steps=20", "--generate.actors.max_actors=1"])
    run_captions_stage(cfg)
    run_generate_stage(cfg)
    assert verify_mis(str(tmp_path / "mis"))[0] == []
    report, files = run_mis_report(MISReportConfig(mis_uri=str(tmp_path / "mis"),
                                                   out=str(tmp_path / "report" / "report.json")))
    assert report["sets"] == 6 and report["images_per_set"] == 5
    print("shapes-MIS agreement", report["agreement"])
    _above_floors(report["agreement"])
    assert set(files) == {"json", "md", "png", "config"}
    assert all(Path(path).stat().st_size > 0 for path in files.values())
