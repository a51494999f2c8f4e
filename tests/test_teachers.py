"""FrozenTeacher: frozen weights and BN statistics; load_teacher: every supported file format, clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seed_cluster.checkpoint import Checkpointer
from seed_cluster.config import TeacherConfig
from seed_cluster.errors import TeacherError
from seed_cluster.models import Encoder
from seed_cluster.teachers import (
    FrozenTeacher,
    detect_format,
    extract_encoder_state,
    file_fingerprint,
    inspect_file,
    load_teacher,
    main,
    preset,
    resolve_checkpoint_path,
)

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


# -- the release layouts -----------------------------------------------------------------------------------
# Files are written as the official repositories save them (key names, nesting, extra entries), from random
# weights whose names and shapes come from the tables below (written from torchvision's / SwAV's naming, not
# from seed_cluster's modules); the reference embedding is a functional forward pass over those tensors.

R50 = (3, 4, 6, 3)


def _resnet_table(blocks=R50, widen: int = 1) -> list[tuple[str, tuple]]:
    """torchvision-named Bottleneck ResNet tensors; `widen` multiplies every width (SwAV's wide ResNets)."""
    def bn(name, c):
        return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,)), (f"{name}.running_mean", (c,)),
                (f"{name}.running_var", (c,)), (f"{name}.num_batches_tracked", ())]
    stem = 64 * widen
    table = [("conv1.weight", (stem, 3, 7, 7))] + bn("bn1", stem)
    in_ch = stem
    for i, n in enumerate(blocks):
        planes = stem * 2 ** i
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            table += [(f"{p}.conv1.weight", (planes, in_ch, 1, 1))] + bn(f"{p}.bn1", planes)
            table += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + bn(f"{p}.bn2", planes)
            table += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + bn(f"{p}.bn3", planes * 4)
            if b == 0:
                table += [(f"{p}.downsample.0.weight", (planes * 4, in_ch, 1, 1))] + bn(f"{p}.downsample.1", planes * 4)
            in_ch = planes * 4
    return table


def _head_table(prefix: str, kind: str, d: int, hidden: int, dim: int) -> list[tuple[str, tuple]]:
    lin = lambda i, o, n, bias=True: [(f"{prefix}{n}.weight", (o, i))] + ([(f"{prefix}{n}.bias", (o,))] if bias else [])  # noqa: E731
    bn = lambda c, n, affine=True: ([(f"{prefix}{n}.weight", (c,)), (f"{prefix}{n}.bias", (c,))] if affine else []) + [  # noqa: E731
        (f"{prefix}{n}.running_mean", (c,)), (f"{prefix}{n}.running_var", (c,)), (f"{prefix}{n}.num_batches_tracked", ())]
    if kind == "linear":
        return [(f"{prefix}weight", (dim, d)), (f"{prefix}bias", (dim,))]
    if kind == "mlp":
        return lin(d, hidden, 0) + lin(hidden, dim, 2)
    if kind == "mlp_bn":
        return lin(d, hidden, 0) + bn(hidden, 1) + lin(hidden, dim, 3)
    if kind == "mocov3":
        return lin(d, hidden, 0, False) + bn(hidden, 1) + lin(hidden, dim, 3, False) + bn(dim, 4, affine=False)
    if kind == "dino":
        return lin(d, hidden, 0) + lin(hidden, hidden, 2) + lin(hidden, dim, 4)
    raise AssertionError(kind)


def _random_state(table, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in table:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("running_mean", ".bias")) or len(shape) == 1:
            state[name] = torch.randn(shape, generator=g) * 0.1 + (1.0 if name.endswith(".weight") else 0.0)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def _bn(x, sd, p, affine=True):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd.get(f"{p}.weight") if affine else None,
                        sd.get(f"{p}.bias") if affine else None, False, 0.0, 1e-5)


