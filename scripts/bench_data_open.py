"""How long opening a large dataset folder takes: ImageFolderDataset lists files, reads no pixels.

Builds N hard links to small real PNGs (32x32 crops of pydicom's CT_small.dcm) in class folders, then
times opening the dataset (listing), one item, and a header-level validation of every file.
Prints one JSON line.

    python scripts/bench_data_open.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from medfusion.data import ImageFolderDataset, read_image, write_image


def build(root: Path, n: int, classes: int) -> None:
    from pydicom.data import get_testdata_file

    array = read_image(get_testdata_file("CT_small.dcm")).array.astype(np.int64)
    array = (array - array.min()).astype(np.uint16)
    links_per_source = 50_000  # below the file system's hard-link limit
    sources = []
    for s in range(-(-n // links_per_source)):
        y = (s * 7) % (array.shape[1] - 32)
        sources.append(write_image(root / f"source{s}.png", array[:, y : y + 32, :32]))
    for c in range(classes):
        (root / "data" / f"class{c}").mkdir(parents=True)
    for i in range(n):
        target = root / "data" / f"class{i % classes}" / f"{i:06d}.png"
        os.link(sources[i // links_per_source], target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of files")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--validate", action="store_true", help="also time validate='header'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        build(root, args.n, args.classes)
        built = time.perf_counter() - start
        start = time.perf_counter()
        dataset = ImageFolderDataset(root / "data")
        opened = time.perf_counter() - start
        start = time.perf_counter()
        item = dataset[len(dataset) // 2]
        first_item = time.perf_counter() - start
        result = {
            "files": len(dataset),
            "build_s": round(built, 2),
            "open_s": round(opened, 3),
            "item_ms": round(first_item * 1000, 2),
            "item_shape": list(item["image"].shape),
        }
        if args.validate:
            start = time.perf_counter()
            ImageFolderDataset(root / "data", validate="header")
            result["validate_header_s"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
