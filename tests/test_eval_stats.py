"""FID / IS / CLIPScore math against float64 references, closed forms and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from m2m_ray.eval.stats import (
    ClassProbStats,
    GaussianMoments,
    GroupStats,
    ScalarStats,
    clip_score,
    dino_score,
    fid_from_moments,
    frechet_distance,
    softmax64,
)


def _random_cov(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _scipy_fid(mean1, cov1, mean2, cov2) -> float:
    """The pytorch-fid formula with scipy's general matrix square root, float64."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    covmean = np.real(covmean)
    diff = mean1 - mean2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def test_frechet_distance_closed_form_and_scipy_reference():
    rng = np.random.default_rng(0)
    dim = 12
    # Same eigenvectors (commuting covariances): FID = ‖Δμ‖² + Σ (√a_i − √b_i)², exactly.
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mean1, mean2 = rng.normal(size=dim), rng.normal(size=dim)
    closed = float(((mean1 - mean2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = frechet_distance(mean1, (q * a) @ q.T, mean2, (q * b) @ q.T)
    assert got == pytest.approx(closed, rel=1e-10, abs=1e-10)
    # Identical distributions: 0.
    cov = _random_cov(rng, dim)
    assert frechet_distance(mean1, cov, mean1, cov) == pytest.approx(0.0, abs=1e-9)
    # General (non-commuting) covariances: the scipy.linalg.sqrtm reference.
    cov1, cov2 = _random_cov(rng, dim), _random_cov(rng, dim)
    assert frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(
        _scipy_fid(mean1, cov1, mean2, cov2), rel=1e-9)
    # Rank-deficient covariances (fewer samples than features) stay finite and match scipy.
    low1 = rng.normal(size=(5, dim))
    low2 = rng.normal(size=(7, dim))
    c1, c2 = np.cov(low1, rowvar=False), np.cov(low2, rowvar=False)
    assert frechet_distance(low1.mean(0), c1, low2.mean(0), c2) == pytest.approx(
        _scipy_fid(low1.mean(0), c1, low2.mean(0), c2), rel=1e-6)


def test_fid_from_merged_moments_equals_all_at_once_and_the_gaussians():
    rng = np.random.default_rng(1)
    dim, n = 6, 40000
    mean1, mean2 = np.zeros(dim), np.full(dim, 0.5)
    cov1 = np.diag(np.linspace(0.5, 2.0, dim))
    cov2 = np.diag(np.linspace(1.0, 1.5, dim))
    x1 = rng.multivariate_normal(mean1, cov1, size=n).astype(np.float32)
    x2 = rng.multivariate_normal(mean2, cov2, size=n // 2).astype(np.float32)

    whole1 = GaussianMoments(dim).update(x1)
    whole2 = GaussianMoments(dim).update(x2)
    parts1 = GaussianMoments(dim)
    for part in np.split(x1, [3, 1000, 25000]):  # uneven parts, merged in any order
        parts1.merge(GaussianMoments(dim).update(part))
    assert parts1.count == whole1.count == n
    np.testing.assert_allclose(parts1.total, whole1.total, rtol=1e-12)
    np.testing.assert_allclose(parts1.outer, whole1.outer, rtol=1e-12)

    fid_parts = fid_from_moments(parts1, whole2)
    fid_whole = fid_from_moments(whole1, whole2)
    assert fid_parts == pytest.approx(fid_whole, rel=1e-10)
    # The float64 reference on all features at once: np.mean / np.cov + scipy sqrtm.
    y1, y2 = x1.astype(np.float64), x2.astype(np.float64)
    reference = _scipy_fid(y1.mean(0), np.cov(y1, rowvar=False),
                           y2.mean(0), np.cov(y2, rowvar=False))
    assert fid_whole == pytest.approx(reference, rel=1e-8)
    # And the analytic distance of the two Gaussians the samples came from (sampling error only).
    analytic = float(((mean1 - mean2) ** 2).sum()
                     + ((np.sqrt(np.diag(cov1)) - np.sqrt(np.diag(cov2))) ** 2).sum())
    assert fid_whole == pytest.approx(analytic, abs=0.03)


def test_fid_matches_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 16

        def forward(self, x):
            return x

    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(0.3, 1.2, size=(200, 16))
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    ours = fid_from_moments(GaussianMoments(16).update(real), GaussianMoments(16).update(fake))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)


def _direct_is(probs: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) straight from the definition."""
    marginal = probs.mean(axis=0)
    kl = (probs * (np.log(probs) - np.log(marginal))).sum(axis=1)
    return math.exp(kl.mean())


def test_inception_score_equals_the_direct_formula_and_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(500, 20))
    probs = softmax64(logits)
    one = ClassProbStats(20, 1).update(probs, np.zeros(500, np.int64))
    assert one.inception_score()[0] == pytest.approx(_direct_is(probs), rel=1e-12)
    assert one.inception_score()[1] == 0.0

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    metric = InceptionScore(feature=Identity(), splits=1)
    metric.update(torch.from_numpy(logits))
    assert one.inception_score()[0] == pytest.approx(float(metric.compute()[0]), rel=1e-9)

    # Splits: each split's IS is the direct formula on its images; mean ± std (ddof 0).
    split = rng.integers(0, 4, size=500)
    merged = ClassProbStats(20, 4)
    for part in np.array_split(np.arange(500), 3):  # partial statistics merged
        merged.merge(ClassProbStats(20, 4).update(probs[part], split[part]))
    per_split = [_direct_is(probs[split == s]) for s in range(4)]
    assert merged.inception_score() == pytest.approx((np.mean(per_split), np.std(per_split)),
                                                     rel=1e-12)
    # A certain, uniform classifier: IS = number of classes; a constant one: IS = 1.
    eye = np.eye(20)
    assert ClassProbStats(20, 1).update(eye, np.zeros(20, np.int64)).inception_score()[0] == \
        pytest.approx(20.0)
    same = np.tile(probs[:1], (10, 1))
    assert ClassProbStats(20, 1).update(same, np.zeros(10, np.int64)).inception_score()[0] == \
        pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"split index in \[0, 4\)"):
        ClassProbStats(20, 4).update(probs[:2], np.array([0, 4]))


def test_clip_score_follows_hessel_dino_score_dreambench_and_scalar_stats_skip_nans():
    cos = np.array([0.31, -0.2, 0.0, 1.0])
    np.testing.assert_allclose(clip_score(cos, 1.0), [31.0, 0.0, 0.0, 100.0])
    np.testing.assert_allclose(dino_score(cos), [31.0, -20.0, 0.0, 100.0])  # 100·cos, unclipped
    # Hessel et al.'s original 2.5·max(cos, 0) is w = 0.025 in w·max(100·cos, 0).
    np.testing.assert_allclose(clip_score(cos, 0.025), 2.5 * np.maximum(cos, 0))

    stats = ScalarStats().update(np.array([1.0, np.nan, 3.0]))
    stats.merge(ScalarStats().update(np.array([5.0])))
    assert (stats.count, stats.mean(), stats.std()) == (3, 3.0, pytest.approx(np.std([1, 3, 5])))
    assert ScalarStats().mean() is None


def test_group_stats_merge_and_moment_checks():
    rng = np.random.default_rng(4)
    resizes = ("legacy_pytorch", "clean")
    a, b = GroupStats.empty(3, 5, 2, resizes), GroupStats.empty(3, 5, 2, resizes)
    for stats, n in ((a, 4), (b, 6)):
        for name in resizes:
            stats.features[name].update(rng.normal(size=(n, 3)))
    a.clip_text.update(np.array([10.0]))
    b.dino.update(np.array([55.0, np.nan]))
    merged = a.merge(b)
    assert merged.count == 10 and merged.features["clean"].count == 10
    assert (merged.clip_text.count, merged.dino.count, merged.dino.mean()) == (1, 1, 55.0)
    with pytest.raises(ValueError, match=r"FID resizes \['legacy_pytorch'\] into "
                                         r"\['clean', 'legacy_pytorch'\]"):
        a.merge(GroupStats.empty(3, 5, 2, ("legacy_pytorch",)))
    with pytest.raises(ValueError, match=r"expected features of shape \(N, 3\), got \(2, 4\)"):
        GaussianMoments(3).update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 2 feature vectors, got 1"):
        GaussianMoments(3).update(np.zeros((1, 3))).mean_cov()
