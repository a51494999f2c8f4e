"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of InstDisc (Wu et al., CVPR 2018, arXiv 1805.01978, Sec. 3.4) as used by
DINO (Caron et al., ICCV 2021, arXiv 2104.14294): features are L2-normalised, each test
sample takes its ``k`` most cosine-similar training samples, and neighbour ``j`` votes
for its class with weight ``exp(sim_j / T)``. Also a few-shot variant that draws
``per_class`` labelled training samples per class several times and reports the mean
and spread of the top-1 accuracy.

Every function works on any device, processes test features in chunks of
``chunk_size`` (memory ``O(chunk_size * N_train)``) and clips ``k`` to the bank size,
so tiny banks and tiny test sets work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seed_cluster.errors import ConfigError, DataError

__all__ = ["knn_predict", "knn_accuracy", "few_shot_bank", "knn_few_shot"]


def _check(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
) -> None:
    problems = []
    if k < 1:
        problems.append(f"k={k} must be >= 1")
    if not temperature > 0:
        problems.append(f"temperature={temperature} must be > 0")
    if chunk_size < 1:
        problems.append(f"chunk_size={chunk_size} must be >= 1")
    if num_classes < 1:
        problems.append(f"num_classes={num_classes} must be >= 1")
    if problems:
        raise ConfigError("kNN: " + "; ".join(problems))
    if (
        train_features.ndim != 2
        or test_features.ndim != 2
        or train_features.shape[1] != test_features.shape[1]
    ):
        raise DataError(
            f"kNN: features must be [N, D] with the same D; got train {tuple(train_features.shape)}, "
            f"test {tuple(test_features.shape)}"
        )
    if train_features.shape[0] == 0:
        raise DataError("kNN: the training bank is empty")
    if train_labels.shape != (train_features.shape[0],):
        raise DataError(
            f"kNN: train_labels must be [{train_features.shape[0]}], got {tuple(train_labels.shape)}"
        )
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise DataError(
            f"kNN: train labels must lie in [0, {num_classes}), got range "
            f"[{int(train_labels.min())}, {int(train_labels.max())}]"
        )


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores.

    Args:
        train_features: ``[N_train, D]`` bank features (normalised here).
        train_labels: ``[N_train]`` int labels in ``[0, num_classes)``.
        test_features: ``[N_test, D]`` query features (normalised here).
        num_classes: number of classes C.
        k: neighbours per query, clipped to ``N_train``.
        temperature: T in the vote weight ``exp(cos_sim / T)``.
        chunk_size: test features processed per matmul.

    Returns:
        ``[N_test, C]`` float32 scores (sum of neighbour weights per class).
    """
    _check(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.to(device=train.device, dtype=torch.int64)
    k = min(k, train.shape[0])
    scores = torch.zeros(test.shape[0], num_classes, dtype=torch.float32, device=test.device)
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # [c, N_train]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = torch.exp(top_sim / temperature)
        scores[start : start + chunk_size].scatter_add_(1, labels[top_idx], weights)
    return scores


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 weighted-kNN accuracy in percent (top-5 is top-C when C < 5).

    Arguments as :func:`knn_predict`, plus ``test_labels`` ``[N_test]``.
    """
    if test_features.shape[0] == 0:
        raise DataError("kNN: the test set is empty")
    if test_labels.shape != (test_features.shape[0],):
        raise DataError(
            f"kNN: test_labels must be [{test_features.shape[0]}], got {tuple(test_labels.shape)}"
        )
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    target = test_labels.to(device=scores.device, dtype=torch.int64)[:, None]
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == target
    n = float(test_features.shape[0])
    return {
        "top1": hits[:, 0].sum().item() * 100.0 / n,
        "top5": hits.any(dim=1).sum().item() * 100.0 / n,
    }


def few_shot_bank(
    labels: torch.Tensor, per_class: int, seed: int, num_classes: int | None = None
) -> torch.Tensor:
    """Indices of ``per_class`` randomly chosen samples of every class, deterministic in ``seed``.

    Args:
        labels: ``[N]`` int labels.
        per_class: samples drawn per class.
        seed: the draw's seed (same seed and labels give the same indices on any device).
        num_classes: when given, classes ``0 .. num_classes - 1`` must all be present;
            otherwise the classes are those occurring in ``labels``.

    Returns:
        Sorted int64 CPU tensor of ``per_class * C`` indices into ``labels``.

    Raises:
        ConfigError: ``per_class < 1``, or some class has fewer than ``per_class`` samples
            (all such classes are listed).
    """
    if per_class < 1:
        raise ConfigError(f"few-shot kNN: per_class={per_class} must be >= 1")
    labels = labels.detach().to("cpu", torch.int64)
    if labels.numel() and labels.min() < 0:
        raise DataError(f"few-shot kNN: labels must be >= 0, got {int(labels.min())}")
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes or 0)
    if num_classes is not None and counts.numel() > num_classes:
        raise DataError(f"few-shot kNN: labels must lie in [0, {num_classes}), got {int(labels.max())}")
    classes = range(counts.numel()) if num_classes is not None else torch.nonzero(counts).flatten().tolist()
    short = [(c, int(counts[c])) for c in classes if counts[c] < per_class]
    if short:
        listed = ", ".join(f"class {c} has {n}" for c, n in short[:10])
        more = f" (and {len(short) - 10} more classes)" if len(short) > 10 else ""
        raise ConfigError(
            f"few-shot kNN: per_class={per_class} needs at least {per_class} samples per class, but {listed}"
            f"{more}; lower per_class"
        )
    starts = torch.cumsum(counts, 0) - counts
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        members = order[int(starts[c]) : int(starts[c]) + int(counts[c])]
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def knn_few_shot(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    per_class: int = 10,
    draws: int = 5,
    seed: int = 0,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float | list[float]]:
    """Few-shot weighted-kNN top-1 accuracy over ``draws`` random banks of ``per_class`` per class.

    Draw ``i`` uses the bank ``few_shot_bank(train_labels, per_class, seed_i, num_classes)``
    where the ``seed_i`` come from a generator seeded with ``seed``; ``k`` is clipped to
    the bank size (``per_class * num_classes``).

    Returns:
        ``{"mean": float, "std": float, "draws": [top1 per draw]}``, in percent; ``std``
        is the sample standard deviation (0.0 for a single draw).
    """
    if draws < 1:
        raise ConfigError(f"few-shot kNN: draws={draws} must be >= 1")
    draw_seeds = torch.randint(0, 2**62, (draws,), generator=torch.Generator().manual_seed(seed)).tolist()
    results = []
    for draw_seed in draw_seeds:
        bank = few_shot_bank(train_labels, per_class, draw_seed, num_classes).to(train_features.device)
        acc = knn_accuracy(
            train_features[bank],
            train_labels[bank.to(train_labels.device)],
            test_features,
            test_labels,
            num_classes,
            k,
            temperature,
            chunk_size,
        )
        results.append(acc["top1"])
    mean = sum(results) / draws
    std = math.sqrt(sum((r - mean) ** 2 for r in results) / (draws - 1)) if draws > 1 else 0.0
    return {"mean": mean, "std": std, "draws": results}
