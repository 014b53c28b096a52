"""The M2M UNet: a diffusers ``UNet2DConditionModel`` whose text cross-attention (``attn2``) is
Image-Set Attention (``image_set_attention``), in two variants (``M2MConfig.variant``):

- ``self``: the context of a site is the UNet's own hidden states of the clean context latents at
  t = 0, taken at the input of that site's ``attn2`` (image-set attention skipped for them). Every
  ``attn2.to_k/to_v`` reads its own site's width (``cross_attention_dim = block_out_channels``).
- ``dino``: the context is DINOv2's last hidden states ``[B, K, L, D]`` of the clean images
  (``context.DinoEncoder``), projected by each site's ``attn2.to_k/to_v``
  (``cross_attention_dim = D``).

Public API (all shapes batch-first; M targets, K context images, latents ``[4, h, w]``)::

    model = M2MUNet.from_preset(ModelConfig(preset="tiny"), M2MConfig(variant="self"))
    print(model.init_report.summary())     # which tensors come from SD, which are new
    eps = model(targets, timesteps, context, offset=0, target_task=None, context_task=None,
                context_drop=None, task_drop=None)                    # → [B, M, 4, h, w]
    cache = model.encode_context(context, task=None)                  # → ContextCache
    eps = model(targets, timesteps, cache=cache, offset=cache.num_images, target_task=...)
    model.save_pretrained(path); model = M2MUNet.from_pretrained(path)
    finetune = M2MUNet.from_pretrained(path, task_conditions=["camera"])  # + fresh task embedders

- ``targets`` noisy latents ``[B, M, 4, h, w]``, ``timesteps`` ``[B, M]``.
- ``context``: self → clean latents ``[B, K, 4, h, w]``; dino → DINO features ``[B, K, L, D]``;
  None → K = 0 (the first image of a set).
- ``offset``: target j sees context images ``< offset + j`` (training: 0; sampling: K);
  0 ≤ offset ≤ K.
  Teacher forcing on a set of N latents: ``model(noisy, t, latents[:, :N - 1], offset=0)`` — no
  target sees image N-1, so leaving it out of the context saves 1/N of the clean pass.
- ``target_task`` / ``context_task``: ``TaskConditions`` of the targets ``[B, M]`` / the context
  images ``[B, K]`` (only with ``M2MConfig.task_conditions``; None = no conditions).
- ``context_drop`` ``[B]`` bool: sample b sees the null token only (context dropout, the
  unconditional guidance branch); identical to an empty context.
- ``task_drop`` ``[B]`` bool: sample b ignores its task conditions (targets and context). Eq. 7's
  three branches in one forward: batch the sets 3×, ``context_drop = [1, 0, 0]``, ``task_drop =
  [1, 1, 0]`` per branch (with a cache: ``cache.repeat(3)``).

Gradients: in training (self) the clean context rows ride in the same UNet batch as the targets and
gradients flow through them: the clean pass is the same network, and the paper trains it end to
end (it only fixes t = 0 for the clean images). ``encode_context`` is meant for sampling: call it
under ``torch.no_grad()``. Gradient checkpointing (``enable_gradient_checkpointing``) and bf16
autocast work; every per-call argument travels in ``cross_attention_kwargs``.

Weights: ``from_preset`` copies every base-UNet tensor except SD's text cross-attention
(``attn2.*``); image-set attention (attn2 to_q/to_k/to_v/to_out, null key/value) and the task
embedders are new, with zero-initialized output projections, so at initialization the model equals
the base UNet with ``attn2`` skipped. ``save_pretrained`` writes the diffusers folder layout:
``config.json`` (M2MConfig, ModelConfig, base UNet config, DINO width) and
``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from m2m_ray.formats.rng import Salt
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.context import ContextCache, SiteContext
from m2m_ray.models.embedders import TaskConditions, TaskEmbedder
from m2m_ray.models.image_set_attention import (
    ImageSetCall,
    install_image_set_attention,
    kept_rows,
)
from m2m_ray.models.presets import _from_hub, get_preset, load_unet, unet_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class InitReport:
    """Where each tensor of a freshly built M2M UNet came from: ``{name: numel}`` per group."""

    from_base: dict[str, int]    # copied from the base UNet (SD-2.1-base for pretrained presets)
    new: dict[str, int]          # fresh: image-set attention, null tokens, task embedders
    base_unused: dict[str, int]  # base tensors left out: SD's text cross-attention

    def summary(self) -> str:
        def line(title: str, group: dict[str, int]) -> str:
            kinds = Counter("attn2." + n.split(".attn2.")[1] if ".attn2." in n
                            else n.removeprefix("unet.").split(".")[0] for n in group)
            detail = ", ".join(f"{k} ×{c}" for k, c in sorted(kinds.items()))
            return (f"{title}: {len(group)} tensors, {sum(group.values()) / 1e6:.2f}M parameters"
                    + (f" ({detail})" if len(kinds) <= 16 else ""))

        return "\n".join([line("from the base UNet", self.from_base), line("new", self.new),
                          line("base tensors not used", self.base_unused)])


def _dino_hidden_size(model: ModelConfig) -> int:
    preset = get_preset(model)
    if preset.dino_model_id:
        from transformers import Dinov2Config

        return _from_hub(Dinov2Config.from_pretrained, preset.dino_model_id,
                         "the DINOv2 config").hidden_size
    return preset.dino_config["hidden_size"]


class M2MUNet(nn.Module):
    """See the module docstring. Build with ``from_preset`` or ``from_pretrained``."""

    def __init__(self, unet_config: dict[str, Any], config: M2MConfig, model: ModelConfig,
                 dino_hidden_size: int | None = None):
        super().__init__()
        if (config.variant == "dino") != (dino_hidden_size is not None):
            raise ValueError(f"variant {config.variant!r} with dino_hidden_size="
                             f"{dino_hidden_size}: the dino variant needs the DINO width, "
                             "self none")
        self.config, self.model_config = config, model
        self.base_config = {k: list(v) if isinstance(v, tuple) else v
                            for k, v in unet_config.items()}
        self.dino_hidden_size = dino_hidden_size
        unet_kwargs = dict(self.base_config)
        unet_kwargs["cross_attention_dim"] = (tuple(unet_kwargs["block_out_channels"])
                                              if config.variant == "self" else dino_hidden_size)
        self.unet = UNet2DConditionModel(**unet_kwargs)
        tasks = config.task_conditions
        self.site_names = install_image_set_attention(
            self.unet, config.task_embed_dim if tasks else None)
        self.task_embedder = TaskEmbedder(tasks, config.task_embed_dim) if tasks else None
        self.dino_task_proj = None
        if tasks and config.variant == "dino":
            self.dino_task_proj = nn.Linear(config.task_embed_dim, dino_hidden_size, bias=False)
            nn.init.zeros_(self.dino_task_proj.weight)
        self.init_report: InitReport | None = None

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, model: ModelConfig, config: M2MConfig, device=None,
                    dtype=None) -> "M2MUNet":
        """Base-UNet weights from the preset (SD for sd21-base), the new modules seeded fresh."""
        dino_width = _dino_hidden_size(model) if config.variant == "dino" else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.seed + Salt.IMAGE_SET_ATTENTION_INIT)
            m2m = cls(unet_config(model), config, model, dino_width)
        m2m.init_report = m2m.load_base_weights(load_unet(model).state_dict())
        return m2m.to(device=device, dtype=dtype).eval()

    def load_base_weights(self, base_state: dict[str, torch.Tensor]) -> InitReport:
        """Copy every base-UNet tensor except ``attn2.*``; any other mismatch is an error."""
        own = self.state_dict()
        to_load, unused = {}, {}
        for name, tensor in base_state.items():
            if ".attn2." in name:
                unused[name] = tensor.numel()
                continue
            target = f"unet.{name}"
            if target not in own or own[target].shape != tensor.shape:
                raise ValueError(
                    f"base UNet tensor {name} {tuple(tensor.shape)} has no place in the M2M UNet "
                    f"(found {tuple(own[target].shape) if target in own else 'nothing'}); the base "
                    "config and the M2M UNet's config disagree")
            to_load[target] = tensor
        new = {n: t.numel() for n, t in own.items() if n not in to_load}
        stray = [n for n in new if ".attn2." not in n and not n.startswith(("task_embedder.",
                                                                             "dino_task_proj."))]
        if stray:
            raise ValueError(f"the base UNet lacks tensors the M2M UNet expects from it: "
                             f"{stray[:5]}")
        self.load_state_dict(to_load, strict=False)
        return InitReport({n: own[n].numel() for n in to_load}, new, unused)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, "m2m": self.config.model_dump(mode="json"),
                  "model": self.model_config.model_dump(mode="json"), "unet": self.base_config,
                  "dino_hidden_size": self.dino_hidden_size}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None,
                        task_conditions: list[str] | None = None,
                        seed: int | None = None, camera_frame: str | None = None) -> "M2MUNet":
        """The model saved at ``path``. ``task_conditions`` (fine-tuning a pre-trained model,
        paper §6.2): the saved weights plus fresh, zero-initialized embedders for the conditions
        it lacks (seeded with ``seed``, default the saved preset seed), so the new model starts
        out predicting exactly what the saved one does; ``camera_frame`` sets what a camera
        embedder added here is given (``M2MConfig.camera_frame``; None: the saved setting). The one fine-tune loader: training's
        ``init_from`` comes here too.

        Raises ``FileNotFoundError`` for a folder without the config or weights, ``ValueError``
        for another class's folder or conditions that would be removed."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not an M2M UNet folder: expected {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME} written by M2MUNet.save_pretrained")
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.get("_class_name") != cls.__name__:
            raise ValueError(f"{path / CONFIG_NAME} describes {config.get('_class_name')!r}, "
                             f"not {cls.__name__}")
        m2m, model_config = M2MConfig(**config["m2m"]), ModelConfig(**config["model"])
        state = load_file(str(path / WEIGHTS_NAME))
        args = (config["unet"], m2m, model_config, config["dino_hidden_size"])
        if task_conditions is None or list(task_conditions) == m2m.task_conditions:
            with torch.device("meta"):
                model = cls(*args)
            model.load_state_dict(state, strict=True, assign=True)
            return model.to(device=device, dtype=dtype).eval()
        m2m = M2MConfig(**{**m2m.model_dump(), "task_conditions": list(task_conditions),
                           **({"camera_frame": camera_frame} if camera_frame else {})})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((model_config.seed if seed is None else seed) + Salt.TASK_EMBEDDER_INIT)
            model = cls(config["unet"], m2m, model_config, config["dino_hidden_size"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        fresh = ("task_embedder.", "dino_task_proj.", ".processor.task_proj.")
        if unexpected or any(not (k.startswith(fresh[:2]) or fresh[2] in k) for k in missing):
            raise ValueError(
                f"{path} holds a model with task_conditions={config['m2m']['task_conditions']}; "
                f"it can gain conditions, not lose them (asked for {list(task_conditions)}: "
                f"unexpected {sorted(unexpected)[:4]}, missing {sorted(missing)[:4]})")
        return model.to(device=device, dtype=dtype).eval()

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, targets: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None, *, offset: int = 0,
                cache: ContextCache | None = None, target_task: TaskConditions | None = None,
                context_task: TaskConditions | None = None,
                context_drop: torch.Tensor | None = None,
                task_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise ε ``[B, M, 4, h, w]`` of the targets (see the module docstring)."""
        if targets.ndim != 5 or timesteps.shape != targets.shape[:2]:
            raise ValueError(f"targets {tuple(targets.shape)} and timesteps "
                             f"{tuple(timesteps.shape)}: expected [B, M, C, h, w] and [B, M]")
        batch, num_targets = targets.shape[:2]
        for name, mask in (("context_drop", context_drop), ("task_drop", task_drop)):
            if mask is not None and (mask.dtype != torch.bool or mask.shape != (batch,)):
                raise ValueError(f"{name} {mask.dtype} {tuple(mask.shape)}: expected a bool "
                                 f"tensor of shape [{batch}]")
        device = targets.device
        common = dict(batch_size=batch, num_targets=num_targets, offset=offset,
                      context_kept=kept_rows(context_drop, device),
                      task_drop=None if task_drop is None else task_drop.to(device, non_blocking=True),
                      target_task=self._embed(target_task, batch, num_targets, "target_task"))
        sample, steps = targets.flatten(0, 1), timesteps.flatten()  # (B*M, C, h, w), (B*M,)
        if cache is not None:
            if context is not None or context_task is not None:
                raise ValueError("pass either a cache or context/context_task, not both: the cache "
                                 "already holds the context and its task conditions")
            if cache.batch_size != batch:
                raise ValueError(f"cache of batch {cache.batch_size} for {batch} target sets; "
                                 "use cache.repeat(n) for guidance branches")
            call = ImageSetCall("cached", num_context=cache.num_images, cache=cache, **common)
        elif self.config.variant == "self":
            context = self._check_latents(context, targets)
            num_context = context.shape[1]
            call = ImageSetCall("self", num_context=num_context, **common,
                                context_task=self._embed(context_task, batch, num_context,
                                                         "context_task"))
            sample = torch.cat([sample, context.flatten(0, 1)])  # (B*(M+K), C, h, w)
            steps = torch.cat([steps, steps.new_zeros(batch * num_context)])  # clean: t = 0
        else:
            features = self._check_features(context, batch, targets)
            context_emb = self._embed(context_task, batch, features.shape[1], "context_task")
            call = ImageSetCall("dino", num_context=features.shape[1], dino_features=features,
                                dino_task=None if context_emb is None
                                else self.dino_task_proj(context_emb), **common)
        if not 0 <= offset <= call.num_context:
            raise ValueError(f"offset {offset} with K={call.num_context} context images: expected "
                             "0 <= offset <= K (training: 0; sampling one image after K: K)")
        eps = self.unet(sample, steps, encoder_hidden_states=None,
                        cross_attention_kwargs={"m2m": call}).sample
        return eps[: batch * num_targets].unflatten(0, (batch, num_targets))  # (B, M, C, h, w)

    @torch.no_grad()
    def encode_context(self, context: torch.Tensor,
                       task: TaskConditions | None = None) -> ContextCache:
        """Keys/values of K context images at every site (self: one clean UNet pass at t = 0 on
        latents ``[B, K, 4, h, w]``; dino: projections of features ``[B, K, L, D]``)."""
        batch, num_context = context.shape[:2]
        task_emb = self._embed(task, batch, num_context, "task")
        attns = [self.unet.get_submodule(name) for name in self.site_names]
        if num_context == 0:
            return ContextCache(tuple(
                SiteContext(context.new_zeros(batch, 0, 0, a.inner_dim, dtype=self.dtype),
                            context.new_zeros(batch, 0, 0, a.inner_dim, dtype=self.dtype))
                for a in attns))
        if self.config.variant == "self":
            self._check_latents(context, context)
            call = ImageSetCall("capture", batch, 0, num_context, context_task=task_emb,
                                captured={})
            steps = torch.zeros(batch * num_context, device=context.device)
            self.unet(context.flatten(0, 1), steps, encoder_hidden_states=None,
                      cross_attention_kwargs={"m2m": call})
            return ContextCache(tuple(call.captured[i] for i in range(len(attns))))
        features = self._check_features(context, batch, context)
        dino_task = None if task_emb is None else self.dino_task_proj(task_emb)
        return ContextCache(tuple(a.processor.context_kv(a, features, dino_task) for a in attns))

    # --- argument checks -------------------------------------------------------------------------

    def _embed(self, task: TaskConditions | None, batch: int, count: int,
               what: str) -> torch.Tensor | None:
        if task is None:
            return None
        if self.task_embedder is None:
            raise ValueError(f"{what} given, but this model has no task conditions "
                             "(M2MConfig.task_conditions is empty); pass None")
        if task.shape() != (batch, count):
            raise ValueError(f"{what} covers [B, N] = {list(task.shape())} but the call has "
                             f"B={batch} sets of {count} images; give one condition per image")
        return self.task_embedder(task)  # (B, N, E)

    def _check_latents(self, context: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if context is None:
            return like.new_zeros(like.shape[0], 0, *like.shape[2:])
        if (context.ndim != 5 or context.shape[0] != like.shape[0]
                or context.shape[2:] != like.shape[2:]):
            raise ValueError(f"self-variant context {tuple(context.shape)}: expected clean latents "
                             f"[B, K, {', '.join(map(str, like.shape[2:]))}] with "
                             f"B={like.shape[0]}")
        return context

    def _check_features(self, context: torch.Tensor | None, batch: int,
                        like: torch.Tensor) -> torch.Tensor:
        width = self.dino_hidden_size
        if context is None:
            return like.new_zeros(batch, 0, 1, width)
        if context.ndim != 4 or context.shape[0] != batch or context.shape[-1] != width:
            raise ValueError(f"dino-variant context {tuple(context.shape)}: expected DINO features "
                             f"[B, K, L, {width}] with B={batch} (DinoEncoder turns images "
                             "into them)")
        return context
