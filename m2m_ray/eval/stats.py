"""Mergeable sufficient statistics for FID, IS and CLIP scores, and the metrics computed from them.

Every statistic is a sum over images, kept in float64, so partial statistics computed on any split
of the images (Ray Data blocks, actors, nodes) merge by addition into exactly the statistics of
all of them at once — no worker and not the driver ever needs all features together.

- ``GaussianMoments``: count, Σx and Σxxᵀ of feature vectors (the state layout of torchmetrics'
  ``FrechetInceptionDistance``); mean and unbiased covariance (N − 1), as pytorch-fid and
  torchmetrics.
- ``ClassProbStats``: per IS split, count, Σ p(y|x) and Σ_x Σ_y p log p. Then
  ``KL_s = (1/n) Σ_x Σ_y p log p − Σ_y p̄ log p̄`` with ``p̄ = Σ p / n``, which is exactly the mean
  over x of KL(p(y|x) ‖ p̄) of the direct formula, and ``IS_s = exp(KL_s)``.
- ``ScalarStats``: count, Σ and Σ² of per-image scores (CLIP text-image, CLIP image-image, DINO).

``frechet_distance`` computes tr √(Σ₁Σ₂) from the symmetric matrix Σ₁^½ Σ₂ Σ₁^½ with ``eigh``: its
eigenvalues are those of Σ₁Σ₂, but a symmetric solver keeps them real and the result stable where
features are many and samples few (a rank-deficient Σ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GaussianMoments:
    """Count, sum and sum of outer products of ``dim``-dimensional feature vectors."""

    dim: int
    count: int = 0
    total: np.ndarray = field(default=None)  # (dim,) float64
    outer: np.ndarray = field(default=None)  # (dim, dim) float64

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features: np.ndarray) -> "GaussianMoments":
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {features.shape}")
        self.count += features.shape[0]
        self.total += features.sum(axis=0)
        self.outer += features.T @ features  # (dim, dim)
        return self

    def merge(self, other: "GaussianMoments") -> "GaussianMoments":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance; needs at least 2 samples."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues rounded below 0 → 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


class FrechetReference:
    """The reference side of FID (mean, covariance and its square root, computed once), so that
    many distributions — the k = 1..M generated images — are compared against it cheaply."""

    def __init__(self, mean: np.ndarray, cov: np.ndarray) -> None:
        self.mean = np.asarray(mean, np.float64)
        self.cov = np.asarray(cov, np.float64)
        self.root = _sqrt_psd(self.cov)

    def distance(self, mean: np.ndarray, cov: np.ndarray) -> float:
        """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), in float64."""
        mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
        middle = self.root @ cov @ self.root  # (d, d), symmetric PSD, spectrum of Σ₁Σ₂
        eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
        trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
        diff = self.mean - mean
        return float(diff @ diff + np.trace(self.cov) + np.trace(cov) - 2.0 * trace_sqrt)


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray,
                     mean2: np.ndarray, cov2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), in float64."""
    return FrechetReference(mean1, cov1).distance(mean2, cov2)


def fid_from_moments(real: GaussianMoments, fake: GaussianMoments) -> float:
    return frechet_distance(*real.mean_cov(), *fake.mean_cov())


def neg_entropy(probs: np.ndarray) -> np.ndarray:
    """Σ_y p log p per row (0 log 0 = 0), float64."""
    probs = np.asarray(probs, np.float64)
    return np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0).sum(axis=-1)


