"""FrozenTeacher: frozen weights and BN statistics; load_teacher: every supported file format, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seed_cluster.checkpoint import Checkpointer
from seed_cluster.config import TeacherConfig
from seed_cluster.errors import TeacherError
from seed_cluster.models import Encoder
from seed_cluster.teachers import FrozenTeacher, file_fingerprint, load_teacher, resolve_checkpoint_path

ARCH = "convnet_s"
DIM = 16


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _source_encoder(seed: int, head: str = "mlp", dim: int = DIM) -> Encoder:
    """A randomly initialised encoder whose BN running statistics have moved away from (0, 1)."""
    torch.manual_seed(seed)
    encoder = Encoder(ARCH, dim, head=head)
    encoder.train()
    with torch.no_grad():
        for i in range(3):
            encoder(_images(8, seed=100 + i) * 3 + 1)
    return encoder.eval()


def _reference_output(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval()(x)


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def _save_trainer_checkpoint(run_dir, encoder: Encoder, step: int):
    """A checkpoint laid out as Trainer.save writes it (the method's state dict under "model")."""
    model = {f"student.{k}": v for k, v in encoder.state_dict().items()}
    model["queue.queue"] = torch.randn(DIM, 32)
    model["queue.ptr"] = torch.zeros((), dtype=torch.long)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=3)
    checkpointer.prepare()
    path, _ = checkpointer.save({"step": step, "train_state": {"step": step}, "model": model, "optimizer": {},
                                 "data": {}, "rng": [], "config": {}, "config_hash": "00000000",
                                 "teacher_fingerprint": None, "git": None}, step)
    return path


def _frozen(seed: int = 0) -> FrozenTeacher:
    return FrozenTeacher(_source_encoder(seed), fingerprint="test")


# -- frozen ------------------------------------------------------------------------------------------------

def test_teacher_parameters_do_not_require_grad():
    teacher = _frozen()
    params = list(teacher.parameters())
    assert params and not any(p.requires_grad for p in params)


def test_teacher_stays_in_eval_mode_after_train_on_itself_and_on_a_parent():
    teacher = _frozen()
    assert not any(m.training for m in teacher.modules())  # frozen from construction on
    parent = nn.ModuleDict({"student": nn.Linear(2, 2), "teacher": teacher})
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    parent.train()
    assert parent["student"].training
    assert not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not any(m.training for m in teacher.modules())


