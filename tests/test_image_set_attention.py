import logging

import pytest
import torch
from tiny_models import randomize_new_projections

from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.image_set_attention import (
    ImageSetAttnProcessor,
    SelfAttnProcessor,
    image_set_attention,
    kept_rows,
    visible_context,
)
from m2m_ray.models.m2m_unet import M2MUNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference(query, key, value, null_key, null_value, heads, offset):
    """Per target, plain softmax attention over the null token and the visible context (float64)."""
    batch, num_targets, _, inner = query.shape
    num_context = key.shape[1]
    d = inner // heads
    visible = visible_context(num_targets, num_context, offset)
    out = torch.empty(query.shape, dtype=torch.float64)
    for b in range(batch):
        for j in range(num_targets):
            seen = [i for i in range(num_context) if visible[j, i]]
            keys = torch.cat([null_key[None], *[key[b, i] for i in seen]]).double()
            values = torch.cat([null_value[None], *[value[b, i] for i in seen]]).double()
            q = query[b, j].double()
            for h in range(heads):
                part = slice(h * d, (h + 1) * d)
                weights = torch.softmax(q[:, part] @ keys[:, part].T / d**0.5, -1)
                out[b, j, :, part] = weights @ values[:, part]
    return out


@pytest.mark.parametrize("num_targets,num_context,offset", [(3, 3, 0), (3, 2, 0), (1, 3, 3),
                                                            (3, 3, 1), (2, 0, 0)])
def test_core_equals_per_target_softmax(num_targets, num_context, offset):
    gen = torch.Generator().manual_seed(0)
    batch, query_len, key_len, inner, heads = 3, 5, 4, 8, 2
    query = torch.randn(batch, num_targets, query_len, inner, generator=gen)
    key = torch.randn(batch, num_context, key_len, inner, generator=gen)
    value = torch.randn(batch, num_context, key_len, inner, generator=gen)
    null_key, null_value = torch.randn(inner, generator=gen), torch.randn(inner, generator=gen)
    got = image_set_attention(query, key, value, null_key, null_value, heads, offset)
    want = _reference(query, key, value, null_key, null_value, heads, offset)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # An empty context gives exactly the null value, what a dropped sample gets without attending.
    empty = image_set_attention(query, key[:, :0], value[:, :0], null_key, null_value, heads, 0)
    assert torch.equal(empty, null_value.expand_as(empty))


def test_kept_rows_forms():
    cpu = torch.device("cpu")
    assert kept_rows(None, cpu) is None
    assert kept_rows(torch.tensor([False, False]), cpu) is None
    # guidance batches: the unconditional copy first, the kept rows one run → a slice (no copies)
    assert kept_rows(torch.tensor([True, True, False, False, False]), cpu) == slice(2, 5)
    assert kept_rows(torch.tensor([True, True]), cpu) == slice(0, 0)
    # training's random drops → indices
    assert kept_rows(torch.tensor([False, True, False]), cpu).tolist() == [0, 2]


@pytest.mark.parametrize("drop", [[True, False, True, False], [True, True, False, False],
                                  [True, True, True, True]])
def test_dropped_samples_equal_an_empty_context_and_kept_ones_are_untouched(drop):
    """The processor's dropped-row shortcut (to_out of the null value, no attention) against the
    full computation of each sample alone: dropped = empty context, kept = not dropped at all."""
    model = randomize_new_projections(
        M2MUNet.from_preset(ModelConfig(preset="tiny"), M2MConfig(variant="self")), scale=0.3)
    gen = torch.Generator().manual_seed(3)
    targets, context = torch.randn(4, 2, 4, 8, 8, generator=gen), torch.randn(4, 3, 4, 8, 8,
                                                                              generator=gen)
    timesteps = torch.randint(0, 1000, (4, 2), generator=gen)
    with torch.no_grad():
        got = model(targets, timesteps, context, context_drop=torch.tensor(drop))
        for b, dropped in enumerate(drop):
            alone = model(targets[b:b + 1], timesteps[b:b + 1],
                          context[b:b + 1, :0] if dropped else context[b:b + 1])
            torch.testing.assert_close(got[b:b + 1], alone, atol=1e-5, rtol=1e-5)


def test_visibility_rule():
    assert visible_context(3, 3, 0).tolist() == [[False, False, False], [True, False, False],
                                                 [True, True, False]]
    assert visible_context(1, 4, 4).tolist() == [[True, True, True, True]]


def test_processors_installed_and_kwargs_reach_them():
    model = M2MUNet.from_preset(ModelConfig(preset="tiny"), M2MConfig(variant="self"))
    attn2 = [model.unet.get_submodule(n) for n in model.site_names]
    assert len(attn2) == 7 and all(isinstance(a.processor, ImageSetAttnProcessor) for a in attn2)
    assert [a.processor.site for a in attn2] == list(range(7))
    assert all(not a.to_out[0].weight.any() and not a.to_out[0].bias.any() for a in attn2)
    attn1 = [p for k, p in model.unet.attn_processors.items() if ".attn1." in k]
    assert len(attn1) == 7 and all(isinstance(p, SelfAttnProcessor) for p in attn1)
    # Processor parameters are registered children, so they are saved and trained.
    assert sum(".processor.null_key" in n for n, _ in model.named_parameters()) == 7

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        model(torch.randn(1, 2, 4, 8, 8), torch.zeros(1, 2), torch.randn(1, 2, 4, 8, 8))
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "not expected" in r.getMessage()]

    with pytest.raises(RuntimeError, match="cross_attention_kwargs"):
        model.unet(torch.randn(1, 4, 8, 8), 0, encoder_hidden_states=None)


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_every_parameter_gets_a_gradient_when_every_context_drops(variant):
    """DDP (without find_unused_parameters) needs every parameter in every step's graph: a
    (micro-)batch whose every set drops its context — 10% of micro-batches of one set — must still
    give to_q/to_k/to_v, the null key and the task projection a (zero) gradient. Found when
    gradient accumulation first ran on 2 workers."""
    from m2m_ray.models.context import DinoEncoder
    from m2m_ray.models.embedders import TaskConditions

    tiny = ModelConfig(preset="tiny")
    model = M2MUNet.from_preset(tiny, M2MConfig(variant=variant, task_conditions=["position"]))
    latents = torch.randn(2, 3, 4, 8, 8)
    context = latents[:, :-1] if variant == "self" else DinoEncoder.from_preset(
        tiny, torch.device("cpu"))(torch.rand(2, 2, 3, 64, 64))
    task = TaskConditions(position=torch.arange(3).float().expand(2, -1))
    everything = torch.tensor([True, True])
    out = model(latents, torch.tensor([[1, 2, 3]] * 2), context, offset=0, target_task=task,
                context_task=task.select(slice(0, 2)), context_drop=everything,
                task_drop=everything)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    with torch.no_grad():  # sampling still skips the attention of dropped rows
        model(latents, torch.tensor([[1, 2, 3]] * 2), context, offset=0,
              context_drop=everything)
