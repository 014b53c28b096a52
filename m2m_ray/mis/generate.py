"""Stable Diffusion image sets: one caption → ``images_per_caption`` images from seeded noises.

``SDSetGenerator`` is a Ray Data callable class: ``__init__`` loads the SD pipeline once per actor,
``__call__(batch)`` turns a batch of captions into image sets. Paper §4: SD-2.1-base, Euler discrete
scheduler, guidance 7.5, 25 images per caption from 25 different latent noises.

Each caption is text-encoded once; all images of all captions in the batch (×2 for classifier-free
guidance) are denoised as one UNet batch. The initial noise of image ``i`` of caption ``c`` is
``randn((4, H/8, W/8), generator=torch.Generator("cpu").manual_seed(image_seed(c, i, base_seed)))``,
drawn on the CPU so that it is the same on every device: any image can be regenerated from its stored
caption, seed and settings (``regenerate_set``). Everything else that changes an image's floats is
either kept from doing so or stored with the set: the VAE decodes each set in its own chunks of
``vae_batch_size`` (stored, with the thread count, precision, memory format and library versions).

Non-finite output (fp16 overflow: NaN/Inf latents decode to black images) is caught per set where it
is made: a set with a NaN or Inf in its latents or decoded pixels is made again alone in float32
(a second, float32 pipeline loaded on first need; the set is stored with ``dtype: float32``, exactly
what ``regenerate_set`` reruns) and, if still non-finite or already float32, rejected: not stored,
reported with its reason (``GeneratedSets.rejected``).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import io
import json
import logging
import time
from typing import Any, Callable, Iterator, NamedTuple

import diffusers
import numpy as np
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

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
_SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


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


class GeneratedSets(NamedTuple):
    """C sets of N images from ``SDSetGenerator.generate``, in caption order."""

    seeds: np.ndarray            # int64 [C, N]
    pixels: np.ndarray           # uint8 [C, N, H, W, 3]; zeros for a rejected set
    latents: np.ndarray          # float16 [C, N, 4, h, w]; zeros for a rejected set
    metadata: list[dict]         # per set: what regenerates it (``dtype`` float32 if retried)
    rejected: list[str | None]   # per set: why it is not to be stored (non-finite), else None


def _non_finite(latents: torch.Tensor, pixels: torch.Tensor) -> list[str | None]:
    """Per set of ``latents [C, N, 4, h, w]`` / float ``pixels [C, N, 3, H, W]``: which of them
    hold a NaN or Inf (``"latents"``, ``"pixels"``, ``"latents and pixels"``), None if neither."""
    bad_latents = (~torch.isfinite(latents)).flatten(1).any(1).tolist()
    bad_pixels = (~torch.isfinite(pixels)).flatten(1).any(1).tolist()
    return [" and ".join(name for name, bad in (("latents", a), ("pixels", b)) if bad) or None
            for a, b in zip(bad_latents, bad_pixels)]


@contextlib.contextmanager
def _nan_unet_rows(unet: torch.nn.Module, sets: int, images: int, index: int):
    """Fault injection (tests): while open, the UNet's output is NaN on the rows of set ``index``
    of a batch of ``sets`` sets of ``images`` images, in every guidance half."""
    forward = unet.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample  # (halves*C*N, 4, h, w)
        sample.unflatten(0, (-1, sets, images))[:, index] = float("nan")  # a view: in place
        return out

    unet.forward = poisoned
    try:
        yield
    finally:
        del unet.forward


class SDSetGenerator:
    """Generates image sets for batches of captions (Ray Data callable class).

    Input batch columns: ``caption_id`` (int64), ``caption`` (str). Output adds ``seeds``
    (int64 [N]), ``pixels`` (uint8 [N, H, W, 3]), ``latents`` (float16 [N, 4, h, w]),
    ``metadata`` (JSON) and ``rejected`` (str: why a set must not be stored, "" if it may).
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
        self._speed_options()
        self.codec = ImageCodec(self.pipe.vae, vae_batch_size=self.cfg.vae_batch_size)
        factor = self.pipe.vae_scale_factor  # 8 for SD-2.1-base, 4 for the shapes VAE
        if self.cfg.height % factor or self.cfg.width % factor:
            raise ValueError(f"generate.height/width {self.cfg.height}×{self.cfg.width}: expected "
                             f"multiples of {factor}, the {self.model.preset} VAE's factor")
        self.latent_shape = (self.pipe.unet.config.in_channels, self.cfg.height // factor,
                             self.cfg.width // factor)
        self._float32: SDSetGenerator | None = None  # the retry of non-finite sets, on first need
        log.info("SDSetGenerator ready: preset=%s device=%s dtype=%s", self.model.preset,
                 self.device, self.dtype)

    def _speed_options(self) -> None:
        """Apply ``fuse_qkv`` and ``compile`` to the UNet and check ``attention_backend``: the
        opt-in speed levers that ``benchmarks/generation.py`` measures (BENCHMARKS.md)."""
        backend = self.cfg.attention_backend
        if self.device.type == "cpu" and backend in ("efficient", "cudnn"):
            raise ValueError(f"generate.attention_backend {backend!r}: torch has no such SDPA "
                             "kernel on the CPU; use auto, flash or math there")
        if self.cfg.fuse_qkv:
            self.pipe.unet.fuse_qkv_projections()
        if self.cfg.compile != "none":
            self.pipe.unet.compile(mode=self.cfg.compile)  # in place: the class stays

    def _attention(self) -> contextlib.AbstractContextManager:
        """Where the UNet and VAE run: restricted to ``attention_backend``'s SDPA kernel."""
        backend = self.cfg.attention_backend
        return contextlib.nullcontext() if backend == "auto" else sdpa_kernel(
            _SDPA_BACKENDS[backend])

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
            # Images per VAE call (within the set) and the UNet's memory format pick the kernels.
            "vae_batch_size": self.cfg.vae_batch_size,
            "channels_last": self.device.type == "cuda" and self.cfg.channels_last,
            "fuse_qkv": self.cfg.fuse_qkv, "compile": self.cfg.compile,
            "attention_backend": self.cfg.attention_backend,
            # Exactness also needs the same libraries (and on a GPU the same model of GPU).
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
            "gpu": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                    else None),
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
    def generate(self, captions: list[str], caption_ids: list[int]) -> GeneratedSets:
        """One set of ``images_per_caption`` images per caption, all denoised as one UNet batch
        and decoded set by set. A set with a NaN or Inf in its latents or pixels is made again
        alone in float32, or rejected (``GeneratedSets.rejected``) if that fails too or the
        generator already runs float32."""
        n, count = self.cfg.images_per_caption, len(captions)
        seeds = [self.seeds_for(cid) for cid in caption_ids]
        noise = initial_noise([s for row in seeds for s in row], self.latent_shape)
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            list(captions), self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.cfg.guidance_scale > 1.0)
        poisoned = self.cfg.fault_injection.nan_unet_output_on_caption
        with (_nan_unet_rows(self.pipe.unet, count, n, list(caption_ids).index(poisoned))
              if poisoned in caption_ids else contextlib.nullcontext()), self._attention():
            latents = self.pipe(
                prompt_embeds=prompt_embeds.repeat_interleave(n, 0),         # (C*N, 77, D)
                negative_prompt_embeds=(None if negative_embeds is None
                                        else negative_embeds.repeat_interleave(n, 0)),
                latents=noise.to(self.device, self.dtype),
                num_inference_steps=self.cfg.num_inference_steps,
                guidance_scale=self.cfg.guidance_scale,
                height=self.cfg.height, width=self.cfg.width, output_type="latent",
            ).images.unflatten(0, (count, n))                                  # (C, N, 4, h, w)
        with self._attention():
            pixels = self.decode_sets(latents)                                 # (C, N, 3, H, W)
        found = _non_finite(latents, pixels)
        out = GeneratedSets(
            np.asarray(seeds, dtype=np.int64), to_uint8(pixels),
            latents.float().cpu().numpy().astype(np.float16),
            [self.metadata] * count, [None] * count)
        for i, where in enumerate(found):
            if where is not None:
                self._redo_in_float32(out, i, captions[i], caption_ids[i], where)
        return out

    def _redo_in_float32(self, out: GeneratedSets, i: int, caption: str, caption_id: int,
                         where: str) -> None:
        """Set ``i`` of ``out`` had non-finite ``where``: make it alone in float32 (what
        ``regenerate_set`` does with ``dtype: float32``) into ``out``, or mark it rejected."""
        made_in = str(self.dtype).removeprefix("torch.")
        reason = f"non-finite {where} (NaN/Inf) in {made_in}"
        if self.dtype == torch.float32:
            out.rejected[i] = f"{reason}; no safer precision to retry in"
            log.error("caption %d: %s: set rejected", caption_id, out.rejected[i])
            return
        log.warning("caption %d: %s; generating it again in float32", caption_id, reason)
        if self._float32 is None:
            cfg = self.cfg.model_copy(update={"dtype": "float32", "captions_per_batch": 1,
                                              "compile": "none"})  # minutes, for one set
            self._float32 = SDSetGenerator(self.model, cfg)
        again = self._float32.generate([caption], [caption_id])
        if again.rejected[0] is not None:
            out.rejected[i] = f"{reason}; {again.rejected[0]}"
            log.error("caption %d: %s: set rejected", caption_id, out.rejected[i])
            return
        out.pixels[i], out.latents[i] = again.pixels[0], again.latents[0]
        out.metadata[i] = {**again.metadata[0], "retried": reason}

    @torch.inference_mode()
    def decode_sets(self, latents: torch.Tensor) -> torch.Tensor:
        """SD latents ``[C, N, 4, h, w]`` → float pixels ``[C, N, 3, H, W]`` in [0, 1] (NaN
        stays NaN), each set in its own chunks of ``vae_batch_size`` (``ImageCodec``): a set's
        pixels do not depend on the other sets of its batch."""
        return self.codec.decode(latents)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.generate([str(c) for c in batch["caption"]],
                            [int(i) for i in batch["caption_id"]])
        return {**batch, "seeds": out.seeds, "pixels": out.pixels, "latents": out.latents,
                "metadata": np.array([json.dumps(m, sort_keys=True) for m in out.metadata]),
                "rejected": np.array([r or "" for r in out.rejected])}


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Float pixels ``[..., 3, H, W]`` in [0, 1] → ``uint8 [..., H, W, 3]``."""
    return (pixels * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def encoded_sets(generator: SDSetGenerator, rows: list[dict[str, Any]],
                 image_pool: cf.Executor, batch_pool: cf.Executor, timings: dict[str, float],
                 after_generate: Callable[[int], None] | None = None,
                 rejected: list[dict[str, Any]] | None = None) -> Iterator[list[SetRecord]]:
    """Generate and encode the sets of ``rows`` (caption_id, caption, split, url, shard_id), in
    order, ``captions_per_batch`` at a time. Batch i is encoded on ``batch_pool`` (which fans the
    images out to ``image_pool``) while batch i+1 is denoised, so the GPU does not wait for JPEG
    encoding. ``timings["generate_seconds"]`` accumulates the time spent in the generator;
    ``after_generate(i)`` is called after the i-th batch is denoised (fault injection). A set the
    generator rejects (non-finite output) yields no record: ``{"caption_id", "reason"}`` is
    appended to ``rejected`` instead (required: no set may vanish unaccounted)."""
    gen = generator.cfg
    if rejected is None:
        raise ValueError("encoded_sets needs a `rejected` list: sets with non-finite output are "
                         "not stored and must be accounted for by the caller")
    timings.setdefault("generate_seconds", 0.0)
    pending: cf.Future | None = None
    for begin in range(0, len(rows), gen.captions_per_batch):
        chunk = rows[begin:begin + gen.captions_per_batch]
        t0 = time.perf_counter()
        out = generator.generate([r["caption"] for r in chunk], [r["caption_id"] for r in chunk])
        timings["generate_seconds"] += time.perf_counter() - t0
        if after_generate is not None:
            after_generate(begin // gen.captions_per_batch)
        rejected += [{"caption_id": int(row["caption_id"]), "reason": reason}
                     for row, reason in zip(chunk, out.rejected) if reason is not None]
        if pending is not None:
            yield pending.result()
        pending = batch_pool.submit(_encode_batch, generator, image_pool, chunk, out)
    if pending is not None:
        yield pending.result()


def _encode_batch(generator: SDSetGenerator, image_pool: cf.Executor, chunk: list[dict],
                  out: GeneratedSets) -> list[SetRecord]:
    """The records of the sets of ``out`` that were not rejected, in order."""
    gen = generator.cfg
    keep = [i for i, reason in enumerate(out.rejected) if reason is None]
    flat = list(image_pool.map(lambda p: encode_image(p, gen.image_format, gen.image_quality),
                               (p for i in keep for p in out.pixels[i])))  # kept C*N images
    n = out.pixels.shape[1]
    return [SetRecord(
        caption_id=chunk[i]["caption_id"], shard_id=chunk[i]["shard_id"], split=chunk[i]["split"],
        caption=chunk[i]["caption"], url=chunk[i]["url"], seeds=[int(s) for s in out.seeds[i]],
        images=flat[k * n:(k + 1) * n], image_ext=IMAGE_EXTENSIONS[gen.image_format],
        latents=latents_to_npy(out.latents[i]) if gen.keep_latents else None,
        metadata=out.metadata[i]) for k, i in enumerate(keep)]


def regenerate_set(caption: str, caption_id: int, metadata: dict[str, Any],
                   device: str | None = None) -> list[Image.Image]:
    """Regenerate a stored set from its caption, id and the ``metadata`` stored beside it.

    A set is regenerated whole: a UNet batch of one image runs other kernels than a batch of 25
    and differs from it in the last float bits, while batches of whole sets agree exactly, and the
    VAE decodes each set in its own chunks of the stored ``vae_batch_size``. On the CPU the stored
    thread count is reused too (it changes the order of float sums); on a GPU the stored memory
    format is, and exactness needs the same GPU model and library versions (both stored). The
    speed levers (``fuse_qkv``, ``compile``, ``attention_backend``) are reapplied on the device
    type that made the set (a compiled set compiles again: minutes on a GPU). Sets
    stored before ``vae_batch_size`` was (decoded in chunks across sets) may differ by a grey
    level. Raises ``RuntimeError`` if the set comes out non-finite (a set stored in float16 that
    was retried in float32 has ``dtype: float32`` and regenerates in float32).
    """
    model = ModelConfig(preset=metadata["model_preset"], seed=metadata.get("model_seed") or 0,
                        sd_model_id=metadata.get("sd_model_id"))
    use_gpu = metadata["device"] == "cuda" and device != "cpu"
    # The speed levers pick kernels: kept on the device type the set was made on, else the default.
    same_device = use_gpu == (metadata["device"] == "cuda")
    cfg = GenerateConfig(
        images_per_caption=metadata["images_per_caption"], base_seed=metadata["base_seed"],
        num_inference_steps=metadata["num_inference_steps"], scheduler=metadata["scheduler"],
        guidance_scale=metadata["guidance_scale"], height=metadata["height"],
        width=metadata["width"], dtype=metadata["dtype"],
        actors={"num_gpus": 1 if use_gpu else 0},
        vae_batch_size=metadata.get("vae_batch_size", 8),
        channels_last=bool(metadata.get("channels_last")),
        fuse_qkv=bool(metadata.get("fuse_qkv")),
        compile=metadata.get("compile", "none") if same_device else "none",
        attention_backend=metadata.get("attention_backend", "auto") if same_device else "auto",
        captions_per_batch=1)
    threads = torch.get_num_threads()
    if metadata.get("cpu_threads") and not use_gpu:
        torch.set_num_threads(metadata["cpu_threads"])
    try:
        out = SDSetGenerator(model, cfg).generate([caption], [caption_id])
    finally:
        torch.set_num_threads(threads)
    if out.rejected[0] is not None:
        raise RuntimeError(f"caption {caption_id}: regenerated set is not finite: "
                           f"{out.rejected[0]}")
    return [Image.fromarray(p) for p in out.pixels[0]]
