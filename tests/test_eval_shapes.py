"""The shapes-world evaluation: the shapes extractors behind the evaluation job's interface (the
method-fidelity tools are tested in tests/test_fidelity.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m2m_ray.eval.config import EvalExtractorsConfig
from m2m_ray.eval.extractors import load_extractors
from m2m_ray.eval.report import render_markdown
from m2m_ray.shapes import world


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
