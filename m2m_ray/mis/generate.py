"""Stable Diffusion image sets: one caption → ``images_per_caption`` images from seeded noises.

``SDSetGenerator`` is a Ray Data callable class: ``__init__`` loads the SD pipeline once per actor,
``__call__(batch)`` turns a batch of captions into image sets. Paper §4: SD-2.1-base, Euler discrete
scheduler, guidance 7.5, 25 images per caption from 25 different latent noises.

Each caption is text-encoded once; all images of all captions in the batch (×2 for classifier-free
guidance) are denoised as one UNet batch. The initial noise of image ``i`` of caption ``c`` is
``randn((4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(image_seed(c, i, base_seed)))``,
drawn on the CPU so that it is the same on every device: any image can be regenerated from its stored
caption, seed and settings (``regenerate_set``).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import io
import logging
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

import m2m_ray
from m2m_ray.formats.ids import image_seed
from m2m_ray.formats.mis import IMAGE_EXTENSIONS, SetRecord, latents_to_npy
from m2m_ray.mis.config import GenerateConfig
from m2m_ray.models import presets
from m2m_ray.models.codec import ImageCodec
from m2m_ray.models.config import ModelConfig
from m2m_ray.runtime import pick_device, torch_dtype

log = logging.getLogger(__name__)

_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


def initial_noise(seeds: list[int], latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Standard-normal initial latents, one per seed, drawn on the CPU: ``[len(seeds), 4, h, w]``."""
    return torch.stack([
        torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(seed))
        for seed in seeds
    ])


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """``uint8 [H, W, 3]`` → encoded bytes."""
    buffer = io.BytesIO()
    kwargs = {} if image_format == "png" else {"quality": quality}
    Image.fromarray(pixels).save(buffer, format=_PIL_FORMATS[image_format], **kwargs)
    return buffer.getvalue()


