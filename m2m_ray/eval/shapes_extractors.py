"""Shapes-world extractors for the evaluation job (``extractors.kind: shapes``): the Table-1
metrics with measures that mean something on the shapes world, behind the ``Extractors``
interface, so the job, its statistics and its reports are unchanged.

- FID: Fréchet distance in the attribute read-out network's feature space (the pooled CNN features
  of ``m2m_ray.shapes.readout``, 4·width dims), k-th generated images vs the context images.
- IS: over the 48 joint (shape, colour, background) classes: the read-out's shape and background
  softmax times its exact colour (one-hot), so IS ∈ [1, 48].
- CLIP-T → *caption agreement*: the "embedding" of an image is the one-hot of its read-out
  attributes, that of a caption the one-hot of the attributes it names
  (``world.caption_attributes``), each scaled by 1/√3, so ``100·cos`` = the percentage of the
  three attributes on which image and caption agree (with ``clip_score_weight`` 1).
- CLIP-I → *context agreement*: the same for a generated image and each context image, averaged
  over the K context images by the job: the percentage of attributes shared with the context.
- No DINO score (``dino = None``): context agreement is this world's image-image measure.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from m2m_ray.shapes import world
from m2m_ray.shapes.readout import HEADS, SIZE, AttributeReadout, colour_of, to_tensor

SHAPES_LABEL = ("shapes world: FID and IS on the attribute read-out (m2m_ray.shapes.readout); "
                "caption / context agreement = % of shape, colour, background that agree")
_ORDER = [(name, values) for name, values in world.ATTRIBUTES.items()]
_WIDTH = sum(len(values) for _, values in _ORDER)  # 11 one-hot slots
READOUT_RESIZE = "readout"  # the one "FID resize": the read-out's own 32 px input (bilinear)


def describe_shapes() -> dict:
    """``describe_extractors`` for ``kind: shapes``: what each column measures."""
    readout = "attribute read-out CNN (m2m_ray.shapes.readout), pooled features"
    return {"label": SHAPES_LABEL,
            "fid": {"network": readout, "weights": "shipped read-out weights",
                    "features": "pooled read-out features; float64 mean and unbiased covariance",
                    "resizes": {READOUT_RESIZE: f"images other than {SIZE}² resized bilinear "
                                                f"(PIL) to {SIZE}²"}},
            "is": {"network": "read-out heads, 48 joint attribute classes",
                   "resize": READOUT_RESIZE},
            "clip": {"backbone": "none: one-hot read-out attributes (image) and caption "
                                 "attributes (text)", "model": "m2m_ray.shapes.readout",
                     "preprocess": f"{SIZE}² bilinear"},
            "dino": None}


def _one_hot(attributes: dict[str, str | None]) -> np.ndarray:
    """``{shape, colour, background}`` (None: not named) → float32 ``[11]`` scaled by 1/√3."""
    out, offset = np.zeros(_WIDTH, np.float32), 0
    for name, values in _ORDER:
        if attributes.get(name) is not None:
            out[offset + values.index(attributes[name])] = 1 / np.sqrt(len(_ORDER))
        offset += len(values)
    return out


class ShapesExtractors:
    """The ``Extractors`` interface on the shapes read-out (CPU; a few ms per 100 images)."""

    kind = "shapes"  # the joint-class index below relies on the read-out heads' value order
    label = SHAPES_LABEL
    fid_resizes = (READOUT_RESIZE,)
    dino = None

    def __init__(self, image_batch_size: int = 256, device: str = "cpu") -> None:
        if HEADS["shape"] != world.SHAPES or HEADS["background"] != world.BACKGROUNDS:
            raise RuntimeError("the read-out's heads and the shapes world disagree on the order "
                               "of values; retrain the read-out")
        self.readout = AttributeReadout.load()
        self.image_batch_size = image_batch_size
        self.feature_dim = int(self.readout.net.heads["shape"].in_features)
        self.num_classes = len(world.SHAPES) * len(world.COLOURS) * len(world.BACKGROUNDS)

    @staticmethod
    def _pixels(images: Sequence[Image.Image]) -> np.ndarray:
        """uint8 ``[N, 32, 32, 3]``; other sizes are resized (bilinear) to the read-out's 32 px."""
        return np.stack([np.asarray(image.convert("RGB") if image.size == (SIZE, SIZE) else
                                    image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
                         for image in images])

    @torch.inference_mode()
    def inception_features(self, images: Sequence[Image.Image]
                           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Read-out features ``{"readout": (N, d)}`` and joint-class logits ``(N, 48)``, float32;
        class index = (shape · 4 + colour) · 3 + background."""
        pixels = self._pixels(images)
        features, shape_lp, background_lp = [], [], []
        for start in range(0, len(pixels), self.image_batch_size):  # one CNN pass per image
            pooled = self.readout.net.features(to_tensor(pixels[start:start + self.image_batch_size]))
            features.append(pooled.numpy())
            heads = self.readout.net.heads
            shape_lp.append(torch.log_softmax(heads["shape"](pooled), -1).numpy())
            background_lp.append(torch.log_softmax(heads["background"](pooled), -1).numpy())
        colours = [world.COLOURS.index(c) for c in colour_of(pixels)]
        colour_lp = np.full((len(pixels), len(world.COLOURS)), -30.0, np.float32)
        colour_lp[np.arange(len(pixels)), colours] = 0.0
        joint = (np.concatenate(shape_lp)[:, :, None, None] + colour_lp[:, None, :, None]
                 + np.concatenate(background_lp)[:, None, None, :])  # (N, 4, 4, 3)
        return ({READOUT_RESIZE: np.concatenate(features).astype(np.float32)},
                joint.reshape(len(pixels), -1).astype(np.float32))

    def clip_image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(N, 11)``: the one-hot of each image's read-out attributes, scaled by 1/√3."""
        predicted = self.readout.predict(self._pixels(images), self.image_batch_size)
        return np.stack([_one_hot({name: predicted[name][i] for name, _ in _ORDER})
                         for i in range(len(images))])

    def clip_text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """``(N, 11)``: the one-hot of the attributes each caption names, scaled by 1/√3."""
        return np.stack([_one_hot(world.caption_attributes(text)) for text in captions])

