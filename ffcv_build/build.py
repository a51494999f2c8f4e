"""Convert a source to a .beton (image, label, index) plus its manifest, atomically.

The .beton is written to `.X.beton.tmp-<pid>` beside the target, checked, fingerprinted
and only then renamed (with its manifest) onto `X.beton` / `X.json`; any exception or
KeyboardInterrupt removes the temporary files, so an interrupted build never leaves a
file under the final name.

ffcv's DatasetWriter runs `num_workers` forked processes and its parent waits for a
progress counter with no timeout: a worker that raises or is killed makes it hang
forever (and leaks its shared memory). So this module starts and supervises ffcv's
worker processes itself (ffcv's own worker function, page allocator and finalisation):
the parent polls with a timeout, and a worker that exits without reporting its pages
fails the build at once with a DataError. The dataset handed to the workers never raises
(a failure is recorded in shared memory and a 1x1 placeholder written, then the build
fails after the workers finish).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import multiprocessing
import os
import queue
import time
from pathlib import Path

import cv2
import ffcv
import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.utils import chunks
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter, worker_job_indexed_dataset
from tqdm import tqdm

from ffcv_build.manifest import FIELD_NAMES, FORMAT_VERSION, fingerprint, manifest_path, open_beton
from ffcv_build.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ArraySource,
    ImageFolderSource,
    TsvSource,
    digits_split,
    fashion_mnist_split,
    stratified_subset,
)
from seed_cluster.checkpoint import fsync_path
from seed_cluster.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

WRITE_MODES = ("jpg", "raw", "proportion")
SPLITS = ("train", "test")
WRITER_CHUNK = 100  # samples per work item of ffcv's writer processes
POLL_S = 0.2  # how often the parent checks its writer processes
_PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)


def default_workers() -> int:
    """CPUs this process may use (respects SLURM/taskset affinity), like os.cpu_count() otherwise."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- public builders

def build_imagefolder(src: str | os.PathLike, out: str | os.PathLike, *, max_side: int | None = 512,
                      quality: int = 90, write_mode: str = "jpg", workers: int | None = None,
                      overwrite: bool = False) -> dict:
    """ImageFolder tree `src/<class>/<image>` -> `out` (.beton) + manifest; returns the manifest."""
    workers = _check_options(write_mode, max_side, quality, workers)
    _refuse_existing([Path(out)], overwrite)
    source = ImageFolderSource(src, max_side, workers)
    return write_beton(source, out, write_mode=write_mode, max_side=max_side, quality=quality,
                       workers=workers, overwrite=overwrite)


def build_tsv(tsv: str | os.PathLike, out: str | os.PathLike, *, max_side: int | None = 512,
              quality: int = 90, write_mode: str = "jpg", workers: int | None = None,
              overwrite: bool = False) -> dict:
    """SEED's TSV (name, label, base64 image; `.lineidx` made when missing) -> `out`; returns the manifest."""
    workers = _check_options(write_mode, max_side, quality, workers)
    _refuse_existing([Path(out)], overwrite)
    source = TsvSource(tsv, max_side, workers)
    return write_beton(source, out, write_mode=write_mode, max_side=max_side, quality=quality,
                       workers=workers, overwrite=overwrite)


def build_fashion_mnist(out_dir: str | os.PathLike, *, limit: int | None = None, write_mode: str = "raw",
                        quality: int = 90, workers: int | None = None, overwrite: bool = False,
                        root: str | os.PathLike = FASHION_MNIST_DIR) -> dict[str, dict]:
    """Fashion-MNIST (Debian package) -> `out_dir`/{train,test}.beton; returns {split: manifest}."""
    def split_source(split: str) -> ArraySource:
        images, labels = fashion_mnist_split(split, root)
        keep = stratified_subset(labels, limit)
        return ArraySource(images[keep], labels[keep], list(FASHION_MNIST_CLASSES),
                           {"kind": "fashion_mnist", "path": str(root), "split": split, "limit": limit})
    return _build_splits(split_source, out_dir, write_mode, quality, workers, overwrite)


def build_digits(out_dir: str | os.PathLike, *, limit: int | None = None, write_mode: str = "raw",
                 quality: int = 90, workers: int | None = None, overwrite: bool = False) -> dict[str, dict]:
    """scikit-learn digits, fixed stratified 75/25 split -> `out_dir`/{train,test}.beton; returns {split: manifest}."""
    def split_source(split: str) -> ArraySource:
        images, labels = digits_split(split)
        keep = stratified_subset(labels, limit)
        return ArraySource(images[keep], labels[keep], [str(d) for d in range(10)],
                           {"kind": "digits", "split": split, "limit": limit, "test_fraction": 0.25,
                            "random_state": 0})
    return _build_splits(split_source, out_dir, write_mode, quality, workers, overwrite)


