"""Reading CC12M-format files as raw numbered lines, in work units made of whole caption shards.

A file is bytes, not CSV: lines split on ``b"\\n"``, quote characters are data, a final line without
a newline counts, nothing after the last newline is a line, and line numbers start at 1.

Work units, planned on the driver in two steps so that line numbers are exact for any range size and
any parallelism:

1. an uncompressed file is cut into byte ranges ``[start, end)`` of ``range_bytes``; a range owns
   the lines that START inside it. ``count_range_lines`` counts them (a cheap parallel pass over
   every range but each file's last) and prefix sums give each range its first line number;
2. a range's work unit is the caption shards (``lines_per_shard`` consecutive lines) whose FIRST
   line the range owns: it reads from the range's start and goes on past its end until the last
   of those shards is complete. Every shard is thus read, filtered and written by exactly one task.

A ``.gz`` file cannot be entered in the middle: it is one unit, starting at line 1.
"""

from __future__ import annotations

import contextlib
import math
import sys
import zlib
from dataclasses import asdict, dataclass, replace
from typing import IO, TYPE_CHECKING, Any, Iterator

from m2m_ray import storage

if TYPE_CHECKING:
    import pyarrow as pa

    from m2m_ray.config import StorageConfig

CHUNK_BYTES = 4 * 2**20  # read size of the line splitter (and the S3 block size)


@dataclass(frozen=True)
class ReadUnit:
    """A byte range of one file, and (once planned) the line numbers its task filters."""

    file_index: int       # position of the file in the sorted input list
    uri: str
    range_index: int      # position of the range within its file
    start: int            # byte where reading starts; the range owns lines starting in [start, end)
    end: int
    size: int             # bytes of the file as stored
    compressed: bool
    first_line: int = 0   # number of the first line starting at or after `start`
    begin_line: int = 0   # first line this unit filters (a shard's first line)
    stop_line: int = 0    # first line it does not filter; 0: to the end of the file

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_batch(cls, batch: "pa.Table") -> list["ReadUnit"]:
        return [cls(**row) for row in batch.to_pylist()]


def is_gzip(uri: str) -> bool:
    return uri.endswith(".gz")


def plan_ranges(files: list[str], range_bytes: int,
                storage_cfg: "StorageConfig | None") -> list[ReadUnit]:
    """Cut every file into ranges of at most ``range_bytes`` (a ``.gz`` file is one range; an
    empty file none)."""
    units: list[ReadUnit] = []
    for file_index, uri in enumerate(files):
        fs, path = storage.fsspec_filesystem(uri, storage_cfg)
        size = int(fs.size(path))
        if size == 0:
            continue
        if is_gzip(uri):
            units.append(ReadUnit(file_index, uri, 0, 0, size, size, True))
            continue
        for k in range(math.ceil(size / range_bytes)):
            units.append(ReadUnit(file_index, uri, k, k * range_bytes,
                                  min((k + 1) * range_bytes, size), size, False))
    return units


def ranges_needing_count(ranges: list[ReadUnit]) -> list[ReadUnit]:
    """The ranges whose line count a later range of the same file needs (all but each last)."""
    last: dict[int, int] = {}
    for unit in ranges:
        last[unit.file_index] = max(last.get(unit.file_index, -1), unit.range_index)
    return [u for u in ranges if u.range_index < last[u.file_index]]


