"""Attribute read-out: for any RGB image of the shapes world, a prediction per hidden attribute.

- ``colour``: exact, no learning. The background is neutral grey, so the saturated pixels are the
  objects; their circular-mean hue is compared with the four colour hues (``colour_of``).
- ``shape``, ``background`` and ``count``: a small CNN (``ReadoutNet``, ~0.07M parameters) trained
  on renders by ``python -m m2m_ray.shapes.train readout`` (random attributes, blur and noise
  augmentation so that a VAE's softer images read the same), shipped in ``readout/``.

``AttributeReadout.predict(pixels)`` takes uint8 ``[B, H, W, 3]`` (any H = W; resized to 32) and
returns one list of names per attribute. ``features(pixels)`` gives the CNN's pooled features
``[B, 4·width]``: a feature space for FID-like statistics in the shapes world.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from m2m_ray.shapes.world import BACKGROUNDS, COLOURS, HUES, SHAPES

READOUT_DIR = Path(__file__).with_name("readout")
HEADS = {"shape": SHAPES, "background": BACKGROUNDS, "count": ("1", "2", "3")}
SIZE = 32


class ReadoutNet(nn.Module):
    """uint8-derived pixels ``[B, 3, 32, 32]`` in [0, 1] → logits per head."""

    def __init__(self, width: int = 16):
        super().__init__()
        features = 4 * width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout),
                                 nn.SiLU())

        self.body = nn.Sequential(block(3, width, 1), block(width, width, 1),
                                  block(width, 2 * width, 2), block(2 * width, 2 * width, 1),
                                  block(2 * width, features, 2), block(features, features, 1))
        self.heads = nn.ModuleDict({name: nn.Linear(features, len(values))
                                    for name, values in HEADS.items()})

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels * 2 - 1).mean(dim=(2, 3))  # (B, 4·width)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def colour_of(pixels: np.ndarray) -> list[str]:
    """uint8 ``[B, H, W, 3]`` → the colour name of each image's saturated pixels (the nearest of
    the four hues to their circular-mean hue; "red" for an image with none)."""
    rgb = pixels.astype(np.float32) / 255
    high, low = rgb.max(-1), rgb.min(-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0)
    hue = _hue(rgb, high, low)
    names = []
    for image_hue, image_sat, image_val in zip(hue, saturation, high):
        mask = (image_sat > 0.4) & (image_val > 0.3)
        if not mask.any():
            names.append(COLOURS[0])
            continue
        angles = np.radians(image_hue[mask])
        mean = np.degrees(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360
        distance = [abs((mean - HUES[c] + 180) % 360 - 180) for c in COLOURS]
        names.append(COLOURS[int(np.argmin(distance))])
    return names


def _hue(rgb: np.ndarray, high: np.ndarray, low: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    delta = np.maximum(high - low, 1e-6)
    hue = np.where(high == r, (g - b) / delta % 6,
                   np.where(high == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return hue * 60  # degrees


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` → float ``[B, 3, 32, 32]`` in [0, 1] (area-resized if needed)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area")
    return x


class AttributeReadout:
    """The read-out of the module docstring, loaded from ``folder`` (default: the shipped one)."""

    def __init__(self, net: ReadoutNet):
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def load(cls, folder: str | Path = READOUT_DIR) -> "AttributeReadout":
        folder = Path(folder)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no read-out weights at {weights}; train them with "
                                    "python -m m2m_ray.shapes.train readout --out " + str(folder))
        config = json.loads((folder / "config.json").read_text())
        net = ReadoutNet(config["width"])
        net.load_state_dict(load_file(str(weights)))
        return cls(net)

    def save(self, folder: str | Path, **report) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        width = self.net.body[0][0].out_channels
        (folder / "config.json").write_text(json.dumps({"width": width, **report}, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()},
                  str(folder / "model.safetensors"))

    @torch.no_grad()
    def predict(self, pixels: np.ndarray, batch_size: int = 256) -> dict[str, list[str]]:
        """uint8 ``[B, H, W, 3]`` → ``{shape, colour, background, count}``: B names each."""
        out: dict[str, list[str]] = {name: [] for name in (*HEADS, "colour")}
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start:start + batch_size]
            logits = self.net(to_tensor(chunk))
            for name, values in HEADS.items():
                out[name] += [values[i] for i in logits[name].argmax(-1).tolist()]
            out["colour"] += colour_of(chunk)
        return out

    @torch.no_grad()
    def features(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` → float64 ``[B, 4·width]`` pooled CNN features."""
        return np.concatenate([self.net.features(to_tensor(pixels[s:s + batch_size])).double()
                               .numpy() for s in range(0, len(pixels), batch_size)])
