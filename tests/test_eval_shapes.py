"""The shapes-world evaluation: the shapes extractors behind the evaluation job's interface, and the
method-fidelity measurement (``m2m_ray.eval.fidelity``) on stand-in models whose answer is known:
one that copies its context (agreement 1) and one that ignores it (agreement at the base rate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m2m_ray.eval.config import EvalExtractorsConfig
from m2m_ray.eval.extractors import load_extractors
from m2m_ray.eval.fidelity import (
    context_attributes,
    measure_fidelity,
    render_fidelity_markdown,
    renderer_context_sets,
    write_fidelity_report,
)
from m2m_ray.eval.report import render_markdown
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.shapes import world
from m2m_ray.shapes.readout import AttributeReadout


def _renders(keys, seed=0):
    rng = np.random.default_rng(seed)
    return [world.render(world.sample_attributes(rng, shape=s, colour=c, background=b))
            for s, c, b in keys]


def test_shapes_extractors_score_agreement_in_percent():
    ext = load_extractors(EvalExtractorsConfig(kind="shapes"))
    keys = [("circle", "red", "stripes"), ("circle", "red", "stripes"), ("square", "blue", "dots")]
    images = [Image.fromarray(a) for a in _renders(keys)]
    embeds = ext.clip_image_embeddings(images)
    assert embeds.shape == (3, 11)
    assert 100 * embeds[0] @ embeds[1] == pytest.approx(100)   # same attributes
    assert 100 * embeds[0] @ embeds[2] == pytest.approx(0)     # none shared
    text = ext.clip_text_embeddings(["two red circles on a striped background",
                                     "a red square, dots behind it"])
    assert 100 * text[0] @ embeds[0] == pytest.approx(100)
    assert 100 * text[1] @ embeds[0] == pytest.approx(100 / 3)  # only the colour agrees
    features, logits = ext.inception_features(images)
    assert features["readout"].shape == (3, ext.feature_dim) and logits.shape == (3, 48)
    joint = logits.argmax(1)  # (shape · 4 + colour) · 3 + background
    assert joint[0] == (world.SHAPES.index("circle") * 4 + world.COLOURS.index("red")) * 3 + 1


def test_shapes_report_names_what_it_measured():
    from m2m_ray.eval.config import EvalConfig
    from m2m_ray.eval.extractors import describe_extractors
    from m2m_ray.eval.report import build_report

    cfg = EvalConfig(extractors={"kind": "shapes"}, actors={"num_gpus": 0})
    rows = [{"k": 1, "images": 2, "fid_readout": 1.0, "is_mean": 2.0, "is_std": 0.1,
             "clip_text": 90.0, "clip_text_images": 2, "clip_image": 80.0,
             "clip_image_images": 2, "dino": None, "dino_images": 0}]
    report = build_report(cfg=cfg, generations_uri="g", sets_total=2, sets_evaluated=2,
                          skipped=[], sets_over_max_sets=0, splits={"test": 2}, per_k=rows,
                          extractors=describe_extractors(cfg.extractors),
                          image_formats={"context": {"png": 8}, "generated": {"png": 2}},
                          method="M2M-Self", wall_s=1.0)
    text = render_markdown(report)
    assert "shapes world" in report["title"] and "caption agreement %" in text
    # its protocol says what the shapes extractors measure, not Inception / CLIPScore
    protocol = text.split("## Protocol")[1]
    assert "read-out network's pooled features" in protocol and "Inception" not in protocol
    assert "CLIPScore" not in protocol
    assert "| M2M-Self | 1.00 ± 0.00 | 2.00 ± 0.00 | 90.00 ± 0.00 | 80.00 ± 0.00 |" in text
    assert "- FID resize `readout`" in text and "- DINO: none" in text
    assert "TINY" not in text


def test_context_attribute_is_the_majority_then_the_earliest():
    readout = AttributeReadout.load()
    keys = [("circle", "red", "plain"), ("square", "blue", "dots"), ("square", "blue", "dots"),
            ("cross", "green", "stripes")]
    images = np.stack(_renders(keys))
    majority = context_attributes(readout, images[None, :3])[0]
    assert majority == {"shape": "square", "colour": "blue", "background": "dots"}
    tie = context_attributes(readout, images[None, [0, 3]])[0]
    assert tie == {"shape": "circle", "colour": "red", "background": "plain"}


class _StandIn:
    """``M2MPipeline.generate``'s interface: ``copy`` repeats the last context image; with no
    context (or ``copy=False``) it renders random attributes."""

    def __init__(self, copy: bool):
        self.copy, self.rng = copy, np.random.default_rng(3)

    def generate(self, image_sets, spec, generators, output_type="pt"):
        out = []
        for images in image_sets:
            if self.copy and images:
                frames = [np.asarray(images[-1])] * spec.num_images
            else:
                frames = [world.render(world.sample_attributes(self.rng))
                          for _ in range(spec.num_images)]
            out.append(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255)
        return torch.stack(out)


def test_agreement_by_value_says_which_value_misses_and_what_it_becomes():
    from m2m_ray.eval.fidelity import _value_cell
    from m2m_ray.shapes.evaluate import agreement_by_value

    targets = [{"shape": "circle", "colour": "red", "background": "plain"},
               {"shape": "square", "colour": "red", "background": "plain"},
               {"shape": "circle", "colour": "blue", "background": "dots"}]
    predicted = {"shape": ["circle", "circle", "circle", "square", "circle", "circle"],
                 "colour": ["red"] * 4 + ["blue"] * 2, "background": ["plain"] * 6}
    split = agreement_by_value(predicted, targets, per=2)
    assert split["shape"] == {"circle": {"sets": 2, "generated": {"circle": 1.0}},
                              "square": {"sets": 1, "generated": {"circle": 0.5, "square": 0.5}}}
    assert split["colour"]["red"] == {"sets": 2, "generated": {"red": 1.0}}
    assert split["background"]["dots"] == {"sets": 1, "generated": {"plain": 1.0}}
    assert _value_cell("square", split["shape"]["square"]) == "square 0.50 (1; circle 0.50)"
    assert _value_cell("dots", split["background"]["dots"]) == "dots 0.00 (1; plain 1.00)"


def test_fidelity_of_a_copier_is_one_and_of_an_ignorer_the_base_rate(tmp_path):
    keys = [("circle", "red", "stripes"), ("square", "blue", "plain"),
            ("triangle", "green", "dots"), ("cross", "yellow", "stripes")]
    sets = renderer_context_sets(keys, sets_per_key=3, per_set=2, seed=1)
    sets.reference = sets.images  # the "teacher" reproduces the context exactly
    spec = SampleConfig(num_images=3)
    copier = measure_fidelity(_StandIn(copy=True), sets, [1, 2], spec)
    for row in copier["rows"]:
        assert row["m2m"] == {"shape": 1.0, "colour": 1.0, "background": 1.0}
        assert row["teacher"]["colour"] == 1.0
        assert all(len(k) == 3 for k in row["m2m_per_k"][:1])
        assert row["m2m_by_value"]["shape"] == {s: {"sets": 3, "generated": {s: 1.0}} for s in
                                                ("circle", "cross", "square", "triangle")}
        assert row["context_dropped"]["colour"] < 0.7
    ignorer = measure_fidelity(_StandIn(copy=False), sets, [2], spec)["rows"][0]
    for name in ("shape", "colour", "background"):
        assert abs(ignorer["m2m"][name] - ignorer["base_rate"][name]) < 0.35
    with pytest.raises(ValueError, match="context images"):
        measure_fidelity(_StandIn(copy=True), sets, [3], spec)
    results = {"model": "stand-in", "variant": "self", "sources": [copier]}
    assert "| renderer (12 sets) | 2 | **1.000**" in render_fidelity_markdown(results)
    assert "| renderer | 2 | circle 1.00 (3), cross 1.00 (3)" in render_fidelity_markdown(results)
    paths = write_fidelity_report(results, str(tmp_path / "f.json"))
    assert Image.open(paths["sheet"]).size[0] > 0 and "examples" not in open(paths["json"]).read()
