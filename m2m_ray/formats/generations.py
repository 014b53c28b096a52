"""The generations folder: the contract between the sampler (pipelines/generate.py) and evaluation.

A folder, local or ``s3://``, holding the images and one index file ``generations.jsonl`` with one
JSON object per image set::

    {"set_id": "4294967297",            # string, e.g. the caption_id
     "caption": "a photo of a cat",     # string or null
     "context": ["images/4294967297/context_00.png", ...],   # K real preceding images
     "generated": ["images/4294967297/gen_01.png", ...],     # M generated images, k = 1..M in order
     "meta": {"model": "...", "seeds": [...], "guidance": 7.5, "split": "test", ...}}

Image paths are relative to the folder; images are PNG or JPEG. ``meta`` is free-form, but
evaluation reads ``meta["split"]`` ("train"/"test", see m2m_ray.formats.ids.split_of; a set of another
split than ``EvalConfig.protocol.split`` is skipped) and ``meta["model"]`` (the method name in the
report's Table 1 row) when present.

Beside the index, ``skipped.jsonl`` lists the input sets that fell out during generation, one
``{"set_id": ..., "reason": ...}`` per line (an unreadable context image, non-finite output), so
that evaluation counts every input set: its report's denominators are the index's sets plus these.
A folder without the file (another tool's) has no known skips.

Writers (sampler side): ``save_set`` writes one set's images and returns its record; it runs
wherever the images are (a Ray actor). ``write_index`` writes ``generations.jsonl`` from all
records, and ``skipped.jsonl``, once, on the driver. Readers (evaluation side):
``read_generations`` parses and validates the index, ``read_skipped`` the skips, ``image_uri``
turns a relative path into a URI, ``load_image`` decodes one image.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from m2m_ray import storage as st

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig

INDEX_FILE = "generations.jsonl"
SKIPPED_FILE = "skipped.jsonl"
IMAGE_DIR = "images"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}


class GenerationsFormatError(ValueError):
    """``generations.jsonl`` does not follow the contract."""


@dataclass(frozen=True)
class GenerationSet:
    set_id: str
    caption: str | None
    context: list[str]
    generated: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_obj(cls, obj: Any, where: str) -> "GenerationSet":
        """Validate one parsed JSON object; ``where`` names it in errors (file and line)."""
        expected = "expected an object with set_id (string), caption (string or null), " \
                   "context and generated (lists of relative image paths), meta (object)"
        if not isinstance(obj, dict):
            raise GenerationsFormatError(f"{where}: got {type(obj).__name__}; {expected}")
        missing = {"set_id", "caption", "context", "generated"} - obj.keys()
        unknown = obj.keys() - {"set_id", "caption", "context", "generated", "meta"}
        if missing or unknown:
            raise GenerationsFormatError(
                f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                f"{expected}")
        problems = []
        if not isinstance(obj["set_id"], str) or not obj["set_id"]:
            problems.append(f"set_id = {obj['set_id']!r} is not a non-empty string")
        if obj["caption"] is not None and not isinstance(obj["caption"], str):
            problems.append(f"caption = {obj['caption']!r} is neither a string nor null")
        for key in ("context", "generated"):
            paths = obj[key]
            if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
                problems.append(f"{key} = {paths!r} is not a list of image paths")
            elif any(p.startswith("/") or "://" in p or ".." in p.split("/") for p in paths):
                problems.append(f"{key} has a path that is not relative to the folder: {paths!r}")
        if not isinstance(obj.get("meta", {}), dict):
            problems.append(f"meta = {obj['meta']!r} is not an object")
        if problems:
            raise GenerationsFormatError(f"{where}: " + "; ".join(problems) + f"; {expected}")
        return cls(obj["set_id"], obj["caption"], list(obj["context"]), list(obj["generated"]),
                   dict(obj.get("meta", {})))


def image_uri(root_uri: str, relative_path: str) -> str:
    return st.join(root_uri, *relative_path.split("/"))


def encode_image(image: "Image.Image | np.ndarray", image_format: str = "png",
                 quality: int = 95) -> bytes:
    """PNG or JPEG bytes of a PIL image or an (H, W, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} "
                             f"{image.shape}")
        image = Image.fromarray(image)
    pil_format, _ = _FORMATS[image_format]
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=pil_format,
                              **({"quality": quality} if pil_format == "JPEG" else {}))
    return buffer.getvalue()


