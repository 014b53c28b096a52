"""Measures the fidelity tools share: agreement split by value, within-set diversity against the
renderer's, and the text-to-image teacher's images and agreement with their captions.

Agreement of an image with a target = the shapes read-out's prediction equals the target's
attribute (``m2m_ray.shapes.evaluate.agreement``), per attribute, as a fraction of images.
Within-set diversity = the mean pairwise L1 pixel distance (pixels in [0, 1]) between the images of
a set, averaged over sets; the renderer's own figure for the same attributes is the reference (a
model that draws one image 25 times scores 0).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from m2m_ray.formats.rng import Salt
from m2m_ray.mis.config import GenerateConfig
from m2m_ray.models.config import ModelConfig
from m2m_ray.shapes import world
from m2m_ray.shapes.evaluate import agreement
from m2m_ray.shapes.readout import AttributeReadout
from m2m_ray.shapes.world import SCORED

#: 1 / number of values, per scored attribute.
CHANCE = {name: round(1 / len(values), 4) for name, values in world.ATTRIBUTES.items()}


def within_set_diversity(sets: np.ndarray) -> float:
    """uint8 ``[S, N, H, W, 3]`` → mean pairwise L1 distance in [0, 1] within sets."""
    values = []
    for images in sets.astype(np.float32) / 255:
        flat = images.reshape(len(images), -1)
        distances = np.abs(flat[:, None] - flat[None]).mean(-1)
        values.append(distances[np.triu_indices(len(images), 1)].mean())
    return round(float(np.mean(values)), 4)


def renderer_diversity(keys: Sequence[tuple[str, str, str]], per_set: int, seed: int) -> float:
    """The renderer's within-set diversity for sets of fixed (shape, colour, background)."""
    rng = np.random.default_rng(seed)
    sets = np.stack([np.stack([world.render(world.sample_attributes(
        rng, shape=s, colour=c, background=b)) for _ in range(per_set)]) for s, c, b in keys])
    return within_set_diversity(sets)


def agreement_by_value(predicted: dict[str, list[str]], targets: Sequence[dict[str, str]],
                       per: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Read-out values split by the value they should have: ``predicted[attribute]`` holds one
    value per image, ``targets`` one dict per set of ``per`` consecutive images (a caption's, or a
    context's). Returns ``{attribute: {target value: {"sets": n, "generated": {value:
    fraction}}}}``, so a miss shows whether it is spread or one value's, and what that value
    becomes (e.g. squares drawn as circles)."""
    out = {}
    for name in SCORED:
        split: dict[str, list[str]] = {}
        for i, value in enumerate(predicted[name]):
            split.setdefault(targets[i // per][name], []).append(value)
        out[name] = {value: {"sets": len(drawn) // per, "generated": {
            v: round(n / len(drawn), 4) for v, n in Counter(drawn).most_common()}}
            for value, drawn in sorted(split.items())}
    return out


def teacher_images(model: "str | ModelConfig", captions: Sequence[str], images_per_caption: int,
                   guidance_scale: float = 7.5, steps: int = 25, seed: int = 0,
                   captions_per_batch: int = 4, first_id: int = 1) -> np.ndarray:
    """uint8 ``[S, images_per_caption, 32, 32, 3]``: the teacher sampled through MIS stage 2's
    ``SDSetGenerator`` (Euler, seeded per image) for each caption; caption s is generated as id
    ``first_id + s`` (its images' seeds derive from it). ``model``: a preset name or a
    ``ModelConfig`` (e.g. the shapes preset with ``sd_model_id`` set to retrained weights).

    Raises ``RuntimeError`` when a set comes out non-finite."""
    # local: mis.generate imports diffusers and transformers (seconds); mis_report and
    # benchmarks/shapes_world use this module without the teacher
    from m2m_ray.mis.generate import SDSetGenerator

    cfg = GenerateConfig(images_per_caption=images_per_caption, num_inference_steps=steps,
                         guidance_scale=guidance_scale, height=32, width=32, base_seed=seed,
                         actors={"num_gpus": 0}, keep_latents=False)
    generator = SDSetGenerator(ModelConfig(preset=model) if isinstance(model, str) else model, cfg)
    sets = []
    for start in range(0, len(captions), captions_per_batch):
        chunk = list(captions[start:start + captions_per_batch])
        ids = list(range(first_id + start, first_id + start + len(chunk)))
        out = generator.generate(chunk, ids)
        if any(out.rejected):
            raise RuntimeError(f"teacher sets of captions {ids} came out non-finite: "
                               f"{out.rejected}")
        sets.append(out.pixels)
    return np.concatenate(sets)


def teacher_agreement(model: "str | ModelConfig", captions: Sequence[str],
                      targets: Sequence[dict[str, Any]], images_per_caption: int = 25,
                      guidance_scale: float = 7.5, steps: int = 25, seed: int = 0,
                      readout: AttributeReadout | None = None) -> dict[str, Any]:
    """``teacher_images`` for each caption, read out and compared with the caption's
    attributes, overall and split by the caption's value (``by_value``); ``images`` holds the
    uint8 ``[S, N, H, W, 3]`` images (not JSON)."""
    images = teacher_images(model, captions, images_per_caption, guidance_scale, steps,
                            seed)                                   # (S, N, H, W, 3)
    readout = readout or AttributeReadout.load()
    predicted = readout.predict(images.reshape(-1, *images.shape[2:]))
    per_image = [t for t in targets for _ in range(images_per_caption)]
    keys = [(t["shape"], t["colour"], t["background"]) for t in targets]
    return {"guidance_scale": guidance_scale, "steps": steps, "sets": len(captions),
            "images_per_set": images_per_caption,
            "agreement": agreement(predicted, per_image),
            "by_value": agreement_by_value(predicted, targets, images_per_caption),
            "all_three": all_three(predicted, per_image),
            "diversity": within_set_diversity(images),
            "renderer_diversity": renderer_diversity(keys, images_per_caption, seed + Salt.RENDERER_DIVERSITY),
            "images": images}


def all_three(predicted: dict[str, list[str]], per_image: Sequence[dict[str, Any]]) -> float:
    """The fraction of images whose every scored attribute equals its target."""
    return round(float(np.mean([all(predicted[a][i] == per_image[i][a] for a in SCORED)
                                for i in range(len(per_image))])), 4)
