"""Extractors: CLIP preprocessing equals transformers', DINO preprocessing is DreamBench's, CLIP and
DINO load by path, backbones are named as the field names them, tiny ones are seeded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m2m_ray.eval.config import EvalExtractorsConfig
from m2m_ray.eval.extractors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNOWN_BACKBONES,
    Extractors,
    clip_pixels,
    describe_extractors,
    dino_processor,
    load_clip,
    load_dino,
    tiny_clip,
    tiny_dino,
    vit_name,
)


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
    pools, logits = first.inception_features(images)
    assert set(pools) == {"legacy_pytorch", "clean"}  # the default: both resizes
    pool = pools["legacy_pytorch"]
    assert pool.shape == pools["clean"].shape == (2, 32) and logits.shape == (2, 10)
    assert not np.allclose(pools["clean"], pool)  # the resizes feed the net different inputs
    np.testing.assert_allclose(pool, again.inception_features(images)[0]["legacy_pytorch"],
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(pool, other.inception_features(images)[0]["legacy_pytorch"])
    dino = first.dino_embeddings(images)
    assert dino.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(dino, axis=1), 1.0, rtol=1e-5)
    clean_only = Extractors(EvalExtractorsConfig(kind="tiny", tiny_seed=5, fid_resizes=["clean"],
                                                 dino_model_id=None))
    only, _ = clean_only.inception_features(images)
    assert list(only) == ["clean"] and clean_only.dino is None
    np.testing.assert_allclose(only["clean"], pools["clean"], rtol=1e-4, atol=1e-6)
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


def _dreambench_pixels(image: Image.Image) -> np.ndarray:
    """torchvision's Resize(256, BICUBIC) → CenterCrop(224) → ToTensor → Normalize(ImageNet),
    the DINO evaluation transform DreamBench uses, written out from torchvision's documentation."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(256 * long / short)
    new_w, new_h = (256, new_long) if width <= height else (new_long, 256)
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    array = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return ((array - np.array(IMAGENET_MEAN, np.float32))
            / np.array(IMAGENET_STD, np.float32)).transpose(2, 0, 1)


def test_dino_preprocessing_is_dreambench_and_the_score_uses_cls(tmp_path):
    processor = dino_processor()
    # Square (SD's 512², any size) and non-square images with even crop margins: identical.
    for image in (_image(0, 512, 512), _image(1, 300, 200), _image(2, 90, 100)):
        got = processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(got, _dreambench_pixels(image), rtol=0, atol=1e-6)
    # The documented one-pixel difference: margin 147 → top 73 here, torchvision rounds to 74.
    odd = _image(3, 371, 256)  # (H, W): already 256 wide, so no resize; height margin 147
    got = processor(images=odd, return_tensors="np")["pixel_values"][0]
    expected_rows = (np.asarray(odd, np.float32)[73:297, 16:240] / 255.0
                     - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(got, expected_rows.transpose(2, 0, 1), rtol=0, atol=1e-6)
    assert not np.allclose(got, _dreambench_pixels(odd))  # torchvision's crop starts at row 74

    # A DINO ViT saved to a folder loads without a pooler; the embedding is the [CLS] token of the
    # last hidden state (after the final layer norm) of the DreamBench input.
    import torch

    tiny_dino(4).save_pretrained(tmp_path / "dino")
    model = load_dino(str(tmp_path / "dino"))
    assert model.pooler is None
    ext = Extractors(EvalExtractorsConfig(kind="tiny", tiny_seed=2))  # its DINO is seed 2 + 2
    images = [_image(5, 300, 200), _image(6, 64, 64)]
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([_dreambench_pixels(im) for im in images]))
        cls = ext.dino(pixel_values=pixels).last_hidden_state[:, 0]
    expected = (cls / cls.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(ext.dino_embeddings(images), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="dino_model_id"):
        load_dino(str(tmp_path / "no-such-dino"))


def test_backbones_are_named_as_the_field_names_them(tmp_path):
    from transformers import CLIPVisionConfig, ViTConfig

    # Published architectures (no weights): CLIP ViT-L/14 and ViT-B/32, DINO ViT-S/16.
    published = {
        "openai/clip-vit-large-patch14": CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24,
                                                          num_attention_heads=16, patch_size=14,
                                                          image_size=224),
        "openai/clip-vit-base-patch32": CLIPVisionConfig(hidden_size=768, num_hidden_layers=12,
                                                         patch_size=32, image_size=224),
        "openai/clip-vit-large-patch14-336": CLIPVisionConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
            image_size=336),
        "facebook/dino-vits16": ViTConfig(hidden_size=384, num_hidden_layers=12,
                                          num_attention_heads=6, patch_size=16, image_size=224),
    }
    assert set(published) == set(KNOWN_BACKBONES)  # every entry of the table is checked here
    for model_id, config in published.items():
        assert vit_name(config) == KNOWN_BACKBONES[model_id], model_id
    assert [KNOWN_BACKBONES[m] for m in published] == ["ViT-L/14", "ViT-B/32", "ViT-L/14@336px",
                                                       "ViT-S/16"]

    default = describe_extractors(EvalExtractorsConfig())
    assert (default["clip"]["backbone"], default["dino"]["backbone"]) == ("ViT-L/14", "ViT-S/16")
    assert list(default["fid"]["resizes"]) == ["legacy_pytorch", "clean"]
    assert default["is"]["resize"] == "legacy_pytorch"
    assert "pt_inception-2015-12-05" in default["fid"]["network"]
    b32 = describe_extractors(EvalExtractorsConfig(clip_model_id="openai/clip-vit-base-patch32",
                                                   dino_model_id=None))
    assert b32["clip"]["backbone"] == "ViT-B/32" and b32["dino"] is None
    assert "CLIP ViT-B/32" in b32["label"] and "DINO" not in b32["label"]
    # A local folder is named from its config.json.
    tiny_clip(0).save_pretrained(tmp_path / "clip")
    local = describe_extractors(EvalExtractorsConfig(clip_model_id=str(tmp_path / "clip"),
                                                     dino_model_id=None))
    assert local["clip"]["backbone"] == "ViT-(width 32, depth 2)/8@32px"
    with pytest.raises(FileNotFoundError, match="name its backbone"):
        describe_extractors(EvalExtractorsConfig(clip_model_id=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="names a resize twice"):
        EvalExtractorsConfig(fid_resizes=["clean", "clean"])
