"""The FID Inception-v3 in plain torch (no torchvision), for the standard FID/IS weights, and the
two input resizes FID is reported with.

The standard weights are TensorFlow's ``inception-2015-12-05`` graph converted to PyTorch as
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid; torch-fidelity and torchmetrics load the
same file name and hash). The network is torchvision's Inception-v3 layout with 1008 classes and
no auxiliary head, plus the TF graph's quirks that FID depends on: average pools that do not count
padding (Mixed_5*, 6b–6e, 7b) and a max pool in the last block's pool branch (Mixed_7c). Parameter
names are the checkpoint's: ``<block>.<branch>.conv.weight`` and
``<block>.<branch>.bn.{weight,bias,running_mean,running_var}`` for every conv, then ``fc.weight``
(1008, 2048) and ``fc.bias``.

Outputs per image: the 2048-d pool features (FID) and the 1008 unbiased logits
``pool @ fc.weight.T`` (IS; as torch-fidelity and the original IS code, which omit the bias).

Input resizes (``FID_RESIZES``; the names are clean-fid's modes, Parmar et al., "On Aliased
Resizing and Surprising Subtleties in GAN Evaluation", CVPR 2022):

- ``legacy_pytorch``: pytorch-fid's input path — ``F.interpolate(bilinear, align_corners=False)``
  without antialiasing to 299×299 on [0, 255] floats, then ``x / 127.5 − 1`` (pytorch-fid's
  ``2·x − 1`` on [0, 1]). clean-fid's ``legacy_pytorch`` mode is the same.
- ``clean``: clean-fid's ``clean`` mode — each channel resized on its own as a float32 PIL image
  (mode ``F``) with PIL's bicubic filter (antialiased when downsampling), no quantisation to
  uint8, clipped to [0, 255]; then ``(x − 128) / 128``, the TF graph's own input scaling, as
  clean-fid applies before the network.

Both feed the same network, so with the standard weights the two FIDs differ only by the resize
(and the scaling constant, 127.5 vs 128). torchmetrics 1.9 resizes inside torch-fidelity's
network (bilinear with ``antialias=True`` by default, TF1-style bilinear with
``antialias=False``) and scales by ``(x − 128) / 128``: neither mode here. Its float64 statistics
and distance agree with ours given the same features, and clean-fid's resizer and network wrapper
with ``clean`` (tests/test_eval_fid_reference.py). For 299×299 images every resize is the
identity.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from m2m_ray import storage as st

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
FID_RESIZES = {  # name → what it does (to the network's input size, 299² for Inception)
    "legacy_pytorch": "bilinear (torch F.interpolate, align_corners=False, no antialias) to "
                      "the input size, x/127.5 − 1: pytorch-fid, clean-fid mode legacy_pytorch",
    "clean": "PIL bicubic on float32 per channel (antialiased, not quantised) to the input "
             "size, clipped to [0, 255], (x − 128)/128: clean-fid mode clean",
}


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, as TF) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class InceptionE(nn.Module):
    """``max_pool=False``: Mixed_7b (average pool without padding); True: Mixed_7c (max pool)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _avg_pool_no_pad(x))
        branch_pool = self.branch_pool(pooled)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID graph: ``forward(images)`` → pool (B, 2048), logits (B, 1008)."""

    input_size = INPUT_SIZE
    feature_dim = FEATURE_DIM
    num_classes = NUM_CLASSES

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor,
                resize: str = "legacy_pytorch") -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: (B, 3, H, W) RGB with values in [0, 255] (any size), resized to 299 and
        scaled as ``resize`` (a ``FID_RESIZES`` name) says → pool (B, 2048), logits (B, 1008)."""
        return self.forward_input(fid_input(images, resize, INPUT_SIZE))

    def forward_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the network input (B, 3, 299, 299), already resized and scaled (``fid_input``)
        → pool features (B, 2048) and unbiased logits (B, 1008)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048)
        logits = pool @ self.fc.weight.T  # (B, 1008), unbiased as in the IS code
        return pool, logits


def _check_resize(resize: str) -> None:
    if resize not in FID_RESIZES:
        raise ValueError(f"unknown FID resize {resize!r}; expected one of {sorted(FID_RESIZES)}")


