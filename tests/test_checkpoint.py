"""Checkpointer: atomic step-N.pt files, retention, discovery that skips temporaries, fallback past a corrupt one."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from seed_cluster.checkpoint import Checkpointer, load
from seed_cluster.errors import CheckpointError


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(4, 3, generator=g)}, "rng": [torch.get_rng_state()],
            "note": f"saved at {step}"}


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def ckpt(tmp_path) -> Checkpointer:
    c = Checkpointer(tmp_path / "checkpoints", keep=3)
    c.prepare()
    return c


def test_save_writes_step_file_whose_content_round_trips(ckpt):
    state = _state(7)
    path, seconds = ckpt.save(state, 7)
    assert path == ckpt.directory / "step-00000007.pt"
    assert seconds >= 0
    assert _names(ckpt.directory) == ["step-00000007.pt"]  # no temp file left beside it
    loaded = load(path)
    assert loaded["format"] == "seed-cluster"
    assert loaded["step"] == 7 and loaded["note"] == "saved at 7"
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["rng"][0], state["rng"][0])


def test_save_does_not_add_the_format_tag_to_the_callers_dict(ckpt):
    state = _state(1)
    ckpt.save(state, 1)
    assert "format" not in state


def test_keep_prunes_the_oldest_checkpoints(tmp_path):
    c = Checkpointer(tmp_path / "ck", keep=2)
    c.prepare()
    for step in (10, 20, 30, 40):
        c.save(_state(step), step)
    assert _names(c.directory) == ["step-00000030.pt", "step-00000040.pt"]
    assert [load(p)["step"] for p in c.paths()] == [30, 40]


def test_paths_order_by_step_number_not_by_name_length(ckpt):
    for step in (99_999_999, 100_000_000, 5):  # 8 and 9 digits: numeric, not lexicographic order
        ckpt.save(_state(step), step)
    assert [load(p)["step"] for p in ckpt.paths()] == [5, 99_999_999, 100_000_000]
    assert ckpt.latest().name == "step-100000000.pt"


def test_latest_ignores_temp_and_unrelated_files(ckpt):
    ckpt.save(_state(3), 3)
    d = ckpt.directory
    (d / ".step-00000009.pt.tmp-4242").write_bytes(b"half a checkpoint")  # a killed writer's leftover
    (d / "step-00000008.pt.bak").write_bytes(b"x")
    (d / "step-8.pt").write_bytes(b"x")
    (d / "notes.txt").write_text("hello")
    (d / "step-00000007.pt.partial").write_bytes(b"x")
    assert ckpt.latest() == d / "step-00000003.pt"
    assert ckpt.paths() == [d / "step-00000003.pt"]


def test_latest_is_none_for_an_empty_or_missing_directory(tmp_path):
    assert Checkpointer(tmp_path / "never-created").latest() is None
    assert Checkpointer(tmp_path / "never-created").load_latest() is None
    empty = Checkpointer(tmp_path / "empty")
    empty.prepare()
    assert empty.latest() is None


def test_load_latest_falls_back_past_a_truncated_newest_checkpoint(ckpt, caplog):
    ckpt.save(_state(1), 1)
    newest, _ = ckpt.save(_state(2), 2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="seed_cluster.checkpoint"):
        found = ckpt.load_latest()
    assert found is not None
    path, state = found
    assert path.name == "step-00000001.pt" and state["step"] == 1
    assert torch.equal(state["model"]["w"], _state(1)["model"]["w"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000002.pt" in m and "falling back" in m for m in warnings), warnings


def test_load_latest_returns_none_when_every_checkpoint_is_unreadable(ckpt, caplog):
    for step in (1, 2):
        p, _ = ckpt.save(_state(step), step)
        p.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="seed_cluster.checkpoint"):
        assert ckpt.load_latest() is None
    assert sum("falling back" in r.getMessage() for r in caplog.records) == 2


def test_prepare_deletes_stale_temp_files_and_keeps_checkpoints(tmp_path):
    directory = tmp_path / "ck"
    directory.mkdir()
    stale = [directory / ".step-00000005.pt.tmp-123", directory / ".step-00000006.pt.tmp-99999"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = directory / "unrelated.txt"
    keep.write_text("mine")
    c = Checkpointer(directory)
    c.save(_state(4), 4)
    c.prepare()
    assert _names(directory) == ["step-00000004.pt", "unrelated.txt"]


def test_prepare_creates_missing_parent_directories(tmp_path):
    c = Checkpointer(tmp_path / "a" / "b" / "checkpoints")
    c.prepare()
    assert c.directory.is_dir()
    assert _names(c.directory) == []  # the writability probe is removed


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_prepare_raises_one_line_checkpoint_error_for_an_unwritable_directory(tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("not a directory")
        directory = tmp_path / "afile" / "ckpt"
    else:
        directory = Path("/proc/seed-cluster-test/ckpt")
    with pytest.raises(CheckpointError) as info:
        Checkpointer(directory).prepare()
    message = str(info.value)
    assert "\n" not in message
    assert str(directory) in message
    assert "output_dir" in message  # says what to change


class _ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


@pytest.mark.parametrize("bad", [_ExplodesWhenPickled(), threading.Lock()], ids=["reduce-raises", "lock"])
def test_failed_save_leaves_neither_the_final_file_nor_a_temp_file(ckpt, bad):
    ckpt.save(_state(1), 1)
    with pytest.raises((RuntimeError, TypeError)):
        ckpt.save({"step": 2, "bad": bad}, 2)
    assert _names(ckpt.directory) == ["step-00000001.pt"]
    assert ckpt.latest().name == "step-00000001.pt"


def test_failed_save_does_not_prune_older_checkpoints(tmp_path):
    c = Checkpointer(tmp_path / "ck", keep=2)
    c.prepare()
    c.save(_state(1), 1)
    c.save(_state(2), 2)
    with pytest.raises(RuntimeError):
        c.save({"step": 3, "bad": _ExplodesWhenPickled()}, 3)
    assert _names(c.directory) == ["step-00000001.pt", "step-00000002.pt"]


def test_save_into_a_vanished_directory_raises_checkpoint_error(tmp_path):
    c = Checkpointer(tmp_path / "gone")  # prepare() never ran: the directory does not exist
    with pytest.raises(CheckpointError) as info:
        c.save(_state(1), 1)
    assert "\n" not in str(info.value) and "step-00000001.pt" in str(info.value)


def test_load_rejects_a_torch_file_that_is_not_a_seed_cluster_checkpoint(tmp_path):
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a seed-cluster checkpoint"):
        load(plain)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="not a seed-cluster checkpoint"):
        load(tensor_only)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint\n", b"PK\x03\x04 truncated zip"])
def test_load_of_garbage_raises_one_line_checkpoint_error(tmp_path, content):
    path = tmp_path / "step-00000001.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
