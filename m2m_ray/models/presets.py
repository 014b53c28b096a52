"""Model presets: where the SD-2.1-base components and DINOv2 come from.

- ``sd21-base``: the real weights, ``from_pretrained("stabilityai/stable-diffusion-2-1-base",
  subfolder=...)`` and ``facebook/dinov2-giant`` (or local folders given in ``ModelConfig``).
- ``tiny``: the same architectures from small configs with seeded random weights, built in-process
  with no download; the tokenizer is the real CLIP BPE (``clip_tokenizer``). Tests and the offline
  demo use it.
- ``shapes``: the shapes world's toy models (``m2m_ray.shapes``): a trained toy VAE, text encoder
  and UNet, shipped in ``models/weights/shapes/`` in the diffusers folder layout and loaded through
  the same ``from_pretrained`` calls as ``sd21-base`` (offline; the images mean something); the real
  CLIP tokenizer; for M2M-DINO a small DINOv2-architecture encoder trained self-supervised on
  renders (``m2m_ray.shapes.dino``, ``models/weights/shapes/dino``).
- ``sd21-base-random``: the full SD-2.1-base / DINOv2-giant architectures with random weights and no
  download, for speed and memory work where only the tensor shapes matter.

A hub load that fails (offline machine, missing cache) raises ``PresetUnavailableError`` naming the
``tiny`` preset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from m2m_ray.formats.rng import Salt
from m2m_ray.models.clip_tokenizer import clip_tokenizer

if TYPE_CHECKING:
    import torch

    from m2m_ray.models.config import ModelConfig

SD21_BASE_ID = "stabilityai/stable-diffusion-2-1-base"
SHAPES_WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes"  # python -m m2m_ray.shapes.train
DINOV2_GIANT_ID = "facebook/dinov2-giant"

# The published configs of SD-2.1-base (unet/, vae/, text_encoder/, scheduler/) and DINOv2-giant.
SD21_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
SD21_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=768,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD21_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
SD21_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False,
)
DINOV2_GIANT_CONFIG: dict[str, Any] = dict(
    hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
    image_size=518, use_swiglu_ffn=True, layerscale_value=1.0,
)

TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4), cross_attention_dim=32, use_linear_projection=True,
    norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 16, 32, 32), sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
SHAPES_DINO_CONFIG: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=4,
    image_size=32,
)
TINY_DINO_CONFIG: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=8,
    image_size=64,
)

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}


class PresetUnavailableError(RuntimeError):
    """A pretrained component could not be loaded (typically: no hub access)."""


class UnsupportedModelError(ValueError):
    """A base model this code cannot train or sample correctly (wrong prediction type, latent
    channels or native size), e.g. SD-2.1 (768 px, v-prediction) given for SD-2.1-base."""


def _unsupported(model_id: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"base model {model_id!r}: {what}. M2M is an ε-prediction latent diffusion model on "
        "SD-2.1-base's 4-channel latents (paper §5, Appendix A): use "
        f"{SD21_BASE_ID!r} (512 px, ε-prediction), not 'stabilityai/stable-diffusion-2-1' "
        "(768 px, v-prediction), or a model folder of the same kind")


def check_scheduler_config(config: dict[str, Any], model_id: str) -> None:
    """Raises ``UnsupportedModelError`` unless the scheduler predicts ε (training's target and
    the samplers' reading of the UNet output, eq. 1–2)."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise _unsupported(model_id, f"scheduler/scheduler_config.json has prediction_type "
                                     f"{prediction!r}, not 'epsilon'")


def check_unet_config(config: dict[str, Any], model: "ModelConfig") -> None:
    """Raises ``UnsupportedModelError`` unless the UNet maps 4 latent channels to 4 and its
    ``sample_size`` × the VAE's scale factor is the preset's resolution."""
    preset = get_preset(model)
    channels = (config.get("in_channels"), config.get("out_channels"))
    if channels != (4, 4):
        raise _unsupported(preset.sd_model_id, f"unet/config.json has in/out channels "
                                               f"{channels}, not (4, 4)")
    native = config.get("sample_size", 0) * vae_scale_factor(model)
    if native != preset.resolution:
        raise _unsupported(preset.sd_model_id, f"unet/config.json's sample_size "
                                               f"{config.get('sample_size')} makes {native} px "
                                               f"images, not the {preset.name} preset's "
                                               f"{preset.resolution} px")


