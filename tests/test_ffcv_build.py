"""ffcv_build: real .beton files built from small sources and read back with ffcv's Reader/Loader."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ffcv.reader import Reader
from PIL import Image

from ffcv_build import (
    FIELD_NAMES,
    build_digits,
    build_fashion_mnist,
    build_imagefolder,
    build_tsv,
    check_beton,
    read_manifest,
    read_sample,
    write_beton,
)
from ffcv_build import build as build_module
from ffcv_build.__main__ import main
from ffcv_build.manifest import MANIFEST_KEYS
from ffcv_build.sources import FASHION_MNIST_DIR, ArraySource, fashion_mnist_split, stratified_subset
from seed_cluster.errors import DataError

# (class, file name, PIL mode, size, colour); every image is one solid colour so it can be checked after JPEG.
FOLDER_IMAGES = [
    ("cat", "a_rgb.jpg", "RGB", (40, 30), (200, 30, 30)),
    ("cat", "b_gray.png", "L", (20, 50), 90),
    ("cat", "c_cmyk.jpg", "CMYK", (64, 64), (0, 0, 0, 0)),
    ("dog", "a_rgba.png", "RGBA", (30, 30), (20, 180, 40, 128)),
    ("dog", "b_small.png", "RGB", (5, 7), (10, 20, 230)),
    ("dog", "c_broken.jpg", None, None, None),  # corrupt: half a JPEG
    ("fish", "a_palette.gif", "P", (16, 16), 3),
    ("fish", "b_tall.png", "RGB", (10, 100), (250, 250, 0)),
]
EXPECTED_RGB = {"a_rgb.jpg": (200, 30, 30), "b_gray.png": (90, 90, 90), "c_cmyk.jpg": (255, 255, 255),
                "a_rgba.png": (20, 180, 40), "b_small.png": (10, 20, 230), "b_tall.png": (250, 250, 0)}


def make_image_folder(root, changed_pixel: bool = False):
    for cls, name, mode, size, colour in FOLDER_IMAGES:
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode is None:
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
            path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            continue
        img = Image.new(mode, size, colour)
        if mode == "P":
            img.putpalette([0, 0, 0] * 3 + [120, 60, 200] + [0, 0, 0] * 252)
        if changed_pixel and name == "b_tall.png":
            img.putpixel((0, 0), (0, 0, 0))
        img.save(path)
    (root / "README.txt").write_text("not an image, not in a class folder")
    return root


@pytest.fixture(scope="module")
def folder_build(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("folder") / "src")
    out = tmp_path_factory.mktemp("folder_out") / "tiny.beton"
    manifest = build_imagefolder(root, out, max_side=32, quality=95, workers=2)
    return root, out, manifest


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, build_digits(out, workers=2)


def test_imagefolder_skips_corrupt_file_and_lists_it(folder_build):
    _, _, manifest = folder_build
    reasons = {os.path.basename(s["path"]): s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"c_broken.jpg", "README.txt"}
    assert "not inside a class subfolder" in reasons["README.txt"]
    assert manifest["num_samples"] == 7


def test_imagefolder_counts_images_converted_to_rgb(folder_build):
    _, _, manifest = folder_build
    assert manifest["converted_to_rgb"] == {"CMYK": 1, "L": 1, "P": 1, "RGBA": 1}
    assert manifest["num_converted"] == 4


def test_imagefolder_manifest_has_every_key_and_the_class_map(folder_build):
    _, out, manifest = folder_build
    assert set(MANIFEST_KEYS) <= set(manifest)
    assert manifest["classes"] == ["cat", "dog", "fish"]
    assert manifest["class_counts"] == [3, 2, 2]
    assert manifest["fields"] == list(FIELD_NAMES)
    assert (manifest["max_side"], manifest["quality"], manifest["write_mode"]) == (32, 95, "jpg")
    assert read_manifest(out) == manifest
    assert check_beton(out, verify_fingerprint=True) == manifest


def test_imagefolder_samples_read_back_with_their_labels_indices_and_pixels(folder_build):
    _, out, _ = folder_build
    reader = Reader(str(out))
    assert reader.field_names == list(FIELD_NAMES)
    kept = [(cls, name, size) for cls, name, mode, size, _ in FOLDER_IMAGES if mode is not None]
    assert reader.num_samples == len(kept)
    classes = ["cat", "dog", "fish"]
    for i, (cls, name, size) in enumerate(kept):
        image, label, index = read_sample(reader, i)
        assert (label, index) == (classes.index(cls), i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert max(image.shape[:2]) == min(32, max(size))
        expected = EXPECTED_RGB.get(name, (120, 60, 200))
        centre = image[image.shape[0] // 2, image.shape[1] // 2].astype(int)
        assert np.abs(centre - expected).max() <= 12, name


def test_fingerprint_is_stable_and_changes_when_one_pixel_changes(tmp_path):
    src_a = make_image_folder(tmp_path / "a")
    src_b = make_image_folder(tmp_path / "b", changed_pixel=True)
    kwargs = {"max_side": 32, "write_mode": "raw", "workers": 1}
    first = build_imagefolder(src_a, tmp_path / "a1.beton", **kwargs)["fingerprint"]
    again = build_imagefolder(src_a, tmp_path / "a2.beton", **kwargs)["fingerprint"]
    changed = build_imagefolder(src_b, tmp_path / "b.beton", **kwargs)["fingerprint"]
    assert first == again
    assert changed != first


class FailingSource(ArraySource):
    """Raises (or kills the writer process) while the .beton is being written."""

    def __init__(self, n: int, fail_at: int, how: str):
        super().__init__(np.zeros((n, 4, 4), np.uint8), np.arange(n) % 2, ["a", "b"], {"kind": "test"})
        self.fail_at, self.how = fail_at, how

    def load(self, i):
        if i == self.fail_at:
            if self.how == "exit":
                os._exit(3)
            raise OSError("disk went away")
        return super().load(i)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_exception_while_writing_leaves_no_final_or_temporary_file(tmp_path):
    out = tmp_path / "x.beton"
    with pytest.raises(DataError, match="disk went away"):
        write_beton(FailingSource(300, fail_at=150, how="raise"), out, write_mode="raw", workers=2)
    assert _leftovers(tmp_path) == []


_DIES = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_ffcv_build import FailingSource
from ffcv_build.build import write_beton
from seed_cluster.errors import DataError
try:
    write_beton(FailingSource(300, fail_at=150, how="exit"), Path({out!r}), write_mode="raw", workers=2)
except DataError as e:
    print("DataError:", e)
    sys.exit(7)
"""


