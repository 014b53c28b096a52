"""``M2MPipeline``: a trained M2M model as one object, in the diffusers style.

    pipe = M2MPipeline.from_pretrained("outputs/model", device="cuda", dtype=torch.float16)
    new_images = pipe(images, num_images=4, guidance_scale=3.0, context_window=8,
                      num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    spec = SampleConfig(num_images=4, guidance_scale=3.0)          # the one sampling spec
    many = pipe.generate([set_a, set_b, set_c], spec, generator=[g_a, g_b, g_c])
    pipe.save_pretrained("outputs/model_copy")
    pipe = M2MPipeline.from_preset(ModelConfig(preset="tiny"), M2MConfig(variant="self"))  # fresh

Folder layout (``save_pretrained`` writes it; the training export writes the same)::

    <path>/model_index.json   {"_class_name": "M2MPipeline", "variant": "self"|"dino", "preset": ...}
    <path>/unet/              M2MUNet (config.json + diffusion_pytorch_model.safetensors)
    <path>/vae/               diffusers AutoencoderKL
    <path>/scheduler/         scheduler_config.json (DDIMScheduler by default)
    <path>/dino/              transformers Dinov2Model (dino variant only)

Input images may have any size and mode (``m2m_ray.data.image_inputs``: RGB, shorter side resized
to the preset's resolution, centre crop); outputs are RGB PIL images of that resolution. The
sampling itself is ``m2m_ray.sampling.sampler.sample``. ``from_pretrained`` also takes an
``s3://`` folder (copied once to ``$M2M_RAY_CACHE`` or ``~/.cache/m2m_ray/pipelines``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from PIL import Image

from m2m_ray import storage as st
from m2m_ray.data.image_inputs import (
    fit_square,
    images_to_tensor,
    tensor_to_images,
    to_rgb,
)
from m2m_ray.models import presets
from m2m_ray.models.codec import ImageCodec
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.sampling.sampler import NonFiniteOutputError, finite_sets, sample

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

INDEX_NAME = "model_index.json"
OutputType = Literal["pil", "pt"]


def local_copy(path: str, storage: "StorageConfig | None" = None) -> Path:
    """A local folder with the contents of ``path`` (itself when local; s3:// is copied once)."""
    if not st.is_remote(path):
        return Path(st.split_uri(path)[1])
    cache = Path(os.environ.get("M2M_RAY_CACHE", Path.home() / ".cache" / "m2m_ray"))
    target = cache / "pipelines" / hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
    if not (target / INDEX_NAME).is_file():
        st.download_dir(path, target, storage)
    return target


class M2MPipeline:
    """See the module docstring."""

    def __init__(self, unet: M2MUNet, vae, scheduler, dino: DinoEncoder | None = None,
                 vae_batch_size: int = 8):
        self.unet, self.vae, self.scheduler, self.dino = unet, vae, scheduler, dino
        self.codec = ImageCodec(vae, unet.config.variant, dino, vae_batch_size)
        self.resolution = presets.get_preset(unet.model_config).resolution

    # --- construction and files ------------------------------------------------------------------

    @property
    def variant(self) -> str:
        return self.unet.config.variant

    @property
    def preset(self) -> str:
        return self.unet.model_config.preset

    @property
    def name(self) -> str:
        """Method name for reports: M2M-Self or M2M-DINO."""
        return "M2M-Self" if self.variant == "self" else "M2M-DINO"

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @classmethod
    def from_preset(cls, model: ModelConfig, m2m: M2MConfig | None = None, device=None,
                    dtype=None, scheduler: str = "ddim") -> "M2MPipeline":
        """Base weights from the preset, image-set attention fresh (untrained: its zero-initialized
        output projections make it a no-op). For tests and demos before training."""
        m2m = m2m or M2MConfig()
        unet = M2MUNet.from_preset(model, m2m, device=device, dtype=dtype)
        dino = (DinoEncoder.from_preset(model, device=device, dtype=dtype)
                if m2m.variant == "dino" else None)
        return cls(unet, presets.load_vae(model, device, dtype),
                   presets.load_scheduler(model, scheduler), dino)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None,
                        storage: "StorageConfig | None" = None) -> "M2MPipeline":
        from diffusers import AutoencoderKL
        from transformers import Dinov2Model

        folder = local_copy(str(path), storage)
        index_file = folder / INDEX_NAME
        if not index_file.is_file():
            raise FileNotFoundError(f"{path} is not an M2M pipeline folder: no {INDEX_NAME}. "
                                    "Expected the layout M2MPipeline.save_pretrained writes "
                                    "(model_index.json, unet/, vae/, scheduler/, dino/)")
        index = json.loads(index_file.read_text())
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{index_file} describes {index.get('_class_name')!r}, not "
                             f"{cls.__name__}")
        unet = M2MUNet.from_pretrained(folder / "unet", device=device, dtype=dtype)
        if unet.config.variant != index.get("variant"):
            raise ValueError(f"{index_file} says variant {index.get('variant')!r} but unet/ holds "
                             f"an M2M-{unet.config.variant} model; re-export the pipeline")
        vae = AutoencoderKL.from_pretrained(folder / "vae").to(device=device, dtype=dtype).eval()
        scheduler = _load_scheduler(folder / "scheduler")
        dino = None
        if unet.config.variant == "dino":
            dino_model = Dinov2Model.from_pretrained(folder / "dino").requires_grad_(False)
            resolution = presets.get_preset(unet.model_config).dino_resolution
            dino = DinoEncoder(dino_model, resolution).to(device=device, dtype=dtype)
        return cls(unet, vae, scheduler, dino)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the folder layout of the module docstring (a local path)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet")
        self.vae.save_pretrained(path / "vae")
        self.scheduler.save_pretrained(path / "scheduler")
        if self.dino is not None:
            self.dino.dino.save_pretrained(path / "dino")
        index = {"_class_name": type(self).__name__, "variant": self.variant,
                 "preset": self.preset}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def set_scheduler(self, kind: str) -> None:
        """Swap the scheduler (ddim, euler, pndm, dpmsolver++), keeping the noise schedule."""
        import diffusers

        if kind not in presets.SCHEDULERS:
            raise ValueError(f"unknown scheduler {kind!r}; expected one of "
                             f"{sorted(presets.SCHEDULERS)}")
        cls = getattr(diffusers, presets.SCHEDULERS[kind])
        if not isinstance(self.scheduler, cls):
            self.scheduler = cls.from_config(self.scheduler.config)

    # --- sampling --------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], resolution: int | None = None
                   ) -> torch.Tensor:
        """Images of any size/mode → ``[K, 3, R, R]`` in [0, 1] at ``resolution`` (default: the
        preset's), by the project's one square fit (``m2m_ray.data.image_inputs.fit_square``)."""
        size = resolution or self.resolution
        if not images:
            return torch.zeros(0, 3, size, size)
        return images_to_tensor([fit_square(to_rgb(image), size) for image in images])

    def __call__(self, images: Sequence[Image.Image], num_images: int = 4, *,
                 generator: torch.Generator | None = None,
                 context_task: TaskConditions | None = None,
                 target_task: TaskConditions | None = None,
                 output_type: OutputType = "pil", **settings) -> list[Image.Image] | torch.Tensor:
        """``num_images`` new images after ``images`` (K >= 0 of them), generated one after
        another. ``settings``: any other ``SampleConfig`` field (``guidance_scale``,
        ``context_window``, ``num_inference_steps``, ...), keyword sugar for ``generate``'s spec.
        Task conditions ``[1, K]`` / ``[1, M]``. Returns PIL images, or for ``output_type="pt"``
        a tensor ``[M, 3, R, R]`` in [0, 1]."""
        spec = SampleConfig(num_images=num_images, **settings)
        out = self.generate([images], spec, None if generator is None else [generator],
                            context_task=context_task, target_task=target_task,
                            output_type=output_type)
        return out[0]

    def generate(self, image_sets: Sequence[Sequence[Image.Image]],
                 spec: SampleConfig | None = None,
                 generator: Sequence[torch.Generator] | None = None, *,
                 context_task: TaskConditions | None = None,
                 target_task: TaskConditions | None = None,
                 output_type: OutputType = "pil",
                 on_non_finite: Literal["raise", "skip"] = "raise"
                 ) -> list[list[Image.Image] | None] | torch.Tensor:
        """The batched form: S sets sampled by ``spec`` (the one sampling spec; None: its
        defaults; its scheduler, resolution and VAE batch size apply here), one generator per set
        (None: seeded from torch's global RNG). Sets with different numbers of images run as
        separate batches; task conditions ``[S, K]`` / ``[S, M]`` need sets of equal K. Returns S
        lists of PIL images, or for ``output_type="pt"`` a tensor ``[S, M, 3, R, R]``.

        A set whose latents or pixels hold NaN/Inf (e.g. a float16 overflow) is never returned as
        images: ``on_non_finite="raise"`` raises ``NonFiniteOutputError`` naming the sets,
        ``"skip"`` (PIL output only) returns None in their place.

        Raises ``ValueError`` when the generator count differs from S or task conditions come
        with sets of different sizes."""
        if on_non_finite == "skip" and output_type == "pt":
            raise ValueError('on_non_finite="skip" needs output_type="pil" (a tensor cannot hold '
                             "the missing sets)")
        spec = spec or SampleConfig()
        if generator is None:
            generator = [torch.Generator().manual_seed(int(torch.randint(2**62, ())))
                         for _ in image_sets]
        if len(generator) != len(image_sets):
            raise ValueError(f"{len(generator)} generators for {len(image_sets)} sets: give one "
                             "torch.Generator per set (that makes each set reproducible alone)")
        groups: dict[int, list[int]] = {}
        for index, images in enumerate(image_sets):
            groups.setdefault(len(images), []).append(index)
        if len(groups) > 1 and (context_task is not None or target_task is not None):
            raise ValueError(f"task conditions with sets of different sizes {sorted(groups)}: "
                             "call generate once per set size")
        self.set_scheduler(spec.scheduler)
        self.codec.vae_batch_size = spec.vae_batch_size
        results: list[torch.Tensor | None] = [None] * len(image_sets)
        for indices in groups.values():
            context = torch.stack([self.preprocess(image_sets[i], spec.resolution)
                                   for i in indices])  # (S, K, 3, R, R)
            out = sample(self.unet, self.scheduler, self.codec, context,
                         [generator[i] for i in indices], spec,
                         context_task=context_task, target_task=target_task)
            pixels = out.pixels if out.pixels is not None else self.codec.decode(out.latents)
            finite = out.finite & finite_sets(pixels).cpu()  # (S,)
            for row, i in enumerate(indices):
                results[i] = pixels[row].cpu() if finite[row] else None  # (M, 3, R, R)
        bad = [i for i, pixels in enumerate(results) if pixels is None]
        if bad and on_non_finite == "raise":
            raise NonFiniteOutputError(
                f"sets {bad} of {len(image_sets)} came out with NaN/Inf latents or pixels in "
                f"{str(self.unet.dtype).removeprefix('torch.')} (their images would be black); "
                "sample in float32 (SampleConfig.dtype / --sample.dtype=float32)", bad)
        if output_type == "pt":
            return torch.stack(results)
        return [None if pixels is None else tensor_to_images(pixels) for pixels in results]


def _load_scheduler(folder: Path):
    import diffusers

    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no {config_file}: expected a diffusers scheduler config")
    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in presets.SCHEDULERS.values():
        raise ValueError(f"{config_file} names scheduler {name!r}; expected one of "
                         f"{sorted(presets.SCHEDULERS.values())}")
    return getattr(diffusers, name).from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m m2m_ray.sampling.pipeline init <folder> --preset tiny --variant self``: write a
    pipeline with fresh image-set attention (to try generate/evaluate before training)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["init"])
    parser.add_argument("folder")
    parser.add_argument("--preset", default="tiny", choices=list(presets.PRESETS))
    parser.add_argument("--variant", default="self", choices=["self", "dino"])
    args = parser.parse_args(argv)
    pipe = M2MPipeline.from_preset(ModelConfig(preset=args.preset), M2MConfig(variant=args.variant))
    pipe.save_pretrained(args.folder)
    print(f"wrote an untrained {pipe.name} pipeline ({args.preset}) to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