def _reference_resnet(sd, x, blocks=R50):
    """A straightforward Bottleneck ResNet forward (torchvision v1.5: stride on the 3x3) over named tensors."""
    x = F.max_pool2d(F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")), 3, 2, 1)
    for i, n in enumerate(blocks):
        for b in range(n):
            p, stride = f"layer{i + 1}.{b}", (2 if b == 0 and i > 0 else 1)
            out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            out = F.relu(_bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), sd, f"{p}.bn2"))
            out = _bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                x = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
            x = F.relu(out + x)
    return x.mean(dim=(2, 3))


def _reference_head(sd, h, kind, prefix):
    def lin(n, bias=True):
        return F.linear(h, sd[f"{prefix}{n}.weight"], sd[f"{prefix}{n}.bias"] if bias else None)
    if kind == "linear":
        return F.linear(h, sd[f"{prefix}weight"], sd[f"{prefix}bias"])
    if kind == "mlp":
        h = F.relu(lin(0))
        return lin(2)
    if kind == "mlp_bn":
        h = F.relu(_bn(lin(0), sd, f"{prefix}1"))
        return lin(3)
    if kind == "mocov3":
        h = F.relu(_bn(lin(0, False), sd, f"{prefix}1"))
        return _bn(lin(3, False), sd, f"{prefix}4", affine=False)
    if kind == "dino":
        h = F.gelu(lin(0))
        h = F.gelu(lin(2))
        return lin(4)
    raise AssertionError(kind)


def _reference_embedding(backbone_sd, head_sd, x, kind, head_prefix):
    with torch.no_grad():
        return F.normalize(_reference_head(head_sd, _reference_resnet(backbone_sd, x), kind, head_prefix), dim=1)


def _x(n=2, side=32):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(5))


