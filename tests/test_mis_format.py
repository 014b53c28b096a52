"""The MIS field table (``m2m_ray/formats/mis_fields.py``): every field of a set reads back equal
from both formats through every reader and engine; null and missing columns read as defaults; a
field added to the table alone round-trips. Shards are written with ``ShardWriter`` directly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2m_ray.config import load_config
from m2m_ray.formats import mis_fields
from m2m_ray.formats.mis import MISLayout, ShardWriter
from m2m_ray.formats.mis_fields import (
    MIS_FIELDS,
    CorruptShardError,
    MISField,
    MISSample,
    SetRecord,
    from_stored_row,
    latents_to_npy,
    parquet_schema,
)
from m2m_ray.formats.mis_read import decode_latents, iter_mis, iter_sets, iter_shard, read_mis

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["parquet", "webdataset"]
N = 3  # images per set


def _record(cid: int, latents: bool, task: bool) -> SetRecord:
    return SetRecord(
        caption_id=cid, shard_id=0, split="test" if cid % 2 else "train",
        caption=f"caption {cid}", url=f"http://x/{cid}", seeds=[10 * cid + i for i in range(N)],
        images=[f"image {cid}.{i}".encode() for i in range(N)], image_ext="jpg",
        latents=latents_to_npy(np.full((N, 4, 8, 8), cid, np.float32)) if latents else None,
        metadata={"image_format": "jpeg", "steps": cid, "guidance": 7.5},
        task={"position": list(range(N))} if task else None)


# two row groups: the first with latents throughout, the second mixed
GROUPS = [[_record(1, True, True), _record(2, True, False)],
          [_record(3, False, True), _record(4, False, False), _record(5, True, False)]]
RECORDS = [r for group in GROUPS for r in group]


def _write(root, groups, sid: int = 0) -> MISLayout:
    layout = MISLayout(str(root))
    writer = ShardWriter(layout, sid, FORMATS)
    for group in groups:
        writer.add(group)
    writer.commit({})
    return layout


def _uri(layout: MISLayout, fmt: str, sid: int = 0) -> str:
    return layout.parquet(sid) if fmt == "parquet" else layout.webdataset(sid)


@pytest.fixture(scope="module")
def mis(tmp_path_factory) -> MISLayout:
    return _write(tmp_path_factory.mktemp("mis"), GROUPS)


def _want(columns=None, records=RECORDS) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(r).items() if columns is None or k in columns}
            for r in records]


def test_table_record_and_sample_agree():
    names = [f.name for f in MIS_FIELDS]
    assert [f.name for f in dataclasses.fields(SetRecord)] == names
    assert list(MISSample.__annotations__) == names
    assert parquet_schema().names == names and pa.null() not in parquet_schema().types


def test_writer_refuses_a_missing_required_field_and_derives_image_ext(tmp_path):
    writer = ShardWriter(MISLayout(str(tmp_path)), 0, FORMATS)
    with pytest.raises(ValueError, match="set 1: MIS field caption is required but None"):
        writer.add([{**dataclasses.asdict(RECORDS[0]), "caption": None}])
    writer.add([{k: v for k, v in dataclasses.asdict(RECORDS[0]).items() if k != "image_ext"}])
    writer.commit({})
    for fmt in FORMATS:
        assert list(iter_mis(str(tmp_path), fmt)) == _want(records=RECORDS[:1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_field_round_trips_through_every_local_reader(mis, fmt):
    uri = _uri(mis, fmt)
    assert list(iter_shard(uri)) == _want()
    assert list(iter_mis(mis.root, fmt)) == _want()
    assert list(iter_mis(mis.root, fmt, split="test")) == _want(
        records=[r for r in RECORDS if r.split == "test"])
    for columns in (["caption_id"], ["metadata", "task"], ["latents", "images", "image_ext"]):
        assert list(iter_shard(uri, columns=columns)) == _want(columns)
        assert list(iter_mis(mis.root, fmt, split="train", columns=columns)) == _want(
            columns, [r for r in RECORDS if r.split == "train"])
    with pytest.raises(ValueError, match=r"columns \['rating'\] are no MIS fields"):
        list(iter_shard(uri, columns=["caption_id", "rating"]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_reader_columns_and_images_for_sets_without_latents(mis, fmt):
    uri = _uri(mis, fmt)
    for columns in (["caption_id", "split", "latents", "images", "task"], ["task"], ["split"]):
        assert list(iter_sets(uri, None, columns)) == _want(columns)
    # latents without images: a set lacking latents brings its images (Parquet: only the row
    # groups whose statistics count null latents read the images column)
    got = list(iter_sets(uri, None, ["caption_id", "latents"]))
    assert got == [{"caption_id": r.caption_id, "latents": r.latents,
                    **({} if r.latents is not None else {"images": r.images})} for r in RECORDS]
    assert decode_latents(got[0]["latents"], "here").shape == (N, 4, 8, 8)


def _train_stream(layout: MISLayout, fmt: str, tmp_path: Path, task_kinds=()):
    """A real training stream (configs/tiny/train.yaml) over shard 0 of ``layout``."""
    from m2m_ray.data.training import plan_stream, use_stored_latents
    from m2m_ray.train.config import TrainConfig

    base = load_config(TrainConfig, ROOT / "configs/tiny/train.yaml").model_dump()
    base.update(data={**base["data"], "uri": layout.root, "format": fmt, "latents": "auto",
                      "split": None, "images_per_set": 2},
                storage_path=str(tmp_path / "train"), export_uri=None)
    cfg = TrainConfig.model_validate(base)
    shards = (_uri(layout, fmt),)
    stored = use_stored_latents(cfg, shards)
    return dataclasses.replace(plan_stream(cfg, shards, 4.0, stored, 0, 1, None, 0),
                               task_kinds=task_kinds)


def test_webdataset_training_keeps_stored_latents(tmp_path):
    """The bug this table fixed: training on data.format=webdataset read no stored latents
    (``iter_webdataset_shard(decode=False)`` gave None) and VAE-encoded the images instead."""
    from m2m_ray.data.training import read_item

    layout = _write(tmp_path / "mis", [[_record(cid, True, False) for cid in range(1, 5)]])
    stream = _train_stream(layout, "webdataset", tmp_path)
    assert stream.use_stored_latents
    (block,) = read_item({"id": np.array([0])}, stream, None)
    assert "pixels" not in block and block["latents"].shape == (4, 2, 4, 8, 8)
    for cid, indices, latents in zip(block["caption_id"], block["indices"], block["latents"]):
        assert np.array_equal(latents, np.full((N, 4, 8, 8), cid, np.float16)[indices])


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_on_a_plain_mis_asks_for_a_task_dataset(mis, fmt, tmp_path):
    from m2m_ray.data.training import _sample_row

    stream = _train_stream(mis, fmt, tmp_path, task_kinds=("position",))
    uri = _uri(mis, fmt)
    by_id = {s["caption_id"]: s for s in iter_sets(uri, None, ["caption_id", "latents", "task"])}
    assert _sample_row(by_id[1], stream, 0, uri)["position"].shape == (2,)
    with pytest.raises(CorruptShardError, match="has no task conditions: it is a MIS set, not a "
                                                "task dataset's"):
        _sample_row(by_id[2], stream, 0, uri)


def _older_parquet(layout: MISLayout, drop: list[str], null: list[str]) -> list[dict]:
    """Rewrite shard 0's Parquet file without the columns ``drop`` and with the columns ``null``
    all null (untyped: Arrow's null type, as an engine that saw no value writes them)."""
    table = pq.read_table(layout.parquet(0)).drop_columns(drop)
    for name in null:
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.nulls(table.num_rows))
    pq.write_table(table, layout.parquet(0))
    return table.to_pylist()


