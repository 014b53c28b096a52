"""The real CLIP BPE tokenizer, offline.

OpenAI's CLIP vocabulary is fully determined by its BPE merges file ``bpe_simple_vocab_16e6.txt.gz``
(256 byte tokens, the same with the end-of-word marker ``</w>``, one token per merge, then the two
special tokens). The ``open-clip-torch`` wheel ships that file; ``fetch_bpe`` takes it from the wheel
with ``pip download --no-deps`` — never ``pip install open-clip-torch``, which would pull torchvision
and a multi-GB CUDA torch. ``clip_tokenizer()`` then builds a ``transformers.CLIPTokenizer`` whose ids
equal CLIP's (``"a photo of a cat"`` → ``[49406, 320, 1125, 539, 320, 2368, 49407]``).

    python -m m2m_ray.models.clip_tokenizer fetch     # once, at set-up
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
CLIP_CONTEXT_LENGTH = 77
# CLIP keeps the file's first 48,894 merges: 256 byte tokens + the same 256 with </w> + one token
# per merge + 2 specials = 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2


def cache_dir() -> Path:
    return Path(os.environ.get("M2M_RAY_CACHE", Path.home() / ".cache" / "m2m_ray"))


def bpe_path() -> Path:
    """Where the BPE file is looked for: ``$M2M_RAY_CLIP_BPE`` or the project cache."""
    override = os.environ.get("M2M_RAY_CLIP_BPE")
    return Path(override) if override else cache_dir() / BPE_FILENAME


def fetch_bpe(dest: Path | None = None) -> Path:
    """Download the open-clip wheel (no dependencies) and unpack only the BPE file."""
    dest = dest or bpe_path()
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", OPEN_CLIP_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(f"open_clip/{BPE_FILENAME}")
    tmp_dest = dest.with_suffix(".partial")
    tmp_dest.write_bytes(data)
    tmp_dest.replace(dest)
    return dest


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _vocab_files(bpe: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the Hugging Face format) beside the BPE file."""
    out = bpe.parent / "clip-tokenizer"
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    if vocab_file.exists() and merges_file.exists():
        return vocab_file, merges_file
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:_NUM_MERGES + 1]  # line 0 is a header
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = (byte_tokens + [t + "</w>" for t in byte_tokens]
             + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"])
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((vocab_file, json.dumps({t: i for i, t in enumerate(vocab)})),
                       (merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return vocab_file, merges_file


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """CLIP's tokenizer built from the BPE file, padded like SD-2.1's (pad token ``!``)."""
    from transformers import CLIPTokenizer

    bpe = bpe_path()
    if not bpe.exists():
        raise FileNotFoundError(
            f"CLIP BPE file not found at {bpe}. Fetch it once with "
            "`python -m m2m_ray.models.clip_tokenizer fetch` (set-up does this), or point "
            "$M2M_RAY_CLIP_BPE at a copy of open_clip's bpe_simple_vocab_16e6.txt.gz"
        )
    vocab_file, merges_file = _vocab_files(bpe)
    return CLIPTokenizer(
        str(vocab_file), str(merges_file), pad_token="!", model_max_length=CLIP_CONTEXT_LENGTH
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m m2m_ray.models.clip_tokenizer fetch")
    print(fetch_bpe())
