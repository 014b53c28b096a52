"""The evaluation job: bad-input policy, and pipelines/evaluate.py end to end on a local Ray with
the tiny extractors (both FID resizes, CLIP, DINO), checked number by number against a direct
single-process computation; the report names every backbone and resize."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from m2m_ray.eval.config import EvalConfig, EvalExtractorsConfig
from m2m_ray.eval.job import (
    EvalInputError,
    SetFeatureExtractor,
    is_split_of,
    select_sets,
)
from m2m_ray.formats import generations as gen

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pipelines"))

K, M, GOOD_SETS, TINY_SEED, W = 4, 3, 40, 3, 1.0  # 40 sets > 32 tiny features: full-rank FID


def _image(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A 32×32 image: a set's colour, a random stripe pattern and noise."""
    y, x = np.mgrid[0:32, 0:32]
    stripes = 0.5 + 0.5 * np.sin(x / rng.uniform(2, 8) + y / rng.uniform(2, 8))
    image = base * stripes[..., None] + rng.normal(0, 20, (32, 32, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_folder(root: str) -> list[gen.GenerationSet]:
    """GOOD_SETS valid sets (one with 6 context and 5 generated images, some without caption or
    split) and four bad ones, one per kind of problem."""
    rng = np.random.default_rng(0)
    captions = ["a red cat", "a photo of a dog on a beach", "blue sky over mountains", None]
    records = []

    def add(set_id, n_context, n_generated, meta, caption="a bowl of fruit"):
        base = rng.uniform(30, 255, 3)
        records.append(gen.save_set(root, set_id, caption,
                                    [_image(rng, base) for _ in range(n_context)],
                                    [_image(rng, base) for _ in range(n_generated)], meta))
        return records[-1]

    for i in range(GOOD_SETS):
        meta = {"model": "m2m-test"} | ({} if i % 5 == 0 else {"split": "test"})
        add(str(i), 6 if i == 1 else K, 5 if i == 1 else M, meta, captions[i % 4])
    add("short", K, M - 1, {"split": "test"})
    add("few-context", K - 1, M, {"split": "test"})
    add("train-set", K, M, {"split": "train"})
    corrupt = add("corrupt", K, M, {"split": "test"})
    with open(gen.image_uri(root, corrupt.generated[1]), "wb") as f:
        f.write(b"\x89PNG truncated")
    gen.write_index(root, records)
    return records


def _cfg(**overrides) -> EvalConfig:
    return EvalConfig.model_validate({
        "protocol": {"context_images": K, "generated_images": M}, "is_splits": 3,
        "actors": {"num_gpus": 0},
        "extractors": {"kind": "tiny", "tiny_seed": TINY_SEED}} | overrides)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gens"))
    return root, _write_folder(root)


def test_bad_sets_are_stated_or_stop_the_job(folder):
    root, records = folder
    selected, skipped = select_sets(records, _cfg())
    assert len(selected) == GOOD_SETS + 1  # the corrupt set is only found by reading it
    assert {s["set_id"]: s["kind"] for s in skipped} == {
        "short": "too few generated images", "few-context": "too few context images",
        "train-set": "wrong split"}
    assert [s["reason"] for s in skipped if s["set_id"] == "short"] == [
        f"{M - 1} generated images < M = {M}"]

    from m2m_ray.eval.job import evaluate_generations

    with pytest.raises(EvalInputError, match=r"3 of 44 sets .*short: 2 generated images < M = 3"
                                             r".*--on_bad_set=skip"):
        evaluate_generations(_cfg(on_bad_set="error"), root)  # fails before any Ray work

    corrupt = next(r for r in records if r.set_id == "corrupt")
    actor = SetFeatureExtractor(_cfg(on_bad_set="error").model_dump(mode="json"))
    batch = {"set_id": np.array(["corrupt"], dtype=object),
             "caption": np.array([corrupt.caption], dtype=object),
             "context": np.array([[gen.image_uri(root, p) for p in corrupt.context]], dtype=object),
             "generated": np.array([[gen.image_uri(root, p) for p in corrupt.generated]],
                                   dtype=object)}
    with pytest.raises(EvalInputError, match=r"set 'corrupt': unreadable image: cannot decode "
                                             r"image .*gen_02.png"):
        actor(batch)


def _direct_metrics(root: str, records: list[gen.GenerationSet]) -> list[dict[str, float]]:
    """The per-k metrics computed in one process from the definitions (float64 references)."""
    from m2m_ray.eval.extractors import Extractors

    ext = Extractors(EvalExtractorsConfig(kind="tiny", tiny_seed=TINY_SEED))
    good = [r for r in records if r.set_id.isdigit()]
    load = lambda paths: [gen.load_image(gen.image_uri(root, p)) for p in paths]  # noqa: E731
    context = [load(r.context[-K:]) for r in good]
    real, _ = ext.inception_features([im for images in context for im in images])
    context_embeds = [ext.clip_image_embeddings(images) for images in context]
    context_dino = [ext.dino_embeddings(images) for images in context]
    rows = []
    for k in range(1, M + 1):
        images = [load([r.generated[k - 1]])[0] for r in good]
        fake, logits = ext.inception_features(images)
        fids = {}
        for name in ("legacy_pytorch", "clean"):
            r, f = real[name].astype(np.float64), fake[name].astype(np.float64)
            diff = r.mean(0) - f.mean(0)
            cov_r, cov_f = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
            fids[f"fid_{name}"] = diff @ diff + np.trace(cov_r) + np.trace(cov_f) - 2 * np.trace(
                np.real(scipy.linalg.sqrtm(cov_r @ cov_f)))
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs = probs / probs.sum(1, keepdims=True)
        split = np.array([is_split_of(r.set_id, 3) for r in good])
        scores = []
        for s in np.unique(split):
            p = probs[split == s].astype(np.float64)
            scores.append(math.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()))
        embeds = ext.clip_image_embeddings(images)
        captioned = [i for i, r in enumerate(good) if r.caption]
        text = ext.clip_text_embeddings([good[i].caption for i in captioned])
        clip_text = [W * max(100 * float(embeds[i] @ t), 0) for i, t in zip(captioned, text)]
        clip_image = [np.mean([W * max(100 * float(embeds[i] @ c), 0) for c in context_embeds[i]])
                      for i in range(len(good))]
        dino_embeds = ext.dino_embeddings(images)
        dino = [np.mean([100 * float(dino_embeds[i] @ c) for c in context_dino[i]])
                for i in range(len(good))]
        rows.append({**fids, "is_mean": np.mean(scores), "is_std": np.std(scores),
                     "clip_text": np.mean(clip_text), "clip_image": np.mean(clip_image),
                     "dino": np.mean(dino)})
    return rows


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_evaluate_pipeline_end_to_end(folder, ray_local, tmp_path):
    import evaluate  # pipelines/evaluate.py

    root, records = folder
    out = str(tmp_path / "eval")
    report = evaluate.main([
        f"--generations={root}", f"--output_uri={out}", f"--protocol.context_images={K}",
        f"--protocol.generated_images={M}", "--is_splits=3", "--actors.num_gpus=0",
        "--actors.num_cpus=1", "--actors.max_actors=2", "--sets_per_batch=8", "--reduce_batch_rows=48",
        "--extractors.kind=tiny", f"--extractors.tiny_seed={TINY_SEED}"])

    # Every bad set is accounted for, with its reason; the split is stated.
    inp = report["input"]
    assert (inp["sets_total"], inp["sets_evaluated"], inp["sets_skipped"]) == (44, GOOD_SETS, 4)
    assert inp["skip_reasons"] == {"too few generated images": 1, "too few context images": 1,
                                   "wrong split": 1, "unreadable image": 1}
    assert inp["split"] == {"unknown": GOOD_SETS // 5, "test": GOOD_SETS - GOOD_SETS // 5}

    # The distributed, merged statistics give the numbers of the direct computation.
    expected = _direct_metrics(root, records)
    for row, want in zip(report["per_k"], expected):
        assert row["images"] == GOOD_SETS
        assert row["clip_text_images"] == sum(1 for r in records[:GOOD_SETS] if r.caption)
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (row["k"], key)
    assert 0 < report["per_k"][0]["clip_text"] < 100  # some pairs clipped at 0, some not
    for name in ("fid_legacy_pytorch", "fid_clean"):
        fids = [row[name] for row in report["per_k"]]
        assert report["summary"][name] == pytest.approx(
            {"mean": np.mean(fids), "std": np.std(fids), "over_k": M})
    first = report["per_k"][0]
    assert first["fid_clean"] != pytest.approx(first["fid_legacy_pytorch"])

    # The three report files, all saying that the extractors were tiny and random.
    assert report["files"] == {ext: os.path.join(out, f"report.{ext}")
                               for ext in ("json", "md", "png")}
    saved = json.loads(open(report["files"]["json"]).read())
    assert saved["per_k"] == report["per_k"] and "TINY RANDOM" in saved["title"]
    markdown = open(report["files"]["md"]).read()
    assert "TINY RANDOM EXTRACTORS" in markdown
    assert ("| Method | FID legacy_pytorch ↓ | FID clean ↓ | IS ↑ | CLIP-T ↑ | CLIP-I ↑ "
            "| DINO ↑ |" in markdown)
    # Every backbone and every resize is named, and the images were lossless PNGs.
    assert "## Backbones and resizes" in markdown
    for line in ("- FID resize `legacy_pytorch`: bilinear", "- FID resize `clean`: PIL bicubic",
                 "- IS: TinyInception", "resize `legacy_pytorch`",
                 "- CLIP (CLIP-T, CLIP-I): ViT-(width 32, depth 2)/8@32px (tiny, random)",
                 "- DINO: ViT-(width 32, depth 2)/16 (tiny, random)", "centre crop 224"):
        assert line in markdown, line
    assert saved["extractors"]["clip"]["backbone"].startswith("ViT-")
    assert list(saved["extractors"]["fid"]["resizes"]) == ["legacy_pytorch", "clean"]
    assert saved["image_formats"]["generated"] == {"png": GOOD_SETS * M}
    assert saved["warnings"] == []
    assert "| m2m-test | " in markdown and "| unreadable image | 1 |" in markdown
    assert f"- sets: {GOOD_SETS} evaluated of 44 input sets, 4 skipped" in markdown
    with Image.open(report["files"]["png"]) as plot:
        assert plot.format == "PNG" and plot.size[0] > plot.size[1] > 100