def _build_splits(split_source, out_dir, write_mode, quality, workers, overwrite) -> dict[str, dict]:
    workers = _check_options(write_mode, None, quality, workers)
    outs = {split: Path(out_dir) / f"{split}.beton" for split in SPLITS}
    _refuse_existing(list(outs.values()), overwrite)  # before writing either split
    return {split: write_beton(split_source(split), out, write_mode=write_mode, max_side=None,
                               quality=quality, workers=workers, overwrite=overwrite)
            for split, out in outs.items()}


# ---------------------------------------------------------------- writing

def write_beton(source, out: str | os.PathLike, *, write_mode: str = "jpg", max_side: int | None = None,
                quality: int = 90, workers: int | None = None, overwrite: bool = False) -> dict:
    """Write any source (see ffcv_build.sources) to `out` and its manifest atomically; returns the manifest."""
    workers = _check_options(write_mode, max_side, quality, workers)
    out = Path(out)
    _refuse_existing([out], overwrite)
    if len(source) == 0:
        raise DataError(f"nothing to write to {out}: the source has no images")
    out.parent.mkdir(parents=True, exist_ok=True)
    final_json = manifest_path(out)
    _remove_stale_temps(out.parent, [out.name, final_json.name])
    tmp_beton = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_json = out.with_name(f".{final_json.name}.tmp-{os.getpid()}")
    try:
        fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_side, jpeg_quality=quality),
                  "label": IntField(), "index": IntField()}
        assert tuple(fields) == FIELD_NAMES
        _run_writer(source, tmp_beton, fields, workers, _page_size(source), write_mode == "proportion")
        manifest = _manifest(source, open_beton(tmp_beton), write_mode, max_side, quality)
        with open(tmp_json, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp_beton)
        os.replace(tmp_beton, out)
        os.replace(tmp_json, final_json)
        fsync_path(out.parent)
    except BaseException:
        tmp_beton.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%d images, %d classes, %d skipped)", out, manifest["num_samples"],
                manifest["num_classes"], len(manifest["skipped"]))
    return manifest


class _WriterDataset:
    """What ffcv's writer processes index: (image, label, index) tuples that never raise.

    The first failure is kept in shared memory and the remaining samples become
    placeholders, so the writer finishes quickly and the build then fails cleanly.
    """

    def __init__(self, source, reseed_numpy: bool):
        self.source = source
        self.reseed_numpy = reseed_numpy
        self.failed_index = multiprocessing.Value("q", -1)
        self.failure = multiprocessing.Array("c", 1024)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        if self._pid != os.getpid():  # first sample in this writer process
            self._pid = os.getpid()
            cv2.setNumThreads(1)  # ffcv's resize/JPEG encode: one thread per process, not N per process
        if self.failed_index.value < 0:
            try:
                image = self.source.load(i)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise TypeError(f"source gave a {image.dtype} image of shape {image.shape}, "
                                    f"expected HxWx3 uint8")
                if self.reseed_numpy:  # write_mode='proportion' draws np.random.rand() per image
                    np.random.seed(i)
                return image, int(self.source.labels[i]), i
            except BaseException as e:  # noqa: B036 - must not reach ffcv's worker loop
                with self.failed_index.get_lock():
                    if self.failed_index.value < 0:
                        self.failed_index.value = i
                        self.failure.value = f"{type(e).__name__}: {e}".encode()[:1000].replace(b"\0", b" ")
        return _PLACEHOLDER, 0, i


def _run_writer(source, path: Path, fields: dict, workers: int, page_size: int, reseed_numpy: bool) -> None:
    """ffcv's DatasetWriter with our own supervision of its worker processes (see the module docstring)."""
    dataset = _WriterDataset(source, reseed_numpy)
    num_workers = max(1, min(workers, math.ceil(len(source) / WRITER_CHUNK)))
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=num_workers)
    writer.num_samples = len(dataset)
    writer.prepare()  # header, field descriptors, and the shared-memory metadata table
    processes: list = []
    try:
        work, allocations = multiprocessing.Queue(), multiprocessing.Queue()
        for chunk in chunks(list(enumerate(range(len(dataset)))), WRITER_CHUNK):
            work.put(chunk)
        for _ in range(num_workers):
            work.put(None)
        done = multiprocessing.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
        args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations,
                dataset)
        processes = [multiprocessing.Process(target=worker_job_indexed_dataset, args=args, daemon=True)
                     for _ in range(num_workers)]
        for p in processes:
            p.start()
        allocation_list = _supervise(processes, allocations, done, len(dataset), path)
        writer.finalize(allocation_list)
    finally:
        for p in processes:  # nothing left running on any path out of here
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        writer.metadata_sm.close()
        try:
            writer.metadata_sm.unlink()
        except FileNotFoundError:
            pass
    if dataset.failed_index.value >= 0:
        raise DataError(f"reading sample {dataset.failed_index.value} for {path.name} failed during the "
                        f"write ({dataset.failure.value.decode(errors='replace')}); did the source change "
                        f"after it was scanned? rebuild")


