"""The auto-regressive sampler and M2MPipeline on the tiny preset (CPU, few DDIM steps)."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import randomize_new_projections

from m2m_ray.models import presets
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.sampling.config import SampleConfig
from m2m_ray.sampling.guidance import Branch, combine, guidance_branches
from m2m_ray.sampling.pipeline import M2MPipeline
from m2m_ray.sampling.sampler import ContextState, GuidedDenoiser, sample

TINY = ModelConfig(preset="tiny")
STEPS = 3
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pipeline(variant: str, tasks=()) -> M2MPipeline:
    config = M2MConfig(variant=variant, task_conditions=list(tasks))
    unet = randomize_new_projections(M2MUNet.from_preset(TINY, config), scale=0.3)
    dino = DinoEncoder.from_preset(TINY) if variant == "dino" else None
    return M2MPipeline(unet, presets.load_vae(TINY), presets.load_scheduler(TINY, "ddim"), dino)


@pytest.fixture(scope="module")
def pipes():
    return {"self": _pipeline("self"), "dino": _pipeline("dino"),
            "task": _pipeline("self", ["camera", "position"])}


def _photos(count: int, seed: int = 0) -> list[Image.Image]:
    """Images of assorted sizes and modes (the pipeline resizes and converts them)."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA", "P"]
    out = []
    for i in range(count):
        array = rng.integers(0, 256, (40 + 13 * i, 90 - 7 * i, 3), dtype=np.uint8)
        out.append(Image.fromarray(array).convert(modes[i % len(modes)]))
    return out


def _context(pipe: M2MPipeline, count: int, seed: int = 0) -> torch.Tensor:
    return pipe.preprocess(_photos(count, seed))[None]  # (1, K, 3, 64, 64)


def _sample(pipe, context, num_images=2, seed=0, **kwargs):
    gens = [torch.Generator().manual_seed(seed + b) for b in range(context.shape[0])]
    tasks = {key: kwargs.pop(key) for key in ("context_task", "target_task") if key in kwargs}
    spec = SampleConfig(**{"num_images": num_images, "num_inference_steps": STEPS,
                           "context_window": 8, **kwargs})
    return sample(pipe.unet, pipe.scheduler, pipe.codec, context, gens, spec, **tasks)


def test_guidance_weights_and_branch_pruning():
    eq6 = guidance_branches(2.5)
    assert [(b.context_drop, b.weight) for b in eq6] == [(True, -1.5), (False, 2.5)]
    assert guidance_branches(1.0) == [Branch(False, True, 1.0)]  # conditional alone, one row
    eq7 = guidance_branches(2.0, 5.0)
    assert [(b.context_drop, b.task_drop, b.weight) for b in eq7] == [
        (True, True, -1.0), (False, True, -3.0), (False, False, 5.0)]
    assert len(guidance_branches(3.0, 3.0)) == 2  # s_I = s_T: ε(c_I, ∅) has weight 0
    eps = torch.randn(6, 4)
    torch.testing.assert_close(combine(eps, eq6), -1.5 * eps[:3] + 2.5 * eps[3:])
    with pytest.raises(ValueError, match="predictions for 2 guidance branches"):
        combine(torch.randn(5, 4), eq6)