def save_set(root_uri: str, set_id: str, caption: str | None,
             context_images: Sequence["Image.Image | np.ndarray"],
             generated_images: Sequence["Image.Image | np.ndarray"],
             meta: dict[str, Any] | None = None, storage: "StorageConfig | None" = None,
             image_format: str = "png", quality: int = 95) -> GenerationSet:
    """Write one set's images under ``<root>/images/<set_id>/`` and return its index record.

    ``generated_images`` are in generation order (k = 1..M). Each file is written whole (atomic
    rename locally, one PUT on S3), so a crash leaves no half image behind.
    """
    if not _SAFE_ID.match(set_id):
        raise ValueError(f"set_id {set_id!r} cannot name a folder: use letters, digits, '.', "
                         "'_' and '-' only (a caption_id as a decimal string works)")
    if image_format not in _FORMATS:
        raise ValueError(f"image_format {image_format!r}: expected one of {sorted(_FORMATS)}")
    suffix = _FORMATS[image_format][1]
    context_paths = [f"{IMAGE_DIR}/{set_id}/context_{j:02d}{suffix}"
                     for j in range(len(context_images))]
    generated_paths = [f"{IMAGE_DIR}/{set_id}/gen_{k:02d}{suffix}"
                       for k in range(1, len(generated_images) + 1)]
    for path, image in zip(context_paths + generated_paths,
                           list(context_images) + list(generated_images)):
        st.write_bytes(image_uri(root_uri, path), encode_image(image, image_format, quality),
                       storage)
    return GenerationSet(set_id, caption, context_paths, generated_paths, dict(meta or {}))


def write_index(root_uri: str, sets: Sequence[GenerationSet],
                storage: "StorageConfig | None" = None,
                skipped: Sequence[dict[str, str]] = ()) -> str:
    """Write ``generations.jsonl`` (one record per set, in the given order) and ``skipped.jsonl``
    (``skipped``: ``{"set_id", "reason"}`` of the input sets not generated; may be empty);
    returns the index's URI. Raises ``ValueError`` for a set id used twice across both."""
    seen: set[str] = set()
    for set_id in [r.set_id for r in sets] + [str(s["set_id"]) for s in skipped]:
        if set_id in seen:
            raise ValueError(f"set_id {set_id!r} appears twice; each set needs its own id")
        seen.add(set_id)
    lines = [json.dumps({"set_id": str(s["set_id"]), "reason": str(s["reason"])},
                        ensure_ascii=False) + "\n" for s in skipped]
    st.write_bytes(st.join(root_uri, SKIPPED_FILE), "".join(lines).encode("utf-8"), storage)
    uri = st.join(root_uri, INDEX_FILE)
    st.write_bytes(uri, "".join(r.to_json() + "\n" for r in sets).encode("utf-8"), storage)
    return uri


def read_skipped(root_uri: str, storage: "StorageConfig | None" = None) -> list[dict[str, str]]:
    """``{"set_id", "reason"}`` of the input sets that fell out during generation
    (``<root>/skipped.jsonl``; [] when the folder has no such file). A malformed line raises
    ``GenerationsFormatError`` naming it."""
    uri = st.join(root_uri, SKIPPED_FILE)
    if not st.exists(uri, storage):
        return []
    skipped = []
    for number, line in enumerate(st.read_bytes(uri, storage).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            skipped.append({"set_id": str(obj["set_id"]), "reason": str(obj["reason"])})
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise GenerationsFormatError(f"{uri} line {number}: expected a JSON object with "
                                         f"set_id and reason ({type(err).__name__}: {err})"
                                         ) from None
    return skipped


def read_generations(root_uri: str,
                     storage: "StorageConfig | None" = None) -> list[GenerationSet]:
    """Parse and validate ``<root>/generations.jsonl``; a malformed line is an error naming it."""
    uri = st.join(root_uri, INDEX_FILE)
    if not st.exists(uri, storage):
        raise FileNotFoundError(
            f"no {INDEX_FILE} in {root_uri!r}: expected a generations folder written by "
            "pipelines/generate.py (m2m_ray.formats.generations.write_index)")
    sets: list[GenerationSet] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(st.read_bytes(uri, storage).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{uri} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerationsFormatError(f"{where}: not valid JSON ({err})") from None
        record = GenerationSet.from_obj(obj, where)
        if record.set_id in seen:
            raise GenerationsFormatError(
                f"{where}: set_id {record.set_id!r} already used on line {seen[record.set_id]}")
        seen[record.set_id] = number
        sets.append(record)
    return sets


def load_image(uri: str, storage: "StorageConfig | None" = None) -> Image.Image:
    """Decode one image fully (so a truncated file fails here) as RGB; errors name the URI."""
    data = st.read_bytes(uri, storage)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises several types for broken files
        raise ValueError(f"cannot decode image {uri} ({len(data)} bytes): "
                         f"{type(err).__name__}: {err}") from err
