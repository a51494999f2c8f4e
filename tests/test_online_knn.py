"""Online kNN: values at the configured steps, time bound, train mode restored."""

from __future__ import annotations

import pytest
import torch

from seed_cluster.config import DataConfig
from seed_cluster.errors import ConfigError
from seed_cluster.models import build_student
from seed_cluster.online_knn import OnlineKNN, evenly_spaced
from seed_cluster.online_knn_config import OnlineKNNConfig


def _data(root, val=True) -> DataConfig:
    return DataConfig(name="fashion_mnist", train=str(root / "train.beton"),
                      val=str(root / "test.beton") if val else None, resolution=32,
                      num_workers=1, mean=[0.286] * 3, std=[0.353] * 3)


def test_online_knn_logs_values_only_at_its_steps_and_restores_train_mode(fmnist_small):
    torch.manual_seed(0)
    student = build_student("convnet_s", 32).train()
    knn = OnlineKNN(OnlineKNNConfig(every_steps=5, train_samples=400, val_samples=200), _data(fmnist_small),
                    torch.device("cpu"))
    assert knn.maybe_run(4, student) is None
    out = knn.maybe_run(5, student)
    assert set(out) == {"knn/top1", "knn/top5", "knn/seconds", "knn/cost(%)", "knn/bank", "knn/queries"}
    assert out["knn/bank"] == 400 and out["knn/queries"] == 200
    assert 10.0 < out["knn/top1"] <= 100.0  # random conv features beat 10% chance on Fashion-MNIST
    assert 0 < out["knn/cost(%)"] <= 100 and student.training
    again = knn.maybe_run(10, student)
    assert again["knn/top1"] == out["knn/top1"], "same weights and subsets give the same accuracy"


def test_without_val_queries_come_from_train_samples_outside_the_bank(fmnist_small):
    knn = OnlineKNN(OnlineKNNConfig(every_steps=1, train_samples=300, val_samples=100),
                    _data(fmnist_small, val=False), torch.device("cpu"))
    bank, file, queries = knn.subsets()
    assert file.endswith("train.beton") and len(queries) == 100 and not set(bank) & set(queries)


def test_time_bound_cuts_extraction_short(fmnist_small):
    knn = OnlineKNN(OnlineKNNConfig(every_steps=1, train_samples=2000, val_samples=500, batch_size=32,
                                    max_seconds=1e-3), _data(fmnist_small), torch.device("cpu"))
    out = knn.run(build_student("convnet_s", 32))
    assert out["knn/bank"] == 32 and out["knn/queries"] == 32  # one batch each, then the deadline


def test_disabled_by_default_and_config_validated():
    assert not OnlineKNN(OnlineKNNConfig(), _data_stub(), torch.device("cpu")).enabled
    with pytest.raises(ConfigError, match="knn.every_steps"):
        OnlineKNNConfig(every_steps=-1)
    assert evenly_spaced(3, 10) == [0, 3, 6] and evenly_spaced(20, 4) == [0, 1, 2, 3]


def _data_stub() -> DataConfig:
    return DataConfig(train="unused.beton")