def _next_shard_start(line: int, lines_per_shard: int) -> int:
    """The first line >= ``line`` that begins a shard (shards begin at 1, 1 + n, 1 + 2n, ...)."""
    return -(-(line - 1) // lines_per_shard) * lines_per_shard + 1


def plan_shard_units(ranges: list[ReadUnit], counts: dict[tuple[int, int], int],
                     lines_per_shard: int) -> list[ReadUnit]:
    """Work units from ranges and their line counts (keyed ``(file_index, range_index)``, every
    range but each file's last): prefix sums give each range's first line; a range's unit filters
    the shards whose first line it owns. Ranges that own no shard start are dropped."""
    missing = {(u.file_index, u.range_index) for u in ranges_needing_count(ranges)} - counts.keys()
    if missing:
        raise ValueError(f"line counts missing for ranges {sorted(missing)}; every range but the "
                         "last of each file needs one")
    ordered = sorted(ranges, key=lambda u: (u.file_index, u.range_index))
    units = []
    next_first = 1
    for k, unit in enumerate(ordered):
        first_line = 1 if unit.range_index == 0 else next_first
        is_last = k + 1 == len(ordered) or ordered[k + 1].file_index != unit.file_index
        begin = _next_shard_start(first_line, lines_per_shard)
        stop = 0  # the file's last range: to the end of the file
        if not is_last:
            next_first = first_line + counts[(unit.file_index, unit.range_index)]
            stop = _next_shard_start(next_first, lines_per_shard)
        if stop == 0 or begin < stop:
            units.append(replace(unit, first_line=first_line, begin_line=begin, stop_line=stop))
    return units


class CaptionInputError(ValueError):
    """A caption input file that cannot be read; the message names it and what to do."""


@contextlib.contextmanager
def reading(unit: ReadUnit) -> Iterator[None]:
    """Inside: an I/O or decompression error while reading ``unit``'s file is raised as
    ``CaptionInputError`` naming the file (a truncated ``.gz`` otherwise ends the job with a bare
    ``EOFError: Compressed file ended before the end-of-stream marker was reached``)."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as err:
        raise CaptionInputError(
            f"cannot read caption input {unit.uri} (bytes {unit.start}-{unit.end}): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. Replace the file with a whole copy "
            "(a .gz must pass gzip -t) or leave it out of captions.inputs") from err


def open_unit(unit: ReadUnit, storage_cfg: "StorageConfig | None") -> IO[bytes]:
    fs, path = storage.fsspec_filesystem(unit.uri, storage_cfg)
    if unit.compressed:
        return fs.open(path, "rb", compression="gzip")
    return fs.open(path, "rb", block_size=CHUNK_BYTES)


def count_range_lines(unit: ReadUnit, storage_cfg: "StorageConfig | None") -> int:
    """Lines starting in ``[start, end)``: one at byte 0, one after every newline at a position in
    ``[start - 1, end - 1)`` that is not the file's last byte."""
    first, stop = max(unit.start - 1, 0), min(unit.end - 1, unit.size - 1)
    count = 1 if unit.start == 0 else 0
    with reading(unit), open_unit(unit, storage_cfg) as f:
        f.seek(first)
        remaining = stop - first
        while remaining > 0:
            chunk = f.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count


def _seek_first_line(f: IO[bytes], start: int) -> bool:
    """Position ``f`` at the first line start at or after byte ``start``; False at end of file."""
    if start == 0:
        return True
    f.seek(start - 1)
    position = start - 1
    while True:
        chunk = f.read(CHUNK_BYTES)
        if not chunk:
            return False
        newline = chunk.find(b"\n")
        if newline >= 0:
            f.seek(position + newline + 1)
            return True
        position += len(chunk)


def iter_unit_lines(unit: ReadUnit, storage_cfg: "StorageConfig | None"
                    ) -> Iterator[bytes]:
    """The raw lines ``begin_line`` … ``stop_line - 1`` of the unit's file, without their
    ``b"\\n"`` (a ``b"\\r"`` before it stays). Raises ``CaptionInputError`` naming a file that
    cannot be read."""
    with reading(unit), open_unit(unit, storage_cfg) as f:
        if not _seek_first_line(f, unit.start):
            return
        line_number = unit.first_line
        stop = unit.stop_line or sys.maxsize
        tail = b""
        while line_number < stop:
            chunk = f.read(CHUNK_BYTES)
            if not chunk:
                if tail and line_number >= unit.begin_line:
                    yield tail  # a final line without newline
                return
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            skip = max(0, unit.begin_line - line_number)
            keep = min(len(lines), stop - line_number)
            yield from lines[skip:keep]
            line_number += len(lines)
