"""Frozen-feature evaluation: backbone features of a labelled .beton and weighted kNN on them.

`python -m seed_cluster.evaluate RUN_OR_CHECKPOINT [--pixels]` prints kNN top-1/top-5
with the full training set as the bank and with 10 labelled images per class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import Checkpointer, load
from .config import DataConfig
from .errors import CheckpointError, SeedClusterError
from .knn import knn_accuracy, knn_few_shot
from .models import Encoder, build_student


def find_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for candidate in (p / "checkpoints", p):
            newest = Checkpointer(candidate).latest()
            if newest is not None:
                return newest
        raise CheckpointError(f"{p} holds no complete checkpoint; train it first or give a checkpoint file")
    if not p.is_file():
        raise CheckpointError(f"{p} does not exist; give a run directory or a checkpoint file")
    return p


def load_student(path: str | Path) -> tuple[Encoder, dict]:
    """The trained network (SEED student or MoCo-v2 query encoder) of a run or checkpoint, and its config."""
    ckpt = load(find_checkpoint(path))
    cfg = ckpt["config"]
    encoder = build_student(cfg["student"]["arch"], cfg["method"]["dim"])
    state = {k[len("student."):]: v for k, v in ckpt["model"].items() if k.startswith("student.")}
    encoder.load_state_dict(state, strict=True)
    return encoder.eval(), cfg


@torch.no_grad()
def extract_features(encoder: Optional[Encoder], path: str, data: DataConfig,
                     device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (or, with encoder=None, the normalised centre view's raw pixels) and labels."""
    from .data import eval_batches

    features, labels = [], []
    for images, y in eval_batches(path, data, device):
        f = images.flatten(1) if encoder is None else encoder.features(images)
        features.append(f.float().cpu())
        labels.append(y.cpu())
    return torch.cat(features), torch.cat(labels)


def knn_report(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               num_classes: int, per_class: int = 10, draws: int = 5, seed: int = 0) -> dict[str, float]:
    full = knn_accuracy(train[0], train[1], test[0], test[1], num_classes)
    few = knn_few_shot(train[0], train[1], test[0], test[1], num_classes, per_class=per_class, draws=draws,
                       seed=seed)
    return {"knn_top1": full["top1"], "knn_top5": full["top5"], f"knn_{per_class}shot_top1": few["mean"],
            f"knn_{per_class}shot_std": few["std"]}


def evaluate_run(path: str | Path, pixels: bool = False, val: Optional[str] = None) -> dict[str, float]:
    encoder, cfg_dict = load_student(path)
    data = DataConfig(**{k: v for k, v in cfg_dict["data"].items()})
    val = val or data.val
    if not val:
        raise SeedClusterError(f"{path}: its config has no data.val; pass --val FILE.beton")
    model = None if pixels else encoder
    train = extract_features(model, data.train, data)
    test = extract_features(model, val, data)
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    return knn_report(train, test, num_classes)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="run directory or checkpoint file")
    parser.add_argument("--pixels", action="store_true", help="evaluate raw pixels instead of the network")
    parser.add_argument("--val", help="held-out .beton (default: the run's data.val)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(evaluate_run(args.path, args.pixels, args.val), indent=2))
    except SeedClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
