"""The .beton layout this project writes, its JSON manifest, and checks on both.

Every .beton holds exactly three fields, in this order:

    image  RGBImageField (raw pixels or JPEG, RGB, uint8)
    label  IntField      (class index into the manifest's `classes`)
    index  IntField      (the sample's own row, 0..N-1; the loader seeds augmentation with it)

`X.beton` is described by `X.json` beside it (see `MANIFEST_KEYS`). The fingerprint
is computed from the .beton itself (labels plus the stored bytes of a deterministic
sample of images), so it can be re-checked against the file at any time and it
changes with anything that changes what the model sees: content, labels, classes,
--max-side, --quality, --write-mode.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType

from seed_cluster.errors import DataError

FORMAT_VERSION = 1
FIELD_NAMES = ("image", "label", "index")
FIELD_TYPES = (RGBImageField, IntField, IntField)
# At most this many images enter the fingerprint (evenly spaced over the file), so it
# stays cheap to recompute for ImageNet-sized files; labels always enter in full.
FINGERPRINT_SAMPLE = 1024
MANIFEST_KEYS = (
    "format_version", "source", "num_samples", "num_classes", "classes", "class_counts",
    "fingerprint", "fields", "max_side", "quality", "write_mode", "num_converted",
    "converted_to_rgb", "skipped",
)
_IMAGE_MODE_RAW = 1  # ffcv.fields.rgb_image.IMAGE_MODES['raw']
_REBUILD_HINT = "rebuild it with `python -m ffcv_build ...`"


def manifest_path(beton_path: str | os.PathLike) -> Path:
    """`X.beton` -> `X.json`."""
    return Path(beton_path).with_suffix(".json")


def read_manifest(beton_path: str | os.PathLike) -> dict:
    """Return the manifest written beside `beton_path`; DataError if missing or unreadable."""
    path = manifest_path(beton_path)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"manifest {path} not found beside {beton_path}; {_REBUILD_HINT}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"manifest {path} is unreadable ({e}); {_REBUILD_HINT}") from None
    if not isinstance(manifest, dict) or "num_samples" not in manifest:
        raise DataError(f"manifest {path} has no num_samples; {_REBUILD_HINT}")
    return manifest


def open_beton(beton_path: str | os.PathLike) -> Reader:
    """Open `beton_path` with ffcv's Reader after checking it is complete and has our fields.

    ffcv's Reader itself accepts truncated files silently (numpy reads what is there),
    so the sizes in the header and the allocation table are checked against the file.
    """
    path = Path(beton_path)
    if not path.is_file():
        raise DataError(f"{path} not found; build it with `python -m ffcv_build ...` or fix the data path")
    size = path.stat().st_size
    min_size = HeaderType.itemsize + len(FIELD_NAMES) * FieldDescType.itemsize
    if size < min_size:
        raise DataError(f"{path} is not an FFCV file ({size} bytes, smaller than a header); {_REBUILD_HINT}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["alloc_table_ptr"]) > size:
        raise DataError(f"{path} is truncated ({size} bytes, its header points to byte "
                        f"{int(header['alloc_table_ptr'])}); {_REBUILD_HINT}")
    try:
        reader = Reader(str(path))
    except Exception as e:  # ffcv raises AssertionError/ValueError/IndexError/KeyError on garbage
        raise DataError(f"{path} is not a readable FFCV file ({type(e).__name__}: {e}); {_REBUILD_HINT}") from None

    names = tuple(reader.field_names)
    types = tuple(type(reader.handlers[n]) for n in names)
    if names != FIELD_NAMES or types != FIELD_TYPES:
        got = ", ".join(f"{n}:{t.__name__}" for n, t in zip(names, types, strict=True))
        raise DataError(f"{path} has fields [{got}], expected [image:RGBImageField, label:IntField, "
                        f"index:IntField]; rebuild it with ffcv_build")
    num_samples = int(reader.num_samples)
    table_ptr = int(reader.header["alloc_table_ptr"])
    table_bytes = size - table_ptr
    if len(reader.metadata) != num_samples or table_ptr < min_size or table_bytes < 0 \
            or table_bytes % ALLOC_TABLE_TYPE.itemsize or len(reader.alloc_table) != num_samples:
        expected = table_ptr + num_samples * ALLOC_TABLE_TYPE.itemsize
        raise DataError(f"{path} is truncated or incomplete ({size} bytes, header says {expected}); "
                        f"{_REBUILD_HINT}")
    sizes = _image_sizes(reader)  # raises if an image has no allocation
    ptrs = reader.metadata["f0"]["data_ptr"].astype(np.int64)
    if num_samples and int((ptrs + sizes).max()) > table_ptr:
        raise DataError(f"{path} has image data past its allocation table (corrupt); {_REBUILD_HINT}")
    if not np.array_equal(reader.metadata["f2"], np.arange(num_samples)):
        raise DataError(f"{path}: the index field is not 0..N-1; {_REBUILD_HINT}")
    return reader


def check_beton(beton_path: str | os.PathLike, verify_fingerprint: bool = False) -> dict:
    """Check that `beton_path` is a complete FFCV file in this project's layout.

    Returns its manifest, or a minimal dict (`num_samples`, `num_classes` from the
    labels, `fields`) when no manifest is beside it. Raises DataError with a one-line
    message when the file is missing, truncated, not FFCV, lacks the three fields,
    or disagrees with its manifest. `verify_fingerprint=True` also recomputes the
    fingerprint (reads up to FINGERPRINT_SAMPLE images).
    """
    reader = open_beton(beton_path)
    num_samples = int(reader.num_samples)
    labels = reader.metadata["f1"]
    if not manifest_path(beton_path).exists():
        num_classes = int(labels.max()) + 1 if num_samples else 0
        return {"num_samples": num_samples, "num_classes": num_classes, "fields": list(FIELD_NAMES)}
    manifest = read_manifest(beton_path)
    if manifest["num_samples"] != num_samples:
        raise DataError(f"{beton_path} holds {num_samples} samples but its manifest says "
                        f"{manifest['num_samples']}; {_REBUILD_HINT}")
    num_classes = manifest.get("num_classes")
    if num_samples and num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{beton_path} has labels outside 0..{num_classes - 1} of its manifest; {_REBUILD_HINT}")
    if verify_fingerprint:
        actual = fingerprint(reader, manifest.get("classes", []))
        if actual != manifest.get("fingerprint"):
            raise DataError(f"{beton_path} does not match the fingerprint in its manifest "
                            f"(file replaced or edited?); {_REBUILD_HINT}")
    return manifest


def fingerprint(reader: Reader, classes: list[str]) -> str:
    """sha256 hex over the sample count, class names, all labels and per-image content hashes.

    The per-image hash covers the stored bytes and the image header (mode, size) of an
    evenly spaced sample of at most FINGERPRINT_SAMPLE images.
    """
    num_samples = int(reader.num_samples)
    h = hashlib.sha256()
    h.update(json.dumps({"num_samples": num_samples, "classes": list(classes)}).encode())
    h.update(np.ascontiguousarray(reader.metadata["f1"], dtype="<i8").tobytes())
    sizes = _image_sizes(reader)
    image_meta = reader.metadata["f0"]
    with open(reader.file_name, "rb") as f:
        for i in _sample_indices(num_samples):
            meta = image_meta[i]
            f.seek(int(meta["data_ptr"]))
            content = hashlib.sha256(f.read(int(sizes[i]))).digest()
            h.update(f"{i}:{meta['mode']}:{meta['width']}x{meta['height']}:".encode() + content)
    return h.hexdigest()


def read_sample(reader: Reader, i: int) -> tuple[np.ndarray, int, int]:
    """Decode sample `i` without an FFCV Loader: (HxWx3 uint8 RGB image, label, index)."""
    meta = reader.metadata[i]
    image_meta = meta["f0"]
    size = int(_image_sizes(reader)[i])
    with open(reader.file_name, "rb") as f:
        f.seek(int(image_meta["data_ptr"]))
        data = np.frombuffer(f.read(size), dtype=np.uint8)
    height, width = int(image_meta["height"]), int(image_meta["width"])
    if image_meta["mode"] == _IMAGE_MODE_RAW:
        image = data.reshape(height, width, 3)
    else:
        image = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return image, int(meta["f1"]), int(meta["f2"])


def _image_sizes(reader: Reader) -> np.ndarray:
    """Byte size of every sample's image, looked up in the allocation table by pointer."""
    table = np.sort(reader.alloc_table, order="ptr")
    ptrs = reader.metadata["f0"]["data_ptr"]
    pos = np.clip(np.searchsorted(table["ptr"], ptrs), 0, max(len(table) - 1, 0))
    if len(ptrs) and (not len(table) or not np.array_equal(table["ptr"][pos], ptrs)):
        raise DataError(f"{reader.file_name} has images without an allocation (corrupt); {_REBUILD_HINT}")
    return table["size"][pos].astype(np.int64) if len(ptrs) else np.zeros(0, np.int64)


def _sample_indices(num_samples: int) -> np.ndarray:
    if num_samples <= FINGERPRINT_SAMPLE:
        return np.arange(num_samples)
    return np.unique(np.linspace(0, num_samples - 1, FINGERPRINT_SAMPLE).round().astype(np.int64))
