import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2m_ray import storage
from m2m_ray.config import StorageConfig


def test_split_uri_forms(tmp_path):
    assert storage.split_uri("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert storage.split_uri(f"file://{tmp_path}/x") == ("file", f"{tmp_path}/x")
    assert storage.split_uri("rel/x")[1].endswith("/rel/x")
    with pytest.raises(ValueError, match="unsupported storage URI"):
        storage.split_uri("gopher://x/y")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_uri("s3:///key")


def test_local_write_read_list(tmp_path):
    uri = f"file://{tmp_path}/d/f.bin"
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(str(tmp_path / "d" / "f.bin")) == b"abc"
    assert storage.list_files(str(tmp_path / "d")) == [str(tmp_path / "d" / "f.bin")]
    assert not list((tmp_path / "d").glob("*.tmp-*"))  # no temporary left behind


def test_expand_inputs_rejects_unmatched(tmp_path):
    (tmp_path / "a.tsv").write_text("x")
    (tmp_path / "b.tsv").write_text("x")
    assert storage.expand_inputs([str(tmp_path / "*.tsv"), str(tmp_path / "a.tsv")]) == [
        str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        storage.expand_inputs([str(tmp_path / "nope*.tsv")])


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_s3_round_trip_fsspec_and_pyarrow(s3_bucket):
    endpoint, bucket = s3_bucket
    cfg = StorageConfig(endpoint_url=endpoint)
    uri = f"s3://{bucket}/dir/blob.bin"
    storage.write_bytes(uri, b"hello", cfg)
    assert storage.read_bytes(uri, cfg) == b"hello"
    assert storage.list_files(f"s3://{bucket}/dir", cfg) == [uri]
    storage.rename(uri, f"s3://{bucket}/dir/moved.bin", cfg)
    assert not storage.exists(uri, cfg) and storage.exists(f"s3://{bucket}/dir/moved.bin", cfg)

    fs, path = storage.pyarrow_filesystem(f"s3://{bucket}/t.parquet", cfg)
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    # written by pyarrow, read back through fsspec/s3fs
    fs2, path2 = storage.fsspec_filesystem(f"s3://{bucket}/t.parquet", cfg)
    with fs2.open(path2, "rb") as f:
        assert pq.read_table(f).column("x").to_pylist() == [1, 2, 3]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_folder_copies_local_and_s3(tmp_path, s3_bucket):
    """The one remote-folder copy (pipelines from s3://, fine-tune init_from, exports)."""
    endpoint, bucket = s3_bucket
    cfg = StorageConfig(endpoint_url=endpoint)
    source = tmp_path / "model"
    (source / "unet").mkdir(parents=True)
    (source / "model_index.json").write_text("{}")
    (source / "unet" / "weights.bin").write_bytes(b"\x00\x01")
    storage.upload_dir(source, f"s3://{bucket}/exports/m", cfg)
    assert storage.list_files(f"s3://{bucket}/exports/m/unet", cfg) == [
        f"s3://{bucket}/exports/m/unet/weights.bin"]
    storage.download_dir(f"s3://{bucket}/exports/m", tmp_path / "back", cfg)
    assert (tmp_path / "back" / "unet" / "weights.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "back" / "model_index.json").read_text() == "{}"
    storage.download_dir(str(source), tmp_path / "local", cfg)
    assert (tmp_path / "local" / "unet" / "weights.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(FileNotFoundError, match="no folder at"):
        storage.download_dir(f"s3://{bucket}/nothing-here", tmp_path / "x", cfg)
