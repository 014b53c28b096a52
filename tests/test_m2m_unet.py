import json

import pytest
import torch
from tiny_models import randomize_new_projections

from m2m_ray.models import presets
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.image_set_attention import visible_context
from m2m_ray.models.m2m_unet import M2MUNet

TINY = ModelConfig(preset="tiny")
B, N, LATENT = 2, 3, (4, 8, 8)
DINO_TOKENS, DINO_WIDTH = 65, 32
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained(config: M2MConfig) -> M2MUNet:
    return randomize_new_projections(M2MUNet.from_preset(TINY, config), scale=0.2)


@pytest.fixture(scope="module")
def models():
    tasks = ["camera", "position"]
    return {variant: _trained(M2MConfig(variant=variant, task_conditions=tasks))
            for variant in ("self", "dino")}


def _inputs(variant, num_targets=N, num_context=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randn(B, num_targets, *LATENT, generator=gen)
    timesteps = torch.randint(0, 1000, (B, num_targets), generator=gen)
    shape = (B, num_context, *LATENT) if variant == "self" else (B, num_context, DINO_TOKENS,
                                                                 DINO_WIDTH)
    return targets, timesteps, torch.randn(shape, generator=gen)


def _task(num_images, start=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return TaskConditions(camera=torch.randn(B, num_images, 4, 4, generator=gen),
                          position=torch.arange(start, start + num_images).expand(B, -1))


def _skip_attn2(unet):
    for module in unet.modules():
        if hasattr(module, "attn2"):
            module.attn2 = None
    return unet


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_at_init_equals_base_unet_without_attn2(variant):
    model = M2MUNet.from_preset(TINY, M2MConfig(variant=variant))
    base = _skip_attn2(presets.load_unet(TINY))
    targets, timesteps, context = _inputs(variant)
    with torch.no_grad():
        got = model(targets, timesteps, context)
        want = base(targets.flatten(0, 1), timesteps.flatten(), encoder_hidden_states=None).sample
    # Zero-initialized to_out: attn2 adds exactly 0; what is left is float32 noise of a different
    # batch (self runs targets and clean context through the UNet together).
    torch.testing.assert_close(got, want.unflatten(0, (B, N)), atol=1e-5, rtol=0)

    report = model.init_report
    total = dict((n, p.numel()) for n, p in model.state_dict().items())
    assert set(report.from_base) | set(report.new) == set(total)
    assert all(".attn2." in n for n in report.base_unused) and len(report.base_unused) == 35
    assert all(".attn2." in n for n in report.new) and len(report.new) == 7 * 7
    assert sum(report.from_base.values()) + sum(report.base_unused.values()) == sum(
        p.numel() for p in presets.load_unet(TINY).parameters())
    assert "new: 49 tensors" in report.summary()


@pytest.mark.parametrize("variant", ["self", "dino"])
@pytest.mark.parametrize("num_targets,num_context,offset", [(N, N, 0), (1, N, N), (2, N, 1)])
def test_causality(models, variant, num_targets, num_context, offset):
    """Perturbing context image j (its pixels or its task condition) changes exactly the targets
    that may see it."""
    model = models[variant]
    targets, timesteps, context = _inputs(variant, num_targets, num_context)
    target_task, context_task = _task(num_targets, offset, seed=1), _task(num_context, seed=2)
    visible = visible_context(num_targets, num_context, offset)
    with torch.no_grad():
        base = model(targets, timesteps, context, offset=offset, target_task=target_task,
                     context_task=context_task)
        for j in range(num_context):
            perturbed = context.clone()
            perturbed[:, j] += torch.randn(perturbed[:, j].shape)
            camera = context_task.camera.clone()
            camera[:, j] += 1.0
            for ctx, task in ((perturbed, context_task), (context, TaskConditions(
                    camera=camera, position=context_task.position))):
                out = model(targets, timesteps, ctx, offset=offset, target_task=target_task,
                            context_task=task)
                change = (out - base).abs().amax(dim=(0, 2, 3, 4))  # per target
                for i in range(num_targets):
                    if visible[i, j]:
                        assert change[i] > 1e-4, (i, j)
                    else:
                        assert change[i] <= 1e-6, (i, j, change[i].item())


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_empty_context_equals_dropped_context(models, variant):
    model = models[variant]
    targets, timesteps, context = _inputs(variant, num_targets=1)
    task = _task(1)
    with torch.no_grad():
        empty = model(targets, timesteps, None, target_task=task)  # the first image of a set
        dropped = model(targets, timesteps, context, offset=N, target_task=task,
                        context_task=_task(N), context_drop=torch.tensor([True, True]))
        mixed = model(targets, timesteps, context, offset=N, target_task=task,
                      context_task=_task(N), context_drop=torch.tensor([True, False]))
        cached = model(targets, timesteps, cache=model.encode_context(context[:, :0]),
                       target_task=task)
    assert torch.isfinite(empty).all()
    # (self: a different UNet batch, so float32 noise of batch composition, ≲ 1e-6)
    torch.testing.assert_close(dropped, empty, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[0], empty[0], atol=1e-5, rtol=0)
    assert (mixed[1] - empty[1]).abs().max() > 1e-4
    torch.testing.assert_close(cached, empty, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_cached_equals_uncached(models, variant):
    model = models[variant]
    targets, timesteps, context = _inputs(variant, num_targets=1)
    context_task, target_task = _task(N, seed=3), _task(1, start=N, seed=4)
    with torch.no_grad():
        # Built the way the sampler builds it: image by image, each joining the context.
        cache = model.encode_context(context[:, :1], context_task.select(slice(0, 1)))
        for k in range(1, N):
            cache = cache.append(model.encode_context(context[:, k:k + 1],
                                                      context_task.select(slice(k, k + 1))))
        assert cache.num_images == N and cache.batch_size == B
        got = model(targets, timesteps, cache=cache, offset=N, target_task=target_task)
        want = model(targets, timesteps, context, offset=N, target_task=target_task,
                     context_task=context_task)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

        window = cache.window(2)
        got = model(targets, timesteps, cache=window, offset=2, target_task=target_task)
        want = model(targets, timesteps, context[:, 1:], offset=2, target_task=target_task,
                     context_task=context_task.select(slice(1, N)))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

        # Eq. 7's three guidance branches (uncond, image, image+task) in one batched forward.
        context_drop = torch.tensor([True, True, False, False, False, False])
        task_drop = torch.tensor([True, True, True, True, False, False])
        got = model(targets.repeat(3, 1, 1, 1, 1), timesteps.repeat(3, 1), cache=cache.repeat(3),
                    offset=N, target_task=target_task.repeat(3), context_drop=context_drop,
                    task_drop=task_drop)
        uncond = model(targets, timesteps, None, target_task=None)
        image = model(targets, timesteps, context, offset=N)
        torch.testing.assert_close(got[:B], uncond, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[B:2 * B], image, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[2 * B:], want_full := model(
            targets, timesteps, context, offset=N, target_task=target_task,
            context_task=context_task), atol=1e-5, rtol=0)
    assert (want_full - image).abs().max() > 1e-4, "task conditions must change the output"


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_save_load_round_trip_is_exact(models, variant, tmp_path):
    model = models[variant]
    model.save_pretrained(tmp_path / "m2m")
    config = json.loads((tmp_path / "m2m" / "config.json").read_text())
    assert config["m2m"]["variant"] == variant and config["model"]["preset"] == "tiny"
    assert config["unet"]["block_out_channels"] == [32, 64, 64]
    loaded = M2MUNet.from_pretrained(tmp_path / "m2m")
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    targets, timesteps, context = _inputs(variant)
    with torch.no_grad():
        assert torch.equal(model(targets, timesteps, context, target_task=_task(N),
                                 context_task=_task(N)),
                           loaded(targets, timesteps, context, target_task=_task(N),
                                  context_task=_task(N)))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        M2MUNet.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="can gain conditions, not lose them"):
        M2MUNet.from_pretrained(tmp_path / "m2m", task_conditions=["camera"])


def test_fine_tuning_start_adds_task_embedders_that_change_nothing_yet(tmp_path):
    pretrained = _trained(M2MConfig(variant="self"))
    pretrained.save_pretrained(tmp_path / "pre")
    tuned = M2MUNet.from_pretrained(tmp_path / "pre", task_conditions=["camera", "position"])
    assert tuned.config.task_conditions == ["camera", "position"]
    targets, timesteps, context = _inputs("self")
    with torch.no_grad():
        before = pretrained(targets, timesteps, context)
        after = tuned(targets, timesteps, context, target_task=_task(N), context_task=_task(N))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_gradient_checkpointing_and_bf16_autocast():
    model = _trained(M2MConfig(variant="self")).train()
    targets, timesteps, context = _inputs("self")
    drop = torch.tensor([False, True])

    def grads():
        model.zero_grad()
        clean = context.clone().requires_grad_(True)
        model(targets, timesteps, clean, context_drop=drop).square().mean().backward()
        named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {**named, "context": clean.grad}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    # Gradients flow through the clean context pass, and only where the context is not dropped.
    assert all(plain["context"][0, j].any() for j in range(N - 1))  # image N-1: no target sees it
    assert not plain["context"][0, N - 1].any() and not plain["context"][1].any()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(targets, timesteps, context, context_drop=drop)
        cache = model.encode_context(context)
        cached = model(targets[:, :1], timesteps[:, :1], cache=cache, offset=N)
    assert torch.isfinite(low).all() and torch.isfinite(cached).all()
    with torch.no_grad():
        full = model(targets, timesteps, context, context_drop=drop)
    assert (low.float() - full).abs().max() < 0.1 * full.abs().max()


def test_bad_arguments_say_what_to_do(models):
    model = models["self"]
    targets, timesteps, context = _inputs("self")
    with pytest.raises(ValueError, match="0 <= offset <= K"):
        model(targets, timesteps, context, offset=N + 1)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model(targets, timesteps, context, context_drop=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="expected clean latents"):
        model(targets, timesteps, context[..., :4])
    with pytest.raises(ValueError, match="one condition per image"):
        model(targets, timesteps, context, target_task=_task(N - 1))
    plain = M2MUNet.from_preset(TINY, M2MConfig(variant="self"))
    with pytest.raises(ValueError, match="no task conditions"):
        plain(targets, timesteps, context, target_task=_task(N))
    with pytest.raises(ValueError, match="not both"):
        model(targets, timesteps, context, cache=model.encode_context(context))


def test_dino_encoder_feeds_the_dino_variant(models):
    encoder = DinoEncoder.from_preset(TINY)
    images = torch.rand(B, N, 3, 48, 48)  # resized to the preset's dino_resolution (64)
    features = encoder(images)
    assert features.shape == (B, N, DINO_TOKENS, DINO_WIDTH) == (B, N, encoder.num_tokens,
                                                                 encoder.hidden_size)
    assert encoder(images[:, :0]).shape == (B, 0, DINO_TOKENS, DINO_WIDTH)
    targets, timesteps, _ = _inputs("dino")
    with torch.no_grad():
        eps = models["dino"](targets, timesteps, features)
    assert eps.shape == targets.shape and torch.isfinite(eps).all()
