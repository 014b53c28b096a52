"""The toy text-to-image teacher of the shapes world: the SD-2.1-base stand-in.

The same component types as SD-2.1-base — a diffusers ``UNet2DConditionModel`` conditioned by a
transformers ``CLIPTextModel`` through cross-attention, the real CLIP tokenizer, SD-2.1's noise
schedule and ε-prediction, latents of a diffusers ``AutoencoderKL`` — in small configs, trained from
scratch on (caption, render) pairs (``python -m m2m_ray.shapes.train teacher``). Saved in the
diffusers folder layout, it is loaded by the ``shapes`` model preset through the same
``from_pretrained`` calls as SD-2.1-base and sampled by the same stage-2 generator.

It never trains on the ``m2m_ray.shapes.world.HELD_OUT`` attribute combinations.
"""

from __future__ import annotations

from typing import Sequence

import torch

from m2m_ray.models.clip_tokenizer import clip_tokenizer
from m2m_ray.models.presets import SD21_SCHEDULER_CONFIG

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(48, 96),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(4, 8), cross_attention_dim=48, use_linear_projection=True,
    norm_num_groups=16, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=77, projection_dim=48, hidden_act="gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


def build_teacher():
    """Fresh ``(unet, text_encoder, tokenizer)`` of the teacher's configs (torch's global RNG)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**UNET_CONFIG).train()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).train()
    return unet, text_encoder, clip_tokenizer()


def teacher_scheduler():
    """SD-2.1's noise schedule (the sampler is chosen at generation time)."""
    import diffusers

    return diffusers.DDIMScheduler.from_config(SD21_SCHEDULER_CONFIG)


def token_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """``[B, 77]`` ids, padded and truncated as ``StableDiffusionPipeline.encode_prompt`` does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids

