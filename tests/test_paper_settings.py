"""The paper's training settings (Appendix A, §7.1.1) as the code carries them, without Ray:
gradient accumulation gives the large batch's update, the run length in epochs over a seeded
subset of MIS, and the paper configs say what the paper says. The Ray run with accumulation and
epochs is in test_train_ray.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from m2m_ray.config import load_config
from m2m_ray.mis.synthetic import write_synthetic_mis
from m2m_ray.models.config import M2MConfig, ModelConfig
from m2m_ray.models.context import DinoEncoder
from m2m_ray.models.embedders import TaskConditions
from m2m_ray.models.m2m_unet import M2MUNet
from m2m_ray.models.presets import load_scheduler
from m2m_ray.train.config import TrainConfig
from m2m_ray.train.ingest import choose_subset, training_shards
from m2m_ray.train.step import (
    StepNoise,
    TrainBatch,
    accumulate_gradients,
    m2m_loss,
    step_generator,
)
from m2m_ray.train.trainer import resolve_run_length

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(preset="tiny")
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(num_sets: int, n: int = 3, task: bool = False) -> TrainBatch:
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(num_sets, n, 4, 8, 8, generator=gen)
    pixels = torch.randint(0, 256, (num_sets, n, 3, 64, 64), generator=gen, dtype=torch.uint8)
    position = (torch.arange(n).float() + torch.arange(num_sets).float()[:, None]) if task \
        else None
    return TrainBatch(latents, pixels, None if position is None else TaskConditions(
        position=position))


def _model(variant: str, task: bool) -> M2MUNet:
    model = M2MUNet.from_preset(TINY, M2MConfig(variant=variant,
                                                task_conditions=["position"] if task else []))
    with torch.no_grad():  # fresh image-set attention outputs and task projections start at zero
        for name, param in model.named_parameters():
            if "attn2.to_out" in name or "task_proj" in name:
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("variant,task", [("self", False), ("dino", False), ("self", True)])
def test_accumulated_update_equals_the_large_batch_update(variant, task):
    """k micro-batches of b sets give the update of one batch of k·b sets (paper: 8 GPUs × 32
    sets; we reach 32 per GPU as 4 × 8): same gradients, same AdamW step, same loss."""
    alphas = load_scheduler(TINY, "ddim").alphas_cumprod
    dino = DinoEncoder.from_preset(TINY, CPU) if variant == "dino" else None
    batch = _batch(num_sets=4, task=task)
    base = _model(variant, task)
    draws = StepNoise.draw(step_generator(0, 3, 0, CPU), batch.latents.shape, alphas.shape[0],
                           0.5, CPU)
    assert draws.drop.any() and not draws.drop.all()  # both branches are in the batch
    results = {}
    for micro in (1, 2, 4):
        model = copy.deepcopy(base)
        # SGD: the update is linear in the gradient. (AdamW's update is a function of the same
        # gradient, but its first step ~lr·g/(|g|+eps) magnifies float noise where |g| ~ eps.)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        optimizer.zero_grad()
        loss = accumulate_gradients(model, batch, alphas, draws, micro, dino)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        optimizer.step()
        results[micro] = (loss, grads, [p.detach().clone() for p in model.parameters()])
    one_loss, one_grads, one_params = results[1]
    # the one-batch loss is eq. 5 on the whole batch with these draws
    torch.testing.assert_close(one_loss, m2m_loss(copy.deepcopy(base), batch, alphas, draws,
                                                  0.0, dino).detach())
    assert sum(g.abs().sum() for g in one_grads) > 0
    for micro in (2, 4):
        loss, grads, params = results[micro]
        torch.testing.assert_close(loss, one_loss, rtol=1e-5, atol=1e-6)
        assert len(grads) == len(one_grads)
        for got, want in zip(grads, one_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        for got, want in zip(params, one_params):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_step_noise_is_the_draw_the_loss_made_before_accumulation():
    """Drawing for the whole batch first keeps a run's randomness what it was: the generator form
    and the StepNoise form of m2m_loss agree, and slicing the draws is what micro-batches see."""
    alphas = load_scheduler(TINY, "ddim").alphas_cumprod
    model, batch = _model("self", False), _batch(num_sets=4)
    from_generator = m2m_loss(model, batch, alphas, step_generator(1, 2, 0, CPU), 0.3)
    draws = StepNoise.draw(step_generator(1, 2, 0, CPU), batch.latents.shape, alphas.shape[0],
                           0.3, CPU)
    torch.testing.assert_close(m2m_loss(model, batch, alphas, draws, 0.0), from_generator)
    half = draws.select(slice(2, 4))
    assert torch.equal(half.noise, draws.noise[2:]) and torch.equal(half.drop, draws.drop[2:])
    with pytest.raises(ValueError, match="does not fit"):
        m2m_loss(model, batch.select(slice(0, 2)), alphas, draws, 0.0)
    with pytest.raises(ValueError, match="multiple of gradient_accumulation_steps"):
        accumulate_gradients(model, batch, alphas, draws, 3)


def _cfg(**overrides) -> TrainConfig:
    base = load_config(TrainConfig, ROOT / "configs/tiny/train.yaml").model_dump()
    base.update(overrides)
    return TrainConfig.model_validate(base)


def test_run_length_and_batch_split_are_validated():
    with pytest.raises(ValueError, match="exactly one of max_steps"):
        _cfg(num_epochs=1.0)  # the tiny config also sets max_steps
    with pytest.raises(ValueError, match="exactly one of max_steps"):
        _cfg(max_steps=None)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        _cfg(global_batch_size=4, gradient_accumulation_steps=3)
    cfg = _cfg(global_batch_size=8, gradient_accumulation_steps=2)
    assert cfg.micro_batch_size == 8 // cfg.scaling.num_workers // 2


def test_epochs_over_a_seeded_subset_give_the_steps(tmp_path):
    root = str(tmp_path / "mis")
    write_synthetic_mis(root, num_shards=6, sets_per_shard=5, test_fraction=0.3)
    cfg = _cfg(max_steps=None, num_epochs=2.0, global_batch_size=4,
               data={**_cfg().data.model_dump(), "uri": root})
    shards = training_shards(cfg)
    assert len(shards) == 6 and all(row["split_sets"] <= row["sets"] for row in shards)
    train_sets = sum(row["split_sets"] for row in shards)
    assert 0 < train_sets < 30  # the test split is not counted
    resolved, info = resolve_run_length(cfg, shards)
    assert resolved.max_steps == info["max_steps"] == (2 * train_sets) // 4
    assert resolved.num_epochs is None and info["sets"] == train_sets
    # a subset: whole shards in a seeded order until their train sets reach the number
    subset_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"subset_sets": 7})})
    subset = training_shards(subset_cfg)
    got = sum(row["split_sets"] for row in subset)
    assert got >= 7 and got - subset[-1]["split_sets"] < 7 or len(subset) < 6
    assert [r["shard"] for r in subset] == sorted(r["shard"] for r in subset)
    assert training_shards(subset_cfg) == subset  # reruns and resumes train on the same subset
    other_seed = choose_subset(shards, 7, seed=1, why="test")
    assert {r["shard"] for r in other_seed} != {r["shard"] for r in subset} or len(shards) < 3
    with pytest.raises(ValueError, match="under one optimizer step"):
        resolve_run_length(cfg.model_copy(update={"num_epochs": 0.01}), shards)
    # shards whose stats predate per-split counts: a clear error, not a guess
    legacy = [{**row, "split_sets": None} for row in shards]
    with pytest.raises(ValueError, match="no per-split counts"):
        resolve_run_length(cfg, legacy)
    max_steps_cfg = _cfg()
    assert resolve_run_length(max_steps_cfg, legacy)[0].max_steps == max_steps_cfg.max_steps


@pytest.mark.parametrize("variant,subset", [("self", 9_000_000), ("dino", 6_000_000)])
def test_paper_configs_say_what_the_paper_says(variant, subset):
    """Appendix A / §7.1.1: batch 256 on 8 GPUs, one epoch over the variant's subset, no warm-up,
    SD codebase defaults (no clipping, weight decay 0.01, EMA 0.9999), DDIM 50 at sampling."""
    text = (ROOT / f"configs/m2m-{variant}.yaml").read_text()
    cfg = load_config(TrainConfig, ROOT / f"configs/m2m-{variant}.yaml")
    assert cfg.global_batch_size == 256 and cfg.scaling.num_workers == 8
    assert cfg.micro_batch_size * cfg.gradient_accumulation_steps == 32
    assert cfg.num_epochs == 1 and cfg.max_steps is None
    assert cfg.data.subset_sets == subset
    assert cfg.optim.warmup_steps == 0 and cfg.optim.schedule == "constant"
    assert cfg.optim.max_grad_norm is None and cfg.optim.weight_decay == 0.01
    assert cfg.ema.decay == 0.9999 and cfg.context_drop_prob == 0.1
    assert cfg.model.preset == "sd21-base" and cfg.m2m.variant == variant
    assert cfg.samples.sample.scheduler == "ddim"
    assert cfg.samples.sample.num_inference_steps == 50
    for stale in ("to revisit", "could read", "not available"):
        assert stale not in text
    assert text.count("our choice") >= 4  # N, lr, accumulation, guidance are visibly ours


def test_evaluation_sets_are_a_uniform_reproducible_random_choice():
    """§8.4: "a random selection of 10K samples from the test split". The choice is the N ids of
    smallest seeded hash: reproducible, independent of read order, uniform over the ids, and no
    shuffle of the split is needed to make it."""
    import numpy as np

    from m2m_ray.data.sets import choose_caption_ids

    ids = np.arange(1000, 1200) * 7919  # ids need not be dense
    chosen = choose_caption_ids(ids, 20, seed=0)
    assert len(chosen) == 20 and set(chosen) <= set(ids.tolist())
    assert np.array_equal(chosen, choose_caption_ids(ids[::-1].copy(), 20, seed=0))  # order-free
    assert not np.array_equal(chosen, np.sort(ids)[:20])  # not the first ones
    assert set(chosen) <= set(choose_caption_ids(ids, 50, seed=0))  # a larger N extends it
    assert not np.array_equal(chosen, choose_caption_ids(ids, 20, seed=1))
    assert np.array_equal(choose_caption_ids(ids[:5], 20, seed=0), np.sort(ids[:5]))  # all
    # uniform: over 300 seeds each id is chosen ~ 300 × 20/200 = 30 times
    counts = np.zeros(len(ids))
    position = {int(v): i for i, v in enumerate(ids)}
    for seed in range(300):
        for value in choose_caption_ids(ids, 20, seed=seed):
            counts[position[int(value)]] += 1
    assert counts.sum() == 300 * 20
    assert counts.min() >= 10 and counts.max() <= 55, (counts.min(), counts.max())
    # by shard position: sets early in the read order are not favoured
    assert abs(counts[:100].sum() - counts[100:].sum()) < 0.1 * counts.sum()
    with pytest.raises(ValueError, match="repeat"):
        choose_caption_ids([1, 2, 2], 1, seed=0)


def test_paper_evaluation_config_is_the_protocol_of_section_8_4():
    from m2m_ray.eval.config import EvalConfig
    from m2m_ray.eval.protocol import generation_for_eval

    cfg = load_config(EvalConfig, ROOT / "configs/evaluate.yaml")
    protocol = cfg.protocol
    assert (protocol.context_images, protocol.generated_images, protocol.split,
            protocol.max_sets) == (4, 10, "test", 10_000)
    job = generation_for_eval(cfg)  # what the generate-then-evaluate run generates
    assert (job.inputs.context_images, job.sample.num_images, job.inputs.max_sets,
            job.inputs.mis_split) == (4, 10, 10_000, "test")
    assert job.sample.scheduler == "ddim" and job.sample.num_inference_steps == 50
    assert job.image_format == "png"  # FID on lossless generated images
    assert cfg.extractors.kind == "real" and set(cfg.extractors.fid_resizes) == {
        "legacy_pytorch", "clean"}
    assert cfg.extractors.clip_model_id == "openai/clip-vit-large-patch14"
