"""Command line: `python -m ffcv_build {imagefolder,tsv,fashion_mnist,digits} ...`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ffcv_build.build import (
    WRITE_MODES,
    build_digits,
    build_fashion_mnist,
    build_imagefolder,
    build_tsv,
    format_report,
)
from seed_cluster.errors import SeedClusterError


def _common(parser: argparse.ArgumentParser, default_mode: str, default_reason: str) -> None:
    parser.add_argument("--write-mode", choices=WRITE_MODES, default=default_mode,
                        help=f"how images are stored (default {default_mode}: {default_reason})")
    parser.add_argument("--raw", dest="write_mode", action="store_const", const="raw",
                        help="store raw pixels instead of JPEG (same as --write-mode raw); "
                             "best for tiny images")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding/writing processes (default: the CPUs available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ffcv_build", description=__doc__)
    sub = parser.add_subparsers(dest="source", required=True)
    for name, src_help in (("imagefolder", "folder with one subfolder per class"),
                           ("tsv", "SEED TSV file: name<TAB>label<TAB>base64 image")):
        p = sub.add_parser(name, help=f"convert a {src_help}")
        p.add_argument("src", type=Path, help=src_help)
        p.add_argument("out", type=Path, help="output .beton (a .json manifest is written beside it)")
        p.add_argument("--max-side", type=int, default=512,
                       help="shrink images so the longest side is at most this (default 512)")
        _common(p, "jpg", "compact; decoded by FFCV's JPEG path")
    tiny = "28x28/8x8 JPEG is lossy for no gain in size or speed"
    for name, what in (("fashion_mnist", "Fashion-MNIST from the Debian package dataset-fashion-mnist"),
                       ("digits", "scikit-learn's digits, fixed stratified 75/25 split (random_state=0)")):
        p = sub.add_parser(name, help=f"{what} -> OUT_DIR/train.beton, OUT_DIR/test.beton")
        p.add_argument("out", type=Path, help="output directory")
        p.add_argument("--limit", type=int, default=None,
                       help="keep only the first N images of each split, class-proportionally (for tests)")
        _common(p, "raw", tiny)
    return parser.parse_args(argv)


def _stop_on_sigterm(main_pid: int):
    """SIGTERM (SLURM, kill) unwinds the main process like Ctrl-C, so temporary files are removed."""
    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked worker inherited this handler: just die
            os._exit(128 + signum)
        raise KeyboardInterrupt
    return handler


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop_on_sigterm(os.getpid()))
    options = {"write_mode": args.write_mode, "quality": args.quality, "workers": args.workers,
               "overwrite": args.overwrite}
    try:
        if args.source in ("imagefolder", "tsv"):
            build = build_imagefolder if args.source == "imagefolder" else build_tsv
            results = {args.out: build(args.src, args.out, max_side=args.max_side, **options)}
        else:
            build = build_fashion_mnist if args.source == "fashion_mnist" else build_digits
            manifests = build(args.out, limit=args.limit, **options)
            results = {args.out / f"{split}.beton": m for split, m in manifests.items()}
    except SeedClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written (temporary files removed)", file=sys.stderr)
        return 130
    for out, manifest in results.items():
        print(format_report(out, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
