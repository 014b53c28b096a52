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
    tasks = {key: kwargs.pop(key) for key in ("context_task", "target_task", "callback")
             if key in kwargs}
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


# --- the sampling contract: seed, dtype, scheduler; callbacks -----------------------------------


def _same_images(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(a, b))


def test_seed_decides_the_noise_through_set_ids(pipes):
    """A user's seed is never dropped: ``pipe(images, seed=3)`` is reproducible, is the set
    ``"input"`` of ``generate`` (the generate job's id for ``inputs.images``), and a generator
    together with an explicit seed is refused."""
    from m2m_ray.sampling.pipeline import DEFAULT_SET_ID
    from m2m_ray.sampling.sampler import set_generators, set_seed

    pipe, photos = pipes["self"], _photos(2)
    kwargs = dict(num_images=2, num_inference_steps=STEPS)
    first = pipe(photos, seed=3, **kwargs)
    assert _same_images(first, pipe(photos, seed=3, **kwargs))
    assert not _same_images(first, pipe(photos, seed=4, **kwargs))
    spec = SampleConfig(seed=3, **kwargs)
    assert DEFAULT_SET_ID == "input"
    assert _same_images(first, pipe.generate([photos], spec, set_ids=["input"])[0])
    assert _same_images(first, pipe(photos, generator=torch.Generator().manual_seed(
        set_seed("input", 3)), **kwargs))
    # generate's default ids are the positions; a set's images do not depend on its batch
    both = pipe.generate([_photos(1, 5), photos], spec)
    assert _same_images(both[1], pipe.generate([photos], spec, set_ids=["1"])[0])
    assert _same_images(both[1], pipe.generate([photos], SampleConfig(**kwargs),
                                               set_generators(["1"], 3))[0])
    with pytest.raises(ValueError, match=r"SampleConfig\.seed=3 and generator"):
        pipe(photos, seed=3, generator=torch.Generator(), **kwargs)
    dumped = SampleConfig(**SampleConfig(**kwargs).model_dump())  # every field set, seed 0
    assert _same_images(pipe.generate([photos], dumped, [torch.Generator().manual_seed(1)])[0],
                        pipe(photos, generator=torch.Generator().manual_seed(1), **kwargs))
    with pytest.raises(ValueError, match="set_ids and generator"):
        pipe.generate([photos], SampleConfig(**kwargs), [torch.Generator()], set_ids=["a"])
    with pytest.raises(ValueError, match="1 set ids for 2 sets"):
        pipe.generate([photos, photos], spec, set_ids=["a"])


def test_dtype_is_the_weights_or_refused_by_name():
    """The CPU samples in float32 whatever ``dtype`` says (``runtime.torch_dtype``); weights in
    another dtype than the spec's are refused naming ``dtype``, never cast or ignored."""
    pipe = M2MPipeline.from_preset(TINY, M2MConfig(variant="self"))
    kwargs = dict(num_images=1, num_inference_steps=1, output_type="pt")
    torch.testing.assert_close(pipe([], dtype="float16", **kwargs),
                               pipe([], dtype="float32", **kwargs), atol=0, rtol=0)
    half = M2MPipeline.from_preset(TINY, M2MConfig(variant="self"), dtype=torch.bfloat16)
    # on the CPU no dtype setting can run them: the way out is loading in float32
    with pytest.raises(ValueError, match=r"weights are bfloat16 on cpu, where sampling runs in "
                       r"float32 whatever SampleConfig\.dtype says: load it in float32"):
        half([], **kwargs)


def test_the_saved_scheduler_is_used_unless_the_spec_names_another(tmp_path):
    import diffusers

    from m2m_ray.sampling.sampler import sample

    M2MPipeline.from_preset(TINY, M2MConfig(variant="self"), scheduler="euler").save_pretrained(
        tmp_path / "model")
    pipe = M2MPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
    assert SampleConfig().scheduler is None
    kwargs = dict(num_images=1, num_inference_steps=STEPS, output_type="pt")
    own = pipe(_photos(1), **kwargs)
    ddim = pipe(_photos(1), scheduler="ddim", **kwargs)
    assert not torch.equal(own, ddim)
    torch.testing.assert_close(pipe(_photos(1), scheduler="euler", **kwargs), own, atol=0, rtol=0)
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)  # never swapped
    torch.testing.assert_close(pipe(_photos(1), **kwargs), own, atol=0, rtol=0)
    # the sampler refuses a scheduler object of another kind than the spec names
    with pytest.raises(ValueError, match=r"SampleConfig\.scheduler is 'ddim' .* EulerDiscrete"):
        sample(pipe.unet, pipe.scheduler, pipe.codec, _context(pipe, 1), [torch.Generator()],
               SampleConfig(num_images=1, num_inference_steps=1, scheduler="ddim"))


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_the_callback_sees_every_step_and_image_in_order(pipes, variant):
    from m2m_ray.sampling.callbacks import ImageEvent, StepEvent

    pipe, events = pipes[variant], []
    out = _sample(pipe, _context(pipe, 2).expand(2, -1, -1, -1, -1), num_images=3,
                  callback=events.append)
    steps = [(e.image, e.step) for e in events if isinstance(e, StepEvent)]
    assert steps == [(k, s) for k in range(3) for s in range(STEPS)]  # M × steps, in order
    assert [(type(e).__name__, e.image) for e in events if not isinstance(e, StepEvent)] == [
        ("ImageEvent", 0), ("ImageEvent", 1), ("ImageEvent", 2)]
    kinds = ["step" if isinstance(e, StepEvent) else "image" for e in events]
    assert kinds == (["step"] * STEPS + ["image"]) * 3  # an image comes after its steps
    assert all(e.num_images == 3 and e.sets == (0, 1) and e.set_ids is None for e in events)
    assert all(e.num_steps == STEPS for e in events if isinstance(e, StepEvent))
    images = [e for e in events if isinstance(e, ImageEvent)]
    for k, event in enumerate(images):
        assert torch.equal(event.latents, out.latents[:, k])
        assert (event.pixels is None) == (variant == "self")  # the sampler decodes for dino only
    assert not out.stopped


def _stop_at(image: int, step: int | None = None):
    """A callback that stops at image ``image``'s ImageEvent (or at its step ``step``)."""
    from m2m_ray.sampling.callbacks import STOP, ImageEvent, StepEvent

    def callback(event):
        if event.image != image:
            return None
        if step is None and isinstance(event, ImageEvent):
            return STOP
        if step is not None and isinstance(event, StepEvent) and event.step == step:
            return STOP
        return None
    return callback


@pytest.mark.parametrize("variant", ["self", "dino"])
def test_a_stop_returns_the_images_finished_so_far(pipes, variant):
    """STOP after image 2 of 4 returns exactly the first 2, bit-equal to a run that did not stop;
    STOP during image 3's steps drops that image."""
    pipe, photos = pipes[variant], _photos(2)
    kwargs = dict(num_images=4, num_inference_steps=STEPS, seed=1)
    full = pipe(photos, **kwargs)
    assert len(full) == 4
    assert _same_images(pipe(photos, callback=_stop_at(1), **kwargs), full[:2])
    assert _same_images(pipe(photos, callback=_stop_at(2, step=1), **kwargs), full[:2])
    assert pipe(photos, callback=_stop_at(0, step=0), **kwargs) == []
    context = _context(pipe, 2)
    whole = _sample(pipe, context, num_images=4)
    part = _sample(pipe, context, num_images=4, callback=_stop_at(1))
    assert part.stopped and part.latents.shape[1] == 2 and part.finite.tolist() == [True]
    assert torch.equal(part.latents, whole.latents[:, :2])
    with pytest.raises(TypeError, match="return None to go on or .*STOP"):
        _sample(pipe, context, num_images=1, callback=lambda event: True)


def test_pipeline_events_name_the_sets_and_carry_their_images(pipes):
    """``generate``'s events say which sets (positions and ids) a batch holds; an ImageEvent's
    images are the ones returned; a stop leaves later batches without images."""
    from m2m_ray.sampling.callbacks import STOP, ImageEvent

    pipe = pipes["self"]
    sets = [_photos(2), _photos(1, 1), _photos(2, 2)]  # two batches: K = 2 (sets 0, 2), K = 1
    spec = SampleConfig(num_images=2, num_inference_steps=STEPS, vae_batch_size=1)
    shown: dict[tuple[str, int], Image.Image] = {}
    seen = []

    def collect(event):
        seen.append((event.sets, event.set_ids))
        if isinstance(event, ImageEvent):
            assert event.pixels.shape == (len(event.sets), 3, 64, 64)
            shown.update({(set_id, event.image): image
                          for set_id, image in zip(event.set_ids, event.images)})

    out = pipe.generate(sets, spec, set_ids=["a", "b", "c"], callback=collect)
    assert set(seen) == {((0, 2), ("a", "c")), ((1,), ("b",))}
    for i, set_id in enumerate("abc"):
        assert _same_images([shown[(set_id, k)] for k in range(2)], out[i])

    def stop_first_batch(event):
        return STOP if isinstance(event, ImageEvent) and event.image == 0 else None

    stopped = pipe.generate(sets, spec, set_ids=["a", "b", "c"], callback=stop_first_batch)
    assert [len(images) for images in stopped] == [1, 0, 1]
    assert _same_images(stopped[0], out[0][:1]) and _same_images(stopped[2], out[2][:1])
    with pytest.raises(ValueError, match="a callback with output_type='pt' and sets of "
                       "different sizes"):
        pipe.generate(sets, spec, callback=collect, output_type="pt")
