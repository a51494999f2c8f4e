"""Export a trained student as weights anyone can load: a plain timm state dict plus its provenance.

`python -m seed_cluster.export RUN_OR_CHECKPOINT [--out DIR] [--head]` writes

    DIR/<arch>.pt         the backbone's state dict: `timm.create_model(arch, num_classes=0)` loads it with
                          strict=True (for ResNets the names are torchvision's too: a torchvision ResNet
                          loads it with only fc.* missing)
    DIR/<arch>.head.pt    with --head: the projection head (Linear-ReLU-Linear, keys 0.* and 2.*)
    DIR/<arch>.json       provenance: arch, source checkpoint, steps, config hash, teacher fingerprint,
                          data fingerprint (from the training .beton's manifest), sha256 of the weights

Every file is written atomically (temporary file, fsync, rename). The source may be a run
directory, a checkpoint, or a SEED release student file (pass --arch). The export is itself a
valid source for `launch/linear.py` and `launch/eval.py` (the JSON tells them the arch).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import atomic_write
from .errors import SeedClusterError
from .evaluate import load_backbone
from .report import write_json_atomic

EXPORT_FORMAT = "seed-cluster-export"


def _save_atomic(obj: object, path: Path) -> str:
    """torch.save through `checkpoint.atomic_write`; returns the sha256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def _load_hint(arch: str) -> str:
    from .models import SMALL_CONVNETS

    if arch in SMALL_CONVNETS:  # not a timm model: this project's small convnet
        return f"seed_cluster.models.build_backbone({arch!r}).load_state_dict(torch.load(...))"
    return f"timm.create_model({arch!r}, num_classes=0).load_state_dict(torch.load(...))"


def export(source: str | Path, out_dir: str | Path, head: bool = False, arch: Optional[str] = None) -> dict:
    """Write the backbone (and optionally the head) of `source` to `out_dir`; returns the provenance."""
    loaded = load_backbone(source, arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{loaded.arch}.pt"
    state = {k: v.detach().clone().contiguous() for k, v in loaded.backbone.state_dict().items()}
    provenance = {"format": EXPORT_FORMAT, "arch": loaded.arch, "source": str(loaded.path),
                  "source_format": loaded.format, "weights": weights.name,
                  "weights_sha256": _save_atomic(state, weights),
                  "load_with": _load_hint(loaded.arch),
                  **{k: v for k, v in loaded.meta.items() if k != "run_dir"}}
    if head:
        if not loaded.head_state:
            raise SeedClusterError(f"{loaded.path} holds no projection head; export without --head")
        head_path = out / f"{loaded.arch}.head.pt"
        provenance["head"] = head_path.name
        provenance["head_sha256"] = _save_atomic(loaded.head_state, head_path)
    write_json_atomic(weights.with_suffix(".json"), provenance)
    return provenance


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="export a student backbone as a plain timm state dict")
    parser.add_argument("source", help="run directory, checkpoint, or SEED release student file")
    parser.add_argument("--out", help="output directory (default: <run>/export, or beside the file)")
    parser.add_argument("--head", action="store_true", help="also write the projection head")
    parser.add_argument("--arch", help="architecture, when the source file does not say it")
    args = parser.parse_args(argv)
    src = Path(args.source)
    out = args.out or (src / "export" if src.is_dir() else src.parent / "export")
    try:
        info = export(src, out, head=args.head, arch=args.arch)
    except SeedClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(out) / info['weights']} ({info['arch']}, from {info['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
