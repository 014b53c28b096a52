import pytest
import torch

from m2m_ray.models import presets
from m2m_ray.models.clip_tokenizer import clip_tokenizer
from m2m_ray.models.config import ModelConfig


def test_tokenizer_ids_equal_clip():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_tiny_preset_is_seeded_and_offline():
    cfg = ModelConfig(preset="tiny")
    a, b = presets.load_unet(cfg), presets.load_unet(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = presets.load_unet(ModelConfig(preset="tiny", seed=1))
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    vae = presets.load_vae(cfg)
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    dino = presets.load_dino(cfg)
    assert not any(p.requires_grad for p in dino.parameters())
    assert presets.load_scheduler(cfg, "euler").config.beta_schedule == "scaled_linear"


def test_offline_hub_load_names_tiny_preset(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(presets.PresetUnavailableError, match="`tiny` preset"):
        presets.load_unet(ModelConfig(preset="sd21-base"))
    with pytest.raises(presets.PresetUnavailableError, match="`tiny` preset"):
        presets.load_dino(ModelConfig(preset="tiny", dino_model_id="facebook/dinov2-giant"))


def test_shapes_preset_has_sd21_architecture():
    cfg = presets.unet_config(ModelConfig(preset="sd21-base-random"))
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["cross_attention_dim"] == 1024
