"""Weighted kNN and its few-shot variant on synthetic features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seed_cluster.errors import ConfigError, DataError
from seed_cluster.knn import few_shot_bank, knn_accuracy, knn_few_shot, knn_predict


def _clusters(num_classes: int, per_class: int, dim: int, seed: int, spread: float = 0.05):
    """Gaussian clusters around random unit centres: linearly separable for small spread."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return features[perm], labels[perm]


def test_separable_gaussian_clusters_are_classified_perfectly():
    train_f, train_l = _clusters(10, 50, 32, seed=0)
    test_f, test_l = _clusters(10, 20, 32, seed=0)  # same centres (same seed), fresh noise below
    test_f = test_f + 0.01 * torch.randn(test_f.shape, generator=torch.Generator().manual_seed(1))
    acc = knn_accuracy(train_f, train_l, test_f, test_l, num_classes=10)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_random_labels_give_near_chance_accuracy():
    g = torch.Generator().manual_seed(2)
    train_f, test_f = torch.randn(2000, 16, generator=g), torch.randn(1000, 16, generator=g)
    train_l, test_l = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    acc = knn_accuracy(train_f, train_l, test_f, test_l, num_classes=10)
    assert 4.0 < acc["top1"] < 16.0  # chance is 10%
    assert 40.0 < acc["top5"] < 60.0  # chance is 50%


def test_scores_follow_the_weighted_vote_definition():
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    train_l = torch.tensor([0, 1, 1])
    test_f = torch.tensor([[2.0, 0.0]])  # unnormalised on purpose
    scores = knn_predict(train_f, train_l, test_f, num_classes=3, k=2, temperature=0.5)
    # Neighbours: [1,0] (sim 1, class 0) and [1,1]/sqrt2 (sim 1/sqrt2, class 1).
    expected = torch.tensor([[torch.exp(torch.tensor(2.0)), torch.exp(torch.tensor(2**0.5)), 0.0]])
    torch.testing.assert_close(scores, expected)


def test_bank_smaller_than_k_uses_every_bank_sample():
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    train_l = torch.tensor([0, 1, 0])
    test_f = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    scores = knn_predict(train_f, train_l, test_f, num_classes=2, k=20)
    assert scores.shape == (2, 2) and (scores > 0).all()  # all 3 samples voted
    acc = knn_accuracy(train_f, train_l, test_f, torch.tensor([0, 1]), num_classes=2, k=20)
    assert acc == {"top1": 100.0, "top5": 100.0}  # top5 clipped to the 2 classes


def test_single_sample_bank_and_single_test_sample_work():
    acc = knn_accuracy(
        torch.randn(1, 4), torch.tensor([0]), torch.randn(1, 4), torch.tensor([0]), num_classes=1
    )
    assert acc == {"top1": 100.0, "top5": 100.0}


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunking_gives_the_same_scores_as_one_chunk(chunk_size):
    train_f, train_l = _clusters(5, 40, 16, seed=3, spread=0.5)
    test_f, _ = _clusters(5, 13, 16, seed=4, spread=0.5)
    whole = knn_predict(train_f, train_l, test_f, num_classes=5, chunk_size=len(test_f))
    chunked = knn_predict(train_f, train_l, test_f, num_classes=5, chunk_size=chunk_size)
    # BLAS may pick a different kernel per chunk height, so similarities can differ in the last
    # bit (~1e-7), which exp(sim / 0.07) turns into ~2e-6 relative; the neighbours and votes match.
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0.0)
    assert torch.equal(chunked.argmax(1), whole.argmax(1))


def test_invalid_arguments_raise_project_errors():
    f, lab = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ConfigError, match="k=0"):
        knn_predict(f, lab, f, num_classes=2, k=0)
    with pytest.raises(ConfigError, match="temperature"):
        knn_predict(f, lab, f, num_classes=2, temperature=0.0)
    with pytest.raises(DataError, match="empty"):
        knn_predict(torch.empty(0, 3), torch.empty(0, dtype=torch.long), f, num_classes=2)
    with pytest.raises(DataError, match="labels"):
        knn_predict(f, torch.tensor([0, 1, 0, 5]), f, num_classes=2)
    with pytest.raises(DataError, match="same D"):
        knn_predict(f, lab, torch.randn(2, 5), num_classes=2)
    with pytest.raises(DataError, match="test set is empty"):
        knn_accuracy(f, lab, torch.empty(0, 3), torch.empty(0, dtype=torch.long), num_classes=2)