def test_outputs_count_size_mode_and_seeds(pipes):
    pipe = pipes["self"]
    photos = _photos(3)
    first = pipe(photos, num_images=3, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(7))
    again = pipe(photos, num_images=3, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(7))
    other = pipe(photos, num_images=3, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(8))
    assert len(first) == 3
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in first)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    # Batched over sets of different sizes: each set as if alone (its own generator).
    sets = [photos, _photos(2, seed=1), []]
    batched = pipe.generate(sets, SampleConfig(num_images=2, num_inference_steps=STEPS),
                            [torch.Generator().manual_seed(s) for s in (7, 3, 4)],
                            output_type="pt")
    assert batched.shape == (3, 2, 3, 64, 64)
    alone = pipe(sets[1], num_images=2, num_inference_steps=STEPS, output_type="pt",
                 generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(batched[1], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_context_window_is_respected(pipes, use_cache):
    """W = 2 after K = 3 images: image 0 is never seen (changing it changes nothing, exactly),
    image 2 is (changing it changes the output, so the check can fail)."""
    pipe = pipes["self"]
    context = _context(pipe, 3)
    base = _sample(pipe, context, context_window=2, use_cache=use_cache).latents
    old = context.clone()
    old[:, 0] = torch.rand_like(old[:, 0])
    torch.testing.assert_close(_sample(pipe, old, context_window=2, use_cache=use_cache).latents,
                               base, atol=0, rtol=0)
    seen = context.clone()
    seen[:, 2] = torch.rand_like(seen[:, 2])
    changed = _sample(pipe, seen, context_window=2, use_cache=use_cache).latents
    assert (changed - base).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-3  # every image moved


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_cache_on_and_off_give_the_same_images(pipes, variant):
    pipe = pipes[variant]
    context = torch.cat([_context(pipe, 3, seed=0), _context(pipe, 3, seed=1)])  # (2, 3, ...)
    cached = _sample(pipe, context, num_images=3, context_window=3, use_cache=True)
    uncached = _sample(pipe, context, num_images=3, context_window=3, use_cache=False)
    torch.testing.assert_close(cached.latents, uncached.latents, atol=1e-4, rtol=1e-4)
    assert cached.latents.shape == (2, 3, 4, 8, 8)
    assert (cached.pixels is not None) == (variant == "dino")


def test_each_context_image_is_encoded_once(pipes, monkeypatch):
    pipe = pipes["self"]
    encoded, calls = [], []
    encode, forward = pipe.unet.encode_context, pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "encode_context",
                        lambda context, task=None: encoded.append(context.shape[1])
                        or encode(context, task=task))
    monkeypatch.setattr(pipe.unet, "forward",
                        lambda *a, **kw: calls.append(sorted(kw)) or forward(*a, **kw))
    _sample(pipe, _context(pipe, 3), num_images=3, context_window=8, guidance_scale=2.0)
    assert encoded == [3, 1, 1]  # the K given images once, then each generated image once
    assert len(calls) == 3 * STEPS  # one UNet forward per step: both branches batched
    assert all("cache" in kw and "context" not in kw for kw in calls)


def _denoiser_inputs(pipe, tasks: bool):
    gen = torch.Generator().manual_seed(5)
    context = pipe.codec.encode(_context(pipe, 2))  # (1, 2, 4, 8, 8)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor(500)
    context_task = target_task = None
    if tasks:
        context_task = TaskConditions(camera=torch.randn(1, 2, 4, 4, generator=gen),
                                      position=torch.tensor([[0, 1]]))
        target_task = TaskConditions(camera=torch.randn(1, 1, 4, 4, generator=gen),
                                     position=torch.tensor([[2]]))
    return context, latents, t, context_task, target_task


def _direct(pipe, context, latents, t, context_task=None, target_task=None, drop_context=False,
            drop_task=False):
    """One branch by a plain uncached forward, no guidance machinery."""
    return pipe.unet(latents[:, None], t.reshape(1, 1), context, offset=context.shape[1],
                     context_task=context_task, target_task=target_task,
                     context_drop=torch.tensor([drop_context]),
                     task_drop=None if target_task is None else torch.tensor([drop_task]))[:, 0]


def test_image_scale_one_is_the_conditional_prediction_alone(pipes):
    pipe = pipes["self"]
    context, latents, t, _, _ = _denoiser_inputs(pipe, tasks=False)
    state = ContextState(pipe.unet, window=8)
    state.add(context)
    guided = GuidedDenoiser(pipe.unet, state, guidance_branches(1.0), 1)(latents, t)
    torch.testing.assert_close(guided, _direct(pipe, context, latents, t), atol=1e-5, rtol=0)
    unguided = GuidedDenoiser(pipe.unet, state, guidance_branches(3.0), 1)(latents, t)
    assert (unguided - guided).abs().max() > 1e-3  # the check can fail


@pytest.mark.parametrize("use_cache", [True, False])
def test_two_scale_guidance_matches_eq7(pipes, use_cache):
    pipe, s_image, s_task = pipes["task"], 2.0, 4.5
    context, latents, t, context_task, target_task = _denoiser_inputs(pipe, tasks=True)
    state = ContextState(pipe.unet, window=8, use_cache=use_cache)
    state.add(context, context_task)
    guided = GuidedDenoiser(pipe.unet, state, guidance_branches(s_image, s_task), 1,
                            target_task)(latents, t)
    args = (pipe, context, latents, t, context_task, target_task)
    eps_none = _direct(*args, drop_context=True, drop_task=True)  # ε(z, ∅, ∅)
    eps_image = _direct(*args, drop_task=True)  # ε(z, c_I, ∅)
    eps_both = _direct(*args)  # ε(z, c_I, c_T)
    want = eps_none + s_image * (eps_image - eps_none) + s_task * (eps_both - eps_image)
    torch.testing.assert_close(guided, want, atol=1e-4, rtol=1e-4)
    assert (eps_both - eps_image).abs().max() > 1e-3 and (eps_image - eps_none).abs().max() > 1e-3


def test_task_conditions_through_the_pipeline(pipes):
    pipe = pipes["task"]
    context_task = TaskConditions(camera=torch.eye(4).expand(1, 2, 4, 4),
                                  position=torch.tensor([[0, 1]]))
    target_task = TaskConditions(camera=torch.eye(4).expand(1, 2, 4, 4),
                                 position=torch.tensor([[2, 3]]))
    images = pipe(_photos(2), num_images=2, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(0), context_task=context_task,
                  target_task=target_task)
    assert len(images) == 2
    with pytest.raises(ValueError, match=r"expected \[B, K\] = \[1, 2\]"):
        pipe(_photos(2), num_images=2, num_inference_steps=STEPS, target_task=target_task)


def test_save_and_load_pretrained_round_trip(pipes, tmp_path):
    pipe = pipes["dino"]
    pipe.save_pretrained(tmp_path / "model")
    loaded = M2MPipeline.from_pretrained(tmp_path / "model")
    assert loaded.variant == "dino" and loaded.preset == "tiny"
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    kwargs = dict(num_images=2, num_inference_steps=STEPS, output_type="pt")
    torch.testing.assert_close(loaded(_photos(2), generator=torch.Generator().manual_seed(0),
                                      **kwargs),
                               pipe(_photos(2), generator=torch.Generator().manual_seed(0),
                                    **kwargs), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="not an M2M pipeline folder"):
        M2MPipeline.from_pretrained(tmp_path / "model" / "unet")


def test_non_finite_sets_are_never_returned_as_images(pipes, monkeypatch):
    """Issue 17.4 in the sampling path: a set whose UNet output is NaN is named (raise) or left
    out (skip) — never black images — and the other sets of the batch are unaffected."""
    from m2m_ray.sampling.sampler import NonFiniteOutputError

    pipe = pipes["self"]
    sets = [_photos(2, seed) for seed in range(3)]
    spec = SampleConfig(num_images=2, num_inference_steps=STEPS)
    clean = pipe.generate(sets, spec, [torch.Generator().manual_seed(s) for s in range(3)])
    forward = pipe.unet.forward

    def poisoned(*args, **kwargs):
        eps = forward(*args, **kwargs)  # (branches*B, 1, 4, h, w), branch-major
        eps.unflatten(0, (-1, 3))[:, 1] = float("nan")
        return eps

    monkeypatch.setattr(pipe.unet, "forward", poisoned)
    with pytest.raises(NonFiniteOutputError, match=r"sets \[1\] of 3 .*NaN/Inf.*float32") as err:
        pipe.generate(sets, spec, [torch.Generator().manual_seed(s) for s in range(3)])
    assert err.value.sets == [1]
    skipped = pipe.generate(sets, spec, [torch.Generator().manual_seed(s) for s in range(3)],
                            on_non_finite="skip")
    assert skipped[1] is None
    for i in (0, 2):
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(skipped[i], clean[i]))