def resize_image(pixels: np.ndarray, resize: str, size: int) -> torch.Tensor:
    """One RGB image, (H, W, 3) uint8, resized to (3, size, size) float32 in [0, 255] as
    ``resize`` does (``FID_RESIZES``; not yet scaled). Raises ``ValueError`` for another name or
    shape."""
    _check_resize(resize)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {pixels.shape}")
    if resize == "clean":
        return _clean_float(pixels.astype(np.float32), size)
    image = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)[0]


def scale_input(x: torch.Tensor, resize: str) -> torch.Tensor:
    """[0, 255] → the network's input range, as the source of ``resize`` scales: pytorch-fid's
    ``x/127.5 − 1`` for ``legacy_pytorch``, the TF graph's ``(x − 128)/128`` for ``clean``."""
    _check_resize(resize)
    return x / 127.5 - 1.0 if resize == "legacy_pytorch" else (x - 128.0) / 128.0


def fid_input(images: torch.Tensor, resize: str, size: int = INPUT_SIZE) -> torch.Tensor:
    """A batch (B, 3, H, W) in [0, 255] → network input (B, 3, size, size), resized and scaled as
    ``resize`` says. ``legacy_pytorch`` stays on the batch's device; ``clean`` resizes each image
    with PIL on the CPU (as clean-fid does) and moves the result back."""
    _check_resize(resize)
    if resize == "clean":
        pixels = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
        resized = torch.stack([_clean_float(p, size) for p in pixels]).to(images.device)
    else:
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                                align_corners=False)
    return scale_input(resized, resize)  # (B, 3, size, size)


def _clean_float(pixels: np.ndarray, size: int) -> torch.Tensor:
    """clean-fid's clean resize of an (H, W, 3) float image in [0, 255]: one float32 PIL image
    (mode F) per channel, bicubic to size × size, clipped → (3, size, size) float32."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c], np.float32))
                           .resize((size, size), Image.BICUBIC)) for c in range(3)]
    return torch.from_numpy(np.stack(channels).clip(0, 255).astype(np.float32))


def random_fid_inception(seed: int) -> FIDInceptionV3:
    """The FID Inception with seeded random weights that keep activations at unit scale (He
    normal convs, identity batch norms), for tests and benchmarks without the real checkpoint:
    its features measure nothing. (PyTorch's default conv init shrinks the activations ~10⁸×
    over the 94 convs, which makes every FID ≈ 0.)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FIDInceptionV3()
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval().requires_grad_(False)


def _read_checkpoint(source: str, storage: "StorageConfig | None") -> bytes:
    if re.match(r"^https?://", source):
        from urllib.request import urlopen

        cache = os.path.join(os.environ.get("TORCH_HOME", os.path.expanduser("~/.cache/torch")),
                             "m2m_ray", os.path.basename(source))
        if not os.path.exists(cache):
            with urlopen(source, timeout=60) as response:
                data = response.read()
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache + ".partial", "wb") as f:
                f.write(data)
            os.replace(cache + ".partial", cache)
        with open(cache, "rb") as f:
            return f.read()

    return st.read_bytes(source, storage)


def load_fid_inception(source: str = FID_WEIGHTS_URL,
                       storage: "StorageConfig | None" = None) -> FIDInceptionV3:
    """The FID Inception with the weights at ``source`` (local path, s3:// URI or http(s) URL).

    A file name with torch hub's ``-<sha256 prefix>.pth`` tail is checked against its content.
    """
    try:
        data = _read_checkpoint(source, storage)
    except Exception as err:  # offline, missing file, S3 errors
        raise FileNotFoundError(
            f"could not read the FID Inception weights from {source!r} ({type(err).__name__}: "
            f"{err}). Download {FID_WEIGHTS_URL} once where there is internet and set "
            "extractors.inception_weights to its local path or s3:// copy; for an offline run "
            "without real weights use --extractors.kind=tiny (numbers are then meaningless)."
        ) from err
    tail = re.search(r"-([0-9a-f]{8,})\.pth?$", os.path.basename(source))
    if tail and not hashlib.sha256(data).hexdigest().startswith(tail.group(1)):
        raise ValueError(f"{source!r}: content does not match the sha256 prefix {tail.group(1)} "
                         "in its name; the file is corrupt or not the FID Inception weights")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source!r} is not an FID Inception-v3 state_dict "
                         f"(pt_inception-2015-12-05): {err}") from None
    return model.eval().requires_grad_(False)
