"""Where images come from: ImageFolder trees, SEED's TSV files, Fashion-MNIST, digits.

A source is an indexed collection of already-validated samples: `len(source)`,
`source.load(i) -> HxWx3 uint8 RGB`, `source.labels[i]`, plus what the manifest
reports (`classes`, `description`, `skipped`, `converted_to_rgb`, `max_pixels`).
File-based sources are scanned once up front in a worker pool that decodes every
image, so undecodable files are skipped and reported before the .beton writer starts
(ffcv's writer hangs forever if one of its workers raises); `load` decodes again
lazily inside the writer's processes, so memory stays flat for ImageNet-sized trees.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import logging
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from seed_cluster.errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# ---------------------------------------------------------------- decoding

def decode_rgb(fp, max_side: int | None) -> tuple[np.ndarray, str]:
    """Decode an image file or file object to HxWx3 uint8 RGB; returns (pixels, original PIL mode).

    For JPEGs, `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale while keeping both
    sides >= max_side; ffcv then resizes to max_side with INTER_AREA.
    """
    with Image.open(fp) as img:
        mode = img.mode
        if max_side:
            img.draft(None, (max_side, max_side))
        img.load()
        return np.asarray(_to_rgb(img)), mode


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:  # 16-bit/int/float grayscale: convert('RGB') would clip to white
        pixels = np.asarray(img, dtype=np.float64)
        if pixels.max(initial=0) > 255:
            pixels = pixels / 257.0
        img = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning; alpha is then dropped like RGBA's
    return img.convert("RGB")


def stored_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) after ffcv's RGBImageField resize (longest side shrunk to max_side)."""
    longest = max(width, height)
    if max_side and longest > max_side:
        ratio = max_side / longest
        return int(ratio * width), int(ratio * height)
    return width, height


def _probe(job: tuple) -> tuple:
    """Pool worker: decode one image fully; ('ok', mode, w, h) or ('skip', reason) or ('bad', message)."""
    kind, location, max_side = job
    extra: tuple = ()
    try:
        if kind == "file":
            pixels, mode = decode_rgb(location, max_side)
        else:
            label, data = read_tsv_row(*location)
            pixels, mode = decode_rgb(io.BytesIO(data), max_side)
            extra = (label,)
    except DataError as e:
        return ("bad", str(e))
    except Exception as e:  # any decoder failure means "skip this file"
        return ("skip", f"{type(e).__name__}: {e}".splitlines()[0])
    height, width = pixels.shape[:2]
    if not max_side and max(width, height) > 65535:
        return ("skip", f"{width}x{height} exceeds FFCV's 65535 px limit; pass --max-side")
    return ("ok", mode, width, height, *extra)


def _probe_all(jobs: list[tuple], workers: int, desc: str) -> list[tuple]:
    """Decode every job in a process pool with a progress bar (images/s); results in job order."""
    results: list[tuple] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="img", smoothing=0.1)
    try:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                results.append(_probe(job))
                bar.update()
                _stop_at_bad_row(results[-1])
            return results
        chunksize = max(1, min(64, len(jobs) // (workers * 8)))
        with multiprocessing.Pool(workers) as pool:
            for result in pool.imap(_probe, jobs, chunksize=chunksize):
                results.append(result)
                bar.update()
                _stop_at_bad_row(result)  # leaving the with-block terminates the pool
        return results
    finally:
        bar.close()


def _stop_at_bad_row(result: tuple) -> None:
    if result[0] == "bad":
        raise DataError(result[1])


class ScannedSource:
    """Common part of the file-based sources: validated entries, labels and the skip report."""

    def __init__(self, classes: list[str], description: dict, max_side: int | None):
        self.classes = classes
        self.description = description
        self.max_side = max_side
        self.labels = np.zeros(0, dtype=np.int64)
        self.skipped: list[dict] = []
        self.converted_to_rgb: Counter = Counter()
        self.max_pixels = 0

    def __len__(self) -> int:
        return len(self.labels)

    def _accept(self, results: list[tuple], names: list[str], labels: list[int]) -> list[int]:
        """Record skips, conversions and sizes; return the positions of the images kept."""
        kept, kept_labels = [], []
        for pos, (result, name) in enumerate(zip(results, names, strict=True)):
            if result[0] == "skip":
                self.skipped.append({"path": name, "reason": result[1]})
                continue
            mode, width, height = result[1:4]
            if mode != "RGB":
                self.converted_to_rgb[mode] += 1
            w, h = stored_size(width, height, self.max_side)
            self.max_pixels = max(self.max_pixels, w * h)
            kept.append(pos)
            kept_labels.append(labels[pos] if labels else result[4])
        self.labels = np.asarray(kept_labels, dtype=np.int64)
        return kept


# ---------------------------------------------------------------- ImageFolder

class ImageFolderSource(ScannedSource):
    """`root/<class>/**/<image>`; classes are the subfolder names sorted, as in torchvision."""

    def __init__(self, root: str | os.PathLike, max_side: int | None, workers: int):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} not found or not a directory; pass the folder "
                            f"that holds one subfolder per class")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"image folder {root} has no class subfolders; expected {root}/<class>/<image>")
        super().__init__([p.name for p in class_dirs], {"kind": "imagefolder", "path": str(root.resolve())},
                         max_side)
        files, file_labels = [], []
        for label, class_dir in enumerate(class_dirs):
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith("."):
                        files.append(os.path.join(dirpath, name))
                        file_labels.append(label)
        for stray in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
            self.skipped.append({"path": str(stray), "reason": "not inside a class subfolder"})
        results = _probe_all([("file", f, max_side) for f in files], workers, f"scan {root.name}")
        kept = self._accept(results, files, file_labels)
        self.paths = [files[i] for i in kept]
        if not self.paths:
            raise DataError(f"image folder {root} has no readable images ({len(self.skipped)} skipped)")
        for label, name in enumerate(self.classes):
            if not np.any(self.labels == label):
                logger.warning("class %r in %s has no readable images", name, root)

    def load(self, i: int) -> np.ndarray:
        return decode_rgb(self.paths[i], self.max_side)[0]


# ---------------------------------------------------------------- SEED TSV

def lineidx_path(tsv_path: str | os.PathLike) -> Path:
    """SEED's convention: `train.tsv` -> `train.lineidx`."""
    return Path(tsv_path).with_suffix(".lineidx")


def load_line_offsets(tsv_path: Path) -> np.ndarray:
    """Byte offset of every non-empty row, from `.lineidx` or scanned (and saved) when it is missing or stale."""
    idx_path = lineidx_path(tsv_path)
    if idx_path.exists() and idx_path.stat().st_mtime >= tsv_path.stat().st_mtime:
        try:
            offsets = np.loadtxt(idx_path, dtype=np.int64, ndmin=1)
        except ValueError as e:
            raise DataError(f"{idx_path} is not a list of byte offsets ({e}); delete it to regenerate") from None
        if len(offsets) and (offsets.max() >= tsv_path.stat().st_size or np.any(np.diff(offsets) <= 0)):
            raise DataError(f"{idx_path} does not match {tsv_path}; delete it to regenerate")
        return offsets
    offsets, pos = [], 0
    with open(tsv_path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    tmp = idx_path.with_name(f".{idx_path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(f"{o}\n" for o in offsets))
        os.replace(tmp, idx_path)
        logger.info("wrote %s (%d rows)", idx_path, len(offsets))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not write %s (%s); using the offsets in memory", idx_path, e)
    return np.asarray(offsets, dtype=np.int64)


_open_tsvs: dict[tuple[int, str], object] = {}


def read_tsv_row(tsv_path: str, offset: int) -> tuple[int, bytes]:
    """Parse the row at `offset`: `name<TAB>label<TAB>...<TAB>base64 image` -> (label, image bytes)."""
    key = (os.getpid(), tsv_path)
    if key not in _open_tsvs:  # one handle per process: the writer's workers are forked
        _open_tsvs[key] = open(tsv_path, "rb")  # kept open for the process's lifetime
    f = _open_tsvs[key]
    f.seek(offset)
    columns = f.readline().rstrip(b"\r\n").split(b"\t")

    def bad(what: str) -> DataError:
        return DataError(f"{tsv_path} line {_line_number(tsv_path, offset)}: {what}; expected "
                         f"name<TAB>integer label<TAB>base64 image")

    if len(columns) < 3:
        raise bad(f"{len(columns)} column(s)")
    try:
        label = int(columns[1])
    except ValueError:
        raise bad(f"label {columns[1][:20]!r} is not an integer") from None
    if label < 0:
        raise bad(f"negative label {label}")
    try:
        data = base64.b64decode(columns[-1], validate=True)
    except (binascii.Error, ValueError):
        raise bad("last column is not valid base64") from None
    return label, data


def _line_number(tsv_path: str, offset: int) -> int:
    with open(tsv_path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


class TsvSource(ScannedSource):
    """SEED's TSV: one image per row; classes are 0..max(label) named by their number."""

    def __init__(self, tsv_path: str | os.PathLike, max_side: int | None, workers: int):
        tsv_path = Path(tsv_path)
        if not tsv_path.is_file():
            raise DataError(f"TSV file {tsv_path} not found; pass SEED's train.tsv (name, label, base64 image)")
        self.tsv_path = str(tsv_path.resolve())
        super().__init__([], {"kind": "tsv", "path": self.tsv_path}, max_side)
        offsets = load_line_offsets(tsv_path)
        results = _probe_all([("tsv", (self.tsv_path, int(o)), max_side) for o in offsets], workers,
                             f"scan {tsv_path.name}")
        names = [f"{self.tsv_path}:{_row_name(self.tsv_path, int(o))}" if r[0] == "skip" else ""
                 for r, o in zip(results, offsets, strict=True)]
        kept = self._accept(results, names, [])
        self.offsets = offsets[kept]
        if not len(self.offsets):
            raise DataError(f"TSV file {tsv_path} has no readable images ({len(self.skipped)} skipped)")
        self.classes = [str(c) for c in range(int(self.labels.max()) + 1)]

    def load(self, i: int) -> np.ndarray:
        _, data = read_tsv_row(self.tsv_path, int(self.offsets[i]))
        return decode_rgb(io.BytesIO(data), self.max_side)[0]


def _row_name(tsv_path: str, offset: int) -> str:
    with open(tsv_path, "rb") as f:
        f.seek(offset)
        name = f.readline().split(b"\t", 1)[0].decode("utf-8", "replace")
    return f"line {_line_number(tsv_path, offset)} ({name})"


# ---------------------------------------------------------------- built-in sets

class ArraySource:
    """In-memory grayscale images (N, H, W) uint8 with labels; stored as RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], description: dict):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.description = description
        self.skipped: list[dict] = []
        self.converted_to_rgb = Counter({"L": len(images)})
        self.max_pixels = int(images.shape[1] * images.shape[2])
        self.max_side = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        return np.repeat(self.images[i][:, :, None], 3, axis=2)


def stratified_subset(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first `limit` samples taken class-proportionally, in their original order.

    Each sample's key is (its rank within its class + 0.5) / class size; the `limit`
    smallest keys keep every class's share and, within a class, its first samples.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise DataError(f"--limit {limit} must be positive")
    ranks = np.zeros(n, dtype=np.float64)
    counts = np.bincount(labels)
    for c in np.flatnonzero(counts):
        ranks[labels == c] = np.arange(counts[c])
    keys = (ranks + 0.5) / counts[labels]
    return np.sort(np.lexsort((np.arange(n), keys))[:limit])


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">i4", count=1)[0]
    if header != magic:
        raise DataError(f"{path} is not an idx file (magic {header}, expected {magic}); reinstall "
                        f"dataset-fashion-mnist")
    ndim = magic & 0xFF
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_split(split: str, root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels) of Fashion-MNIST's own 'train' (60k) or 'test' (10k) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = Path(root)
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise DataError(f"Fashion-MNIST file {path} not found; install it with "
                            f"`apt-get install dataset-fashion-mnist`")
    images, labels = _read_idx(images_path, 2051), _read_idx(labels_path, 2049)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
    return images, labels.astype(np.int64)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (8x8, 0..16 scaled to 0..255) with a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    train, test = train_test_split(np.arange(len(images)), test_size=DIGITS_TEST_FRACTION,
                                   random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
    chosen = np.sort({"train": train, "test": test}[split])
    return images[chosen], digits.target[chosen].astype(np.int64)
