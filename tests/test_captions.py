"""MIS stage 1: every input line gets exactly one verdict, ids do not depend on how the input was
split, outputs are byte-faithful and rerunnable, locally and on S3."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from m2m_ray import storage
from m2m_ray.formats import ids
from m2m_ray.mis.captions import (
    load_shard_captions,
    read_captions_stats,
    run_captions_stage,
)
from m2m_ray.mis.captions_read import (
    count_range_lines,
    iter_unit_lines,
    plan_ranges,
    plan_shard_units,
    ranges_needing_count,
)
from m2m_ray.mis.config import BuildMISConfig
from m2m_ray.models.config import ModelConfig
from m2m_ray.models.presets import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REASONS = ("undecodable", "malformed", "empty", "too_long", "duplicate")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(preset="tiny"))


def caption_of_tokens(tokenizer, n: int) -> str:
    """A caption of exactly ``n`` CLIP tokens, BOS and EOS included."""
    words = ("photo", "of", "a", "red", "cat", "on", "the", "beach")
    caption = " ".join(words[i % len(words)] for i in range(n - 2))
    assert len(tokenizer(caption).input_ids) == n
    return caption


def crafted_rows(tokenizer) -> list[tuple[bytes, bytes, str | None]]:
    """``(line content, line ending, expected verdict)``; a verdict of None means kept."""
    rows = [
        (b'https://x/1.jpg\tHe said "hello', b"\n", None),
        ("https://x/2.jpg\t  café naïve — 北京 🎉  ".encode(), b"\n", None),
        (b"https://x/3.jpg\tCaf\xe9 latin-1 bytes", b"\n", "undecodable"),
        (b"https://x/4.jpg", b"\n", "malformed"),
        (b"https://x/5.jpg\ta dog\textra column", b"\n", "malformed"),
        (b"", b"\n", "malformed"),
        (b"https://x/7.jpg\t \t ", b"\n", "malformed"),
        (b"https://x/8.jpg\t   ", b"\n", "empty"),
        (f"https://x/9.jpg\t{caption_of_tokens(tokenizer, 76)}".encode(), b"\r\n", None),
        (f"https://x/10.jpg\t{caption_of_tokens(tokenizer, 77)}".encode(), b"\r\n", None),
        (f"https://x/11.jpg\t{caption_of_tokens(tokenizer, 78)}".encode(), b"\r\n", "too_long"),
        (b"https://x/12.jpg\tA photo of a cat", b"\r\n", None),
        (b"https://x/13.jpg\ta  photo of a CAT ", b"\r\n", "duplicate"),
        (b"", b"\r\n", "malformed"),
        (b"https://x/15.jpg\t<PERSON> on stage, 'live' at \"the Hall\"", b"\n", None),
        (b"https://x/16.jpg\ta \r inside stays", b"\n", None),
        (b"https://x/17.jpg\ta photo of a cat", b"\n", "duplicate"),
        (b"https://x/18.jpg\tthe last line has no newline", b"", None),
    ]
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    return rows


def expected_verdict(reason: str | None, dedup: bool) -> str | None:
    return None if reason == "duplicate" and not dedup else reason


def write_crafted(tmp_path: Path, rows) -> tuple[Path, Path]:
    data = b"".join(line + ending for line, ending, _ in rows)
    plain = tmp_path / "crafted.tsv"
    plain.write_bytes(data)
    packed = tmp_path / "crafted_copy.tsv.gz"
    packed.write_bytes(gzip.compress(data))
    return plain, packed


def config(output: str, inputs: list[str], **captions) -> BuildMISConfig:
    return BuildMISConfig(
        output_uri=output, stages=["captions"], model={"preset": "tiny"},
        captions={"inputs": inputs, "lines_per_shard": 4, "batch_size": 5,
                  "test_fraction": 0.3, "actors": {"max_actors": 2}, **captions},
    )


def read_outputs(output: str, storage_cfg=None):
    """(kept rows, reject rows) of a stage-1 output, each as a list of dicts."""
    fs, path = storage.pyarrow_filesystem(output, storage_cfg)
    shard_partitioning = pads.partitioning(pa.schema([("shard_id", pa.int64())]), flavor="hive")
    kept = pads.dataset(f"{path}/captions", filesystem=fs, format="parquet",
                        partitioning=shard_partitioning).to_table()
    rejects = pads.dataset(f"{path}/rejects", filesystem=fs, format="parquet").to_table()
    return kept.to_pylist(), rejects.to_pylist()


def check_output(output: str, rows, files: list[str], dedup: bool, tokenizer, storage_cfg=None):
    """Every line of every file accounted for once, with the right verdict, ids and bytes."""
    kept, rejects = read_outputs(output, storage_cfg)
    stats = read_captions_stats(output, storage_cfg)
    verdicts = {(r["source_file"], r["line_number"]): r["reason"] for r in rejects}
    verdicts.update({(r["source_file"], r["line_number"]): None for r in kept})
    assert len(verdicts) == len(kept) + len(rejects)  # no line twice
    expected = {(f, n): expected_verdict(reason, dedup)
                for f in files for n, (_, _, reason) in enumerate(rows, 1)}
    assert verdicts == expected

    test_fraction = stats["config"]["captions"]["test_fraction"]
    for row in kept:
        file_index = files.index(row["source_file"])
        line = rows[row["line_number"] - 1][0]
        assert row["caption"].encode() == line.split(b"\t")[1]  # byte-identical, unstripped
        assert row["url"].encode() == line.split(b"\t")[0]
        assert row["num_tokens"] == len(tokenizer(row["caption"]).input_ids)
        assert row["caption_id"] == ids.caption_id(file_index, row["line_number"])
        assert row["shard_id"] == ids.shard_id(file_index, row["line_number"], 4)
        assert row["split"] == ids.split_of(row["caption_id"], test_fraction)
    for row in rejects:
        line = rows[row["line_number"] - 1][0]
        assert row["raw_text"] == line.decode("utf-8", errors="replace")
        assert row["detail"]

    counts = {r: sum(v == r for v in expected.values()) for r in REASONS}
    assert stats["rejected"] == counts
    assert stats["input_lines"] == len(expected) == stats["kept"] + sum(counts.values())
    shards: dict[str, int] = {}
    for row in kept:
        shards[str(row["shard_id"])] = shards.get(str(row["shard_id"]), 0) + 1
    assert stats["shards"] == shards
    for f in files:
        assert stats["files"][f]["input_lines"] == len(rows)
    return kept, rejects, stats


def identity(rows: list[dict]) -> set[tuple]:
    """What must not depend on how the work was split: ids, split and caption."""
    return {(r["caption_id"], r["shard_id"], r["split"], r["caption"]) for r in rows}


def expected_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


@pytest.mark.parametrize("data", [
    b"a\tb\r\n\n\nc\td\ne" + b"x" * 40 + b"\n\r\n" + b"f\tg",
    b"\n" + b"h" * 30 + b"\n\nend\n",
])
def test_units_own_whole_shards_with_exact_line_numbers(tmp_path, data):
    """Every range size and shard size: each line read exactly once, by number, in whole shards."""
    path = tmp_path / "lines.tsv"
    path.write_bytes(data)
    want = list(enumerate(expected_lines(data), 1))
    for range_bytes in range(1, len(data) + 2):
        ranges = plan_ranges([str(path)], range_bytes, None)
        counts = {(u.file_index, u.range_index): count_range_lines(u, None)
                  for u in ranges_needing_count(ranges)}
        for lines_per_shard in (1, 2, 3, 100):
            got = []
            for unit in plan_shard_units(ranges, counts, lines_per_shard):
                assert (unit.begin_line - 1) % lines_per_shard == 0
                lines = list(iter_unit_lines(unit, None))
                got.extend(enumerate(lines, unit.begin_line))
                assert not unit.stop_line or len(lines) <= unit.stop_line - unit.begin_line
            assert got == want, (range_bytes, lines_per_shard)


def test_missing_input_and_uncommitted_output_are_clear_errors(tmp_path):
    cfg = config(str(tmp_path / "out"), [str(tmp_path / "nope" / "cc12m*.tsv")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        run_captions_stage(cfg)
    with pytest.raises(FileNotFoundError, match="has not completed"):
        read_captions_stats(str(tmp_path / "out"))


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The module's Ray, quiet."""
    ray_local.data.DataContext.get_current().enable_progress_bars = False
    return ray_local


