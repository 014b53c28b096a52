"""The shapes world's self-supervised DINO encoder (m2m_ray/shapes/dino.py): its views keep what a
view must keep, its loss ranks the matching view first, and a short run saves an encoder that
loads through the same Dinov2Model.from_pretrained call as DINOv2, with its linear-probe report; the
shapes preset loads the shipped one (weights/shapes/dino)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m2m_ray.shapes import world
from m2m_ray.shapes.dino import augment, linear_probe, nt_xent, train_dino
from m2m_ray.shapes.readout import AttributeReadout, to_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_views_keep_colour_and_shape_and_background():
    """The read-out reads the same colour, shape and background on both views of a render (the
    labels the encoder never sees, used here only to check the augmentations)."""
    images, attributes, _ = world.render_batch(np.random.default_rng(3), 48)
    view = augment(to_tensor(images), torch.Generator().manual_seed(0))
    assert view.shape == (48, 3, 32, 32) and 0 <= view.min() and view.max() <= 1
    readout = AttributeReadout.load()
    pixels = (view.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    read = readout.predict(pixels)
    # The read-out learned the world's four stripe angles; a view turned by any angle shows
    # stripes at others, which it misreads now and then (measured 0.80-0.82 on 400 renders).
    for name, least in (("colour", 0.95), ("shape", 0.85), ("background", 0.7)):
        truth = [getattr(a, name) for a in attributes]
        right = np.mean([r == t for r, t in zip(read[name], truth)])
        assert right >= least, (name, right)


def test_colour_free_views_keep_shape_and_lose_colour():
    """The "drop" views (one of the two NT-Xent terms) turn the hue anywhere and move the grey
    levels: the read-out's colour falls to chance while its shape stays far above it (the
    read-out never saw those hues, so it misreads some shapes: measured 0.76-0.80 on 400)."""
    images, attributes, _ = world.render_batch(np.random.default_rng(3), 96)
    view = augment(to_tensor(images), torch.Generator().manual_seed(0), colour="drop")
    assert 0 <= view.min() and view.max() <= 1
    pixels = (view.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    read = AttributeReadout.load().predict(pixels)
    right = {name: np.mean([r == getattr(a, name) for r, a in zip(read[name], attributes)])
             for name in ("shape", "colour")}
    assert right["shape"] >= 0.65 and right["colour"] <= 0.45, right
    with pytest.raises(ValueError, match="colour='grey'"):
        augment(to_tensor(images[:2]), torch.Generator(), colour="grey")


def test_nt_xent_ranks_the_other_view_of_the_same_image_first():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    matched = nt_xent(z, z + 0.01 * torch.randn(8, 16))
    shuffled = nt_xent(z, z[torch.randperm(8)])
    assert matched < 0.5 < shuffled


def test_a_short_run_saves_an_encoder_the_preset_machinery_loads(tmp_path):
    from m2m_ray.models import presets
    from m2m_ray.models.config import ModelConfig

    report = train_dino(tmp_path, steps=3, seed=0, batch=16)
    assert set(report["linear_probe"]) == {"shape", "colour", "background"}
    dino = presets.load_dino(ModelConfig(preset="shapes", dino_model_id=str(tmp_path / "dino")))
    assert json.loads((tmp_path / "dino" / "training.json").read_text())["steps"] == 3
    probe = linear_probe(dino, seed=5, train=300, test=100)
    assert probe["colour"] >= 0.9  # colour is linear in the features even after 3 steps


def test_the_shapes_preset_loads_the_shipped_self_supervised_encoder():
    """``load_dino`` on the shapes preset gives the encoder in ``weights/shapes/dino`` (float16 on
    disk, float32 loaded, frozen), whose features carry shape and background well above a random
    encoder of the same architecture (measured on 300 held-out renders: 0.51-0.59 / 0.89-0.92
    against 0.32-0.37 / 0.55-0.61)."""
    from transformers import Dinov2Config, Dinov2Model

    from m2m_ray.models import presets
    from m2m_ray.models.config import ModelConfig

    dino = presets.load_dino(ModelConfig(preset="shapes"))
    assert next(dino.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in dino.parameters())
    assert {k: getattr(dino.config, k) for k in presets.SHAPES_DINO_CONFIG} == \
        presets.SHAPES_DINO_CONFIG
    trained = linear_probe(dino, seed=5, train=600, test=300)
    random = linear_probe(Dinov2Model(Dinov2Config(**presets.SHAPES_DINO_CONFIG)).eval(), seed=5,
                          train=600, test=300)
    assert trained["shape"] >= random["shape"] + 0.1, (trained, random)
    assert trained["background"] >= random["background"] + 0.2, (trained, random)
    assert trained["colour"] >= 0.95