def test_teacher_bn_running_stats_do_not_move_in_train_mode():
    teacher = _frozen()
    parent = nn.ModuleDict({"teacher": teacher}).train()
    before = _bn_buffers(teacher)
    assert before  # the convnet has BN layers, so this test checks something
    for i in range(3):
        teacher(_images(8, seed=i) * 5 - 2)
    after = _bn_buffers(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert parent["teacher"] is teacher


def test_teacher_output_carries_no_gradient_even_for_inputs_that_require_it():
    teacher = _frozen()
    x = _images().requires_grad_(True)
    z = teacher(x)
    assert not z.requires_grad
    assert z.grad_fn is None
    assert torch.allclose(z.norm(dim=1), torch.ones(len(x)), atol=1e-5)


def test_teacher_output_is_deterministic_across_batch_composition():
    # In eval mode an image's embedding cannot depend on the other images of the batch.
    teacher = _frozen()
    x = _images(6)
    assert torch.allclose(teacher(x)[:2], teacher(x[:2]), atol=1e-5)


# -- loading -----------------------------------------------------------------------------------------------

def _cfg(path, head: str = "mlp") -> TeacherConfig:
    return TeacherConfig(arch=ARCH, head=head, hidden_dim=0, checkpoint=str(path))


@pytest.mark.parametrize("layout", ["plain", "module_prefixed", "state_dict_key"])
def test_load_teacher_from_an_encoder_state_dict_reproduces_the_source(tmp_path, layout):
    source = _source_encoder(1)
    state = source.state_dict()
    if layout == "module_prefixed":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "state_dict_key":
        state = {"state_dict": state, "epoch": 3}
    path = tmp_path / "teacher.pth"
    torch.save(state, path)
    teacher = load_teacher(_cfg(path), DIM)
    x = _images()
    assert torch.equal(teacher(x), _reference_output(source, x))
    assert teacher.fingerprint.startswith("sha256:") and teacher.format == "plain"
    assert not any(p.requires_grad for p in teacher.parameters())


def test_load_teacher_from_a_plain_backbone_state_dict_with_head_none(tmp_path):
    source = _source_encoder(2, head="none")
    path = tmp_path / "backbone.pth"
    torch.save(source.backbone.state_dict(), path)
    assert not any(k.startswith("backbone.") for k in torch.load(path))
    teacher = load_teacher(_cfg(path, head="none"), DIM)
    x = _images()
    z = teacher(x)
    assert z.shape == (len(x), source.backbone.num_features)
    assert torch.equal(z, _reference_output(source, x))


def test_load_teacher_from_a_seed_cluster_checkpoint_file(tmp_path):
    source = _source_encoder(3)
    path = _save_trainer_checkpoint(tmp_path / "run", source, step=50)
    teacher = load_teacher(_cfg(path), DIM)
    x = _images()
    assert torch.equal(teacher(x), _reference_output(source, x))


def test_a_run_directory_resolves_to_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _save_trainer_checkpoint(run, _source_encoder(4), step=10)
    newest_source = _source_encoder(5)
    newest = _save_trainer_checkpoint(run, newest_source, step=20)
    (run / "checkpoints" / ".step-00000030.pt.tmp-1").write_bytes(b"a half-written save")
    assert resolve_checkpoint_path(str(run)) == newest
    teacher = load_teacher(_cfg(run), DIM)
    x = _images()
    assert torch.equal(teacher(x), _reference_output(newest_source, x))
    assert teacher.fingerprint == load_teacher(_cfg(newest), DIM).fingerprint
    assert teacher.format == "seed-cluster"


def test_a_run_directory_without_checkpoints_raises_teacher_error(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(TeacherError) as info:
        load_teacher(_cfg(tmp_path / "run"), DIM)
    assert "no complete checkpoint" in str(info.value) and "\n" not in str(info.value)


def test_head_dimension_mismatch_names_method_dim(tmp_path):
    source = _source_encoder(6, dim=64)
    path = tmp_path / "teacher64.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(TeacherError) as info:
        load_teacher(_cfg(path), 128)
    message = str(info.value)
    assert "\n" not in message
    assert "method.dim=128" in message and "64-d" in message


def test_architecture_mismatch_lists_the_offending_keys(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "convnet_m.pth"
    torch.save(Encoder("convnet_m", DIM).state_dict(), path)
    with pytest.raises(TeacherError) as info:
        load_teacher(_cfg(path), DIM)
    message = str(info.value)
    assert "\n" not in message
    assert f"teacher.arch={ARCH}" in message and "mis-shaped" in message and "backbone." in message


def test_missing_teacher_file_raises_one_line_teacher_error(tmp_path):
    missing = tmp_path / "nope" / "teacher.pth"
    with pytest.raises(TeacherError) as info:
        load_teacher(_cfg(missing), DIM)
    message = str(info.value)
    assert "\n" not in message
    assert "teacher.checkpoint=" in message and str(missing) in message and "does not exist" in message


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n" * 3, b"", b"PK\x03\x04\x00\x00garbage"])
def test_garbage_teacher_file_raises_one_line_teacher_error(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(TeacherError) as info:
        load_teacher(_cfg(path), DIM)
    message = str(info.value)
    assert "\n" not in message
    assert "teacher.checkpoint=" in message and str(path) in message


def test_a_pickle_that_is_not_a_state_dict_raises_teacher_error(tmp_path):
    path = tmp_path / "dict.pth"
    torch.save({"epoch": 3, "arch": "resnet50"}, path)
    with pytest.raises(TeacherError, match="not a state dict nor a checkpoint layout"):
        load_teacher(_cfg(path), DIM)


def test_no_checkpoint_gives_a_random_teacher_with_a_non_file_fingerprint():
    teacher = load_teacher(TeacherConfig(arch=ARCH, head="mlp", checkpoint=None), DIM)
    assert teacher.fingerprint.startswith("random:")
    assert not any(p.requires_grad for p in teacher.parameters())


def test_fingerprint_hashes_loaded_tensors_and_head_not_file_bytes(tmp_path):
    a, a_prefixed, b = tmp_path / "a.pth", tmp_path / "a_module.pth", tmp_path / "b.pth"
    torch.save(_source_encoder(7).state_dict(), a)
    torch.save({"state_dict": {f"module.{k}": v for k, v in _source_encoder(7).state_dict().items()}}, a_prefixed)
    torch.save(_source_encoder(8).state_dict(), b)
    assert file_fingerprint(a) != file_fingerprint(a_prefixed)  # other bytes ...
    fp = load_teacher(_cfg(a), DIM).fingerprint
    assert fp == load_teacher(_cfg(a_prefixed), DIM).fingerprint  # ... same weights, same teacher
    assert fp == load_teacher(_cfg(a), DIM).fingerprint
    assert fp != load_teacher(_cfg(b), DIM).fingerprint
    assert fp.startswith("sha256:")
