"""The MIS set's fields: ONE table (``MIS_FIELDS``) from which both shard formats are derived —
the Parquet schema, the WebDataset JSON header and members, every sample ↔ stored-row converter,
the columns a reader reads, and the defaults of fields that older shards lack.

A sample (``MISSample``, the record every reader returns) holds each field as ``SetRecord`` does:
``latents`` the stored ``.npy`` bytes (decoded by the consumer: ``mis_read.decode_latents``),
JSON fields (``metadata``, ``task``) decoded. A *stored row* is a sample in the Parquet column
layout (JSON fields as JSON text): the rows of a Ray Dataset of MIS (``mis_read.read_mis``).

To add a field: add a ``MISField`` to ``MIS_FIELDS`` and its attribute to ``SetRecord`` and
``MISSample`` (tests/test_mis_format.py checks the three agree), then fill it in the producer.
Make it ``optional`` with a ``default``: shards written before it existed read back with that.
Readers and writers look ``MIS_FIELDS`` up when they run (``read_mis`` ships it to its tasks).
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypedDict

import numpy as np
import pyarrow as pa

IMAGE_EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png"}

# WebDataset location of a list of images: members NN.<image_ext>, one per seed, in seed order.
IMAGE_MEMBERS = "NN.<image_ext>"

# What a user can do about a bad shard, appended to every read error.
BAD_SHARD_HELP = ("Check the dataset with python -m m2m_ray.mis.verify <MIS root> (it lists every "
                  "bad shard); training can skip bad shards and sets with data.on_bad_data=skip")


class CorruptShardError(ValueError):
    """A shard file that cannot be read as MIS; the message names the shard."""


@dataclass(frozen=True)
class MISField:
    """One field of every MIS set.

    ``arrow``: its Parquet column type (a JSON field's is ``pa.string()``: the JSON text).
    ``json``: stored as JSON text in Parquet; a JSON value in the WebDataset header.
    ``optional``: a set may lack it (null, or a shard written before the field existed); it then
    reads back as ``default`` — a value, or a function of the fields ``default_needs`` names.
    ``member``: None for a key of the WebDataset JSON header; else its own tar member, e.g.
    ``latents.npy`` (binary), or ``IMAGE_MEMBERS`` (a list of binary).
    """

    name: str
    arrow: pa.DataType
    json: bool = False
    optional: bool = False
    default: Any = None
    default_needs: tuple[str, ...] = ()
    member: str | None = None

    def __post_init__(self):
        if self.json and self.arrow != pa.string():
            raise ValueError(f"MIS field {self.name}: a JSON field is stored as pa.string(), "
                             f"not {self.arrow}")
        binary = self.arrow in (pa.binary(), pa.list_(pa.binary()))
        if binary != (self.member is not None):
            raise ValueError(f"MIS field {self.name}: binary fields (and only they) are their own "
                             "WebDataset members; give member= for binary, none otherwise")
        if callable(self.default) != bool(self.default_needs):
            raise ValueError(f"MIS field {self.name}: a default function needs default_needs "
                             "(the fields it reads), a plain default none")


def _image_ext_of(needs: dict[str, Any]) -> str:
    """Parquet shards written before the image_ext column: from the generation settings."""
    return IMAGE_EXTENSIONS[needs["metadata"]["image_format"]]


MIS_FIELDS: tuple[MISField, ...] = (
    MISField("caption_id", pa.int64()),
    MISField("shard_id", pa.int64()),
    MISField("split", pa.string()),
    MISField("caption", pa.string()),
    MISField("url", pa.string()),
    MISField("seeds", pa.list_(pa.int64())),
    MISField("images", pa.list_(pa.binary()), member=IMAGE_MEMBERS),  # encoded, in seed order
    MISField("image_ext", pa.string(), optional=True, default=_image_ext_of,
             default_needs=("metadata",)),                            # jpg / webp / png
    MISField("latents", pa.binary(), optional=True, member="latents.npy"),  # fp16 [N, 4, h, w]
    MISField("metadata", pa.string(), json=True),     # generation settings, enough to regenerate
    MISField("task", pa.string(), json=True, optional=True),  # a task dataset's raw conditions
)


@dataclass
class SetRecord:
    """One encoded image set, the unit both formats store (a producer's ``MISSample``)."""

    caption_id: int
    shard_id: int
    split: str
    caption: str
    url: str
    seeds: list[int]
    images: list[bytes]                # encoded, in seed order
    image_ext: str                     # jpg / webp / png
    latents: bytes | None              # .npy bytes or None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Task datasets only (m2m_ray.data.tasks): raw per-image conditions, e.g.
    # {"camera": [N][3][4] world-to-camera, "position": [N] step indices}; None in MIS.
    task: dict[str, Any] | None = None


class MISSample(TypedDict, total=False):
    """A set as every MIS reader returns it (the fields asked for: ``columns=``)."""

    caption_id: int
    shard_id: int
    split: str
    caption: str
    url: str
    seeds: list[int]
    images: list[bytes]
    image_ext: str
    latents: bytes | None
    metadata: dict[str, Any]
    task: dict[str, Any] | None


def current_fields() -> tuple[MISField, ...]:
    """The field table now (``MIS_FIELDS``, looked up at call time)."""
    return MIS_FIELDS


def field_names(fields: Sequence[MISField] | None = None) -> list[str]:
    return [f.name for f in (fields or current_fields())]


def check_columns(columns: Sequence[str] | None, fields: Sequence[MISField]) -> list[str]:
    """``columns`` (None: every field) as a list; raises ``ValueError`` for a name not in the
    table."""
    names = field_names(fields)
    if columns is None:
        return names
    unknown = [c for c in columns if c not in names]
    if unknown:
        raise ValueError(f"columns {unknown} are no MIS fields; the fields are {names}")
    return list(columns)


def parquet_schema(fields: Sequence[MISField] | None = None,
                   columns: Sequence[str] | None = None) -> pa.Schema:
    """The Parquet schema (of ``columns`` only, in their order): every column typed, never
    Arrow's null type, whatever the values."""
    by_name = {f.name: f for f in (fields or current_fields())}
    return pa.schema([(name, by_name[name].arrow)
                      for name in (columns or list(by_name))])


def as_sample(record: SetRecord | Mapping[str, Any],
              fields: Sequence[MISField] | None = None) -> dict[str, Any]:
    """A ``SetRecord`` or a sample mapping → the sample of every field to write; raises
    ``ValueError`` when a required field is missing or None. An optional one missing is None,
    or what its default function gives (``image_ext``: from ``metadata``)."""
    fields = fields or current_fields()
    out = {}
    for f in fields:
        if isinstance(record, Mapping):
            value = record.get(f.name)
        elif hasattr(record, f.name):
            value = getattr(record, f.name)
        else:
            raise ValueError(f"{type(record).__name__} has no attribute {f.name}, a field of "
                             "MIS_FIELDS: add it to SetRecord (m2m_ray/formats/mis_fields.py)")
        if value is None and not f.optional:
            raise ValueError(f"set {out.get('caption_id')}: MIS field {f.name} is required "
                             "but None")
        out[f.name] = value
    for f in fields:
        if out[f.name] is None and f.default_needs:
            needs = {n: out[n] for n in f.default_needs}
            try:
                out[f.name] = f.default(needs)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"set {out.get('caption_id')}: MIS field {f.name} is None and "
                                 f"does not follow from {sorted(needs)} "
                                 f"({type(err).__name__}: {err}); give it") from err
    return out


def to_stored_row(sample: Mapping[str, Any], columns: Sequence[str],
                  fields: Sequence[MISField] | None = None) -> dict[str, Any]:
    """A sample → its Parquet row (JSON fields as sorted-key JSON text; None stays null)."""
    by_name = {f.name: f for f in (fields or current_fields())}
    row = {}
    for name in columns:
        value = sample.get(name)
        row[name] = (json.dumps(value, sort_keys=True)
                     if by_name[name].json and value is not None else value)
    return row


def stored_table(samples: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 fields: Sequence[MISField] | None = None) -> pa.Table:
    """Samples → a typed Arrow table of their stored rows (``parquet_schema``'s columns)."""
    fields = fields or current_fields()
    columns = check_columns(columns, fields)
    return pa.Table.from_pylist([to_stored_row(s, columns, fields) for s in samples],
                                schema=parquet_schema(fields, columns))


def from_stored_row(row: Mapping[str, Any], columns: Sequence[str] | None, where: str,
                    fields: Sequence[MISField] | None = None) -> MISSample:
    """A stored row (Parquet, or a row of ``read_mis``) → the sample of ``columns`` (None: every
    field). A column that is null or absent reads as its field's default; raises
    ``CorruptShardError`` naming ``where`` for a required field lacking or bad JSON."""
    fields = fields or current_fields()

    def value_of(f: MISField) -> Any:
        value = row.get(f.name)
        return decode_json(value, f"{where}: {f.name}") if f.json and value is not None else value

    return _assemble(check_columns(columns, fields), fields, value_of, where)


def parquet_columns(columns: Sequence[str], present: Sequence[str],
                    fields: Sequence[MISField]) -> list[str]:
    """The columns of a Parquet file (with columns ``present``) to read for the fields
    ``columns``: those present, plus what the defaults of absent ones need."""
    by_name = {f.name: f for f in fields}
    read = [c for c in columns if c in present]
    for name in columns:
        if name not in present:
            read += [n for n in by_name[name].default_needs if n in present and n not in read]
    return read


def wds_members(sample: Mapping[str, Any],
                fields: Sequence[MISField] | None = None) -> list[tuple[str, bytes]]:
    """A sample → its WebDataset members ``(name without key, bytes)``: ``json`` (the header:
    every non-member field, an optional one only when not None), then the member fields."""
    fields = fields or current_fields()
    header = {f.name: sample.get(f.name) for f in fields
              if f.member is None and not (f.optional and sample.get(f.name) is None)}
    members = [("json", json.dumps(header, sort_keys=True).encode())]
    for f in fields:
        value = sample.get(f.name)
        if f.member == IMAGE_MEMBERS:
            members += [(f"{i:02d}.{sample['image_ext']}", image) for i, image in enumerate(value)]
        elif f.member is not None and value is not None:
            members.append((f.member, value))
    return members


def from_wds_members(members: Mapping[str, bytes], columns: Sequence[str] | None, where: str,
                     fields: Sequence[MISField] | None = None) -> MISSample:
    """One set's WebDataset members (names without the key) → the sample of ``columns``; raises
    ``CorruptShardError`` naming ``where`` for a missing header, image or required field."""
    fields = fields or current_fields()
    if "json" not in members:
        raise CorruptShardError(f"{where} has no json member. {BAD_SHARD_HELP}")
    header = decode_json(members["json"], where)

    def value_of(f: MISField) -> Any:
        if f.member is None:
            return header.get(f.name)
        if f.member != IMAGE_MEMBERS:
            return members.get(f.member)
        ext, count = header.get("image_ext"), len(header.get("seeds") or [])
        images = [members.get(f"{i:02d}.{ext}") for i in range(count)]
        missing = [i for i, image in enumerate(images) if image is None]
        if missing:
            raise CorruptShardError(f"{where} lacks images {missing}. {BAD_SHARD_HELP}")
        return images

    return _assemble(check_columns(columns, fields), fields, value_of, where)


def _assemble(columns: list[str], fields: Sequence[MISField],
              value_of: Callable[[MISField], Any], where: str) -> MISSample:
    """The sample of ``columns`` from each field's stored value (None: null or absent)."""
    by_name = {f.name: f for f in fields}
    sample: dict[str, Any] = {}
    derived = []
    for name in columns:
        f = by_name[name]
        value = value_of(f)
        if value is not None:
            sample[name] = value
        elif not f.optional:
            raise CorruptShardError(f"{where} has no {name}, a required MIS field. "
                                    f"{BAD_SHARD_HELP}")
        elif f.default_needs:
            derived.append(f)
        else:
            sample[name] = copy.deepcopy(f.default)
    for f in derived:
        needs = {n: sample[n] if n in sample else value_of(by_name[n]) for n in f.default_needs}
        try:
            sample[f.name] = f.default(needs)
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptShardError(f"{where} stores no {f.name} and it does not follow from "
                                    f"{sorted(needs)} ({type(err).__name__}: {err}). "
                                    f"{BAD_SHARD_HELP}") from err
    return {name: sample[name] for name in columns}  # type: ignore[return-value]


def decode_json(data: bytes | str, where: str) -> Any:
    """JSON stored in a shard (a WebDataset header, a Parquet JSON column) → its value; raises
    ``CorruptShardError`` naming ``where``."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptShardError(f"{where}: stored JSON cannot be decoded: {str(err).rstrip('.')}. "
                                f"{BAD_SHARD_HELP}"
                                ) from err


def latents_to_npy(latents: np.ndarray) -> bytes:
    """float ``[N, 4, h, w]`` → the stored ``.npy`` bytes (float16)."""
    buffer = io.BytesIO()
    np.save(buffer, latents.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def npy_to_latents(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
