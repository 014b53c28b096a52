"""Image-Set Attention: the attention processor that replaces text cross-attention (``attn2``) in
every transformer block of a diffusers ``UNet2DConditionModel``.

Queries come from the noisy targets, keys/values from the context images (one site = one ``attn2``
layer), multi-head, with a learned null key/value that every target always sees. The rule
(``visible_context``): target ``j`` attends to the null token and context images ``i < offset + j``
among the K given. Training teacher forcing: ``M = N`` targets, context = the same N images (or
their first N-1, the last one is never visible), ``offset = 0``; sampling one new image after K
context images: ``M = 1``, ``offset = K``. A dropped context (``context_drop[b]``) leaves the null
token only, exactly what an empty context (K = 0, the first image of a set) gives, so classifier-
free guidance and the first image share one code path.

Compute (``image_set_attention``): the null token is put in front of the flattened context keys,
``[B, H, 1 + K·L, d]``, so the keys a target may see are a *prefix*. Targets are grouped by how many
context images they see; each group is one ``F.scaled_dot_product_attention`` call over its prefix,
without any mask, so SDPA may pick its flash/memory-efficient kernels, masked keys cost nothing
(≈ half the attention FLOPs of a masked version in training) and no mask is built at all, let alone
a dense ``N·h·w × N·h·w`` one. A dropped sample's output is the projected null value (the exact
output of attention over the null token alone), with no query projection or attention compute:
only the kept samples attend.

Processors are ``nn.Module``s (they own the null key/value and the zero-initialized task-condition
projection), installed with ``set_attn_processor`` before weights are loaded. Everything a call
needs travels in ``cross_attention_kwargs={"m2m": ImageSetCall(...)}`` — never in shared state — so
gradient checkpointing recomputes blocks with the same arguments. ``ImageSetCall.mode``:

- ``self``: rows of the UNet batch are ``[B·M targets; B·K clean context]``; context keys/values
  come from the clean rows' hidden states at the same site; clean rows get zero output (image-set
  attention skipped for them).
- ``dino``: rows are the targets; keys/values are this site's projections of DINO features.
- ``cached``: rows are the targets; keys/values come from ``ImageSetCall.cache`` (``ContextCache``).
- ``capture``: rows are clean context only; each site stores its ``SiteContext`` into
  ``ImageSetCall.captured`` and returns zeros (how ``M2MUNet.encode_context`` builds a cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from m2m_ray.models.context import ContextCache, SiteContext

CallMode = Literal["self", "dino", "cached", "capture"]


def visible_context(num_targets: int, num_context: int, offset: int) -> torch.Tensor:
    """``[M, K]`` bool: may target ``j`` attend to context image ``i`` (``i < offset + j``)."""
    targets = torch.arange(num_targets)[:, None]
    context = torch.arange(num_context)[None, :]
    return context < offset + targets


def _target_groups(num_targets: int, num_context: int,
                   offset: int) -> Iterator[tuple[int, int, int]]:
    """Runs ``(first, last, seen)`` of consecutive targets that see the same ``seen`` images."""
    first = 0
    while first < num_targets:
        seen = min(offset + first, num_context)
        last = first + 1
        while last < num_targets and min(offset + last, num_context) == seen:
            last += 1
        yield first, last, seen
        first = last


def image_set_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        null_key: torch.Tensor, null_value: torch.Tensor, heads: int,
                        offset: int) -> torch.Tensor:
    """Causal multi-head attention of M targets over K context images plus a null token.

    query ``(B, M, Lq, inner)``, key/value ``(B, K, Lk, inner)``, null_key/null_value ``(inner,)``
    → ``(B, M, Lq, inner)``. Dropped samples never come here (``ImageSetAttnProcessor.attend``).
    """
    batch, num_targets, query_len, inner = query.shape
    num_context, key_len = key.shape[1], key.shape[2]
    head_dim = inner // heads
    null_k = null_key.to(key.dtype).expand(batch, 1, inner)
    null_v = null_value.to(value.dtype).expand(batch, 1, inner)
    keys = torch.cat([null_k, key.flatten(1, 2)], 1)  # (B, 1+K*Lk, inner)
    values = torch.cat([null_v, value.flatten(1, 2)], 1)  # (B, 1+K*Lk, inner)
    keys = keys.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, 1+K*Lk, d)
    values = values.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, 1+K*Lk, d)
    outputs = []
    for first, last, seen in _target_groups(num_targets, num_context, offset):
        group = query[:, first:last].flatten(1, 2)  # (B, m*Lq, inner)
        group = group.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, m*Lq, d)
        span = 1 + seen * key_len
        out = F.scaled_dot_product_attention(group, keys[:, :, :span], values[:, :, :span])
        outputs.append(out.transpose(1, 2).reshape(batch, last - first, query_len, inner))
    return torch.cat(outputs, 1)  # (B, M, Lq, inner)


@dataclass(frozen=True, eq=False)
class ImageSetCall:
    """Everything one UNet call's image-set attention needs (see the module docstring)."""

    mode: CallMode
    batch_size: int                               # B
    num_targets: int                              # M (0 in capture mode)
    num_context: int                              # K
    offset: int = 0
    context_kept: torch.Tensor | slice | None = None  # samples that see their context: indices
                                                  # or a slice (``kept_rows``); None: all
    task_drop: torch.Tensor | None = None         # (B,) bool: ignore the task conditions
    target_task: torch.Tensor | None = None       # (B, M, E) task embeddings of the targets
    context_task: torch.Tensor | None = None      # (B, K, E) self/capture: of the context images
    dino_features: torch.Tensor | None = None     # (B, K, L, D) dino mode
    dino_task: torch.Tensor | None = None         # (B, K, D) dino mode: projected context task
    cache: ContextCache | None = None             # cached mode
    captured: dict[int, SiteContext] | None = None  # capture mode: filled per site


