"""The Objaverse NVS reader (Zero123's render layout) and the shapes world's novel-view task that
writes that layout: the views read back as written, their cameras' relative poses are the orbit's,
the azimuth read-out is accurate (and can fail), and every malformed entry is an error naming the
file or a counted skip of the whole object. Local files, plus one round trip through moto S3."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from m2m_ray.config import StorageConfig
from m2m_ray.data.tasks import relative_cameras
from m2m_ray.formats.tasks import TaskDataError
from m2m_ray.mis.tasks import TaskReadReport
from m2m_ray.mis.tasks.objaverse import (
    composite_on_white,
    iter_objaverse_sets,
    list_objects,
    read_object,
)
from m2m_ray.shapes import views

# Read-out thresholds from its measurement (module docstring of views.py: 2000 renders, median
# 0.36°, 90th percentile 0.92°, max 2.7°), with headroom for a small sample.
MEDIAN_MAX_DEG, WORST_MAX_DEG = 1.0, 4.0


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A layout of 3 boxes, written once: ``(root, uids)``."""
    root = tmp_path_factory.mktemp("views") / "renders"
    return root, views.write_objaverse_layout(str(root), count=3, seed=0)


@pytest.fixture
def layout(written, tmp_path):
    """A private copy of the written layout, for tests that break it."""
    root, uids = written
    copy = tmp_path / "renders"
    shutil.copytree(root, copy)
    return copy, uids


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Right-handed rotation by ``degrees`` about the unit ``axis`` (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


# --- (a) the shapes views read back through the Objaverse reader ------------------------------


def test_views_read_back_as_written(written):
    root, uids = written
    assert json.loads((root / "valid_paths.json").read_text()) == uids
    assert list_objects(str(root)) == uids
    for uid in uids:
        task_set = read_object(str(root), uid)
        assert task_set.set_id == uid and task_set.caption is None and task_set.image_ext == "png"
        assert task_set.source == {"root": str(root), "uid": uid, "views": list(range(12))}
        assert task_set.camera.shape == (12, 3, 4) and task_set.camera.dtype == np.float64
        for k, png in enumerate(task_set.images):
            rgb = _decode(png)
            with Image.open(root / uid / f"{k:03d}.png") as source:
                assert source.mode == "RGBA"
                rgba = np.asarray(source)
            assert rgb.shape == (32, 32, 3)
            assert (rgb[rgba[..., 3] == 0] == 255).all(), "background not white"
            assert (rgba[..., 3] == 0).mean() > 0.3 and (rgba[..., 3] == 255).mean() > 0.2
            opaque = rgba[..., 3] == 255
            assert (rgb[opaque] == rgba[..., :3][opaque]).all()
            np.testing.assert_array_equal(task_set.camera[k], np.load(root / uid / f"{k:03d}.npy"))


def test_cameras_follow_the_orbit(written):
    """Relative to view 0, view k is the camera turned by 30·k° about world up (the −Z forward,
    +Y up Blender convention): in camera-0 coordinates a rotation about ``R₀ · e_z`` by −30k°."""
    root, uids = written
    cameras = read_object(str(root), uids[0]).camera
    azimuths = views.camera_azimuth(cameras)
    np.testing.assert_allclose(views.azimuth_error(azimuths, azimuths[0] + 30 * np.arange(12)),
                               0, atol=1e-9)
    positions = -np.einsum("kji,kj->ki", cameras[:, :, :3], cameras[:, :, 3])
    np.testing.assert_allclose(np.linalg.norm(positions, axis=1), views.RADIUS)
    np.testing.assert_allclose(np.degrees(np.arcsin(positions[:, 2] / views.RADIUS)), 30)
    relative = relative_cameras(cameras).reshape(12, 3, 4).astype(np.float64)
    np.testing.assert_allclose(relative[0], np.eye(3, 4), atol=1e-6)
    up = cameras[0, :, :3] @ np.array([0.0, 0.0, 1.0])   # world up in camera-0 coordinates
    for k in range(1, 12):
        np.testing.assert_allclose(relative[k, :, :3], _rotation(up, -30.0 * k), atol=1e-5)
        np.testing.assert_allclose(relative[k, :, :3] @ up, up, atol=1e-5)
    # Camera 0 looks down its −Z at the origin; image up is world +Z's side.
    forward = cameras[0, :, :3].T @ np.array([0.0, 0.0, -1.0])
    np.testing.assert_allclose(forward, -positions[0] / views.RADIUS, atol=1e-12)
    assert up[1] > 0 and abs(up[0]) < 1e-12


def test_view_order_and_listing_without_valid_paths(layout):
    root, uids = layout
    full = read_object(str(root), uids[1])
    subset = read_object(str(root), uids[1], order=[3, 0, 11])
    assert subset.images == [full.images[i] for i in (3, 0, 11)]
    np.testing.assert_array_equal(subset.camera, full.camera[[3, 0, 11]])
    first = read_object(str(root), uids[1], views=4)
    assert len(first.images) == 4
    for bad in ([0, 0], [12], [-1], []):
        with pytest.raises(ValueError, match="view order"):
            read_object(str(root), uids[1], order=bad)
    (root / "valid_paths.json").unlink()
    (root / "notes.txt").write_text("a file, not an object")
    (root / ".cache").mkdir()
    assert list_objects(str(root)) == sorted(uids)


# --- (b) the viewpoint read-out ------------------------------------------------------------------


def test_read_azimuth_is_accurate_on_fresh_renders_and_can_fail():
    rng = np.random.default_rng(7)
    errors, wrong = [], []
    for _ in range(40):
        box = views.sample_box(rng)
        image = composite_on_white(views.render_rgba(box, views.orbit_cameras(
            box.base_azimuth, views=1)[0]))
        read = views.read_azimuth(image)
        errors.append(views.azimuth_error(read, box.base_azimuth))
        other = box.base_azimuth + rng.uniform(20, 340)  # the render of another azimuth
        wrong.append(views.azimuth_error(read, other) - views.azimuth_error(other,
                                                                           box.base_azimuth))
    assert np.median(errors) < MEDIAN_MAX_DEG and max(errors) < WORST_MAX_DEG, errors
    # Against the wrong azimuth, the error is the azimuths' distance, within the read-out's error.
    assert max(abs(w) for w in wrong) < WORST_MAX_DEG


def test_read_azimuth_on_views_read_back(written):
    """The read-out on the reader's composited PNGs agrees with the stored poses' azimuths."""
    root, uids = written
    task_set = read_object(str(root), uids[2])
    read = [views.read_azimuth(_decode(png)) for png in task_set.images]
    errors = views.azimuth_error(read, views.camera_azimuth(task_set.camera))
    assert errors.max() < WORST_MAX_DEG, errors
    shifted = views.azimuth_error(read, views.camera_azimuth(task_set.camera[np.roll(
        np.arange(12), 1)]))
    assert shifted.min() > 30 - WORST_MAX_DEG  # each image against its neighbour's pose


def test_azimuth_error_and_blank_image():
    assert views.azimuth_error(350, 10) == pytest.approx(20)
    assert views.azimuth_error(0, 180) == pytest.approx(180)
    assert views.azimuth_error(-90, 270) == pytest.approx(0)
    np.testing.assert_allclose(views.azimuth_error([0, 90], [359, 300]), [1, 150])
    assert math.isnan(views.read_azimuth(np.full((32, 32, 3), 255, np.uint8)))


def test_cli_writes_the_layout(tmp_path):
    assert views.main(["--out", str(tmp_path / "out"), "--count", "1", "--seed", "3"]) == 0
    (uid,) = json.loads((tmp_path / "out" / "valid_paths.json").read_text())
    assert uid == views.object_uid(3, 0)
    assert sorted(p.name for p in (tmp_path / "out" / uid).iterdir()) == sorted(
        f"{k:03d}.{ext}" for k in range(12) for ext in ("png", "npy"))


# --- (c) malformed entries: an error naming the file, or a counted skip of the whole object -----


def _save_npy(path, array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    path.write_bytes(buffer.getvalue())


def _save_png(path, mode):
    Image.new(mode, (32, 32), 128).save(path)


def _pose(path):
    return np.load(path)


BREAKAGES = {
    # name: (how to break object 0, the file named, the reason counted)
    "missing png": (lambda d: (d / "005.png").unlink(), "005.png", "MissingViewError"),
    "missing npy": (lambda d: (d / "011.npy").unlink(), "011.npy", "MissingViewError"),
    "pose 4x4": (lambda d: _save_npy(d / "007.npy", np.eye(4)), "007.npy", "BadPoseError"),
    "pose nan": (lambda d: _save_npy(d / "002.npy", np.full((3, 4), np.nan)), "002.npy",
                 "BadPoseError"),
    "pose scaled": (lambda d: _save_npy(d / "003.npy", 2 * _pose(d / "003.npy")), "003.npy",
                    "BadPoseError"),
    "pose not npy": (lambda d: (d / "004.npy").write_bytes(b"not numpy"), "004.npy",
                     "BadPoseError"),
    "png RGB": (lambda d: _save_png(d / "001.png", "RGB"), "001.png", "NoAlphaError"),
    "png L": (lambda d: _save_png(d / "009.png", "L"), "009.png", "NoAlphaError"),
    "png corrupt": (lambda d: (d / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"), "000.png",
                    "BadImageError"),
    "folder missing": (lambda d: shutil.rmtree(d), "", "MissingObjectError"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_malformed_object_is_an_error_naming_the_file_or_a_counted_skip(layout, name):
    root, uids = layout
    breaks, file_name, reason = BREAKAGES[name]
    breaks(root / uids[0])
    named = str(root / uids[0] / file_name) if file_name else str(root / uids[0])
    with pytest.raises(TaskDataError, match=re.escape(named)) as caught:
        read_object(str(root), uids[0])
    assert type(caught.value).__name__ == reason
    if reason == "NoAlphaError":
        assert "expected RGBA" in str(caught.value)
    with pytest.raises(TaskDataError, match=re.escape(named)):
        list(iter_objaverse_sets(str(root)))

    report = TaskReadReport()
    sets = list(iter_objaverse_sets(str(root), on_bad="skip", report=report))
    assert [s.set_id for s in sets] == uids[1:]           # the others still read, whole
    assert all(len(s.images) == 12 for s in sets)
    assert report.sets == 2 and report.skipped == Counter({reason: 1})
    assert named in report.examples[0]


@pytest.mark.parametrize("content, match", [
    ("{not json", "not JSON"),
    ('{"uid": 1}', "JSON list"),
    ('["a", "../b"]', "JSON list"),
    ('["a", "a/"]', "listed twice"),
])
def test_malformed_valid_paths_is_an_error_naming_it(layout, content, match):
    root, _ = layout
    (root / "valid_paths.json").write_text(content)
    with pytest.raises(TaskDataError, match=re.escape(str(root / "valid_paths.json")) + ".*"
                       + match):
        list_objects(str(root))


def test_missing_root_and_bad_on_bad(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        list_objects(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="on_bad"):
        list(iter_objaverse_sets(str(tmp_path), on_bad="ignore"))


# --- (d) through S3 ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.ray
def test_round_trip_on_s3(s3_bucket, written):
    endpoint, bucket = s3_bucket
    cfg = StorageConfig(endpoint_url=endpoint)
    root = f"s3://{bucket}/renders"
    uids = views.write_objaverse_layout(root, count=2, seed=0, storage_cfg=cfg)
    local_root, local_uids = written
    assert uids == local_uids[:2] and list_objects(root, cfg) == uids
    remote = read_object(root, uids[0], cfg)
    local = read_object(str(local_root), uids[0])
    assert remote.images == local.images and remote.source["root"] == root
    np.testing.assert_array_equal(remote.camera, local.camera)

    from m2m_ray import storage

    storage.remove(storage.join(root, "valid_paths.json"), cfg)
    assert list_objects(root, cfg) == sorted(uids)
    storage.remove(storage.join(root, uids[1], "006.png"), cfg)
    with pytest.raises(TaskDataError, match=re.escape(f"{root}/{uids[1]}/006.png")):
        read_object(root, uids[1], cfg)
    report = TaskReadReport()
    assert [s.set_id for s in iter_objaverse_sets(root, cfg, on_bad="skip", report=report)] == [
        uids[0]]
    assert report.skipped == Counter({"MissingViewError": 1})
