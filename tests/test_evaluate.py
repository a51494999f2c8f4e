"""Loading backbones from every source kind, sharded feature extraction, and the kNN job."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from eval_fixtures import seed_cluster_checkpoint, seed_release_file

from seed_cluster.config import DataConfig
from seed_cluster.errors import CheckpointError, ConfigError
from seed_cluster.eval_config import load_eval_config
from seed_cluster.evaluate import extract_features, extract_sharded, load_backbone, run_root, shard


def _data(root) -> DataConfig:
    return DataConfig(name="fashion_mnist", train=str(root / "train.beton"), val=str(root / "test.beton"),
                      resolution=32, num_workers=1, mean=[0.286] * 3, std=[0.353] * 3)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenetv3_large_100"])
def test_seed_release_student_file_loads_strictly_with_its_head_set_aside(tmp_path, arch):
    backbone = seed_release_file(tmp_path / f"{arch}.pth.tar", arch)
    loaded = load_backbone(tmp_path / f"{arch}.pth.tar", arch)
    assert loaded.format == "seed" and loaded.arch == arch
    assert set(loaded.head_state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.backbone(x), backbone(x))


def test_project_checkpoint_and_run_directory_load_the_same_backbone(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "step-00000007.pt"
    student = seed_cluster_checkpoint(path, "convnet_s")
    for source in (path, tmp_path / "run"):
        loaded = load_backbone(source)
        assert loaded.path == path and loaded.format == "seed-cluster" and loaded.arch == "convnet_s"
        assert loaded.meta["steps"] == 7 and loaded.meta["method"] == "seed"
        x = torch.randn(3, 3, 32, 32)
        assert torch.equal(loaded.backbone(x), student.features(x))
    assert run_root(path) == tmp_path / "run" and run_root(tmp_path / "run") == tmp_path / "run"
    with pytest.raises(ConfigError, match="drop source.arch"):
        load_backbone(path, "resnet18")


def test_a_file_of_another_architecture_fails_listing_the_keys(tmp_path):
    seed_release_file(tmp_path / "r18.pth", "resnet18")
    with pytest.raises(CheckpointError, match=r"missing: .*unexpected: .*check source.arch"):
        load_backbone(tmp_path / "r18.pth", "efficientnet_b0")
    with pytest.raises(ConfigError, match="pass source.arch"):
        load_backbone(tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(tmp_path / "nothing.pth", "resnet18")


def test_shards_cover_every_sample_once_in_order():
    for n in (0, 1, 5, 101):
        for world in (1, 2, 3, 8):
            joined = [i for r in range(world) for i in shard(n, r, world)]
            assert joined == list(range(n))


def test_shard_features_concatenate_to_the_whole_set(fmnist_small):
    data = _data(fmnist_small)
    torch.manual_seed(0)
    from seed_cluster.models import build_backbone

    net = build_backbone("convnet_s").eval()
    whole, labels = extract_features(net, data.val, data, batch_size=128)
    n = len(labels)
    parts = [extract_sharded(net, data.val, data, torch.device("cpu"), r, 3, n, batch_size=100) for r in range(3)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat([p[1] for p in parts]), labels)


def test_eval_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="knn.kk"):
        load_eval_config(["source.checkpoint=x", "knn.kk=3"])
    with pytest.raises(ConfigError, match="knn.k="):
        load_eval_config(["source.checkpoint=x", "knn.k=[0]"])
    with pytest.raises(ConfigError, match="source.checkpoint is required"):
        load_eval_config([])


def test_eval_config_errors_name_the_eval_launchers_and_list_every_problem():
    with pytest.raises(ConfigError) as unknown:
        load_eval_config(["source.checkpoint=x", "linear.epoch=3"])
    assert "launch/eval.py --cfg" in str(unknown.value) and "slurm.py" not in str(unknown.value)
    with pytest.raises(ConfigError) as several:
        load_eval_config(["source.checkpoint=x", "knn.batches_per_chunk=0", "linear.epochs=0", "nodes=0"])
    message = str(several.value)
    assert "knn.batches_per_chunk=0" in message and "linear.epochs=0" in message and "nodes=0" in message


@pytest.mark.slow
def test_two_rank_knn_job_matches_the_single_process_result(tmp_path, fmnist_small):
    import subprocess
    import sys

    from seed_cluster.evaluate import knn_report

    run = tmp_path / "run"
    seed_cluster_checkpoint(run / "checkpoints" / "step-00000007.pt", "convnet_s",
                            train_beton=str(fmnist_small / "train.beton"))
    args = [sys.executable, str(ROOT / "launch" / "eval.py"), f"source.checkpoint={run}", "data=fashion_mnist",
            f"data.train={fmnist_small / 'train.beton'}", f"data.val={fmnist_small / 'test.beton'}",
            "data.num_workers=1", "cluster=local", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1",
            "device=cpu"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    knn = json.loads((run / "results.json").read_text())["knn"]

    data = _data(fmnist_small)
    net = load_backbone(run).backbone
    train, val = extract_features(net, data.train, data), extract_features(net, data.val, data)
    expected = knn_report(train, val, 10, per_class=0)
    for key, value in expected.items():
        assert knn[key] == pytest.approx(value), key
    assert knn["knn_train_samples"] == len(train[1]) and knn["knn_val_samples"] == len(val[1])


def test_eval_preflight_refuses_cluster_slurm_without_sbatch_as_training_does(tmp_path, monkeypatch):
    from seed_cluster.evaluate import preflight

    seed_cluster_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000007.pt", "convnet_s")
    cfg = load_eval_config([f"source.checkpoint={tmp_path / 'run'}", "data=fashion_mnist",
                            f"data.train={tmp_path / 'none.beton'}", "cluster=slurm", "cluster.timeout_min=0"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ConfigError) as refused:
        preflight(cfg, "knn")
    message = str(refused.value)
    assert "`sbatch` is not on PATH" in message and "cluster.timeout_min=0 must be >= 1" in message
    assert "none.beton" in message, "the data problem is reported in the same line"