def kept_rows(context_drop: torch.Tensor | None,
              device: torch.device) -> torch.Tensor | slice | None:
    """The samples whose context is not dropped: None when none is dropped, a slice when they are
    one run (the sampler's guidance batches: the unconditional copy first, so indexing the query,
    the keys and the output costs no copy), else indices on ``device``. Computed once per UNet
    call (not per site); from a mask that lives on the CPU — as the sampler's guidance masks do —
    without any device synchronisation."""
    if context_drop is None:
        return None
    kept = (~context_drop).nonzero().flatten()  # a host sync only if the mask is on a device
    if kept.numel() == context_drop.numel():
        return None
    if kept.numel() == 0:
        return slice(0, 0)
    first, last = int(kept[0]), int(kept[-1])
    if last - first + 1 == kept.numel():
        return slice(first, last + 1)
    return kept.to(device, non_blocking=True)


def _take(rows: torch.Tensor | None, kept: torch.Tensor | slice) -> torch.Tensor | None:
    return None if rows is None else rows[kept]


def _unless_dropped(term: torch.Tensor, task_drop: torch.Tensor | None) -> torch.Tensor:
    if task_drop is None:
        return term
    return torch.where(task_drop.view(-1, *([1] * (term.ndim - 1))), 0.0, term)


class ImageSetAttnProcessor(nn.Module):
    """Image-set attention at one ``attn2`` site; ``attn`` (the diffusers ``Attention``) owns
    to_q/to_k/to_v/to_out, this module the null key/value and the task projection."""

    def __init__(self, site: int, inner_dim: int, query_dim: int, task_embed_dim: int | None):
        super().__init__()
        self.site = site
        self.null_key = nn.Parameter(torch.randn(inner_dim) * 0.02)
        self.null_value = nn.Parameter(torch.randn(inner_dim) * 0.02)
        self.task_proj = None
        if task_embed_dim is not None:
            self.task_proj = nn.Linear(task_embed_dim, query_dim, bias=False)
            nn.init.zeros_(self.task_proj.weight)

    def context_kv(self, attn: Attention, context: torch.Tensor,
                   task_input: torch.Tensor | None) -> SiteContext:
        """context ``(B, K, L, C_ctx)``, task_input ``(B, K, C_ctx)`` → this site's keys/values."""
        key_task = value_task = None
        if task_input is not None:
            key_task = F.linear(task_input, attn.to_k.weight)  # (B, K, inner)
            value_task = F.linear(task_input, attn.to_v.weight)  # (B, K, inner)
        return SiteContext(attn.to_k(context), attn.to_v(context), key_task, value_task)

    def attend(self, attn: Attention, hidden: torch.Tensor, site: SiteContext,
               call: ImageSetCall) -> torch.Tensor:
        """Target rows ``(B*M, Lq, C)`` → image-set attention output ``(B*M, Lq, C)``."""
        kept = call.context_kept
        if kept is None:
            out = self._attend(attn, hidden, site, call.target_task, call.task_drop, call)
            return attn.to_out[1](out)
        # A dropped sample attends to the null token alone, so its output is to_out(null value) at
        # every position whatever its query: no to_q, attention or to_out for its rows (a guidance
        # batch's unconditional copy costs one vector).
        hidden = hidden.unflatten(0, (call.batch_size, call.num_targets))  # (B, M, Lq, C)
        null_out = attn.to_out[0](self.null_value.to(hidden.dtype))  # (C,)
        out = null_out.expand(hidden.shape).clone()  # (B, M, Lq, C)
        hidden_kept = hidden[kept]  # (B', M, Lq, C); a view for a slice
        # With no row kept, training still runs the (empty) attention: it gives to_q/to_k/to_v and
        # the null key zero gradients instead of none, so DDP, which needs every parameter in
        # every step's graph, does not fail on a (micro-)batch whose every set drops its context.
        if hidden_kept.shape[0] or torch.is_grad_enabled():
            part = self._attend(attn, hidden_kept.flatten(0, 1), site.map(lambda t: t[kept]),
                                _take(call.target_task, kept), _take(call.task_drop, kept), call)
            out[kept] = part.unflatten(0, hidden_kept.shape[:2]).to(out.dtype)
        return attn.to_out[1](out.flatten(0, 1))

    def _attend(self, attn: Attention, hidden: torch.Tensor, site: SiteContext,
                target_task: torch.Tensor | None, task_drop: torch.Tensor | None,
                call: ImageSetCall) -> torch.Tensor:
        """Rows ``(B'*M, Lq, C)`` of samples that all see their context → ``to_out[0]`` of their
        attention ``(B'*M, Lq, C)``; site, target_task and task_drop cover the same B'."""
        query = attn.to_q(hidden).unflatten(0, (-1, call.num_targets))  # (B', M, Lq, inner)
        if target_task is not None:
            query_task = F.linear(self.task_proj(target_task), attn.to_q.weight)  # (B', M, inner)
            query = query + _unless_dropped(query_task, task_drop)[:, :, None]
        key, value = site.key, site.value  # (B', K, L, inner)
        if site.key_task is not None:
            key = key + _unless_dropped(site.key_task, task_drop)[:, :, None]
            value = value + _unless_dropped(site.value_task, task_drop)[:, :, None]
        out = image_set_attention(query, key, value, self.null_key, self.null_value, attn.heads,
                                  call.offset)  # (B', M, Lq, inner)
        return attn.to_out[0](out.flatten(0, 1))  # (B'*M, Lq, C)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 m2m: ImageSetCall | None = None) -> torch.Tensor:
        # `m2m` must be named here: Attention.forward passes only the kwargs __call__ declares.
        if m2m is None:
            raise RuntimeError(
                "image-set attention was called without cross_attention_kwargs={'m2m': "
                "ImageSetCall(...)}; call M2MUNet (forward / encode_context), not its inner UNet"
            )
        batch = m2m.batch_size
        if m2m.mode == "capture":
            context = hidden_states.unflatten(0, (batch, m2m.num_context))  # (B, K, L, C)
            task = None if m2m.context_task is None else self.task_proj(m2m.context_task)
            m2m.captured[self.site] = self.context_kv(attn, context, task)
            return torch.zeros_like(hidden_states)
        rows = batch * m2m.num_targets
        if hidden_states.shape[0] != rows + (batch * m2m.num_context if m2m.mode == "self" else 0):
            raise RuntimeError(f"image-set attention site {self.site} got {hidden_states.shape[0]} "
                               f"rows for mode {m2m.mode!r}, B={batch}, M={m2m.num_targets}, "
                               f"K={m2m.num_context}")
        if m2m.mode == "self":
            context = hidden_states[rows:].unflatten(0, (batch, m2m.num_context))  # (B, K, L, C)
            task = None if m2m.context_task is None else self.task_proj(m2m.context_task)
            site = self.context_kv(attn, context, task)
        elif m2m.mode == "dino":
            site = self.context_kv(attn, m2m.dino_features, m2m.dino_task)
        else:
            site = m2m.cache.sites[self.site]
        out = self.attend(attn, hidden_states[:rows], site, m2m)  # (B*M, Lq, C)
        if m2m.mode == "self":
            # Clean context rows: image-set attention skipped (adds zero to their residual).
            out = torch.cat([out, out.new_zeros((hidden_states.shape[0] - rows, *out.shape[1:]))])
        return out


class SelfAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor for ``attn1`` that accepts the ``m2m`` kwarg (and ignores it)."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 m2m: ImageSetCall | None = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _check_supported(name: str, attn: Attention) -> None:
    unsupported = {
        "norm_cross": attn.norm_cross is not None, "group_norm": attn.group_norm is not None,
        "spatial_norm": attn.spatial_norm is not None, "norm_q": attn.norm_q is not None,
        "residual_connection": attn.residual_connection,
        "rescale_output_factor": attn.rescale_output_factor != 1.0,
        "kv_heads": attn.inner_kv_dim != attn.inner_dim,
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise ValueError(f"{name} uses {found}, which image-set attention does not implement; "
                         "use a UNet config with plain SD-style cross-attention blocks")


def install_image_set_attention(unet: nn.Module, task_embed_dim: int | None) -> list[str]:
    """Replace every ``attn2`` processor by an ``ImageSetAttnProcessor`` (site = its index in the
    returned list of module names) with a zero-initialized ``to_out``; ``attn1`` gets
    ``SelfAttnProcessor``. Call before loading weights: the processors hold parameters."""
    processors, sites = {}, []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        attn = unet.get_submodule(name)
        if name.endswith(".attn2"):
            _check_supported(name, attn)
            processors[key] = ImageSetAttnProcessor(len(sites), attn.inner_dim, attn.query_dim,
                                                    task_embed_dim)
            nn.init.zeros_(attn.to_out[0].weight)
            if attn.to_out[0].bias is not None:
                nn.init.zeros_(attn.to_out[0].bias)
            sites.append(name)
        else:
            processors[key] = SelfAttnProcessor()
    unet.set_attn_processor(processors)
    return sites
