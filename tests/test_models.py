"""Encoders: SEED's student head Linear(d,d)-ReLU-Linear(d,dim) without BN, L2-normalised output, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from seed_cluster.errors import ConfigError
from seed_cluster.launcher import load_config
from seed_cluster.models import Encoder, build_backbone, build_head, build_student

CONF_STUDENTS = Path(__file__).resolve().parents[1] / "conf" / "student"

# Backbone feature width d of each student (DESIGN.md §3): the head's input and hidden width.
WIDTHS = [("resnet18", 512), ("mobilenetv3_large_100", 1280), ("efficientnet_b0", 1280), ("convnet_s", 128)]


def _images(n: int = 2, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _assert_seed_head(head: nn.Module, d: int, dim: int) -> None:
    assert isinstance(head, nn.Sequential)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    first, _, last = head
    assert (first.in_features, first.out_features) == (d, d)
    assert (last.in_features, last.out_features) == (d, dim)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())


@pytest.mark.parametrize("arch,d", WIDTHS)
def test_student_head_is_linear_relu_linear_without_bn(arch, d):
    torch.manual_seed(0)
    student = build_student(arch, dim=128)
    _assert_seed_head(student.head, d, 128)
    assert student.dim == 128
    student.eval()
    x = _images()
    with torch.no_grad():
        features = student.features(x)
        z = student(x)
    assert features.shape == (2, d)
    assert z.shape == (2, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_student_output_is_the_normalised_head_of_the_features():
    torch.manual_seed(0)
    student = build_student("convnet_s", dim=16).eval()
    x = _images(4, side=32)
    with torch.no_grad():
        raw = student.head(student.features(x))
        z = student(x)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4))  # so the normalisation is really doing something
    assert torch.allclose(z, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)


def test_student_trains_end_to_end_through_the_head():
    torch.manual_seed(0)
    student = build_student("convnet_s", dim=8)
    student(_images(4, side=32)).sum().backward()
    assert all(p.grad is not None for p in student.parameters())


def test_features_of_a_small_convnet_have_its_last_stage_width():
    for arch, d in [("convnet_s", 128), ("convnet_m", 256), ("convnet_l", 384)]:
        with torch.no_grad():
            assert build_backbone(arch).eval()(_images(3, side=28)).shape == (3, d)


@pytest.mark.parametrize("kind,types", [
    ("mlp", [nn.Linear, nn.ReLU, nn.Linear]),
    ("mlp_bn", [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]),
])
def test_head_kinds_have_the_documented_layers(kind, types):
    head = build_head(kind, 32, 64, 8)
    assert [type(m) for m in head] == types
    assert head(torch.randn(5, 32)).shape == (5, 8)


def test_linear_and_none_heads():
    assert isinstance(build_head("linear", 32, 0, 8), nn.Linear)
    enc = Encoder("convnet_s", 16, head="none")
    assert enc.dim == 128  # no head: the embedding is the backbone feature
    with torch.no_grad():
        assert enc.eval()(_images(2, side=32)).shape == (2, 128)


def test_unknown_head_kind_raises_config_error():
    with pytest.raises(ConfigError, match="mlp_bn"):
        build_head("mlp-bn", 32, 32, 8)


@pytest.mark.parametrize("arch,expected", [("resnet81", "resnet18"), ("mobilenetv3_large_10", "mobilenetv3_large_100"),
                                            ("convnet_x", "convnet_s")])
def test_unknown_arch_raises_one_line_config_error_naming_the_key_and_close_names(arch, expected):
    with pytest.raises(ConfigError) as info:
        build_student(arch, dim=128)
    message = str(info.value)
    assert "\n" not in message
    assert f"student.arch={arch!r}" in message
    assert "did you mean" in message and expected in message


def test_unknown_teacher_arch_names_the_teacher_key():
    with pytest.raises(ConfigError, match=r"teacher\.arch='resnet5O'"):
        Encoder("resnet5O", 128, key="teacher.arch")


# The six students of the paper's tables, as presets in conf/student/.
PAPER_STUDENTS = [
    pytest.param("resnet18", "resnet18", 512),
    pytest.param("mobilenetv3_large", "mobilenetv3_large_100", 1280),
    pytest.param("efficientnet_b0", "efficientnet_b0", 1280),
    pytest.param("efficientnet_b1", "efficientnet_b1", 1280),
    pytest.param("resnet34", "resnet34", 512),
    pytest.param("resnet50", "resnet50", 2048),
]


def test_every_paper_student_has_a_preset():
    presets = {p.stem for p in CONF_STUDENTS.glob("*.yaml")}
    assert {p.values[0] for p in PAPER_STUDENTS} <= presets


@pytest.mark.parametrize("preset,arch,d", PAPER_STUDENTS)
def test_paper_student_preset_builds_and_embeds(preset, arch, d):
    cfg = load_config([f"student={preset}", "data.train=unused.beton"])
    assert cfg.student.arch == arch
    torch.manual_seed(0)
    student = build_student(cfg.student.arch, cfg.method.dim).eval()
    _assert_seed_head(student.head, d, cfg.method.dim)
    with torch.no_grad():
        z = student(_images(1, side=64))
    assert z.shape == (1, cfg.method.dim)
    assert torch.allclose(z.norm(dim=1), torch.ones(1), atol=1e-5)


# -- teacher backbones and heads ---------------------------------------------------------------------------

def test_swav_backbones_mirror_swav_module_names_and_widen_every_layer_including_the_stem():
    from seed_cluster.swav_resnet import SwAVResNet50

    with torch.device("meta"):
        w1, w2 = build_backbone("swav_resnet50", "teacher.arch"), build_backbone("swav_resnet50w2", "teacher.arch")
    assert isinstance(w1, SwAVResNet50) and isinstance(w1.padding, nn.ConstantPad2d) and w1.conv1.padding == (2, 2)
    assert list(w1.state_dict()) == list(w2.state_dict())  # same names as SwAV's resnet50.py (minus head, prototypes)
    assert w2.conv1.weight.shape == (128, 3, 7, 7) and w2.layer1[0].conv1.weight.shape == (128, 128, 1, 1)
    assert (w1.num_features, w2.num_features) == (2048, 4096)


@pytest.mark.parametrize("kind,types", [
    ("mocov3", [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]),
    ("dino", [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]),
])
def test_teacher_only_head_kinds(kind, types):
    head = build_head(kind, 32, 64, 8).eval()
    assert [type(m) for m in head] == types
    assert head(torch.randn(5, 32)).shape == (5, 8)
    if kind == "mocov3":
        assert head[0].bias is None and head[3].bias is None and not head[4].affine


def test_check_arch_accepts_swav_names_and_rejects_typos_without_building():
    from seed_cluster.models import check_arch

    check_arch("swav_resnet50w5", "teacher.arch")
    with pytest.raises(ConfigError, match="swav_resnet50w2"):
        check_arch("swav_resnet50w3", "teacher.arch")