# name: (preset, head kind, hidden, dim, writer(backbone_sd, head_sd) -> object saved, head prefix in head_sd)
def _moco(backbone, head, head_key="fc."):
    encoder_q = {**backbone, **{head_key + k: v for k, v in head.items()}}
    state = {f"module.encoder_q.{k}": v for k, v in encoder_q.items()}
    state.update({"module.encoder_k.conv1.weight": backbone["conv1.weight"].clone(),
                  "module.encoder_k.fc.bias": torch.zeros(1), "module.queue": torch.randn(128, 64),
                  "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def _simclr(backbone, head):
    model = {f"module.module.module.{k}": v for k, v in backbone.items()}
    model.update({f"module.module.module.fc.{k}": v for k, v in head.items()})
    return {"model": model, "epoch": 200}


def _swav(backbone, head):
    state = {f"module.{k}": v for k, v in backbone.items()}
    state.update({f"module.projection_head.{k}": v for k, v in head.items()})
    state["module.prototypes.weight"] = torch.randn(3000, 128)
    return state


def _dino(backbone, head):
    teacher = {f"module.backbone.{k}": v for k, v in backbone.items()}
    teacher.update({f"module.head.mlp.{k}": v for k, v in head.items()})
    teacher["module.head.last_layer.weight_g"] = torch.ones(100, 1)
    teacher["module.head.last_layer.weight_v"] = torch.randn(100, 256)
    return {"student": {"module.backbone.conv1.weight": backbone["conv1.weight"].clone()}, "teacher": teacher,
            "optimizer": {}, "epoch": 100, "args": argparse.Namespace(arch="resnet50", out_dim=60000),
            "dino_loss": {"center": torch.zeros(1, 100)}}


def _mocov3(backbone, head):
    base = {**backbone, **{f"fc.{k}": v for k, v in head.items()}}
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state["module.momentum_encoder.conv1.weight"] = backbone["conv1.weight"].clone()
    state["module.predictor.0.weight"] = torch.randn(4096, 256)
    return {"epoch": 1000, "arch": "resnet50", "state_dict": state, "optimizer": {}, "scaler": {"scale": 1.0}}


RELEASES = [
    pytest.param("resnet50_mocov1", "mocov1", "linear", 0, _moco, id="mocov1"),
    pytest.param("resnet50_mocov2_200ep", "mocov2", "mlp", 2048, _moco, id="mocov2"),
    pytest.param("resnet50_simclr", "simclr", "mlp_bn", 2048, _simclr, id="simclr"),
    pytest.param("resnet50_swav", "swav", "mlp_bn", 2048, _swav, id="swav"),
    pytest.param("resnet50_dino", "dino", "dino", 2048, _dino, id="dino"),
    pytest.param("resnet50_mocov3", "mocov3", "mocov3", 4096, _mocov3, id="mocov3"),
]


def _release_file(tmp_path, writer, kind, hidden, dim, widen=1, seed=0, name="release.pth.tar"):
    backbone = _random_state(_resnet_table(widen=widen), seed)
    head = _random_state(_head_table("", kind, 2048 * widen, hidden, dim), seed + 1)
    path = tmp_path / name
    torch.save(writer(backbone, head), path)
    return path, backbone, head


@pytest.mark.parametrize("name,fmt,kind,hidden,writer", RELEASES)
def test_release_layout_is_detected_loads_strictly_and_embeds_like_the_source(tmp_path, caplog, name, fmt, kind,
                                                                               hidden, writer):
    cfg = preset(name)
    path, backbone, head = _release_file(tmp_path, writer, kind, hidden, cfg.dim)
    assert detect_format(torch.load(path, weights_only=False)) == fmt
    with caplog.at_level("INFO", logger="seed_cluster.teachers"):
        teacher = load_teacher(name, path)
    assert teacher.format == fmt and teacher.dim == cfg.dim
    x = _x()
    torch.testing.assert_close(teacher(x), _reference_embedding(backbone, head, x, kind, ""), rtol=1e-4, atol=1e-5)
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) <= 1  # the entries left aside are listed once
    if fmt in ("mocov1", "mocov2"):
        assert "encoder_k" in ignored[0] and "queue" in ignored[0]
    if fmt == "swav":
        assert "prototypes" in ignored[0]
    if fmt == "dino":
        assert "last_layer" in ignored[0] and "student" in ignored[0]


def test_swav_padding_equals_torchvision_resnet50_on_the_same_weights(tmp_path):
    import torchvision

    path, backbone, head = _release_file(tmp_path, _swav, "mlp_bn", 2048, 128)
    teacher = load_teacher("resnet50_swav", path)
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(backbone)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(teacher.encoder.features(x), tv.eval()(x), rtol=1e-4, atol=1e-5)
    assert isinstance(teacher.encoder.backbone.padding, nn.ConstantPad2d)
    assert teacher.encoder.backbone.conv1.padding == (2, 2)


def test_wide_swav_w2_release_loads_end_to_end(tmp_path):
    path, backbone, head = _release_file(tmp_path, _swav, "mlp_bn", 8192, 128, widen=2)
    teacher = load_teacher("resnet50w2_swav", path)
    backbone_params = sum(p.numel() for p in teacher.encoder.backbone.parameters())
    assert round(backbone_params / 1e6) == 94  # SwAV README: RN50-w2 94M
    x = _x(2, side=32)
    torch.testing.assert_close(teacher(x), _reference_embedding(backbone, head, x, "mlp_bn", ""), rtol=1e-4, atol=1e-5)
    info = inspect_file(str(path))
    assert (info["format"], info["arch"], info["head"], info["hidden_dim"], info["dim"]) == (
        "swav", "swav_resnet50w2", "mlp_bn", 8192, 128)
    assert info["presets"] == ["resnet50w2_swav"] and info["verified"]


@pytest.mark.parametrize("name,widen,hidden,kind,millions", [
    ("resnet50w4_swav", 4, 8192, "mlp_bn", 375), ("resnet50w5_swav", 5, 10240, "mlp", 586)])
def test_wide_swav_w4_w5_release_tables_fit_their_presets_on_meta(name, widen, hidden, kind, millions):
    """The release's key/shape table (meta tensors: no memory) maps onto the preset's Encoder exactly."""
    table = _resnet_table(widen=widen)
    with torch.device("meta"):
        raw = {f"module.{k}": torch.empty(s) for k, s in table}
        raw.update({f"module.projection_head.{k}": torch.empty(s)
                    for k, s in _head_table("", kind, 2048 * widen, hidden, 128)})
        raw["module.prototypes.weight"] = torch.empty(3000, 128)
    assert detect_format(raw) == "swav"
    state, ignored = extract_encoder_state(raw, "swav")
    assert ignored == ["prototypes.weight"]
    from seed_cluster.teachers import _expected_shapes, _mismatch, fitting_presets, infer

    cfg = preset(name)
    assert not any(_mismatch(state, _expected_shapes(cfg.arch, cfg.head, cfg.hidden_dim, cfg.dim)))
    found = infer(state, "swav")
    assert (found.arch, found.head, found.hidden_dim, found.dim) == (cfg.arch, kind, hidden, 128)
    assert fitting_presets(state, found) == [name]
    params = sum(torch.Size(s).numel() for k, s in table if not k.endswith(("running_mean", "running_var", "tracked")))
    assert round(params / 1e6) == millions  # SwAV README parameter counts


@pytest.mark.parametrize("name", ["resnet101_mocov2", "resnet152_mocov2_200ep", "resnet152_mocov2_800ep",
                                  "resnet50_mocov2_800ep"])
def test_deeper_moco_release_tables_fit_their_presets_on_meta(name):
    blocks = {"resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3), "resnet50": R50}[preset(name).arch]
    with torch.device("meta"):
        state = {f"module.encoder_q.{k}": torch.empty(s) for k, s in
                 _resnet_table(blocks) + _head_table("fc.", "mlp", 2048, 2048, 128)}
    raw = {"state_dict": state, "epoch": 200}
    assert detect_format(raw) == "mocov2"
    from seed_cluster.teachers import fitting_presets, infer

    encoder_state, _ = extract_encoder_state(raw, "mocov2")
    fits = fitting_presets(encoder_state, infer(encoder_state, "mocov2"))
    assert name in fits and all(preset(f).arch == preset(name).arch for f in fits)


def test_every_release_row_has_a_preset_with_arch_head_dim_format_and_top1():
    rows = ["resnet50_mocov1", "resnet50_simclr", "resnet50_mocov2_200ep", "resnet50_mocov2_800ep", "resnet50_swav",
            "resnet101_mocov2", "resnet152_mocov2_200ep", "resnet152_mocov2_800ep", "resnet50w2_swav",
            "resnet50w4_swav", "resnet50w5_swav"]
    for name in rows:
        cfg = preset(name)
        assert cfg.dim == 128 and cfg.format != "auto" and cfg.checkpoint is None
    assert preset("resnet50_swav").top1 == 75.3 and preset("resnet50w5_swav").head == "mlp"
    assert [preset(n).hidden_dim for n in rows[-4:]] == [2048, 8192, 8192, 10240]


def test_wide_swav_teacher_is_usable_from_the_training_config(tmp_path):
    from seed_cluster.launcher import load_config
    from seed_cluster.teachers import check_teacher

    path, _, _ = _release_file(tmp_path, _swav, "mlp_bn", 2048, 128)
    cfg = load_config(["teacher=resnet50w2_swav", f"teacher.checkpoint={path}", "data.train=unused.beton"])
    assert (cfg.teacher.arch, cfg.teacher.hidden_dim, cfg.teacher.format) == ("swav_resnet50w2", 8192, "swav")
    with pytest.raises(TeacherError, match="presets that fit: teacher=resnet50_swav"):
        check_teacher(cfg.teacher, cfg.method.dim)  # an RN50 file given to the w2 preset: caught before submission
    cfg = load_config(["teacher=resnet50_swav", f"teacher.checkpoint={path}", "data.train=unused.beton"])
    check_teacher(cfg.teacher, cfg.method.dim)


def test_seed_student_and_plain_torchvision_files(tmp_path):
    import torchvision

    torch.manual_seed(0)
    student = torchvision.models.resnet18()
    student.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    seed_file = tmp_path / "seed_student.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": {
        **{f"module.student.{k}": v for k, v in student.state_dict().items()},
        "module.teacher.conv1.weight": torch.randn(64, 3, 7, 7), "module.queue": torch.randn(128, 64),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}, seed_file)
    teacher = load_teacher(TeacherConfig(arch="resnet18", head="mlp", hidden_dim=512, checkpoint=str(seed_file)), 128)
    x = _x()
    assert teacher.format == "seed"
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), F.normalize(student.eval()(x), dim=1), rtol=1e-4, atol=1e-5)

    plain = tmp_path / "resnet18_torchvision.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)  # with its 1000-class fc: not a head here
    teacher = load_teacher(TeacherConfig(arch="resnet18", head="none", dim=0, checkpoint=str(plain)), 512)
    assert teacher.format == "plain" and teacher(x).shape == (2, 512)


