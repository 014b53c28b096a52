"""The shapes world's own checks: read-out accuracy and VAE agreement on held-out renders (written
into each trained component's ``training.json`` by ``m2m_ray.shapes.train``).

Agreement of an image with a target = the read-out's prediction equals the target's attribute;
reported per attribute as a fraction of images. The measures of generated images (method and task
fidelity, the shapes-MIS report, teacher agreement) are experiments on this world:
``m2m_ray.fidelity``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from m2m_ray.shapes import world
from m2m_ray.shapes.readout import AttributeReadout, to_tensor
from m2m_ray.shapes.world import SCORED


def agreement(predicted: dict[str, list[str]], targets: Sequence[dict[str, Any]],
              attributes: Sequence[str] = SCORED) -> dict[str, float]:
    """Per attribute, the fraction of images whose prediction equals its target (targets without
    the attribute, e.g. a caption that names no count, are not counted)."""
    out = {}
    for name in attributes:
        pairs = [(p, t[name]) for p, t in zip(predicted[name], targets) if t.get(name) is not None]
        out[name] = round(sum(p == str(t) for p, t in pairs) / len(pairs), 4) if pairs else None
    return out


def readout_accuracy(readout: AttributeReadout, seed: int, count: int = 2000) -> dict[str, float]:
    """Accuracy on ``count`` held-out renders (a seed the training never used)."""
    rng = np.random.default_rng(seed)
    attributes = [world.sample_attributes(rng) for _ in range(count)]
    images = np.stack([world.render(a) for a in attributes])
    targets = [{"shape": a.shape, "colour": a.colour, "background": a.background,
                "count": str(a.count)} for a in attributes]
    return agreement(readout.predict(images), targets, (*SCORED, "count"))


@torch.no_grad()
def vae_agreement(vae, readout: AttributeReadout, seed: int, count: int = 1000
                  ) -> dict[str, Any]:
    """Read-out on VAE reconstructions (posterior mean) of held-out renders vs their ground truth;
    also the mean absolute pixel error."""
    rng = np.random.default_rng(seed)
    attributes = [world.sample_attributes(rng) for _ in range(count)]
    images = np.stack([world.render(a) for a in attributes])
    recon = []
    for start in range(0, count, 64):
        x = to_tensor(images[start:start + 64]) * 2 - 1
        out = vae.decode(vae.encode(x).latent_dist.mean).sample
        recon.append(((out / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1))
    recon_np = torch.cat(recon).numpy()
    targets = [{"shape": a.shape, "colour": a.colour, "background": a.background,
                "count": str(a.count)} for a in attributes]
    result: dict[str, Any] = agreement(readout.predict(recon_np), targets, (*SCORED, "count"))
    result["mean_abs_pixel_error"] = round(float(np.abs(recon_np.astype(np.float32)
                                                        - images).mean() / 255), 4)
    return result
