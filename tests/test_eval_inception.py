"""The plain-torch FID Inception against what the public sources say the real checkpoint holds.

What is known without downloading ``pt_inception-2015-12-05-6726825d.pth`` (no internet here):
- pytorch-fid loads it with ``load_state_dict`` (strict) into torchvision's Inception3 built with
  ``num_classes=1008, aux_logits=False``; torch-fidelity loads its file of the same name and hash
  (strict) into its own module with the same parameter names;
- torch-fidelity's converter (utils/util_convert_inception_weights.py) writes, for every conv of the
  TF graph, ``<prefix>.conv.weight`` and ``<prefix>.bn.{weight,bias,running_mean,running_var}`` —
  no ``num_batches_tracked`` — plus ``fc.weight`` / ``fc.bias``; its map lists the 94 conv prefixes
  spelled out in ``CONV_PREFIXES`` below;
- torchvision's Inception-v3 (1000 classes, with the aux head) has 27,161,264 parameters
  (``Inception_V3_Weights.IMAGENET1K_V1.meta["num_params"]``). Without the aux head (3,326,696) and
  with 1008 classes (+8 × 2049) that is 23,850,960.
Not verified here: the tensors' values, and that the FID of real images matches pytorch-fid's.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from m2m_ray.eval.inception import (
    FIDInceptionV3,
    load_fid_inception,
    random_fid_inception,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3", "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
      "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
      "branch7x7x3_4"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
      "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
CONV_PREFIXES = (
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    + [f"{block}.{branch}" for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for branch in _A]
    + [f"Mixed_6a.{branch}" for branch in _B]
    + [f"{block}.{branch}" for block in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")
       for branch in _C]
    + [f"Mixed_7a.{branch}" for branch in _D]
    + [f"{block}.{branch}" for block in ("Mixed_7b", "Mixed_7c") for branch in _E]
)
# (out, in, kh, kw) of a few convs whose shapes the TF graph fixes (torchvision's layer table).
KNOWN_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _checkpoint_keys() -> set[str]:
    keys = {f"{p}.conv.weight" for p in CONV_PREFIXES}
    keys |= {f"{p}.bn.{name}" for p in CONV_PREFIXES
             for name in ("weight", "bias", "running_mean", "running_var")}
    return keys | {"fc.weight", "fc.bias"}


def test_state_dict_matches_the_published_checkpoint_layout():
    assert len(CONV_PREFIXES) == 94
    with torch.device("meta"):
        model = FIDInceptionV3()
    state = model.state_dict()
    tracked = {k for k in state if k.endswith("num_batches_tracked")}
    assert set(state) - tracked == _checkpoint_keys()
    for key, shape in KNOWN_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def test_load_real_layout_checkpoint_and_forward(tmp_path):
    reference = FIDInceptionV3().eval()
    for module in reference.modules():  # non-trivial BN statistics, so loading them matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    # A plain dict as the converter writes it: no num_batches_tracked entries.
    state = {k: v for k, v in reference.state_dict().items() if k in _checkpoint_keys()}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    named = tmp_path / f"pt_inception-test-{digest}.pth"
    path.rename(named)

    model = load_fid_inception(str(named))
    loaded = model.state_dict()
    assert [k for k, v in state.items() if not torch.equal(loaded[k], v)] == []
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        pool, logits = model(images)
        unbiased = pool @ reference.fc.weight.T
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(pool).all() and (pool >= 0).all()  # mean of ReLU outputs
    torch.testing.assert_close(logits, unbiased)  # logits without the fc bias, as IS uses

    wrong_hash = tmp_path / "pt_inception-test-00000000.pth"
    wrong_hash.write_bytes(named.read_bytes())
    with pytest.raises(ValueError, match="does not match the sha256 prefix 00000000"):
        load_fid_inception(str(wrong_hash))
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3 state_dict"):
        load_fid_inception(str(tmp_path / "partial.pth"))
    with pytest.raises(FileNotFoundError, match="--extractors.kind=tiny"):
        load_fid_inception(str(tmp_path / "missing.pth"))


def test_random_weights_keep_scale_and_the_resize_is_an_input_choice():
    """The random-weight net the FID reference tests use gives features that differ per image
    (PyTorch's default init collapses them to ~1e-8, every FID ≈ 0); ``forward`` takes the
    resize by name (default legacy_pytorch) and ``forward_input`` the prepared input."""
    from m2m_ray.eval.inception import fid_input

    model = random_fid_inception(seed=1)
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        legacy, _ = model(images)
        clean, _ = model(images, "clean")
        again, _ = random_fid_inception(seed=1).forward_input(fid_input(images, "legacy_pytorch"))
    torch.testing.assert_close(legacy, again)
    assert legacy.std() > 0.1 and (legacy[0] - legacy[1]).abs().mean() > 1e-3
    assert (clean - legacy).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="unknown FID resize 'bicubic'"):
        model(images, "bicubic")