@pytest.mark.parametrize("null", [True, False])
def test_null_and_missing_columns_read_as_defaults(tmp_path, null):
    layout = _write(tmp_path, GROUPS)
    _older_parquet(layout, ["image_ext"] + ([] if null else ["task"]), ["task"] if null else [])
    assert ("task" in pq.read_schema(layout.parquet(0)).names) == null
    want = [{**s, "task": None} for s in _want()]  # image_ext follows from metadata
    assert list(iter_shard(layout.parquet(0))) == want
    assert list(iter_sets(layout.parquet(0), None, ["caption_id", "task"])) == [
        {"caption_id": s["caption_id"], "task": None} for s in want]
    assert list(iter_shard(layout.parquet(0), columns=["image_ext"])) == [
        {"image_ext": "jpg"}] * len(RECORDS)


RATING = MISField("rating", pa.float64(), optional=True, default=-1.0)


@pytest.fixture
def rated(monkeypatch):
    """The table with one more field, nothing else changed: sets written as samples."""
    monkeypatch.setattr(mis_fields, "MIS_FIELDS", (*MIS_FIELDS, RATING))
    return [{**dataclasses.asdict(r), "rating": None if r.caption_id == 2 else r.caption_id / 4}
            for r in RECORDS]


def test_a_field_added_to_the_table_round_trips_locally(rated, tmp_path):
    layout = _write(tmp_path, [rated])
    assert pq.read_schema(layout.parquet(0)).field("rating").type == pa.float64()
    want = [{**s, "rating": -1.0 if s["rating"] is None else s["rating"]} for s in rated]
    for fmt in FORMATS:
        assert list(iter_mis(layout.root, fmt)) == want
        assert list(iter_sets(_uri(layout, fmt), None, ["caption_id", "rating"])) == [
            {"caption_id": s["caption_id"], "rating": s["rating"]} for s in want]
    # an older shard (no rating column) and an all-null one read the default
    for drop, null in ((["rating"], []), ([], ["rating"])):
        _older_parquet(_write(tmp_path / f"old-{bool(drop)}", [_want()]), drop, null)
        assert list(iter_mis(str(tmp_path / f"old-{bool(drop)}"), "parquet", columns=[
            "caption_id", "rating"])) == [{"caption_id": r.caption_id, "rating": -1.0}
                                          for r in RECORDS]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_read_mis_round_trips_every_field_and_an_added_one(ray_local, mis, rated, tmp_path):
    """Ray Data's ``read_mis`` (tasks in other processes) gives the same sets, every column
    typed by the table, the added field included, also for an older shard and an empty split."""
    for fmt in FORMATS:
        ds = read_mis(mis.root, fmt, columns=[f.name for f in MIS_FIELDS])
        assert ds.schema().base_schema == parquet_schema(MIS_FIELDS)
        rows = sorted(ds.take_all(), key=lambda row: row["caption_id"])
        assert [from_stored_row(row, None, "row", MIS_FIELDS) for row in rows] == _want()
        test = read_mis(mis.root, fmt, split="test", columns=["caption_id", "task"]).take_all()
        assert sorted(row["caption_id"] for row in test) == [1, 3, 5]
    layout = _write(tmp_path / "rated", [rated])
    old = _write(tmp_path / "old", [_want()])
    _older_parquet(old, ["rating", "task", "image_ext"], [])
    want = [{**s, "rating": -1.0 if s["rating"] is None else s["rating"]} for s in rated]
    for root, fmt, expected in ((layout.root, "parquet", want), (layout.root, "webdataset", want),
                                (old.root, "parquet", [{**s, "rating": -1.0, "task": None}
                                                        for s in _want()])):
        ds = read_mis(root, fmt)
        assert ds.schema().base_schema == parquet_schema()
        rows = sorted(ds.take_all(), key=lambda row: row["caption_id"])
        assert [from_stored_row(row, None, "row") for row in rows] == expected
    empty = read_mis(old.root, "parquet", split="nothing", columns=["caption_id", "rating"])
    assert empty.count() == 0


def test_an_unknown_format_is_refused_not_read_as_empty(tmp_path):
    """``"wds"`` matched no shard's formats and read as an empty dataset (a new user's finding)."""
    with pytest.raises(ValueError, match=r"MIS format 'wds': expected 'parquet' or 'webdataset'"):
        list(iter_mis(str(tmp_path), "wds"))
