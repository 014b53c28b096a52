"""The evaluation job on Ray Data: a generations folder → per-k FID (one per resize), IS, CLIP-T,
CLIP-I and DINO → reports.

Data flow (paper Table 1 protocol, K context images and M generated images per set)::

    generations.jsonl ──driver: validate sets (K, M, split)──► one row per set
      ─► map_batches(SetFeatureExtractor, ActorPoolStrategy, num_gpus)   GPU actors
           one row per image: group (0 = context, k = 1..M), Inception pool features per FID
           resize (pool_<resize>), class probabilities, CLIP-T, CLIP-I and DINO scores (a set's
           context stays on one actor)
      ─► sort("group") ─► map_batches(reduce_partials, reduce_batch_rows)   CPU tasks
           one row per (batch, group): pickled GroupStats (count, Σx, Σxxᵀ, Σp, Σ p log p, ...)
      ─► driver: merge the partial statistics by addition, compute the metrics, write reports

The sort makes each reduce batch hold (mostly) one group, so a partial statistic (d² floats)
summarises many images; the driver holds only the M + 1 merged statistics, never the features.
A bad set (too few images, unreadable image, wrong split) is skipped and counted with its reason,
or stops the job, per ``EvalConfig.on_bad_set``.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from m2m_ray import storage as st
from m2m_ray.config import config_to_dict
from m2m_ray.eval.config import EvalConfig
from m2m_ray.eval.report import build_report, write_reports
from m2m_ray.eval.stats import (
    FrechetReference,
    GroupStats,
    clip_score,
    dino_score,
    neg_entropy,
    softmax64,
)
from m2m_ray.formats import generations as gen
from m2m_ray.runtime import actor_pool_args, pick_device, task_errors_as

SKIPPED = -1  # group of the rows that stand for a skipped set
CONTEXT = 0   # group of the real preceding images; k = 1..M are the generated ones


class EvalInputError(ValueError):
    """Bad input sets with ``on_bad_set="error"``."""


def is_split_of(set_id: str, splits: int) -> int:
    """IS split of a set: a hash of its id, so the same under any parallelism or order."""
    digest = hashlib.blake2b(set_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % splits


def select_sets(sets: list[gen.GenerationSet],
                cfg: EvalConfig) -> tuple[list[gen.GenerationSet], list[dict[str, str]]]:
    """Sets to evaluate and ``{set_id, kind, reason}`` of those that cannot be (checked from the
    index alone; unreadable images are found by the actors)."""
    K, M = cfg.protocol.context_images, cfg.protocol.generated_images
    selected, skipped = [], []
    for record in sets:
        problems = {}  # kind → detail
        if len(record.context) < K:
            problems["too few context images"] = f"{len(record.context)} context images < K = {K}"
        if len(record.generated) < M:
            problems["too few generated images"] = (f"{len(record.generated)} generated images "
                                                    f"< M = {M}")
        split = record.meta.get("split")
        if cfg.protocol.split and split is not None and split != cfg.protocol.split:
            problems["wrong split"] = f"split {split!r} != expected {cfg.protocol.split!r}"
        if problems:
            skipped.append({"set_id": record.set_id, "kind": " + ".join(problems),
                            "reason": "; ".join(problems.values())})
        elif cfg.protocol.max_sets is None or len(selected) < cfg.protocol.max_sets:
            selected.append(record)
    return selected, skipped


class SetFeatureExtractor:
    """Ray Data actor: a batch of sets → one row per image with features and CLIP scores."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        # local: eval.extractors imports torch; the CPU tasks of reduce_partials import this module
        # and never need it, only the feature actors and the driver do
        from m2m_ray.eval.extractors import load_extractors

        self.cfg = EvalConfig.model_validate(cfg_dict)
        device = pick_device(self.cfg.actors.num_gpus, "the evaluation actor pool")
        self.extractors = load_extractors(self.cfg.extractors, device, self.cfg.storage)
        self.readers = ThreadPoolExecutor(self.cfg.read_threads)

    def _read_sets(self, batch: dict[str, np.ndarray]) -> tuple[list[int], list, list]:
        """Indices of the readable sets, their images (set by set, context first) and
        ``(set_id, reason)`` of the others; all images of the batch are read concurrently."""
        futures = [[self.readers.submit(gen.load_image, uri, self.cfg.storage)
                    for uri in list(context) + list(generated)]
                   for context, generated in zip(batch["context"], batch["generated"])]
        good, images, skipped = [], [], []
        for i, (set_id, set_futures) in enumerate(zip(batch["set_id"], futures)):
            try:
                set_images = [future.result() for future in set_futures]
            except Exception as err:  # any read / decode failure makes the set unreadable
                reason = f"unreadable image: {err}"
                if self.cfg.on_bad_set == "error":
                    raise EvalInputError(
                        f"set {set_id!r}: {reason}. Fix or remove the set, or run with "
                        "--on_bad_set=skip to count it as skipped") from err
                skipped.append((str(set_id), reason))
                continue
            good.append(i)
            images.extend(set_images)
        return good, images, skipped

    def _dino_scores(self, images: list, sets: int) -> np.ndarray:
        """DINO per image, (S*(K+M),): mean over the set's K context images of 100·cos; NaN for
        context images and when there is no DINO model."""
        K = self.cfg.protocol.context_images
        per_set = K + self.cfg.protocol.generated_images
        scores = np.full((sets, per_set), np.nan)
        if images and self.extractors.dino is not None:
            embeds = self.extractors.dino_embeddings(images).reshape(sets, per_set, -1)
            pair_cos = np.einsum("sme,ske->smk", embeds[:, K:], embeds[:, :K])  # (S, M, K)
            scores[:, K:] = dino_score(pair_cos).mean(axis=2)
        return scores.reshape(-1)

    def _clip_scores(self, images: list, captions: list) -> tuple[np.ndarray, np.ndarray]:
        """CLIP-T and CLIP-I per image, (S*(K+M),) each; NaN where not defined (context images,
        sets without a caption)."""
        K, w = self.cfg.protocol.context_images, self.cfg.clip_score_weight
        per_set = K + self.cfg.protocol.generated_images
        clip_text = np.full((len(captions), per_set), np.nan)
        clip_image = np.full((len(captions), per_set), np.nan)
        if images:
            embeds = self.extractors.clip_image_embeddings(images)
            embeds = embeds.reshape(len(captions), per_set, -1)  # (S, K+M, e)
            context, generated = embeds[:, :K], embeds[:, K:]  # (S, K, e), (S, M, e)
            pair_cos = np.einsum("sme,ske->smk", generated, context)  # (S, M, K)
            clip_image[:, K:] = clip_score(pair_cos, w).mean(axis=2)
            captioned = [j for j, caption in enumerate(captions) if _has_caption(caption)]
            if captioned:
                text = self.extractors.clip_text_embeddings([captions[j] for j in captioned])
                text_cos = np.einsum("sme,se->sm", generated[captioned], text)  # (S', M)
                clip_text[captioned, K:] = clip_score(text_cos, w)
        return clip_text.reshape(-1), clip_image.reshape(-1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        K, M = self.cfg.protocol.context_images, self.cfg.protocol.generated_images
        good, images, skipped = self._read_sets(batch)
        ext = self.extractors
        d, C, per_set = ext.feature_dim, ext.num_classes, K + M
        groups = np.tile(np.arange(per_set) - K + 1, len(good)).clip(CONTEXT)  # (S*(K+M),)
        features, logits = (ext.inception_features(images) if images else (
            {name: np.zeros((0, d), np.float32) for name in ext.fid_resizes},
            np.zeros((0, C), np.float32)))  # {resize: (S*(K+M), d)}, (S*(K+M), C)
        probs = softmax64(logits)  # (S*(K+M), C)
        clip_text, clip_image = self._clip_scores(images, [batch["caption"][i] for i in good])
        dino = self._dino_scores(images, len(good))
        set_ids = [str(batch["set_id"][i]) for i in good for _ in range(per_set)]
        splits = [is_split_of(s, self.cfg.is_splits) for s in set_ids]
        n_bad = len(skipped)
        return {
            "group": np.concatenate([groups, np.full(n_bad, SKIPPED)]).astype(np.int64),
            "set_id": np.array(set_ids + [s for s, _ in skipped], dtype=object),
            "reason": np.array([""] * len(set_ids) + [r for _, r in skipped], dtype=object),
            **{f"pool_{name}": np.concatenate([pool, np.zeros((n_bad, d), np.float32)])
               for name, pool in features.items()},
            "probs": np.concatenate([probs, np.zeros((n_bad, C))]),
            "neg_entropy": np.concatenate([neg_entropy(probs), np.zeros(n_bad)]),
            "is_split": np.array(splits + [0] * n_bad, dtype=np.int64),
            "clip_text": np.concatenate([clip_text, np.full(n_bad, np.nan)]),
            "clip_image": np.concatenate([clip_image, np.full(n_bad, np.nan)]),
            "dino": np.concatenate([dino, np.full(n_bad, np.nan)]),
        }


def _has_caption(caption: Any) -> bool:
    return isinstance(caption, str) and bool(caption.strip())


def reduce_partials(batch: dict[str, np.ndarray], is_splits: int,
                    resizes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Image rows → one row per group present: ``group`` and pickled ``GroupStats`` with moments
    of the ``pool_<resize>`` column of every FID resize (or, for skipped sets, a pickled list of
    ``(set_id, reason)``)."""
    out_groups, out_stats = [], []
    for group in np.unique(batch["group"]):
        rows = batch["group"] == group
        if group == SKIPPED:
            payload: Any = list(zip(batch["set_id"][rows].tolist(),
                                    batch["reason"][rows].tolist()))
        else:
            probs = batch["probs"][rows]
            dim = batch[f"pool_{resizes[0]}"].shape[1]
            payload = GroupStats.empty(dim, probs.shape[1], is_splits, resizes)
            for name in resizes:
                payload.features[name].update(batch[f"pool_{name}"][rows])
            payload.classes.update(probs, batch["is_split"][rows], batch["neg_entropy"][rows])
            payload.clip_text.update(batch["clip_text"][rows])
            payload.clip_image.update(batch["clip_image"][rows])
            payload.dino.update(batch["dino"][rows])
        out_groups.append(int(group))
        out_stats.append(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    return {"group": np.array(out_groups, np.int64), "stats": np.array(out_stats, dtype=object)}


def _finite(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def metrics_per_k(groups: dict[int, GroupStats], M: int,
                  resizes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Table rows for k = 1..M from the merged statistics: ``fid_<resize>`` for every FID resize
    (k-th generated images vs the context images; None with fewer than 2 images on a side),
    ``is_mean`` / ``is_std``, ``clip_text``, ``clip_image``, ``dino`` (None where no image
    had one) and their image counts."""
    real = groups.get(CONTEXT)
    references = {name: FrechetReference(*real.features[name].mean_cov())
                  for name in resizes if real is not None and real.count >= 2}
    rows = []
    for k in range(1, M + 1):
        fake = groups.get(k)
        row: dict[str, Any] = {"k": k, "images": fake.count if fake else 0}
        for name in resizes:
            enough = name in references and fake is not None and fake.count >= 2
            row[f"fid_{name}"] = (_finite(references[name].distance(
                *fake.features[name].mean_cov())) if enough else None)
        is_mean, is_std = fake.classes.inception_score() if fake and fake.count else (
            None, None)
        row.update(is_mean=_finite(is_mean), is_std=_finite(is_std))
        for name in ("clip_text", "clip_image", "dino"):
            stats = getattr(fake, name) if fake else None
            row[name] = stats.mean() if stats else None
            row[f"{name}_images"] = stats.count if stats else 0
        rows.append(row)
    return rows


def image_formats(sets: list[gen.GenerationSet], K: int, M: int) -> dict[str, dict[str, int]]:
    """``{"context": {suffix: images}, "generated": {...}}`` of the evaluated images, by file
    suffix: FID needs lossless generated images (``.png``, the generate job's default)."""
    def count(paths: list[str]) -> dict[str, int]:
        suffixes = [p.rsplit(".", 1)[-1].lower() if "." in p else "none" for p in paths]
        return {suffix: suffixes.count(suffix) for suffix in sorted(set(suffixes))}

    return {"context": count([p for s in sets for p in s.context[-K:]]),
            "generated": count([p for s in sets for p in s.generated[:M]])}


def evaluate_generations(cfg: EvalConfig, generations_uri: str) -> dict[str, Any]:
    """Evaluate a generations folder on the current Ray cluster; writes report.json/.md/.png to
    ``cfg.output_uri`` (default ``<generations>/eval``) and returns the report dict."""
    import ray

    # local: torch, as in SetFeatureExtractor
    from m2m_ray.eval.extractors import describe_extractors

    started = time.time()
    extractors = describe_extractors(cfg.extractors)  # before any Ray work: names every backbone
    resizes = tuple(extractors["fid"]["resizes"])
    sets = gen.read_generations(generations_uri, cfg.storage)
    # Sets that fell out in the generation step count in the denominators, with their reason.
    not_generated = [{"set_id": s["set_id"], "kind": "not generated", "reason": s["reason"]}
                     for s in gen.read_skipped(generations_uri, cfg.storage)]
    selected, skipped = select_sets(sets, cfg)
    over_max_sets = len(sets) - len(selected) - len(skipped)
    if skipped and cfg.on_bad_set == "error":
        listed = "; ".join(f"{s['set_id']}: {s['reason']}" for s in skipped[:5])
        raise EvalInputError(f"{len(skipped)} of {len(sets)} sets in {generations_uri!r} cannot "
                             f"be evaluated ({listed}{' ...' if len(skipped) > 5 else ''}); "
                             "fix them or run with --on_bad_set=skip to count them as skipped")
    K, M = cfg.protocol.context_images, cfg.protocol.generated_images
    items = [{"set_id": s.set_id, "caption": s.caption,
              "context": [gen.image_uri(generations_uri, p) for p in s.context[-K:]],
              "generated": [gen.image_uri(generations_uri, p) for p in s.generated[:M]]}
             for s in selected]
    groups: dict[int, GroupStats] = {}
    if items:
        features = ray.data.from_items(items).map_batches(
            SetFeatureExtractor, fn_constructor_kwargs={"cfg_dict": config_to_dict(cfg)},
            batch_size=cfg.sets_per_batch, batch_format="numpy",
            **actor_pool_args(cfg.actors, "actors"))
        partials = features.sort("group").map_batches(
            reduce_partials, fn_kwargs={"is_splits": cfg.is_splits, "resizes": resizes},
            batch_size=cfg.reduce_batch_rows, batch_format="numpy")
        with task_errors_as(EvalInputError):  # the set and image named, not an actor's traceback
            batches = list(partials.iter_batches(batch_size=1, batch_format="numpy"))
        for batch in batches:
            group, payload = int(batch["group"][0]), pickle.loads(batch["stats"][0])
            if group == SKIPPED:
                skipped.extend({"set_id": s, "kind": "unreadable image", "reason": r}
                               for s, r in payload)
            elif group in groups:
                groups[group].merge(payload)
            else:
                groups[group] = payload
    unreadable = {s["set_id"] for s in skipped} & {s.set_id for s in selected}
    evaluated = [s for s in selected if s.set_id not in unreadable]
    splits: dict[str, int] = {}
    for record in evaluated:
        name = str(record.meta.get("split", "unknown"))
        splits[name] = splits.get(name, 0) + 1
    models = {str(s.meta.get("model")) for s in evaluated if s.meta.get("model")}
    report = build_report(
        cfg=cfg, generations_uri=generations_uri, sets_total=len(sets) + len(not_generated),
        sets_evaluated=len(evaluated), skipped=not_generated + skipped,
        sets_over_max_sets=over_max_sets, splits=splits,
        per_k=metrics_per_k(groups, M, resizes), extractors=extractors,
        image_formats=image_formats(evaluated, K, M),
        method=models.pop() if len(models) == 1 else None, wall_s=time.time() - started)
    output_uri = cfg.output_uri or st.join(generations_uri, "eval")
    report["files"] = write_reports(report, output_uri, cfg.storage)
    return report