@pytest.mark.timeout(300)
@pytest.mark.ray
def test_verdicts_ids_and_bytes_across_ranges_gzip_and_dedup(ray_cluster, tokenizer, tmp_path):
    rows = crafted_rows(tokenizer)
    plain, packed = write_crafted(tmp_path, rows)
    files = [str(plain), str(packed)]

    # Tiny byte ranges (most own no shard start) for the plain file, one unit for the .gz copy.
    out1 = str(tmp_path / "tiny_ranges")
    stats = run_captions_stage(config(out1, files, range_bytes=64))
    kept1, _, _ = check_output(out1, rows, files, dedup=False, tokenizer=tokenizer)
    by_file = [[r for r in kept1 if r["source_file"] == f] for f in files]
    # The .gz copy (one unit) holds the same lines as the plain file (many tiny ranges).
    assert ({(r["line_number"], r["shard_id"] & ids.MAX_LINES_PER_FILE, r["caption"])
             for r in by_file[0]}
            == {(r["line_number"], r["shard_id"] & ids.MAX_LINES_PER_FILE, r["caption"])
                for r in by_file[1]})
    assert stats["code_version"]["m2m_ray"] and stats["timings"]["captions_per_s"] > 0

    shard = ids.shard_id(0, 1, 4)
    table = load_shard_captions(out1, shard)
    assert table["caption_id"].to_pylist() == sorted(
        r["caption_id"] for r in by_file[0] if r["shard_id"] == shard)
    assert set(table["shard_id"].to_pylist()) == {shard}

    # One big range, dedup on (the global step), through the entry script and its overrides.
    sys.path.insert(0, str(ROOT / "pipelines"))
    from build_mis import main

    out2 = str(tmp_path / "one_range_dedup")
    argv = ["--config", str(ROOT / "configs/tiny/build_mis.yaml"), f"--output_uri={out2}",
            "--stages=[captions]", f"--captions.inputs=[{plain}]", "--captions.dedup=true",
            "--captions.range_bytes=1048576", "--captions.lines_per_shard=4",
            "--captions.batch_size=5", "--captions.test_fraction=0.3", "--captions.actors.max_actors=2"]
    main(argv)
    kept2, rejects2, _ = check_output(out2, rows, [str(plain)], dedup=True, tokenizer=tokenizer)
    duplicate_lines = {n for n, (_, _, reason) in enumerate(rows, 1) if reason == "duplicate"}
    not_duplicates = [r for r in by_file[0] if r["line_number"] not in duplicate_lines]
    assert identity(kept2) == identity(not_duplicates)
    first_cat = ids.caption_id(0, 12)
    assert {r["line_number"]: str(first_cat) in r["detail"]
            for r in rejects2 if r["reason"] == "duplicate"} == {13: True, 17: True}

    # A rerun into the same output gives the same files, and nothing from before survives.
    stale = Path(out2) / "captions" / "shard_id=999" / "stale.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not parquet")
    before = {p.relative_to(out2): p.read_bytes() for p in Path(out2).rglob("*.parquet")
              if p != stale}
    main(argv)
    after = {p.relative_to(out2): p.read_bytes() for p in Path(out2).rglob("*.parquet")}
    assert after.keys() == before.keys()
    for name, data in before.items():
        assert pq.read_table(Path(out2) / name).equals(pq.read_table(pa.BufferReader(data)))
    assert json.loads((Path(out2) / "captions_config.json").read_text())["config"][
        "captions"]["dedup"] is True


