"""Extractors: CLIP preprocessing equals transformers', CLIP loads by path, tiny ones are seeded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m2m_ray.eval.config import EvalExtractorsConfig
from m2m_ray.eval.extractors import Extractors, clip_pixels, load_clip, tiny_clip


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_clip_preprocessing_equals_transformers_pil_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                      crop_size={"height": 32, "width": 32})
    for image in (_image(0, 45, 70), _image(1, 90, 50), _image(2, 32, 32)):
        expected = processor(images=image, return_tensors="pt")["pixel_values"]
        assert (clip_pixels([image], 32) - expected).abs().max().item() == 0.0


def test_tiny_extractors_are_seeded_and_clip_loads_from_a_folder(tmp_path):
    images = [_image(3, 40, 48), _image(4, 64, 30)]  # sizes differ within one batch
    first = Extractors(EvalExtractorsConfig(kind="tiny", tiny_seed=5, image_batch_size=1))
    again = Extractors(EvalExtractorsConfig(kind="tiny", tiny_seed=5))
    other = Extractors(EvalExtractorsConfig(kind="tiny", tiny_seed=6))
    pool, logits = first.inception_features(images)
    assert pool.shape == (2, 32) and logits.shape == (2, 10)
    np.testing.assert_allclose(pool, again.inception_features(images)[0], rtol=1e-4, atol=1e-6)
    assert not np.allclose(pool, other.inception_features(images)[0])
    embeds = first.clip_image_embeddings(images)
    text = first.clip_text_embeddings(["a red cat", "a photo of a dog on a beach"])
    assert embeds.shape == text.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
    assert "TINY RANDOM EXTRACTORS (seed 5)" in first.label

    # The real loading path, from a local folder instead of the hub.
    tiny_clip(7).save_pretrained(tmp_path / "clip")
    loaded = load_clip(str(tmp_path / "clip"))
    assert loaded.config.vision_config.image_size == 32
    with pytest.raises(FileNotFoundError, match="--extractors.kind=tiny"):
        load_clip(str(tmp_path / "no-such-clip"))
