"""Our FID against the field's implementations, on the same small image sets.

- ``legacy_pytorch`` resize vs **torchmetrics** ``FrechetInceptionDistance`` (float64 statistics,
  its own distance): torchmetrics is given, as its ``feature`` module, the same random-weight FID
  Inception behind pytorch-fid's input steps (``ToTensor`` → bilinear ``F.interpolate`` to 299,
  ``align_corners=False`` → ``2x − 1``). torchmetrics' own Inception path needs torch-fidelity,
  which imports torchvision (not installed here, on purpose), so its resize is not compared.
- ``clean`` resize vs **clean-fid**'s computation: its ``cleanfid.resize.build_resizer("clean")``
  and its ``InceptionV3W`` wrapper (``(x − 128)/128`` then the TorchScript network's ``layers``),
  with the random-weight network saved as the TorchScript file it loads. clean-fid's
  ``fid.py`` cannot be imported without torchvision (``cleanfid.utils`` imports it), so its
  statistics and distance (``fid_from_feats``: ``np.mean``, ``np.cov(rowvar=False)``,
  ``frechet_distance`` with ``scipy.linalg.sqrtm`` and its ε retry) are written out below from
  its documented algorithm.

The weights are random (no model download here); they are saved and loaded through the real
checkpoint path (``load_fid_inception``), and the features are 2048-d as with the real weights.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from m2m_ray.eval.config import EvalExtractorsConfig
from m2m_ray.eval.extractors import Extractors, tiny_clip
from m2m_ray.eval.inception import (
    FID_RESIZES,
    fid_input,
    random_fid_inception,
    resize_image,
    scale_input,
)
from m2m_ray.eval.job import CONTEXT, metrics_per_k
from m2m_ray.eval.stats import GroupStats, softmax64

RESIZES = ("legacy_pytorch", "clean")


def _images(seed: int, count: int, size: int) -> list[np.ndarray]:
    """Smooth colour gradients with stripes and noise (so resampling filters matter), uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        base = rng.uniform(0, 255, 3)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x * rng.uniform(3, 40) + y * rng.uniform(3, 40)))
        image = base * (0.4 + 0.6 * stripes[..., None]) + rng.normal(0, 25, (size, size, 3))
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


def test_resizes_equal_clean_fid_resizers_and_the_batch_path():
    """Each resize against clean-fid's own resizer of that mode (cleanfid.resize imports no
    torchvision), and the batched tensor path against the per-image one."""
    from cleanfid.resize import build_resizer

    clean, legacy = build_resizer("clean"), build_resizer("legacy_pytorch")
    for image in (_images(0, 1, 512)[0], _images(1, 1, 64)[0], _images(2, 1, 299)[0]):
        ours_clean = resize_image(image, "clean", 299).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(ours_clean, clean(image))  # same PIL calls: bit-equal
        ours_legacy = resize_image(image, "legacy_pytorch", 299).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours_legacy, legacy(image), rtol=0, atol=1e-4)
        batch = torch.from_numpy(image).permute(2, 0, 1)[None]
        for name in RESIZES:
            expected = scale_input(resize_image(image, name, 299), name)[None]
            torch.testing.assert_close(fid_input(batch, name), expected, rtol=0, atol=1e-5)
    big = _images(3, 1, 512)[0]  # downsampling: the antialiased bicubic and bilinear differ
    assert np.abs(resize_image(big, "clean", 299) - resize_image(big, "legacy_pytorch", 299)
                  ).mean() > 5
    assert set(FID_RESIZES) == set(RESIZES)
    with pytest.raises(ValueError, match="unknown FID resize 'bilinear'"):
        resize_image(big, "bilinear", 299)


class _PytorchFIDInput(nn.Module):
    """torchmetrics' ``feature`` module: pytorch-fid's input steps on uint8 (B, 3, H, W), then the
    network; float64 features, so torchmetrics computes and returns float64."""

    num_features = 2048

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0  # torchvision ToTensor
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # pytorch-fid InceptionV3(normalize_input=True)
        return self.net.forward_input(x)[0].double()


