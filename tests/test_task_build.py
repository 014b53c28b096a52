"""Task datasets get MIS stage 2's shard builder (m2m_ray/mis/shards.py): rounds over the pending
shards, a failed round retried, each shard committed exactly once, the manifest rewritten from the
committed stats; a data error (on_bad=error) stops at once, unretried. Real local Ray, real files:
the shapes world's Zero123 layout with one view made unreadable (a folder where a PNG should be:
a storage error, not a data error)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m2m_ray.config import load_config
from m2m_ray.formats.mis import MISLayout
from m2m_ray.formats.mis_read import iter_mis
from m2m_ray.formats.tasks import TaskDataError
from m2m_ray.mis.shards import progress_uri
from m2m_ray.mis.tasks.build import TaskDatasetConfig, run_build_tasks
from m2m_ray.mis.tasks.objaverse import MissingViewError
from m2m_ray.shapes.views import write_objaverse_layout

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_task_build_rounds_retry_commit_once_and_manifest(ray_local, tmp_path):
    raw = tmp_path / "raw"
    uids = write_objaverse_layout(str(raw), count=4, seed=0)
    out = tmp_path / "data"
    cfg = load_config(TaskDatasetConfig, ROOT / "configs/shapes/views_data.yaml",
                      [f"--source={raw}", f"--output_uri={out}", "--units_per_shard=2",
                       "--max_shard_attempts=2", "--progress_interval_s=1000"])
    view = raw / uids[3] / "005.png"  # shard 1 (units 2, 3)
    data = view.read_bytes()
    view.unlink()
    view.mkdir()  # reading it fails with a storage error in every round
    layout = MISLayout(str(out))
    with pytest.raises(RuntimeError, match=r"1 shards still pending after 2 rounds: \[1\]"):
        run_build_tasks(cfg)
    progress = json.loads(Path(progress_uri(layout)).read_text())
    assert progress["state"] == "failed" and progress["failures"] == 2  # both rounds failed
    assert progress["done"]["shards"] == 1 and progress["done"]["units"] == 2
    manifest = json.loads(Path(layout.manifest).read_text())
    assert manifest["committed_shards"] == 1 and manifest["pending_shards"] == [1]
    first = Path(layout.stats(0)).read_bytes()

    view.rmdir()
    view.write_bytes(data)
    manifest = run_build_tasks(cfg)  # the rerun builds only what is pending
    assert Path(layout.stats(0)).read_bytes() == first  # committed once, not redone
    assert (manifest["committed_shards"], manifest["pending_shards"], manifest["sets"]) == (
        2, [], 4)
    assert manifest["progress"]["state"] == "done"
    assert manifest["progress"]["done"] == {"shards": 2, "units": 4, "sets": 4}
    assert sorted(s["caption_id"] >> 32 for s in iter_mis(str(out))) == [0, 1, 2, 3]

    # a data error is the same in every round: raised at once, naming the file, not retried
    broken = tmp_path / "broken"
    shutil.copytree(raw, broken)
    (broken / uids[1] / "002.npy").unlink()
    bad = cfg.model_copy(update={"source": str(broken), "output_uri": str(tmp_path / "bad")})
    with pytest.raises(TaskDataError, match=f"{uids[1]}/002.npy: view file missing") as info:
        run_build_tasks(bad)
    assert type(info.value) is MissingViewError  # the reader's own error, as itself
    bad_progress = json.loads(Path(progress_uri(MISLayout(bad.output_uri))).read_text())
    assert bad_progress["state"] == "failed" and bad_progress["failures"] == 0