def test_few_shot_bank_is_deterministic_per_seed_and_balanced():
    labels = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(5))
    a = few_shot_bank(labels, per_class=4, seed=11)
    b = few_shot_bank(labels, per_class=4, seed=11)
    c = few_shot_bank(labels, per_class=4, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.int64 and len(a) == 28 and len(set(a.tolist())) == 28
    assert torch.equal(torch.bincount(labels[a], minlength=7), torch.full((7,), 4))


def test_few_shot_bank_raises_config_error_listing_every_short_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ConfigError, match=r"class 1 has 2") as info:
        few_shot_bank(labels, per_class=3, seed=0)
    assert "class 0" not in str(info.value)
    # A class absent from the labels counts when num_classes says it exists.
    with pytest.raises(ConfigError, match=r"class 3 has 0"):
        few_shot_bank(labels, per_class=2, seed=0, num_classes=4)
    with pytest.raises(ConfigError, match="per_class=0"):
        few_shot_bank(labels, per_class=0, seed=0)


def test_knn_few_shot_reports_mean_std_and_each_draw():
    train_f, train_l = _clusters(4, 30, 16, seed=6, spread=0.6)
    test_f, test_l = _clusters(4, 25, 16, seed=6, spread=0.6)
    out = knn_few_shot(train_f, train_l, test_f, test_l, num_classes=4, per_class=2, draws=5, seed=0)
    assert set(out) == {"mean", "std", "draws"} and len(out["draws"]) == 5
    draws = torch.tensor(out["draws"], dtype=torch.float64)
    assert out["mean"] == pytest.approx(draws.mean().item())
    assert out["std"] == pytest.approx(draws.std().item())
    assert out["std"] > 0  # different banks give different accuracies at this noise level
    again = knn_few_shot(train_f, train_l, test_f, test_l, num_classes=4, per_class=2, draws=5, seed=0)
    assert again == out


def test_knn_few_shot_clips_k_to_a_tiny_bank():
    train_f, train_l = _clusters(3, 10, 8, seed=7)
    test_f, test_l = _clusters(3, 5, 8, seed=7)
    out = knn_few_shot(train_f, train_l, test_f, test_l, num_classes=3, per_class=1, draws=1, k=20)
    assert out["draws"] == [100.0] and out["std"] == 0.0


def test_one_search_scores_every_k_like_separate_searches():
    from seed_cluster.knn import knn_accuracies

    train_f, train_l = _clusters(6, 30, 16, seed=8, spread=0.7)
    test_f, test_l = _clusters(6, 10, 16, seed=9, spread=0.7)
    both = knn_accuracies(train_f, train_l, test_f, test_l, 6, [20, 1])
    for k in (20, 1):
        assert both[k] == knn_accuracy(train_f, train_l, test_f, test_l, 6, k=k)


def test_auto_chunk_keeps_an_imagenet_similarity_block_within_the_budget():
    from seed_cluster.knn import auto_chunk_size

    rows = auto_chunk_size(1_281_167, max_chunk_mb=256)
    assert rows == 52 and rows * 1_281_167 * 4 <= 256 * 2**20
    assert auto_chunk_size(10, max_chunk_mb=256) == 4096 and auto_chunk_size(10**12, 1) == 1
    train_f, train_l = _clusters(5, 40, 16, seed=3, spread=0.5)
    test_f, test_l = _clusters(5, 13, 16, seed=4, spread=0.5)
    tiny_budget = knn_predict(train_f, train_l, test_f, 5, max_chunk_mb=1e-4)  # one query per chunk
    torch.testing.assert_close(tiny_budget, knn_predict(train_f, train_l, test_f, 5), rtol=1e-5, atol=0.0)
