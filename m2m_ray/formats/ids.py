"""Stable identities of MIS: caption ids, shard ids, the train/test split and per-image seeds.

All are pure functions of the input (file position, caption id, index, base seed), never of how the
work was split into blocks, tasks or actors, so a rerun or a bigger cluster gives the same dataset
and every image can be regenerated from its stored (caption, seed, settings).

Layout of the 64-bit ids (``file_index`` = position of the file in the sorted input list)::

    caption_id = file_index << 32 | line_number               (line numbers start at 1)
    shard_id   = file_index << 32 | (line_number - 1) // lines_per_shard
"""

from __future__ import annotations

import hashlib
import struct

_LOW_BITS = 32
_LOW_MASK = (1 << _LOW_BITS) - 1
MAX_LINES_PER_FILE = _LOW_MASK


def caption_id(file_index: int, line_number: int) -> int:
    if not 0 <= file_index < 2**31:
        raise ValueError(f"file_index {file_index} out of range [0, 2^31)")
    if not 1 <= line_number <= MAX_LINES_PER_FILE:
        raise ValueError(f"line_number {line_number} out of range [1, {MAX_LINES_PER_FILE}]")
    return file_index << _LOW_BITS | line_number


def shard_id(file_index: int, line_number: int, lines_per_shard: int) -> int:
    return file_index << _LOW_BITS | (line_number - 1) // lines_per_shard


def shard_name(sid: int) -> str:
    """File-name stem of a shard: ``shard-<file index>-<block>``, zero-padded so names sort."""
    return f"shard-{sid >> _LOW_BITS:05d}-{sid & _LOW_MASK:08d}"


def _hash64(*parts: int) -> int:
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_of(cid: int, test_fraction: float) -> str:
    """``"test"`` for a fixed pseudo-random ``test_fraction`` of caption ids, else ``"train"``."""
    return "test" if _hash64(cid, -1) < test_fraction * 2**64 else "train"


def image_seed(cid: int, index: int, base_seed: int) -> int:
    """Noise seed of image ``index`` of caption ``cid``: a 63-bit hash of the three numbers."""
    return _hash64(base_seed, cid, index) >> 1