class SDSetGenerator:
    """Generates image sets for batches of captions (Ray Data callable class).

    Input batch columns: ``caption_id`` (int64), ``caption`` (str). Output adds ``seeds``
    (int64 [N]), ``pixels`` (uint8 [N, H, W, 3]) and ``latents`` (float16 [N, 4, h, w]).
    """

    def __init__(self, model: ModelConfig | dict, generate: GenerateConfig | dict):
        self.model = ModelConfig.model_validate(model)
        self.cfg = GenerateConfig.model_validate(generate)
        self.device = pick_device(self.cfg.actors.num_gpus, "generate.actors")
        self.dtype = torch_dtype(self.cfg.dtype, self.device)
        self.pipe = presets.load_sd_pipeline(self.model, self.cfg.scheduler, self.device,
                                             self.dtype)
        if self.device.type == "cuda" and self.cfg.channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
        self.codec = ImageCodec(self.pipe.vae, vae_batch_size=self.cfg.vae_batch_size)
        factor = self.pipe.vae_scale_factor  # 8 for SD-2.1-base, 4 for the shapes VAE
        if self.cfg.height % factor or self.cfg.width % factor:
            raise ValueError(f"generate.height/width {self.cfg.height}×{self.cfg.width}: expected "
                             f"multiples of {factor}, the {self.model.preset} VAE's factor")
        self.latent_shape = (self.pipe.unet.config.in_channels, self.cfg.height // factor,
                             self.cfg.width // factor)
        log.info("SDSetGenerator ready: preset=%s device=%s dtype=%s", self.model.preset,
                 self.device, self.dtype)

    @functools.cached_property
    def metadata(self) -> dict[str, Any]:
        """Everything needed to regenerate an image besides its caption and seed."""
        preset = presets.get_preset(self.model)
        return {
            "model_preset": self.model.preset,
            "sd_model_id": preset.sd_model_id,
            "model_seed": None if preset.pretrained else self.model.seed,
            "scheduler": self.cfg.scheduler,
            "scheduler_config": dict(self.pipe.scheduler.config),
            "num_inference_steps": self.cfg.num_inference_steps,
            "guidance_scale": self.cfg.guidance_scale,
            "height": self.cfg.height,
            "width": self.cfg.width,
            "vae_scale_factor": self.pipe.vae_scale_factor,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            # CPU float sums depend on the thread count; regeneration reuses it to be bit-exact.
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "base_seed": self.cfg.base_seed,
            "images_per_caption": self.cfg.images_per_caption,
            "image_format": self.cfg.image_format,
            "image_quality": self.cfg.image_quality,
            "seed_function": "m2m_ray.formats.ids.image_seed(caption_id, index, base_seed)",
            "code_version": m2m_ray.__version__,
        }

    def seeds_for(self, caption_id: int) -> list[int]:
        return [image_seed(caption_id, i, self.cfg.base_seed)
                for i in range(self.cfg.images_per_caption)]

    @torch.inference_mode()
    def generate(self, captions: list[str], caption_ids: list[int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(seeds [C, N], pixels uint8 [C, N, H, W, 3], latents fp16 [C, N, 4, h, w])``."""
        n = self.cfg.images_per_caption
        seeds = [self.seeds_for(cid) for cid in caption_ids]
        noise = initial_noise([s for row in seeds for s in row], self.latent_shape)
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            list(captions), self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.cfg.guidance_scale > 1.0)
        latents = self.pipe(
            prompt_embeds=prompt_embeds.repeat_interleave(n, 0),             # (C*N, 77, D)
            negative_prompt_embeds=(None if negative_embeds is None
                                    else negative_embeds.repeat_interleave(n, 0)),
            latents=noise.to(self.device, self.dtype),
            num_inference_steps=self.cfg.num_inference_steps,
            guidance_scale=self.cfg.guidance_scale,
            height=self.cfg.height, width=self.cfg.width, output_type="latent",
        ).images                                                               # (C*N, 4, h, w)
        pixels = self.decode(latents)
        shape = (len(captions), n)
        return (np.asarray(seeds, dtype=np.int64),
                pixels.reshape(*shape, *pixels.shape[1:]),
                latents.float().cpu().numpy().astype(np.float16).reshape(*shape, *latents.shape[1:]))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """SD latents ``[B, 4, h, w]`` → ``uint8 [B, H, W, 3]``, in chunks to bound VAE memory."""
        pixels = self.codec.decode(latents)                                     # (B, 3, H, W) in [0, 1]
        return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds, pixels, latents = self.generate([str(c) for c in batch["caption"]],
                                               [int(i) for i in batch["caption_id"]])
        return {**batch, "seeds": seeds, "pixels": pixels, "latents": latents}


def encoded_sets(generator: SDSetGenerator, rows: list[dict[str, Any]],
                 image_pool: cf.Executor, batch_pool: cf.Executor, timings: dict[str, float],
                 after_generate: Callable[[int], None] | None = None) -> Iterator[list[SetRecord]]:
    """Generate and encode the sets of ``rows`` (caption_id, caption, split, url, shard_id), in
    order, ``captions_per_batch`` at a time. Batch i is encoded on ``batch_pool`` (which fans the
    images out to ``image_pool``) while batch i+1 is denoised, so the GPU does not wait for JPEG
    encoding. ``timings["generate_seconds"]`` accumulates the time spent in the generator;
    ``after_generate(i)`` is called after the i-th batch is denoised (fault injection)."""
    gen = generator.cfg
    timings.setdefault("generate_seconds", 0.0)
    pending: cf.Future | None = None
    for begin in range(0, len(rows), gen.captions_per_batch):
        chunk = rows[begin:begin + gen.captions_per_batch]
        t0 = time.perf_counter()
        seeds, pixels, latents = generator.generate([r["caption"] for r in chunk],
                                                    [r["caption_id"] for r in chunk])
        timings["generate_seconds"] += time.perf_counter() - t0
        if after_generate is not None:
            after_generate(begin // gen.captions_per_batch)
        if pending is not None:
            yield pending.result()
        pending = batch_pool.submit(_encode_batch, generator, image_pool, chunk, seeds, pixels,
                                    latents)
    if pending is not None:
        yield pending.result()


def _encode_batch(generator: SDSetGenerator, image_pool: cf.Executor, chunk: list[dict],
                  seeds: np.ndarray, pixels: np.ndarray, latents: np.ndarray) -> list[SetRecord]:
    gen = generator.cfg
    flat = list(image_pool.map(lambda p: encode_image(p, gen.image_format, gen.image_quality),
                               (p for row in pixels for p in row)))       # C*N encoded images
    n = pixels.shape[1]
    return [SetRecord(
        caption_id=row["caption_id"], shard_id=row["shard_id"], split=row["split"],
        caption=row["caption"], url=row["url"], seeds=[int(s) for s in seeds[i]],
        images=flat[i * n:(i + 1) * n], image_ext=IMAGE_EXTENSIONS[gen.image_format],
        latents=latents_to_npy(latents[i]) if gen.keep_latents else None,
        metadata=generator.metadata) for i, row in enumerate(chunk)]


def regenerate_set(caption: str, caption_id: int, metadata: dict[str, Any],
                   device: str | None = None) -> list[Image.Image]:
    """Regenerate a stored set from its caption, id and the ``metadata`` stored beside it.

    A set is regenerated whole: a UNet batch of one image runs other kernels than a batch of 25
    and differs from it in the last float bits, while batches of whole sets agree exactly. On the
    CPU the stored thread count is reused too (it changes the order of float sums); on a GPU,
    exactness needs the same GPU model and library versions.
    """
    model = ModelConfig(preset=metadata["model_preset"], seed=metadata.get("model_seed") or 0,
                        sd_model_id=metadata.get("sd_model_id"))
    use_gpu = metadata["device"] == "cuda" and device != "cpu"
    cfg = GenerateConfig(
        images_per_caption=metadata["images_per_caption"], base_seed=metadata["base_seed"],
        num_inference_steps=metadata["num_inference_steps"], scheduler=metadata["scheduler"],
        guidance_scale=metadata["guidance_scale"], height=metadata["height"],
        width=metadata["width"], dtype=metadata["dtype"],
        actors={"num_gpus": 1 if use_gpu else 0},
        captions_per_batch=1)
    threads = torch.get_num_threads()
    if metadata.get("cpu_threads") and not use_gpu:
        torch.set_num_threads(metadata["cpu_threads"])
    try:
        _, pixels, _ = SDSetGenerator(model, cfg).generate([caption], [caption_id])
    finally:
        torch.set_num_threads(threads)
    return [Image.fromarray(p) for p in pixels[0]]