@pytest.mark.timeout(300)
@pytest.mark.ray
def test_s3_round_trip(ray_cluster, s3_bucket, tokenizer, tmp_path):
    endpoint, bucket = s3_bucket
    rows = crafted_rows(tokenizer)
    plain, _ = write_crafted(tmp_path, rows)
    storage_cfg = {"endpoint_url": endpoint}
    source = f"s3://{bucket}/cc12m/part-0.tsv"
    # A few ranges: S3 reads start mid-object (tiny ranges are tested locally).
    cfg = config(f"s3://{bucket}/mis", [f"s3://{bucket}/cc12m/*.tsv"], range_bytes=400)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update=storage_cfg)})
    storage.write_bytes(source, plain.read_bytes(), cfg.storage)

    stats = run_captions_stage(cfg)
    assert "testing" not in json.dumps(stats)  # credentials never land in outputs
    kept, _, _ = check_output(cfg.output_uri, rows, [source], dedup=False, tokenizer=tokenizer,
                              storage_cfg=cfg.storage)
    shard = ids.shard_id(0, 1, 4)
    table = load_shard_captions(cfg.output_uri, shard, cfg.storage)
    assert table["caption"].to_pylist() == [r["caption"] for r in sorted(
        kept, key=lambda r: r["caption_id"]) if r["shard_id"] == shard]
    assert storage.list_files(f"s3://{bucket}/mis", cfg.storage, suffix=".json") == [
        f"s3://{bucket}/mis/captions_config.json", f"s3://{bucket}/mis/captions_stats.json"]


@pytest.mark.timeout(300)
@pytest.mark.ray
def test_a_truncated_gzip_input_is_named(ray_cluster, tokenizer, tmp_path):
    """A cut .gz caption file used to end stage 1 with a bare "EOFError: Compressed file ended
    before the end-of-stream marker was reached" from a worker, naming no file."""
    from m2m_ray.mis.captions_read import CaptionInputError

    _, packed = write_crafted(tmp_path, crafted_rows(tokenizer))
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(CaptionInputError, match=rf"^cannot read caption input {cut} .*EOFError: "
                                                r".*gzip -t"):
        run_captions_stage(config(str(tmp_path / "out"), [str(cut)]))