def _supervise(processes: list, allocations, done, total: int, path: Path) -> list:
    """Wait for every worker's page allocations, with a progress bar; a worker that exits without handing
    them over (killed, out of memory, os._exit) fails the build at once instead of hanging it."""
    collected: list = []
    reported = 0
    with tqdm(total=total, unit="img", desc=f"writing {path.name.split('.tmp-')[0].lstrip('.')}",
              dynamic_ncols=True) as bar:
        while reported < len(processes):
            try:
                collected.extend(allocations.get(timeout=POLL_S))
                reported += 1
            except queue.Empty:
                pass
            if done.value > bar.n:
                bar.update(done.value - bar.n)
            # A worker that handed its allocations over may exit before we read them: count exits only
            # after the queue had a chance to deliver.
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise DataError(f"an FFCV writer process died (exit code {dead[0].exitcode}) while writing "
                                f"{path}; check memory and disk space, then rebuild")
            if all(p.exitcode == 0 for p in processes) and allocations.empty() and reported < len(processes):
                time.sleep(POLL_S)  # exited cleanly: its allocations are in flight through the queue's pipe
                if allocations.empty():
                    raise DataError(f"FFCV writer processes exited without reporting their pages while "
                                    f"writing {path}; rebuild")
    return collected


def _page_size(source) -> int:
    """ffcv page size: a power of two that fits the largest stored image (JPEG may exceed raw)."""
    largest = 2 * 3 * source.max_pixels + (1 << 16)
    small = len(source) * 3 * source.max_pixels < (64 << 20)  # every worker pads its last page
    size = MIN_PAGE_SIZE if small else 4 * MIN_PAGE_SIZE
    while size < largest:
        size *= 2
    return size


def _manifest(source, reader, write_mode: str, max_side: int | None, quality: int) -> dict:
    labels = np.asarray(source.labels)
    converted = {mode: int(n) for mode, n in sorted(source.converted_to_rgb.items())}
    return {
        "format_version": FORMAT_VERSION,
        "source": source.description,
        "num_samples": len(source),
        "num_classes": len(source.classes),
        "classes": list(source.classes),
        "class_counts": np.bincount(labels, minlength=len(source.classes)).tolist(),
        "fingerprint": fingerprint(reader, source.classes),
        "fields": list(FIELD_NAMES),
        "max_side": max_side,
        "quality": quality,
        "write_mode": write_mode,
        "num_converted": sum(converted.values()),
        "converted_to_rgb": converted,
        "skipped": list(source.skipped),
        "ffcv_version": getattr(ffcv, "__version__", "unknown"),
    }


# ---------------------------------------------------------------- checks and helpers

def _check_options(write_mode: str, max_side: int | None, quality: int, workers: int | None) -> int:
    problems = []
    if write_mode not in WRITE_MODES:
        problems.append(f"--write-mode {write_mode!r} must be one of {', '.join(WRITE_MODES)}")
    if max_side is not None and not (isinstance(max_side, int) and 0 < max_side <= 65535):
        problems.append(f"--max-side {max_side} must be an integer in 1..65535")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        problems.append(f"--quality {quality} must be an integer in 1..100")
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        problems.append(f"--workers {workers} must be a positive integer")
    if problems:
        raise ConfigError("; ".join(problems))
    return workers or default_workers()


def _refuse_existing(outs: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in outs if p.exists()]
    if existing and not overwrite:
        verb, it = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        raise DataError(f"{', '.join(existing)} already {verb}; pass --overwrite to replace {it}")


def _remove_stale_temps(directory: Path, names: list[str]) -> None:
    """Delete temporary files left by builds that were killed hard (their pid no longer runs)."""
    if not directory.is_dir():
        return
    for name in names:
        for tmp in directory.glob(f".{name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                logger.info("removed stale temporary file %s", tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_report(out: str | os.PathLike, manifest: dict, max_listed: int = 20) -> str:
    """The end-of-build summary: counts, conversions and every skipped file with its reason."""
    converted = ", ".join(f"{mode}: {n}" for mode, n in manifest["converted_to_rgb"].items()) or "none"
    skipped = manifest["skipped"]
    lines = [f"{out}: {manifest['num_samples']} images, {manifest['num_classes']} classes, "
             f"{manifest['num_converted']} converted to RGB ({converted}), {len(skipped)} skipped"]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in skipped[:max_listed]]
    if len(skipped) > max_listed:
        lines.append(f"  ... {len(skipped) - max_listed} more in {manifest_path(out)}")
    return "\n".join(lines)