def test_writer_process_that_dies_fails_the_build_instead_of_hanging(tmp_path):
    out = tmp_path / "x.beton"
    code = _DIES.format(tests=str(Path(__file__).parent), out=str(out))
    # In a subprocess with a timeout: a regression hangs this test for 5 minutes at most, never the suite.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 7, result.stderr[-3000:]
    assert "writer process died (exit code 3)" in result.stdout
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_after_writing_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "fingerprint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_beton(FailingSource(10, fail_at=-1, how="raise"), tmp_path / "x.beton", workers=1)
    assert _leftovers(tmp_path) == []


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "x.beton"
    out.write_bytes(b"precious")
    source = FailingSource(10, fail_at=-1, how="raise")
    with pytest.raises(DataError, match="--overwrite"):
        write_beton(source, out, workers=1)
    assert out.read_bytes() == b"precious"
    manifest = write_beton(source, out, workers=1, overwrite=True)
    assert check_beton(out)["fingerprint"] == manifest["fingerprint"]


def test_check_beton_rejects_missing_truncated_and_foreign_files(tmp_path, digits_dir):
    good = digits_dir[0] / "test.beton"
    with pytest.raises(DataError, match="not found"):
        check_beton(tmp_path / "missing.beton")
    data = good.read_bytes()
    for name, content in [("half.beton", data[: len(data) // 2]), ("tail.beton", data[:-5]),
                          ("tiny.beton", data[:100]), ("garbage.beton", b"\x07" * 5000)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=name) as err:
            check_beton(tmp_path / name)
        assert "\n" not in str(err.value)
    shutil.copy(good, tmp_path / "alone.beton")  # no manifest beside it: a minimal dict
    assert check_beton(tmp_path / "alone.beton") == {"num_samples": 450, "num_classes": 10,
                                                     "fields": list(FIELD_NAMES)}


def test_check_beton_notices_a_manifest_that_does_not_match(tmp_path, digits_dir):
    for name in ("train", "test"):
        shutil.copy(digits_dir[0] / f"{name}.beton", tmp_path / f"{name}.beton")
    shutil.copy(digits_dir[0] / "train.json", tmp_path / "test.json")
    with pytest.raises(DataError, match="manifest says"):
        check_beton(tmp_path / "test.beton")


def _tsv_row(name, label, image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"{name}\t{label}\t{base64.b64encode(buf.getvalue()).decode()}\n"


def test_tsv_round_trip_creates_lineidx_and_keeps_labels(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)]
    rows = [_tsv_row(f"img{i}", i % 3, Image.new("RGB", (12 + i, 9), c), "PNG" if i % 2 else "JPEG")
            for i, c in enumerate(colours)]
    rows.insert(2, "broken\t1\t" + base64.b64encode(b"not an image").decode() + "\n")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("".join(rows))
    manifest = build_tsv(tsv, tmp_path / "train.beton", workers=1)
    assert (tmp_path / "train.lineidx").read_text().split() == [
        str(sum(len(r) for r in rows[:k])) for k in range(len(rows))]
    assert manifest["num_samples"] == 4 and manifest["classes"] == ["0", "1", "2"]
    assert [s["path"].rsplit(":", 1)[1] for s in manifest["skipped"]] == ["line 3 (broken)"]
    reader = Reader(str(tmp_path / "train.beton"))
    for i, colour in enumerate(colours):
        image, label, index = read_sample(reader, i)
        assert (label, index) == (i % 3, i)
        assert np.abs(image[4, 5].astype(int) - colour).max() <= 12


def test_tsv_malformed_row_names_the_file_and_line(tmp_path):
    good = _tsv_row("ok", 0, Image.new("RGB", (8, 8)), "PNG")
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(good + good + "x\tseven\tAAAA\n" + good)
    with pytest.raises(DataError, match=r"bad\.tsv line 3: label b'seven' is not an integer"):
        build_tsv(tsv, tmp_path / "bad.beton", workers=1)
    tsv.write_text(good + "only-a-name\n")
    (tmp_path / "bad.lineidx").unlink()
    with pytest.raises(DataError, match=r"bad\.tsv line 2: 1 column"):
        build_tsv(tsv, tmp_path / "bad.beton", workers=1)
    assert not (tmp_path / "bad.beton").exists()


def test_digits_split_is_stratified_and_complete(digits_dir):
    out, manifests = digits_dir
    train, test = manifests["train"], manifests["test"]
    assert (train["num_samples"], test["num_samples"]) == (1347, 450)
    assert train["write_mode"] == test["write_mode"] == "raw"
    counts = np.array(train["class_counts"]) + np.array(test["class_counts"])
    assert np.all(np.abs(np.array(test["class_counts"]) - 0.25 * counts) <= 1)
    image, label, index = read_sample(Reader(str(out / "test.beton")), 7)
    assert image.shape == (8, 8, 3) and index == 7 and 0 <= label < 10
    assert image.max() > 200  # 0..16 scaled to 0..255


def test_digits_beton_loads_with_ffcv_loader(digits_dir):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    reader = Reader(str(digits_dir[0] / "test.beton"))
    loader = Loader(str(digits_dir[0] / "test.beton"), batch_size=100, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()],
                               "index": [IntDecoder()]})
    images, labels, indices = (np.concatenate(parts) for parts in zip(*loader, strict=True))
    assert images.shape == (450, 8, 8, 3)
    np.testing.assert_array_equal(indices.ravel(), np.arange(450))
    np.testing.assert_array_equal(labels.ravel(), reader.metadata["f1"])
    np.testing.assert_array_equal(images[17], read_sample(reader, 17)[0])


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_fashion_mnist_limit_keeps_a_stratified_prefix(tmp_path):
    manifests = build_fashion_mnist(tmp_path, limit=50, workers=2)
    raw_images, raw_labels = fashion_mnist_split("train")
    for split in ("train", "test"):
        assert manifests[split]["num_samples"] == 50
        assert manifests[split]["class_counts"] == [5] * 10
        assert manifests[split]["source"]["split"] == split
        check_beton(tmp_path / f"{split}.beton", verify_fingerprint=True)
    reader = Reader(str(tmp_path / "train.beton"))
    first = stratified_subset(raw_labels, 50)
    image, label, _ = read_sample(reader, 3)
    np.testing.assert_array_equal(image[:, :, 0], raw_images[first[3]])  # raw: lossless
    assert label == raw_labels[first[3]]


def test_fashion_mnist_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_fashion_mnist(tmp_path / "out", root=tmp_path)


def test_stratified_subset_is_proportional_and_in_order():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    keep = stratified_subset(labels, 10)
    assert np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [6, 3, 1]
    assert keep[:6].tolist() == list(range(6))


def test_cli_prints_report_and_exits_2_on_user_errors(tmp_path, capsys, folder_build):
    root = folder_build[0]
    out = tmp_path / "cli.beton"
    assert main(["imagefolder", str(root), str(out), "--max-side", "16", "--workers", "1", "--raw"]) == 0
    report = capsys.readouterr().out
    assert "7 images, 3 classes, 4 converted to RGB" in report and "c_broken.jpg" in report
    assert read_manifest(out)["write_mode"] == "raw"
    assert main(["imagefolder", str(root), str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and out.exists()
    assert main(["tsv", str(tmp_path / "nope.tsv"), str(tmp_path / "t.beton")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sigterm_unwinds_the_cli_like_ctrl_c_so_temporary_files_are_removed():
    import signal

    from ffcv_build.__main__ import _stop_on_sigterm

    with pytest.raises(KeyboardInterrupt):
        _stop_on_sigterm(os.getpid())(signal.SIGTERM, None)