def test_mismatched_file_names_the_layout_first_bad_keys_and_fitting_presets(tmp_path):
    path, _, _ = _release_file(tmp_path, _moco, "mlp", 2048, 128)
    with pytest.raises(TeacherError) as info:
        load_teacher(replace_cfg(preset("resnet50_mocov1"), checkpoint=str(path), format="auto"), 128)
    message = str(info.value)
    assert "\n" not in message
    assert "looks like MoCo-v2" in message and "missing ['head.weight'" in message and "head.0.weight" in message
    assert "teacher=resnet50_mocov2_200ep" in message and "teacher=resnet50_mocov2_800ep" in message
    with pytest.raises(TeacherError) as info:  # the preset names its layout: another layout fails on that alone
        load_teacher("resnet50_swav", path)
    assert "looks like MoCo-v2" in str(info.value) and "teacher.format=swav" in str(info.value)


def replace_cfg(cfg: TeacherConfig, **changes) -> TeacherConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def test_unknown_preset_name_suggests_close_ones():
    with pytest.raises(Exception, match="resnet50_swav"):
        preset("resnet50_swv")


def test_teacher_output_can_enter_the_students_autograd_graph():
    teacher = _frozen()
    student = nn.Linear(DIM, DIM)
    t = teacher(_images())
    loss = (student(t) * t).sum()  # the teacher's embedding is saved for backward: it must not be an inference tensor
    loss.backward()
    assert student.weight.grad is not None and not t.requires_grad


def test_inspect_prints_format_arch_head_dim_and_parameters(tmp_path, capsys):
    path, _, _ = _release_file(tmp_path, _moco, "mlp", 2048, 128)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mocov2" in out and "resnet50" in out and "mlp (hidden 2048)" in out and "128" in out
    assert "parameters:" in out and "27," in out  # 23.5M backbone + 4.5M head
    assert "teacher=resnet50_mocov2_200ep" in out


def test_inspect_bad_input_exits_2_with_one_line(tmp_path, capsys):
    garbage = tmp_path / "bad.pth"
    garbage.write_bytes(b"not a checkpoint")
    unknown = tmp_path / "unknown.pth"
    torch.save({"epoch": 3, "arch": "resnet50"}, unknown)
    for path in (garbage, unknown):
        assert main(["inspect", str(path)]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.strip().count("\n") == 0 and str(path) in out.err


def test_inspect_cli_on_a_missing_file_exits_2_with_one_line(tmp_path):
    path = tmp_path / "missing.pth"
    result = subprocess.run([sys.executable, "-m", "seed_cluster.teachers", "inspect", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr and result.stdout == ""
