import pytest
import torch

from m2m_ray.models import presets
from m2m_ray.models.clip_tokenizer import clip_tokenizer
from m2m_ray.models.config import M2MConfig, ModelConfig


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
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # the variable is read when huggingface_hub is imported (long before this test): without its
    # constant the loads went to the network and spent ~45 s in retries before failing
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(presets.PresetUnavailableError, match="`tiny` preset"):
        presets.load_unet(ModelConfig(preset="sd21-base"))
    with pytest.raises(presets.PresetUnavailableError, match="`tiny` preset"):
        presets.load_dino(ModelConfig(preset="tiny", dino_model_id="facebook/dinov2-giant"))


def test_shapes_preset_has_sd21_architecture():
    cfg = presets.unet_config(ModelConfig(preset="sd21-base-random"))
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["cross_attention_dim"] == 1024


def test_a_base_model_of_another_kind_is_refused_naming_the_right_one(tmp_path):
    """SD-2.1 (768 px, v-prediction) given where SD-2.1-base belongs used to load without a word
    and train with an ε target. The prediction type, the latent channels and the native size of a
    base model are checked wherever its configs are read (scheduler, UNet config, UNet)."""
    import json
    import shutil

    from m2m_ray.models.m2m_unet import M2MUNet
    from m2m_ray.models.presets import (
        SHAPES_WEIGHTS,
        UnsupportedModelError,
        load_scheduler,
        load_unet,
        unet_config,
    )

    def variant(name: str, folder: str, **changes) -> ModelConfig:
        root = tmp_path / name
        shutil.copytree(SHAPES_WEIGHTS, root)
        path = root / folder / ("scheduler_config.json" if folder == "scheduler" else "config.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return ModelConfig(preset="shapes", sd_model_id=str(root))

    assert load_scheduler(ModelConfig(preset="shapes"), "ddim").config.prediction_type == "epsilon"
    v_model = variant("v", "scheduler", prediction_type="v_prediction")
    for kind in ("ddim", "euler"):
        with pytest.raises(UnsupportedModelError, match=r"prediction_type 'v_prediction'.*"
                                                        r"stable-diffusion-2-1-base"):
            load_scheduler(v_model, kind)
    big = variant("big", "unet", sample_size=24)
    with pytest.raises(UnsupportedModelError, match="sample_size 24 makes 96 px images, not the "
                                                    "shapes preset's 32 px"):
        unet_config(big)
    with pytest.raises(UnsupportedModelError, match="sample_size"):
        load_unet(big)
    with pytest.raises(UnsupportedModelError, match=r"in/out channels \(8, 4\)"):
        M2MUNet.from_preset(variant("inpaint", "unet", in_channels=8), M2MConfig(variant="self"))


def test_retrained_shapes_weights_load_like_the_shipped_ones(tmp_path):
    """A folder of shapes weights (e.g. a rerun of `python -m m2m_ray.shapes.train`) has no
    tokenizer/ folder, like the shipped preset: it keeps the real CLIP BPE, while hub weights
    swapped into a preset of another kind read their own tokenizer."""
    import shutil

    from m2m_ray.models.presets import (
        SHAPES_WEIGHTS,
        get_preset,
        load_text_encoder,
        load_tokenizer,
    )

    root = tmp_path / "rerun"
    shutil.copytree(SHAPES_WEIGHTS, root)
    rerun = ModelConfig(preset="shapes", sd_model_id=str(root))
    assert get_preset(rerun).sd_model_id == str(root) and get_preset(rerun).tokenizer == "clip"
    ids = load_tokenizer(rerun)("a red disc on stripes", return_tensors="pt").input_ids
    shipped = ModelConfig(preset="shapes")
    assert ids.tolist() == load_tokenizer(shipped)("a red disc on stripes",
                                                   return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(load_text_encoder(rerun)(ids)[0], load_text_encoder(shipped)(ids)[0])
    assert get_preset(ModelConfig(preset="tiny", sd_model_id="some/hub-model")).tokenizer == "model"
