"""The generations-folder contract: write with save_set/write_index, read back, reject bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from m2m_ray.config import StorageConfig
from m2m_ray.formats import generations as gen


def _images(rng, n, size=(24, 32)):
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _roundtrip(root: str, storage: StorageConfig | None):
    rng = np.random.default_rng(0)
    first = gen.save_set(root, "4294967297", "a photo of a cat", _images(rng, 4),
                         _images(rng, 3), {"model": "m2m-self", "seeds": [1, 2, 3],
                                           "split": "test"}, storage)
    second = gen.save_set(root, "7", None, [Image.new("RGB", (16, 16), "red")] * 2,
                          _images(rng, 1), storage=storage, image_format="jpeg")
    skipped = [{"set_id": "9", "reason": "unreadable context image x.jpg"}]
    gen.write_index(root, [first, second], storage, skipped)
    back = gen.read_generations(root, storage)
    assert back == [first, second] and gen.read_skipped(root, storage) == skipped
    with pytest.raises(ValueError, match="set_id '7' appears twice"):
        gen.write_index(root, [first, second], storage, [{"set_id": "7", "reason": "r"}])
    assert first.context[0] == "images/4294967297/context_00.png"
    assert first.generated == [f"images/4294967297/gen_{k:02d}.png" for k in (1, 2, 3)]
    image = gen.load_image(gen.image_uri(root, first.generated[2]), storage)
    assert image.size == (32, 24) and image.mode == "RGB"
    assert gen.load_image(gen.image_uri(root, second.context[1]), storage).size == (16, 16)
    return back


def test_roundtrip_local_and_format_errors(tmp_path):
    root = str(tmp_path / "gens")
    _roundtrip(root, None)
    index = tmp_path / "gens" / gen.INDEX_FILE
    good = index.read_text().splitlines()[0]

    def bad(line: str, match: str):
        index.write_text(good + "\n" + line + "\n")
        with pytest.raises(gen.GenerationsFormatError, match=match):
            gen.read_generations(root)

    bad("{not json", r"line 2: not valid JSON")
    bad(json.dumps({"set_id": "x", "caption": None, "context": []}),
        r"line 2: missing keys \['generated'\]")
    bad(json.dumps({"set_id": "x", "caption": 3, "context": [], "generated": ["/abs.png"]}),
        r"caption = 3 is neither.*generated has a path that is not relative")
    bad(good, r"line 2: set_id '4294967297' already used on line 1")
    with pytest.raises(FileNotFoundError, match="no generations.jsonl"):
        gen.read_generations(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot name a folder"):
        gen.save_set(root, "a/b", None, [], [])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken.png \(15 bytes\)"):
        gen.load_image(str(tmp_path / "broken.png"))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_roundtrip_on_s3(s3_bucket):
    endpoint, bucket = s3_bucket
    _roundtrip(f"s3://{bucket}/run1/gens", StorageConfig(endpoint_url=endpoint))


def test_skipped_sets_file_is_optional_and_checked(tmp_path):
    """A folder from another tool has no skipped.jsonl (no known skips); a malformed line is an
    error naming it."""
    root = tmp_path / "gens"
    root.mkdir()
    assert gen.read_skipped(str(root)) == []
    (root / gen.SKIPPED_FILE).write_text('{"set_id": "1", "reason": "r"}\n{"set_id": "2"}\n')
    with pytest.raises(gen.GenerationsFormatError, match=r"skipped.jsonl line 2: .*set_id and "
                                                         "reason"):
        gen.read_skipped(str(root))
