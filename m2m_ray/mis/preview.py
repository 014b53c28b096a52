"""A PNG contact sheet of MIS sets: one row per set (its images in seed order), caption underneath.

    python -m m2m_ray.mis.preview <dataset root> --out sheet.png [--sets 8] [--thumb 96]
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys

from PIL import Image

from m2m_ray import storage
from m2m_ray.config import StorageConfig
from m2m_ray.formats.mis_read import iter_mis
from m2m_ray.viz import contact_sheet, png_bytes


def preview(root: str, out: str, num_sets: int = 8, thumb: int = 96, fmt: str = "parquet",
            storage_cfg: StorageConfig | None = None) -> int:
    rows = []
    for sample in itertools.islice(iter_mis(root, fmt, storage_cfg), num_sets):
        images = [Image.open(io.BytesIO(data)) for data in sample["images"]]
        rows.append((f"[{sample['caption_id']}] {sample['caption']}", images))
    if not rows:
        raise FileNotFoundError(f"no committed {fmt} sets under {root}")
    storage.write_bytes(out, png_bytes(contact_sheet(rows, thumb)), storage_cfg)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--out", required=True, help="PNG path or URI")
    parser.add_argument("--sets", type=int, default=8)
    parser.add_argument("--thumb", type=int, default=96)
    parser.add_argument("--format", default="parquet", choices=["parquet", "webdataset"])
    parser.add_argument("--endpoint-url", default=None)
    args = parser.parse_args(argv)
    n = preview(args.root, args.out, args.sets, args.thumb, args.format,
                StorageConfig(endpoint_url=args.endpoint_url))
    print(f"wrote {args.out}: {n} sets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
