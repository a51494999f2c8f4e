"""Export: plain timm state dicts with provenance, loaded strictly by a fresh timm model."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from eval_fixtures import seed_cluster_checkpoint, seed_release_file

from seed_cluster.errors import SeedClusterError
from seed_cluster.export import export, main


def test_exported_resnet_gives_identical_features_in_a_fresh_timm_model(tmp_path, fmnist_small):
    run = tmp_path / "run"
    student = seed_cluster_checkpoint(run / "checkpoints" / "step-00000007.pt", "resnet18",
                                      train_beton=str(fmnist_small / "train.beton"))
    info = export(run, tmp_path / "out", head=True)

    fresh = timm.create_model("resnet18", num_classes=0)
    fresh.load_state_dict(torch.load(tmp_path / "out" / "resnet18.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(fresh.eval()(x), student.backbone(x))

    provenance = json.loads((tmp_path / "out" / "resnet18.json").read_text())
    assert provenance == info
    assert provenance["arch"] == "resnet18" and provenance["steps"] == 7
    assert provenance["teacher_fingerprint"] == "teacher-fp-123"
    manifest = json.loads((fmnist_small / "train.json").read_text())
    assert provenance["data_fingerprint"] == manifest["fingerprint"]
    assert len(provenance["config_hash"]) == 8 and len(provenance["weights_sha256"]) == 64
    head = torch.load(tmp_path / "out" / "resnet18.head.pt", weights_only=True)
    assert torch.equal(head["0.weight"], student.head[0].weight)
    assert not list((tmp_path / "out").glob(".*tmp*")), "no temporary file may be left behind"


def test_exported_resnet_uses_torchvision_names(tmp_path):
    seed_cluster_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000007.pt", "resnet50")
    export(tmp_path / "run", tmp_path / "out")
    state = torch.load(tmp_path / "out" / "resnet50.pt", weights_only=True)
    result = torchvision.models.resnet50().load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_seed_release_students_export_to_strict_timm_weights(tmp_path, arch):
    backbone = seed_release_file(tmp_path / "seed.pth.tar", arch)
    info = export(tmp_path / "seed.pth.tar", tmp_path / "out", head=True, arch=arch)
    assert info["source_format"] == "seed"
    fresh = timm.create_model(arch, num_classes=0)
    fresh.load_state_dict(torch.load(tmp_path / "out" / f"{arch}.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), backbone(x))
    assert set(torch.load(tmp_path / "out" / f"{arch}.head.pt", weights_only=True)) == {
        "0.weight", "0.bias", "2.weight", "2.bias"}


def test_export_cli_writes_beside_the_run_and_reports_errors_in_one_line(tmp_path, capsys):
    seed_cluster_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000007.pt", "convnet_s")
    assert main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "export" / "convnet_s.pt").is_file()
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SeedClusterError, match="pass source.arch"):
        seed_release_file(tmp_path / "s.pth", "resnet18")
        export(tmp_path / "s.pth", tmp_path / "o")