def softmax64(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass
class ClassProbStats:
    """Per IS split: image count, Σ p(y|x) and Σ_x Σ_y p log p."""

    num_classes: int
    splits: int
    count: np.ndarray = field(default=None)         # (splits,) int64
    prob_sum: np.ndarray = field(default=None)      # (splits, num_classes) float64
    neg_entropy_sum: np.ndarray = field(default=None)  # (splits,) float64

    def __post_init__(self) -> None:
        if self.count is None:
            self.count = np.zeros(self.splits, np.int64)
        if self.prob_sum is None:
            self.prob_sum = np.zeros((self.splits, self.num_classes), np.float64)
        if self.neg_entropy_sum is None:
            self.neg_entropy_sum = np.zeros(self.splits, np.float64)

    def update(self, probs: np.ndarray, split: np.ndarray,
               row_neg_entropy: np.ndarray | None = None) -> "ClassProbStats":
        """Add images with class probabilities ``probs`` (N, C) that fall in IS ``split`` (N,)."""
        probs = np.asarray(probs, np.float64)
        split = np.asarray(split, np.int64)
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"expected probabilities of shape (N, {self.num_classes}), "
                             f"got {probs.shape}")
        if split.shape != probs.shape[:1] or (split.size and not 0 <= split.min() <= split.max()
                                               < self.splits):
            raise ValueError(f"expected one split index in [0, {self.splits}) per image, got "
                             f"shape {split.shape}, values {np.unique(split)[:10]}")
        terms = neg_entropy(probs) if row_neg_entropy is None else np.asarray(row_neg_entropy,
                                                                              np.float64)
        np.add.at(self.count, split, 1)
        np.add.at(self.prob_sum, split, probs)
        np.add.at(self.neg_entropy_sum, split, terms)
        return self

    def merge(self, other: "ClassProbStats") -> "ClassProbStats":
        if (other.num_classes, other.splits) != (self.num_classes, self.splits):
            raise ValueError(f"cannot merge IS statistics of (classes, splits) = "
                             f"{(other.num_classes, other.splits)} into "
                             f"{(self.num_classes, self.splits)}")
        self.count += other.count
        self.prob_sum += other.prob_sum
        self.neg_entropy_sum += other.neg_entropy_sum
        return self

    def split_scores(self) -> np.ndarray:
        """IS of every non-empty split."""
        scores = []
        for n, prob_sum, neg_ent in zip(self.count, self.prob_sum, self.neg_entropy_sum):
            if n == 0:
                continue
            marginal = prob_sum / n  # (C,) p̄(y)
            kl = neg_ent / n - float(neg_entropy(marginal))
            scores.append(math.exp(kl))
        return np.asarray(scores, np.float64)

    def inception_score(self) -> tuple[float, float]:
        """Mean and standard deviation (ddof=0, as the original IS code) over the splits."""
        scores = self.split_scores()
        if scores.size == 0:
            raise ValueError("an Inception Score needs at least one image")
        return float(scores.mean()), float(scores.std())


@dataclass
class ScalarStats:
    """Count, Σ and Σ² of per-image scores (NaNs, e.g. no caption, are not counted)."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def update(self, values: np.ndarray) -> "ScalarStats":
        values = np.asarray(values, np.float64).reshape(-1)
        values = values[~np.isnan(values)]
        self.count += int(values.size)
        self.total += float(values.sum())
        self.total_sq += float((values * values).sum())
        return self

    def merge(self, other: "ScalarStats") -> "ScalarStats":
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        return self

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def std(self) -> float | None:
        """Standard deviation over images (ddof=0)."""
        if not self.count:
            return None
        mean = self.total / self.count
        return math.sqrt(max(self.total_sq / self.count - mean * mean, 0.0))


def clip_score(cosine: np.ndarray, weight: float) -> np.ndarray:
    """Hessel et al. (2021) CLIPScore: ``w · max(100 · cos, 0)`` per pair (see EvalConfig);
    ``cosine`` any shape, result float64 of the same shape."""
    return weight * np.maximum(100.0 * np.asarray(cosine, np.float64), 0.0)


def dino_score(cosine: np.ndarray) -> np.ndarray:
    """DreamBench's DINO score (Ruiz et al. 2023, §4.1): ``100 · cos`` of DINO ViT-S/16 [CLS]
    embeddings per pair, not clipped; ``cosine`` any shape, result float64 of the same shape."""
    return 100.0 * np.asarray(cosine, np.float64)


@dataclass
class GroupStats:
    """Everything the report needs about one group of images (the context images, or the k-th
    generated images of every set), mergeable by addition: Inception moments per FID resize
    (``features[resize]``), IS class statistics, and CLIP-T, CLIP-I and DINO score sums."""

    features: dict[str, GaussianMoments]
    classes: ClassProbStats
    clip_text: ScalarStats = field(default_factory=ScalarStats)
    clip_image: ScalarStats = field(default_factory=ScalarStats)
    dino: ScalarStats = field(default_factory=ScalarStats)

    @classmethod
    def empty(cls, feature_dim: int, num_classes: int, is_splits: int,
              resizes: tuple[str, ...]) -> "GroupStats":
        """No images yet: moments of ``feature_dim``-d features for each of ``resizes``."""
        return cls({name: GaussianMoments(feature_dim) for name in resizes},
                   ClassProbStats(num_classes, is_splits))

    @property
    def count(self) -> int:
        """Images in the group (every resize sees all of them)."""
        return next(iter(self.features.values())).count

    def merge(self, other: "GroupStats") -> "GroupStats":
        if set(other.features) != set(self.features):
            raise ValueError(f"cannot merge statistics of FID resizes {sorted(other.features)} "
                             f"into {sorted(self.features)}")
        for name, moments in other.features.items():
            self.features[name].merge(moments)
        self.classes.merge(other.classes)
        self.clip_text.merge(other.clip_text)
        self.clip_image.merge(other.clip_image)
        self.dino.merge(other.dino)
        return self
