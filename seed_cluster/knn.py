"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of InstDisc (Wu et al., CVPR 2018, arXiv 1805.01978, Sec. 3.4) as used by
DINO (Caron et al., ICCV 2021, arXiv 2104.14294): features are L2-normalised, each test
sample takes its ``k`` most cosine-similar training samples, and neighbour ``j`` votes
for its class with weight ``exp(sim_j / T)``. Also a few-shot variant that draws
``per_class`` labelled training samples per class several times and reports the mean
and spread of the top-1 accuracy.

Every function works on any device, processes test features in chunks of
``chunk_size`` rows (memory ``O(chunk_size * N_train)``; by default the chunk is sized so
that one similarity block stays under ``max_chunk_mb``, e.g. 52 queries for an ImageNet
bank of 1.28M features) and clips ``k`` to the bank size, so tiny banks and tiny test sets
work. Several ``k`` are scored from one neighbour search (:func:`knn_accuracies`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seed_cluster.errors import ConfigError, DataError

__all__ = ["knn_predict", "knn_accuracy", "knn_accuracies", "auto_chunk_size", "few_shot_bank", "knn_few_shot"]

DEFAULT_MAX_CHUNK_MB = 256
"""Default memory budget of one [chunk, N_train] float32 similarity block."""
MAX_CHUNK_ROWS = 4096


def auto_chunk_size(num_train: int, max_chunk_mb: float = DEFAULT_MAX_CHUNK_MB) -> int:
    """Query rows per chunk so that one float32 similarity block [rows, num_train] fits in ``max_chunk_mb``."""
    if not max_chunk_mb > 0:
        raise ConfigError(f"kNN: max_chunk_mb={max_chunk_mb} must be > 0")
    rows = int(max_chunk_mb * 2**20) // (4 * max(num_train, 1))
    return max(1, min(MAX_CHUNK_ROWS, rows))


def _check(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int | None,
) -> None:
    problems = []
    if k < 1:
        problems.append(f"k={k} must be >= 1")
    if not temperature > 0:
        problems.append(f"temperature={temperature} must be > 0")
    if chunk_size is not None and chunk_size < 1:
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
    chunk_size: int | None = None,
    max_chunk_mb: float = DEFAULT_MAX_CHUNK_MB,
) -> torch.Tensor:
    """Weighted kNN class scores.

    Args:
        train_features: ``[N_train, D]`` bank features (normalised here).
        train_labels: ``[N_train]`` int labels in ``[0, num_classes)``.
        test_features: ``[N_test, D]`` query features (normalised here).
        num_classes: number of classes C.
        k: neighbours per query, clipped to ``N_train``.
        temperature: T in the vote weight ``exp(cos_sim / T)``.
        chunk_size: test features processed per matmul; None sizes it from ``max_chunk_mb``.
        max_chunk_mb: memory budget of one similarity block when ``chunk_size`` is None.

    Returns:
        ``[N_test, C]`` float32 scores (sum of neighbour weights per class).
    """
    return _knn_scores(train_features, train_labels, test_features, num_classes, [k], temperature, chunk_size,
                       max_chunk_mb)[0]


def _knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: list[int],
    temperature: float,
    chunk_size: int | None,
    max_chunk_mb: float,
) -> list[torch.Tensor]:
    """Scores ``[N_test, C]`` for every k in ``ks`` from one search of the ``max(ks)`` nearest neighbours."""
    for k in ks:
        _check(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    # The bank is not copied to normalise it (1.28M x 128 floats are 655 MB): each similarity column
    # is divided by its bank feature's norm instead.
    train = train_features.float()
    inv_norm = train.norm(dim=1).clamp_min(1e-12).reciprocal()  # [N_train], as F.normalize's eps
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.to(device=train.device, dtype=torch.int64)
    chunk = chunk_size or auto_chunk_size(train.shape[0], max_chunk_mb)
    k_max = min(max(ks), train.shape[0])
    scores = [torch.zeros(test.shape[0], num_classes, dtype=torch.float32, device=test.device) for _ in ks]
    for start in range(0, test.shape[0], chunk):
        sim = (test[start : start + chunk] @ train.T).mul_(inv_norm)  # [c, N_train]: the one large block
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, most similar first
        del sim
        weights, votes = torch.exp(top_sim / temperature), labels[top_idx]
        for k, out in zip(ks, scores, strict=True):
            k = min(k, k_max)
            out[start : start + chunk].scatter_add_(1, votes[:, :k], weights[:, :k])
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
    chunk_size: int | None = None,
    max_chunk_mb: float = DEFAULT_MAX_CHUNK_MB,
) -> dict[str, float]:
    """Top-1 and top-5 weighted-kNN accuracy in percent (top-5 is top-C when C < 5).

    Arguments as :func:`knn_predict`, plus ``test_labels`` ``[N_test]``.
    """
    return knn_accuracies(train_features, train_labels, test_features, test_labels, num_classes, [k],
                          temperature, chunk_size, max_chunk_mb)[k]


@torch.no_grad()
def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: list[int] = (20, 1),
    temperature: float = 0.07,
    chunk_size: int | None = None,
    max_chunk_mb: float = DEFAULT_MAX_CHUNK_MB,
) -> dict[int, dict[str, float]]:
    """``{k: {"top1", "top5"}}`` for every k in ``ks``, from a single neighbour search (percent)."""
    if test_features.shape[0] == 0:
        raise DataError("kNN: the test set is empty")
    if test_labels.shape != (test_features.shape[0],):
        raise DataError(
            f"kNN: test_labels must be [{test_features.shape[0]}], got {tuple(test_labels.shape)}"
        )
    ks = list(ks)
    if not ks:
        raise ConfigError("kNN: give at least one k")
    all_scores = _knn_scores(train_features, train_labels, test_features, num_classes, ks, temperature,
                             chunk_size, max_chunk_mb)
    target = test_labels.to(device=all_scores[0].device, dtype=torch.int64)[:, None]
    n = float(test_features.shape[0])
    out = {}
    for k, scores in zip(ks, all_scores, strict=True):
        hits = scores.topk(min(5, num_classes), dim=1).indices == target
        out[k] = {"top1": hits[:, 0].sum().item() * 100.0 / n, "top5": hits.any(dim=1).sum().item() * 100.0 / n}
    return out


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
    chunk_size: int | None = None,
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
