"""``M2MPipeline``: a trained M2M model as one object, in the diffusers style.

    pipe = M2MPipeline.from_pretrained("outputs/model", device="cuda", dtype=torch.float16)
    new_images = pipe(images, num_images=4, guidance_scale=3.0, context_window=8,
                      num_inference_steps=50, seed=0, dtype="float16")
    spec = SampleConfig(num_images=4, guidance_scale=3.0, seed=0)   # the one sampling spec
    many = pipe.generate([set_a, set_b, set_c], spec, set_ids=["a", "b", "c"])
    first_two = pipe(images, callback=lambda e: STOP if isinstance(e, ImageEvent) and e.image == 1
                     else None)                                # m2m_ray.sampling.callbacks
    pipe.save_pretrained("outputs/model_copy")
    pipe = M2MPipeline.from_preset(ModelConfig(preset="tiny"), M2MConfig(variant="self"))  # fresh

Folder layout (``save_pretrained`` writes it; the training export writes the same)::

    <path>/model_index.json   {"_class_name": "M2MPipeline", "variant": "self"|"dino", "preset": ...}
    <path>/unet/              M2MUNet (config.json + diffusion_pytorch_model.safetensors)
    <path>/vae/               diffusers AutoencoderKL
    <path>/scheduler/         scheduler_config.json (DDIMScheduler by default): the model's own
                              scheduler, used unless a spec names another
    <path>/dino/              transformers Dinov2Model (dino variant only)

Input images may have any size and mode (``m2m_ray.data.image_inputs``: RGB, shorter side resized
to the spec's resolution, default the preset's; centre crop); outputs are RGB PIL images of that
resolution. Every ``SampleConfig`` field is honoured (``generate``'s docstring); the weights' dtype
is checked against the spec's ``dtype``, never cast. The
sampling itself is ``m2m_ray.sampling.sampler.sample``. ``from_pretrained`` also takes an
``s3://`` folder (copied once to ``$M2M_RAY_CACHE`` or ``~/.cache/m2m_ray/pipelines``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch
from PIL import Image

from m2m_ray import storage as st
from m2m_ray.data.image_inputs import images_to_tensor, tensor_to_images
from m2m_ray.formats.images import fit_square, to_rgb
from m2m_ray.models import presets
from m2m_ray.models.codec import ImageCodec
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.runtime import torch_dtype
from m2m_ray.sampling.callbacks import Callback, Event, ImageEvent
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.sampling.sampler import NonFiniteOutputError, finite_sets, sample, set_generators

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

INDEX_NAME = "model_index.json"
DEFAULT_SET_ID = "input"  # __call__'s set: the id the generate job gives its inputs.images set
SEED_WITH_GENERATORS = SampleConfig.model_fields["seed"].default  # the one seed generators allow
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
        self._schedulers: dict[str, object] = {}  # scheduler_for's other kinds, built once
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

    def scheduler_for(self, name: str | None):
        """The scheduler a spec samples with: the model's own (``name`` None: the one saved in its
        folder, ``from_preset``'s ``scheduler``), or the kind ``name`` names (ddim, euler, pndm,
        dpmsolver++) on the model's noise schedule. The model's own is never changed."""
        import diffusers

        if name is None:
            return self.scheduler
        if name not in presets.SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; expected one of "
                             f"{sorted(presets.SCHEDULERS)}")
        cls = getattr(diffusers, presets.SCHEDULERS[name])
        if isinstance(self.scheduler, cls):
            return self.scheduler
        if name not in self._schedulers:
            self._schedulers[name] = cls.from_config(self.scheduler.config)
        return self._schedulers[name]

    def check_dtype(self, spec: SampleConfig) -> None:
        """Refuse a spec whose ``dtype`` is not the one the weights have on this device (the CPU
        always runs float32, ``runtime.torch_dtype``): the pipeline never casts its weights."""
        wanted = torch_dtype(spec.dtype, self.device)
        if self.unet.dtype != wanted:
            have = str(self.unet.dtype).removeprefix("torch.")
            if self.device.type != "cuda":  # no dtype setting runs other weights than float32 here
                raise ValueError(
                    f"this pipeline's weights are {have} on {self.device.type}, where sampling "
                    "runs in float32 whatever SampleConfig.dtype says: load it in float32 "
                    "(M2MPipeline.from_pretrained(..., dtype=None or torch.float32)), or on a GPU")
            raise ValueError(
                f"SampleConfig.dtype is {spec.dtype!r} ({str(wanted).removeprefix('torch.')} on "
                f"{self.device.type}) but this pipeline's weights are {have}: pass dtype={have!r} "
                "(--sample.dtype), or load the pipeline in that dtype "
                f"(M2MPipeline.from_pretrained(..., dtype=torch.{spec.dtype}))")

    # --- sampling --------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image], resolution: int | None = None
                   ) -> torch.Tensor:
        """Images of any size/mode → ``[K, 3, R, R]`` in [0, 1] at ``resolution`` (default: the
        preset's), by the project's one square fit (``m2m_ray.formats.images.fit_square``)."""
        size = resolution or self.resolution
        if not images:
            return torch.zeros(0, 3, size, size)
        return images_to_tensor([fit_square(to_rgb(image), size) for image in images])

    def __call__(self, images: Sequence[Image.Image], num_images: int = 4, *,
                 generator: torch.Generator | None = None, set_id: str | None = None,
                 context_task: TaskConditions | None = None,
                 target_task: TaskConditions | None = None,
                 output_type: OutputType = "pil", callback: Callback | None = None,
                 **settings) -> list[Image.Image] | torch.Tensor:
        """``num_images`` new images after ``images`` (K >= 0 of them), generated one after
        another: ``generate`` for one set. ``settings``: any other ``SampleConfig`` field
        (``seed``, ``guidance_scale``, ``context_window``, ``num_inference_steps``, ``scheduler``,
        ``dtype``, ``resolution``, ...), keyword sugar for ``generate``'s spec. The noise comes
        from ``set_generators([set_id], seed)``; ``set_id`` None is ``DEFAULT_SET_ID`` ("input",
        the id the generate job gives its ``inputs.images`` set), so ``pipe(images, seed=s)``
        gives the job's images of those files with ``sample.seed=s``; or from ``generator``.
        ``callback``: see ``generate``. Task conditions ``[1, K]`` / ``[1, M]``. Returns M PIL
        images (M' < M when the callback stopped), or for ``output_type="pt"`` a tensor
        ``[M, 3, R, R]`` in [0, 1]."""
        spec = SampleConfig(num_images=num_images, **settings)
        if generator is not None and set_id is not None:
            raise ValueError("set_id and generator both given: the generator decides the noise "
                             "alone; pass one of them")
        out = self.generate([images], spec, None if generator is None else [generator],
                            set_ids=None if generator is not None else [
                                DEFAULT_SET_ID if set_id is None else set_id],
                            context_task=context_task, target_task=target_task,
                            output_type=output_type, callback=callback)
        return out[0]

    def generate(self, image_sets: Sequence[Sequence[Image.Image]],
                 spec: SampleConfig | None = None,
                 generator: Sequence[torch.Generator] | None = None, *,
                 set_ids: Sequence[str] | None = None,
                 context_task: TaskConditions | None = None,
                 target_task: TaskConditions | None = None,
                 output_type: OutputType = "pil",
                 on_non_finite: Literal["raise", "skip"] = "raise",
                 callback: Callback | None = None
                 ) -> list[list[Image.Image] | None] | torch.Tensor:
        """The batched form: S sets sampled by ``spec`` (the one sampling spec; None: its
        defaults), every field honoured: the sampler's (M, W, steps, s_I, s_T, cache), the
        scheduler (None: the model's own, ``scheduler_for``), ``resolution`` of the inputs and
        outputs (None: the preset's), ``vae_batch_size``, ``dtype`` (it must be the weights',
        ``check_dtype``) and ``seed``: set i's noise comes from ``set_generators([set_ids[i]],
        spec.seed)`` — ``set_ids`` None means ``"0"``, ``"1"``, … by position — or, instead,
        from ``generator`` (one per set; ``spec.seed`` must then be its default 0, since it would
        be ignored). Sets with different numbers of images run as separate batches; task
        conditions ``[S, K]`` / ``[S, M]`` need sets of equal K. Returns S lists of PIL images,
        or for ``output_type="pt"`` a tensor ``[S, M, 3, R, R]``.

        ``callback`` (``m2m_ray.sampling.callbacks``): a ``StepEvent`` after every denoising step
        and an ``ImageEvent`` (with decoded ``pixels`` and PIL ``images``) after every image of
        every batch; ``sets`` / ``set_ids`` name the sets of the batch. Returning ``STOP`` ends
        the call: the sets of that batch get their M' finished images, later batches none (empty
        lists).

        A set whose latents or pixels hold NaN/Inf (e.g. a float16 overflow) is never returned as
        images: ``on_non_finite="raise"`` raises ``NonFiniteOutputError`` naming the sets,
        ``"skip"`` (PIL output only) returns None in their place.

        Raises ``ValueError`` for a generator or set id count other than S, generators together
        with set ids or a ``spec.seed`` other than 0, a ``spec.dtype`` the weights do not have,
        task conditions with sets of different sizes, or a callback with ``output_type="pt"`` and
        sets of different sizes (a stop could leave them with different counts)."""
        if on_non_finite == "skip" and output_type == "pt":
            raise ValueError('on_non_finite="skip" needs output_type="pil" (a tensor cannot hold '
                             "the missing sets)")
        spec = spec or SampleConfig()
        self.check_dtype(spec)
        generator, set_ids = self._generators(len(image_sets), spec, generator, set_ids)
        groups: dict[int, list[int]] = {}
        for index, images in enumerate(image_sets):
            groups.setdefault(len(images), []).append(index)
        if len(groups) > 1 and (context_task is not None or target_task is not None):
            raise ValueError(f"task conditions with sets of different sizes {sorted(groups)}: "
                             "call generate once per set size")
        if len(groups) > 1 and callback is not None and output_type == "pt":
            raise ValueError(f"a callback with output_type='pt' and sets of different sizes "
                             f"{sorted(groups)}: a stop can leave the batches with different "
                             "image counts, which no tensor holds; use output_type='pil' or call "
                             "generate once per set size")
        scheduler = self.scheduler_for(spec.scheduler)
        self.codec.vae_batch_size = spec.vae_batch_size
        size = spec.resolution or self.resolution
        results: list[torch.Tensor | None] = [torch.zeros(0, 3, size, size)] * len(image_sets)
        for indices in groups.values():
            context = torch.stack([self.preprocess(image_sets[i], spec.resolution)
                                   for i in indices])  # (S, K, 3, R, R)
            out = sample(self.unet, scheduler, self.codec, context,
                         [generator[i] for i in indices], spec,
                         context_task=context_task, target_task=target_task,
                         callback=None if callback is None else self._forward(
                             callback, indices, set_ids))
            if out.pixels is not None:  # decoded in the loop (dino)
                pixels = out.pixels  # (S, M', 3, R, R)
            elif out.latents.shape[1]:
                pixels = self.codec.decode(out.latents)  # (S, M', 3, R, R)
            else:  # stopped before the first image
                pixels = torch.zeros(len(indices), 0, 3, *context.shape[-2:])
            finite = out.finite & finite_sets(pixels).cpu()  # (S,)
            for row, i in enumerate(indices):
                results[i] = pixels[row].cpu() if finite[row] else None  # (M', 3, R, R)
            if out.stopped:
                break
        bad = [i for i, pixels in enumerate(results) if pixels is None]
        if bad and on_non_finite == "raise":
            raise NonFiniteOutputError(
                f"sets {bad} of {len(image_sets)} came out with NaN/Inf latents or pixels in "
                f"{str(self.unet.dtype).removeprefix('torch.')} (their images would be black); "
                "sample in float32 (a pipeline loaded in float32 and dtype='float32'; the "
                "generate job: --sample.dtype=float32)", bad)
        if output_type == "pt":
            return torch.stack(results)
        return [None if pixels is None else tensor_to_images(pixels) for pixels in results]

    def _generators(self, count: int, spec: SampleConfig,
                    generator: Sequence[torch.Generator] | None,
                    set_ids: Sequence[str] | None
                    ) -> tuple[list[torch.Generator], list[str] | None]:
        """One generator per set and the set ids they come from: ``set_generators(set_ids,
        spec.seed)`` (ids by default ``"0"``, ``"1"``, …), or the given generators and None."""
        if generator is None:
            set_ids = [str(i) for i in range(count)] if set_ids is None else list(set_ids)
            if len(set_ids) != count:
                raise ValueError(f"{len(set_ids)} set ids for {count} sets: give one per set")
            return set_generators(set_ids, spec.seed), set_ids
        if set_ids is not None:
            raise ValueError("set_ids and generator both given: the generators decide the noise "
                             "alone; pass one of them")
        if spec.seed != SEED_WITH_GENERATORS:  # by value: SampleConfig(**dump) sets every field
            raise ValueError(f"SampleConfig.seed={spec.seed} and generator both given: the "
                             "generators decide the noise alone; leave seed at its default "
                             f"{SEED_WITH_GENERATORS}, or pass set_ids instead of generators")
        if len(generator) != count:
            raise ValueError(f"{len(generator)} generators for {count} sets: give one "
                             "torch.Generator per set (that makes each set reproducible alone)")
        return list(generator), None

    def _forward(self, callback: Callback, indices: list[int],
                 set_ids: Sequence[str] | None) -> Callback:
        """The sampler's events of one batch as the caller's: rows → positions in ``image_sets``
        and set ids; an ``ImageEvent`` gets decoded pixels and PIL images."""
        def forward(event: Event):
            sets = tuple(indices[row] for row in event.sets)
            ids = None if set_ids is None else tuple(str(set_ids[i]) for i in sets)
            if isinstance(event, ImageEvent):
                pixels = (event.pixels if event.pixels is not None
                          else self.codec.decode(event.latents[:, None])[:, 0])  # (B, 3, R, R)
                event = replace(event, pixels=pixels, images=tensor_to_images(pixels))
            return callback(replace(event, sets=sets, set_ids=ids))
        return forward


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
