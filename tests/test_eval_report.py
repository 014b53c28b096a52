"""The evaluation report names every backbone and every resize, flags lossy generated images, and
generate-then-evaluate refuses to write them lossy (no Ray, no model download)."""

from __future__ import annotations

import pytest

from m2m_ray.config import ConfigError
from m2m_ray.eval.config import EvalConfig
from m2m_ray.eval.extractors import describe_extractors
from m2m_ray.eval.protocol import generation_for_eval
from m2m_ray.eval.report import build_report, render_markdown

RESIZES = ("legacy_pytorch", "clean")


def _rows(M: int = 2) -> list[dict]:
    return [{"k": k, "images": 10, "fid_legacy_pytorch": 20.0 + k, "fid_clean": 22.0 + k,
             "is_mean": 3.0, "is_std": 0.1, "clip_text": 30.0, "clip_text_images": 10,
             "clip_image": 80.0, "clip_image_images": 10, "dino": 60.0 + k, "dino_images": 10}
            for k in range(1, M + 1)]


def _report(cfg: EvalConfig, generated: dict[str, int]) -> dict:
    return build_report(cfg=cfg, generations_uri="s3://bucket/gens", sets_total=10,
                        sets_evaluated=10, skipped=[], sets_over_max_sets=0, splits={"test": 10},
                        per_k=_rows(),
                        extractors=describe_extractors(cfg.extractors),
                        image_formats={"context": {"png": 40}, "generated": generated},
                        method="M2M-Self", wall_s=1.0)


def test_real_report_names_every_backbone_and_resize():
    cfg = EvalConfig(actors={"num_gpus": 1})  # the defaults: real extractors
    report = _report(cfg, {"png": 20})
    text = render_markdown(report)
    for line in (
        "- FID network: FID Inception-v3: TF inception-2015-12-05 ported to PyTorch "
        "(pt_inception-2015-12-05",
        "weights `https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth`; 2048-d pool features; mean and unbiased "
        "covariance in float64 over the whole set",
        "- FID resize `legacy_pytorch`: bilinear (torch F.interpolate, align_corners=False, no "
        "antialias)",
        "- FID resize `clean`: PIL bicubic on float32 per channel",
        "- IS: FID Inception-v3", "resize `legacy_pytorch`",
        "- CLIP (CLIP-T, CLIP-I): ViT-L/14 (`openai/clip-vit-large-patch14`)",
        "- DINO: ViT-S/16 (`facebook/dino-vits16`); shorter side → 256 bicubic, centre crop "
        "224, ImageNet mean/std (DreamBench)",
        "| Method | FID legacy_pytorch ↓ | FID clean ↓ | IS ↑ | CLIP-T ↑ | CLIP-I ↑ | "
        "DINO ↑ |",
        "| M2M-Self | 21.50 ± 0.50 | 23.50 ± 0.50 | 3.00 ± 0.00 | 30.00 ± 0.00 | 80.00 ± 0.00 "
        "| 61.50 ± 0.50 |",
        "| 1 | 10 | 21.00 | 23.00 | 3.00 ± 0.10 | 30.00 | 80.00 | 61.00 |",
        "- image files: context: 40 png; generated: 20 png",
    ):
        assert line in text, line
    assert report["warnings"] == [] and "Warning" not in text
    assert report["extractors"]["clip"]["backbone"] == "ViT-L/14"
    assert list(report["summary"]) == ["fid_legacy_pytorch", "fid_clean", "is_mean", "clip_text",
                                       "clip_image", "dino"]

    # ViT-B/32 as the CLIP option, no DINO, one resize: the report follows.
    cfg = EvalConfig(actors={"num_gpus": 1}, extractors={
        "clip_model_id": "openai/clip-vit-base-patch32", "dino_model_id": None,
        "fid_resizes": ["clean"]})
    text = render_markdown(_report(cfg, {"png": 20}))
    assert "- CLIP (CLIP-T, CLIP-I): ViT-B/32 (`openai/clip-vit-base-patch32`)" in text
    assert "- DINO: none" in text and "DINO ↑" not in text
    assert "| Method | FID clean ↓ | IS ↑ | CLIP-T ↑ | CLIP-I ↑ |" in text
    assert "- IS: FID Inception-v3" in text and "resize `clean`" in text


def test_lossy_generated_images_are_flagged_and_never_written_for_eval():
    cfg = EvalConfig(actors={"num_gpus": 1})
    report = _report(cfg, {"jpg": 20})
    assert report["warnings"] == ["generated images stored as jpg (lossy): FID is not comparable "
                                  "with FIDs of lossless images; generate with image_format: png"]
    assert "> **Warning: generated images stored as jpg (lossy)" in render_markdown(report)

    base = {"actors": {"num_gpus": 0}, "generate": {
        "output_uri": "/tmp/gens", "inputs": {"mis_uri": "/tmp/mis"}, "actors": {"num_gpus": 0}}}
    assert generation_for_eval(EvalConfig.model_validate(base)).image_format == "png"
    base["generate"]["image_format"] = "jpeg"
    with pytest.raises(ConfigError, match="image_format = 'jpeg': FID .* lossless; use png"):
        generation_for_eval(EvalConfig.model_validate(base))


def test_is_with_one_split_shows_no_spread():
    """One IS split has no spread: the per-k table used to print "± 0.00"."""
    cfg = EvalConfig(actors={"num_gpus": 1}, is_splits=1)
    rows = render_markdown(_report(cfg, {"png": 20})).split("## Per generated image k")[1]
    assert "3.00 ± " not in rows and "| 3.00 |" in rows
    rows = render_markdown(_report(EvalConfig(actors={"num_gpus": 1}), {"png": 20})).split(
        "## Per generated image k")[1]
    assert "3.00 ± 0.10" in rows
