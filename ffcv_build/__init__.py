"""Dataset conversion to FFCV .beton files (image, label, index) with a JSON manifest.

    python -m ffcv_build imagefolder SRC OUT.beton [--max-side 512] [--quality 90] [--write-mode jpg]
    python -m ffcv_build tsv TRAIN_TSV OUT.beton
    python -m ffcv_build fashion_mnist OUT_DIR [--limit N]
    python -m ffcv_build digits OUT_DIR
"""

from ffcv_build.build import (
    build_digits,
    build_fashion_mnist,
    build_imagefolder,
    build_tsv,
    format_report,
    write_beton,
)
from ffcv_build.manifest import FIELD_NAMES, check_beton, read_manifest, read_sample

__all__ = [
    "FIELD_NAMES", "build_digits", "build_fashion_mnist", "build_imagefolder", "build_tsv",
    "check_beton", "format_report", "read_manifest", "read_sample", "write_beton",
]
