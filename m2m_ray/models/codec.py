"""Images ↔ what the M2M UNet consumes: VAE latents (targets, and the context of M2M-Self) and
DINOv2 features (the context of M2M-DINO). The project's one VAE encode/decode: MIS generation,
training's VAE actors, the synthetic MIS, previews and the pipeline all go through ``ImageCodec``.

Pixels are float tensors in [0, 1], ``[..., 3, H, W]``; latents are the VAE's scaled latents
``[..., 4, H/8, W/8]`` (the posterior mean, so encoding is deterministic). Every method takes and
returns batch-first tensors with one or more leading dimensions and runs the VAE in chunks of
``vae_batch_size`` images (the SD decoder at 512 px needs ~1 GB of activations per image in fp16);
with ``[B, n, ...]`` inputs the chunks never span two sets (a set's floats do not depend on its
batch).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import AutoencoderKL

from m2m_ray.models.context import DinoEncoder


class ImageCodec:
    """The VAE, and for ``dino`` the frozen DINOv2 encoder, of one M2M pipeline."""

    def __init__(self, vae: AutoencoderKL, variant: Literal["self", "dino"] = "self",
                 dino: DinoEncoder | None = None, vae_batch_size: int = 8):
        if (variant == "dino") != (dino is not None):
            raise ValueError(f"variant {variant!r} with dino={type(dino).__name__}: the dino "
                             "variant needs a DinoEncoder, the self variant none")
        self.vae, self.variant, self.dino = vae, variant, dino
        self.vae_batch_size = vae_batch_size
        self.scaling_factor = vae.config.scaling_factor

    @property
    def needs_pixels(self) -> bool:
        """Whether a generated image must be decoded before it can join the context."""
        return self.variant == "dino"

    def _chunked(self, fn, x: torch.Tensor, out_shape: tuple[int, int, int]) -> torch.Tensor:
        """``fn`` over ``x`` ``[*lead, C, H, W]`` in chunks of at most ``vae_batch_size`` images.

        With two or more leading dimensions (``[B, n, ...]``: sets) no chunk spans two sets: each
        set is cut from its own first image. A VAE call's floats depend on how many images it
        holds, so this makes a set's pixels (and latents) independent of the other sets in its
        batch: the same alone (``regenerate_set``) as in any batch, given ``vae_batch_size``."""
        lead = x.shape[:-3]
        if x.numel() == 0:
            return torch.zeros(*lead, *out_shape, device=x.device)
        sets = x.reshape(lead[0] if len(lead) > 1 else 1, -1, *x.shape[-3:])  # (B, n, C, H, W)
        out = torch.stack([torch.cat([fn(part) for part in images.split(self.vae_batch_size)])
                           for images in sets])  # (B, n, *out_shape)
        return out.reshape(*lead, *out.shape[2:])

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[..., 3, H, W]`` in [0, 1] → scaled latents ``[..., 4, H/8, W/8]`` (float32)."""
        vae = self.vae

        def run(part: torch.Tensor) -> torch.Tensor:
            part = (part * 2 - 1).to(device=vae.device, dtype=vae.dtype)
            return vae.encode(part).latent_dist.mean.float() * self.scaling_factor

        height, width = pixels.shape[-2:]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return self._chunked(run, pixels, (vae.config.latent_channels, height // factor,
                                           width // factor))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[..., 4, h, w]`` → pixels ``[..., 3, 8h, 8w]`` in [0, 1] (float32)."""
        vae = self.vae

        def run(part: torch.Tensor) -> torch.Tensor:
            part = (part / self.scaling_factor).to(device=vae.device, dtype=vae.dtype)
            return (vae.decode(part).sample.float() / 2 + 0.5).clamp(0, 1)

        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return self._chunked(run, latents, (3, latents.shape[-2] * factor,
                                            latents.shape[-1] * factor))

    @torch.no_grad()
    def context_of(self, latents: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """The context the UNet reads for images ``[B, n, ...]``: self → their latents
        ``[B, n, 4, h, w]``; dino → DINO features of their pixels ``[B, n, L, D]``."""
        if self.variant == "self":
            return latents
        if pixels is None:
            raise ValueError("M2M-DINO needs the pixels of context images; decode the latents")
        return self.dino(pixels)
