"""The shapes world without trained weights: renderer determinism and ground truth, captions that
name their attributes, the caption file stage 1 reads."""

import numpy as np
import pytest

from m2m_ray.shapes import world
from m2m_ray.shapes.readout import colour_of
from m2m_ray.shapes.world import HELD_OUT


def _draw(seed: int, **fixed):
    rng = np.random.default_rng(seed)
    attributes = world.sample_attributes(rng, **fixed)
    return attributes, world.render(attributes), world.caption(attributes, rng)


def test_rendering_is_a_pure_function_of_the_seed():
    a1, image1, caption1 = _draw(7)
    a2, image2, caption2 = _draw(7)
    assert a1 == a2 and caption1 == caption2 and np.array_equal(image1, image2)
    assert image1.shape == (32, 32, 3) and image1.dtype == np.uint8
    _, other, _ = _draw(8)
    assert not np.array_equal(image1, other)
    assert world.render(a1, 64).shape == (64, 64, 3)


def test_images_with_the_same_attributes_differ_visibly():
    images = [_draw(seed, shape="cross", colour="green", background="dots")[1] for seed in range(6)]
    distances = [np.abs(a.astype(int) - b).mean() / 255
                 for i, a in enumerate(images) for b in images[i + 1:]]
    assert min(distances) > 0.02  # nuisances: count, size, position, rotation, greys, phase


def test_ground_truth_colour_is_exact_and_the_background_stays_grey():
    rng = np.random.default_rng(0)
    attributes = [world.sample_attributes(rng) for _ in range(400)]
    images = np.stack([world.render(a) for a in attributes])
    assert colour_of(images) == [a.colour for a in attributes]
    plain = world.render(world.sample_attributes(np.random.default_rng(1), background="plain",
                                                 count=1))
    corner = plain[:3, :3].reshape(-1, 3)
    assert (corner.max(1) - corner.min(1)).max() <= 1  # neutral: no hue to confuse the colour
    assert {a.count for a in attributes} == {1, 2, 3}
    assert {a.key for a in attributes} >= {(s, c, b) for s in world.SHAPES[:1]
                                           for c in world.COLOURS for b in world.BACKGROUNDS}


def test_captions_name_their_attributes_in_varied_english():
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(500):
        attributes = world.sample_attributes(rng)
        text = world.caption(attributes, rng)
        named = world.caption_attributes(text)
        assert (named["shape"], named["colour"], named["background"]) == attributes.key, text
        seen.add(text)
    assert len(seen) > 400  # not a handful of fixed sentences
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        world.sample_attributes(rng, shape="hexagon")


def test_caption_file_is_cc12m_format_without_held_out_combinations(tmp_path):
    path = tmp_path / "shapes.tsv"
    world.write_caption_tsv(str(path), seed=0, count=300, exclude=HELD_OUT)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 300
    keys = set()
    for line in lines:
        url, caption = line.split("\t")
        shape, colour, background, seed = url.removeprefix("shapes://").split("/")
        keys.add((shape, colour, background))
        assert world.caption_attributes(caption) == {"shape": shape, "colour": colour,
                                                     "background": background}
        assert int(seed) >= 0
    assert not keys & set(HELD_OUT) and len(keys) > 30
