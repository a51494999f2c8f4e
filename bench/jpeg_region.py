#!/usr/bin/env python
"""Does decoding only part of a JPEG pay? FFCV's region decode vs decoding the whole image.

    python bench/jpeg_region.py [--images 300] [--workdir /tmp/seed-cluster-bench]

FFCV's `imdecode` can decode a region (its crop mode: turbojpeg's lossless crop of the region,
then a decode of that smaller JPEG). The seeded crop decoder could use it for the union of an
image's view boxes; this measures whether that would be faster. Same JPEGs as
bench/data_loader.py (real photographs cut to 300-500 px, quality 90), one thread, best of 5
passes; printed: time of a whole decode per image, and for regions of a given fraction of the
image's area (placed at the top-left, centre and bottom-right, MCU-aligned) the time relative
to the whole decode (< 1: the region decode is faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_loader import make_jpeg_folder  # noqa: E402

FRACTIONS = (0.03, 0.06, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9)
PLACES = ("top-left", "centre", "bottom-right")
MCU = 16


def load(folder: Path, count: int) -> list[tuple[np.ndarray, int, int]]:
    from PIL import Image

    files = sorted(folder.glob("*/*.jpg"))[:count]
    return [(np.fromfile(f, dtype=np.uint8), *Image.open(f).size[::-1]) for f in files]


def per_image_ms(decode, jpegs, passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for jpeg in jpegs:
            decode(*jpeg)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(jpegs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/seed-cluster-bench"))
    args = parser.parse_args(argv)

    from ffcv.libffcv import imdecode

    args.workdir.mkdir(parents=True, exist_ok=True)
    jpegs = load(make_jpeg_folder(args.workdir, args.images), args.images)
    out = np.empty(512 * 512 * 3, np.uint8)

    def whole(data, height, width):
        imdecode(data, out, height, width, height, width, 0, 0, 1, 1, False, False)

    def region(fraction: float, place: str):
        def decode(data, height, width):
            rh, rw = max(1, int(height * fraction ** 0.5)), max(1, int(width * fraction ** 0.5))
            at = {"top-left": 0.0, "centre": 0.5, "bottom-right": 1.0}[place]
            y0, x0 = int((height - rh) * at) // MCU * MCU, int((width - rw) * at) // MCU * MCU
            imdecode(data, out, height, width, rh, rw, x0, y0, 1, 1, True, False)
        return decode

    base = per_image_ms(whole, jpegs)
    print(f"{len(jpegs)} JPEGs, one thread: whole decode {base:.3f} ms per image")
    print("region / whole decode time, by the region's share of the image's area:")
    print(f"  {'area':>6s} " + " ".join(f"{p:>13s}" for p in PLACES))
    for fraction in FRACTIONS:
        ratios = [per_image_ms(region(fraction, place), jpegs) / base for place in PLACES]
        print(f"  {fraction:6.2f} " + " ".join(f"{r:12.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