@dataclass(frozen=True)
class Preset:
    name: str
    pretrained: bool                    # True: load weights with from_pretrained
    resolution: int                     # native image size in pixels
    dino_resolution: int                # DINO input size (a multiple of its patch size)
    sd_model_id: str | None = None
    dino_model_id: str | None = None
    tokenizer: str = "clip"             # "model": sd_model_id/tokenizer; "clip": the real CLIP BPE
    unet_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] = field(default_factory=dict)
    text_config: dict[str, Any] = field(default_factory=dict)
    dino_config: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "sd21-base": Preset("sd21-base", pretrained=True, resolution=512, dino_resolution=224,
                        sd_model_id=SD21_BASE_ID, dino_model_id=DINOV2_GIANT_ID,
                        tokenizer="model"),
    "shapes": Preset("shapes", pretrained=True, resolution=32, dino_resolution=32,
                     sd_model_id=str(SHAPES_WEIGHTS), dino_model_id=str(SHAPES_WEIGHTS / "dino")),
    "sd21-base-random": Preset(
        "sd21-base-random", pretrained=False, resolution=512, dino_resolution=224,
        unet_config=SD21_UNET_CONFIG, vae_config=SD21_VAE_CONFIG, text_config=SD21_TEXT_CONFIG,
        dino_config=DINOV2_GIANT_CONFIG),
    "tiny": Preset(
        "tiny", pretrained=False, resolution=64, dino_resolution=64,
        unet_config=TINY_UNET_CONFIG, vae_config=TINY_VAE_CONFIG, text_config=TINY_TEXT_CONFIG,
        dino_config=TINY_DINO_CONFIG),
}


def get_preset(model: "ModelConfig") -> Preset:
    preset = PRESETS[model.preset]
    if model.sd_model_id or model.dino_model_id:
        # Explicit ids turn a preset into a pretrained one for that component.
        updates = {}
        if model.sd_model_id:
            # A pretrained preset that ships no tokenizer (shapes: the real CLIP BPE) keeps its
            # tokenizer, so its own retrained weights load the same way; anything else swapped
            # for hub weights reads the tokenizer those weights come with.
            keeps_tokenizer = preset.pretrained and preset.tokenizer == "clip"
            updates.update(sd_model_id=model.sd_model_id, pretrained=True,
                           tokenizer=preset.tokenizer if keeps_tokenizer else "model")
        if model.dino_model_id:
            updates.update(dino_model_id=model.dino_model_id)
        preset = Preset(**{**preset.__dict__, **updates})
    return preset


def _from_hub(load: Callable[..., Any], model_id: str, what: str, **kwargs: Any) -> Any:
    try:
        return load(model_id, **kwargs)
    except Exception as err:  # hub/cache errors come as OSError, ValueError or HTTP errors
        raise PresetUnavailableError(
            f"could not load {what} from {model_id!r} ({type(err).__name__}: {err}). This machine "
            "may be offline or lack the model in its Hugging Face cache. For an offline run use "
            "the `tiny` preset (--model.preset=tiny); for real weights download the model once "
            "(huggingface-cli download ...) or set model.sd_model_id / model.dino_model_id to a "
            "local folder."
        ) from err


def _seeded(build: Callable[[], "torch.nn.Module"], seed: int) -> "torch.nn.Module":
    """Build a module with random weights that depend on ``seed`` only."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _finish(module: "torch.nn.Module", device: "torch.device | str | None",
            dtype: "torch.dtype | None") -> "torch.nn.Module":
    import torch

    dtype = dtype or torch.float32  # weights stored in half precision load as float32 by default
    current = next(module.parameters())
    if dtype != current.dtype:
        module = module.to(dtype=dtype)
    if device is not None and torch.device(device) != current.device:
        module = module.to(device=device)
    return module.eval()


def unet_config(model: "ModelConfig") -> dict[str, Any]:
    """The base UNet's config (a copy, safe to edit)."""
    preset = get_preset(model)
    if preset.pretrained:
        from diffusers import UNet2DConditionModel

        config = _from_hub(UNet2DConditionModel.load_config, preset.sd_model_id, "the UNet config",
                           subfolder="unet")
        check_unet_config(dict(config), model)
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return copy.deepcopy(preset.unet_config)