class _Layers(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_input(x)[0]


class _TorchScriptLayout(nn.Module):
    """What clean-fid's ``InceptionV3W`` loads: a TorchScript module with a ``layers`` submodule
    from the scaled 299² input to the 2048 pool features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.layers = _Layers(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _clean_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """clean-fid's ``frechet_distance`` (Danica J. Sutherland's stable version), as documented."""
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def fid_world(tmp_path_factory):
    """A random-weight FID Inception saved as a checkpoint, real (512², downsampled) and
    generated (200², upsampled) PNGs, and our Extractors (kind real) on them."""
    tmp = tmp_path_factory.mktemp("fid")
    net = random_fid_inception(seed=0)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp / "weights.pth")
    digest = hashlib.sha256((tmp / "weights.pth").read_bytes()).hexdigest()[:8]
    weights = tmp / f"pt_inception-random-{digest}.pth"
    (tmp / "weights.pth").rename(weights)
    tiny_clip(0).save_pretrained(tmp / "clip")
    paths = {"real": [], "fake": []}
    for side, seed, size in (("real", 10, 512), ("fake", 11, 200)):
        for i, image in enumerate(_images(seed, 4, size)):
            paths[side].append(tmp / f"{side}_{i}.png")  # lossless, as the generate job writes
            Image.fromarray(image).save(paths[side][-1])
    ext = Extractors(EvalExtractorsConfig(kind="real", inception_weights=str(weights),
                                          clip_model_id=str(tmp / "clip"), dino_model_id=None,
                                          fid_resizes=list(RESIZES), image_batch_size=4))
    groups, features = {}, {}
    for group, side in ((CONTEXT, "real"), (1, "fake")):
        pools, logits = ext.inception_features([Image.open(p) for p in paths[side]])
        stats = GroupStats.empty(2048, 1008, 1, RESIZES)
        for name in RESIZES:
            stats.features[name].update(pools[name])
        stats.classes.update(softmax64(logits), np.zeros(len(logits), np.int64))
        groups[group], features[side] = stats, pools
    row = metrics_per_k(groups, 1, RESIZES)[0]  # the job's own FID computation
    moments = {side: groups[group].features["legacy_pytorch"]
               for group, side in ((CONTEXT, "real"), (1, "fake"))}
    return {"net": net, "paths": paths, "features": features, "row": row, "tmp": tmp,
            "moments": moments}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_legacy_pytorch_fid_equals_torchmetrics(fid_world):
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_PytorchFIDInput(fid_world["net"]), normalize=False)
    reference = {}
    for side in ("real", "fake"):
        batch = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB")))
                             .permute(2, 0, 1) for p in fid_world["paths"][side]])
        metric.update(batch, real=side == "real")
        with torch.no_grad():
            reference[side] = metric.inception(batch).numpy()
    for side in ("real", "fake"):  # the same 2048-d features, image by image
        ours = fid_world["features"][side]["legacy_pytorch"]
        assert ours.shape == (4, 2048)
        np.testing.assert_allclose(ours, reference[side], rtol=1e-4, atol=1e-6)
    # The float64 sums over the whole set are torchmetrics' metric states.
    moments = fid_world["moments"]
    for side, prefix in (("real", "real"), ("fake", "fake")):
        assert int(getattr(metric, f"{prefix}_features_num_samples")) == moments[side].count
        np.testing.assert_allclose(getattr(metric, f"{prefix}_features_sum").numpy(),
                                   moments[side].total, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(getattr(metric, f"{prefix}_features_cov_sum").numpy(),
                                   moments[side].outer, rtol=1e-4, atol=1e-5)
    expected = float(metric.compute())
    ours = fid_world["row"]["fid_legacy_pytorch"]
    assert ours == pytest.approx(expected, rel=1e-4)  # measured: 2e-6
    # The comparison can tell the resizes apart: the clean FID is another number.
    assert abs(fid_world["row"]["fid_clean"] - expected) > 0.05 * expected


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_clean_fid_equals_clean_fid_reference(fid_world):
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    tmp = fid_world["tmp"]
    traced = torch.jit.trace(_TorchScriptLayout(fid_world["net"]), torch.zeros(1, 3, 299, 299))
    traced.save(str(tmp / "inception-2015-12-05.pt"))
    model = InceptionV3W(str(tmp), download=False, resize_inside=False).eval()
    fn_resize = build_resizer("clean")
    feats = {}
    for side in ("real", "fake"):
        # cleanfid.utils.ResizeDataset: PIL RGB → uint8 array → resizer (float32) → ToTensor
        # (float input: HWC → CHW, no scaling) → batch → InceptionV3W.
        batch = torch.stack([torch.from_numpy(fn_resize(np.array(Image.open(p).convert("RGB")))
                                              .transpose((2, 0, 1)).copy())
                             for p in fid_world["paths"][side]])
        with torch.no_grad():
            feats[side] = model(batch).numpy()
        np.testing.assert_allclose(fid_world["features"][side]["clean"], feats[side],
                                   rtol=1e-4, atol=1e-6)
    mu1, sigma1 = np.mean(feats["real"], axis=0), np.cov(feats["real"], rowvar=False)
    mu2, sigma2 = np.mean(feats["fake"], axis=0), np.cov(feats["fake"], rowvar=False)
    expected = _clean_fid_frechet(mu1, sigma1, mu2, sigma2)
    assert fid_world["row"]["fid_clean"] == pytest.approx(expected, rel=1e-4)  # measured: 3e-7
    assert abs(fid_world["row"]["fid_legacy_pytorch"] - expected) > 0.05 * expected