def vae_scale_factor(model: "ModelConfig") -> int:
    """Pixels per latent cell of the preset's VAE (8 for SD-2.1-base, 4 for the shapes VAE)."""
    preset = get_preset(model)
    if preset.pretrained:
        from diffusers import AutoencoderKL

        config = _from_hub(AutoencoderKL.load_config, preset.sd_model_id, "the VAE config",
                           subfolder="vae")
    else:
        config = preset.vae_config
    return 2 ** (len(config["block_out_channels"]) - 1)


def load_unet(model: "ModelConfig", device=None, dtype=None):
    from diffusers import UNet2DConditionModel

    preset = get_preset(model)
    if preset.pretrained:
        unet = _from_hub(UNet2DConditionModel.from_pretrained, preset.sd_model_id, "the UNet",
                         subfolder="unet")
        check_unet_config(dict(unet.config), model)
    else:
        unet = _seeded(lambda: UNet2DConditionModel(**preset.unet_config), model.seed)
    return _finish(unet, device, dtype)


def load_vae(model: "ModelConfig", device=None, dtype=None):
    from diffusers import AutoencoderKL

    preset = get_preset(model)
    if preset.pretrained:
        vae = _from_hub(AutoencoderKL.from_pretrained, preset.sd_model_id, "the VAE",
                        subfolder="vae")
    else:
        vae = _seeded(lambda: AutoencoderKL(**preset.vae_config), model.seed + Salt.VAE_INIT)
    return _finish(vae, device, dtype)


def load_text_encoder(model: "ModelConfig", device=None, dtype=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = get_preset(model)
    if preset.pretrained:
        encoder = _from_hub(CLIPTextModel.from_pretrained, preset.sd_model_id,
                            "the text encoder", subfolder="text_encoder")
    else:
        encoder = _seeded(lambda: CLIPTextModel(CLIPTextConfig(**preset.text_config)),
                          model.seed + Salt.TEXT_ENCODER_INIT)
    return _finish(encoder, device, dtype)


def load_tokenizer(model: "ModelConfig"):
    from transformers import CLIPTokenizer

    preset = get_preset(model)
    if preset.tokenizer == "model":
        return _from_hub(CLIPTokenizer.from_pretrained, preset.sd_model_id, "the tokenizer",
                         subfolder="tokenizer")
    return clip_tokenizer()


def load_scheduler(model: "ModelConfig", kind: str):
    """A fresh scheduler of ``kind`` (euler, ddim, pndm, dpmsolver++) on SD-2.1's noise schedule."""
    import diffusers

    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; expected one of {sorted(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[kind])
    preset = get_preset(model)
    if preset.pretrained:
        config = _from_hub(diffusers.DDIMScheduler.load_config, preset.sd_model_id,
                           "the scheduler config", subfolder="scheduler")
        check_scheduler_config(dict(config), preset.sd_model_id)
        return cls.from_config(config)
    return cls.from_config(SD21_SCHEDULER_CONFIG)


def load_dino(model: "ModelConfig", device=None, dtype=None):
    """The frozen DINOv2 encoder (M2M-DINO's context), in eval mode without gradients."""
    from transformers import Dinov2Config, Dinov2Model

    preset = get_preset(model)
    if preset.dino_model_id:
        dino = _from_hub(Dinov2Model.from_pretrained, preset.dino_model_id, "DINOv2")
    else:
        dino = _seeded(lambda: Dinov2Model(Dinov2Config(**preset.dino_config)), model.seed + Salt.DINO_INIT)
    dino.requires_grad_(False)
    return _finish(dino, device, dtype)


def load_sd_pipeline(model: "ModelConfig", scheduler: str, device=None, dtype=None):
    """A ``StableDiffusionPipeline`` assembled from this preset's components (no safety checker:
    MIS is built from captions, and the checker's hub weights are not part of SD-2.1-base)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=load_vae(model, device, dtype),
        text_encoder=load_text_encoder(model, device, dtype),
        tokenizer=load_tokenizer(model),
        unet=load_unet(model, device, dtype),
        scheduler=load_scheduler(model, scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
