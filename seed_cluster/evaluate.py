"""Frozen-feature evaluation: load a backbone from any source, extract features, weighted kNN.

Sources (`load_backbone`): a run directory or a seed-cluster checkpoint, a backbone exported
by `seed_cluster.export` (plain state dict + JSON beside it), a SEED release student file
(`{"state_dict": {"module.student.*", "module.teacher.*", ...}}`), or a plain timm state dict.
The backbone always loads strictly; a mismatch lists the missing and unexpected keys.

Feature extraction reads the centre view of every sample; with several ranks each rank reads
a contiguous shard and the features are gathered back into file order.

`python -m seed_cluster.evaluate RUN_OR_CHECKPOINT [--pixels]` prints kNN top-1/top-5 (k = 20
and k = 1) with the full training set as the bank and with 10 labelled images per class, in
this process. `launch/eval.py` runs the same kNN as a (multi-rank, SLURM-able) job: `KNNJob`, whose
feature extraction resumes by chunk after a preemption (`feature_store`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import submitit
import torch
from torch import nn

from .checkpoint import FORMAT, Checkpointer, load
from .config import DataConfig
from .errors import CheckpointError, ConfigError, SeedClusterError
from .knn import knn_accuracies, knn_few_shot
from .models import Encoder, build_backbone, build_student, check_arch

logger = logging.getLogger(__name__)

HEAD_PREFIXES = ("fc.", "classifier.", "head.")
"""Where a student keeps its projection head (torchvision/timm ResNet, EfficientNet/MobileNet, ViT)."""


# -- sources ---------------------------------------------------------------------------------------------

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


def run_root(path: str | Path) -> Optional[Path]:
    """The run directory a source belongs to (a run dir, or a file in <run>/checkpoints/), else None."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        return p
    if p.is_file() and p.parent.name == "checkpoints":
        return p.parent.parent
    return None


def load_student(path: str | Path) -> tuple[Encoder, dict]:
    """The trained network (SEED student or MoCo-v2 query encoder) of a run or checkpoint, and its config."""
    ckpt = load(find_checkpoint(path))
    cfg = ckpt["config"]
    encoder = build_student(cfg["student"]["arch"], cfg["method"]["dim"])
    state = {k[len("student."):]: v for k, v in ckpt["model"].items() if k.startswith("student.")}
    encoder.load_state_dict(state, strict=True)
    return encoder.eval(), cfg


@dataclass
class LoadedBackbone:
    backbone: nn.Module
    arch: str
    path: Path
    """The concrete file the weights came from (a run directory resolved to its newest checkpoint)."""
    format: str
    """seed-cluster, export, seed (SEED release student) or plain."""
    head_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The projection head's weights when the file has them (keys as in `Encoder.head`)."""
    meta: dict = field(default_factory=dict)
    """What is known about the run: student, teacher, method, epochs, steps, fingerprints, config hash."""


def _read(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - retried with full unpickling below, which reports the error
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def _is_state(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def load_backbone_strict(backbone: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """`load_state_dict(strict=True)` with a one-line CheckpointError naming the missing and unexpected keys."""
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{name}: {few(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{where} does not fit the backbone ({'; '.join(parts)}); check source.arch")
    backbone.load_state_dict(state, strict=True)


def split_student_state(state: dict[str, torch.Tensor], backbone: nn.Module) -> tuple[dict, dict]:
    """(backbone state, head state) of a student's state dict whose head lives under fc./classifier./head."""
    own = backbone.state_dict()
    body, head = {}, {}
    for key, value in state.items():
        prefix = next((p for p in HEAD_PREFIXES if key.startswith(p)), None)
        if prefix is not None and key not in own:
            head[key[len(prefix):]] = value
        else:
            body[key] = value
    return body, head


def load_backbone(checkpoint: str | Path, arch: Optional[str] = None) -> LoadedBackbone:
    """The backbone (eval mode) stored in `checkpoint`, whatever the source kind (module docstring)."""
    root = run_root(checkpoint)
    path = find_checkpoint(checkpoint)
    raw = _read(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        cfg = raw["config"]
        if arch and arch != cfg["student"]["arch"]:
            raise ConfigError(f"source.arch={arch} but {path} holds a {cfg['student']['arch']} student; "
                              "drop source.arch")
        encoder = build_student(cfg["student"]["arch"], cfg["method"]["dim"])
        state = {k[len("student."):]: v for k, v in raw["model"].items() if k.startswith("student.")}
        encoder.load_state_dict(state, strict=True)
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        return LoadedBackbone(encoder.backbone.eval(), cfg["student"]["arch"], path, "seed-cluster", head,
                              meta_from_checkpoint(raw, root))
    provenance = path.with_suffix(".json")
    info = json.loads(provenance.read_text()) if provenance.is_file() and _is_state(raw) else {}
    fmt = "export" if info.get("format") == "seed-cluster-export" else None
    state = raw.get("state_dict") if isinstance(raw, dict) and _is_state(raw.get("state_dict")) else raw
    if not _is_state(state):
        raise CheckpointError(f"{path} is neither a seed-cluster checkpoint, an export, a SEED student file "
                              "nor a state dict")
    if fmt is None:
        fmt = "seed" if any(_strip(k, ("module.",)).startswith("student.") for k in state) else "plain"
    arch = arch or info.get("arch")
    if not arch:
        raise ConfigError(f"{path} does not say which architecture it holds; pass source.arch=<timm name>")
    check_arch(arch, "source.arch")
    backbone = build_backbone(arch, "source.arch")
    # The SEED release layout this assumes (as issue #6 describes it; no released file was downloaded to check
    # it against): torch.save({"state_dict": {...}, "epoch", "arch"}) of the DDP-wrapped SEED module, so every
    # key starts with "module.": "module.student.<backbone key>" with the timm/torchvision name of the student's
    # backbone, "module.student.<fc|classifier>.{0,2}.*" its MLP head where the classifier was, plus
    # "module.teacher.*", "module.queue" and "module.queue_ptr", which are ignored. A file with another layout
    # fails the strict load below with the differing keys listed. tests/eval_fixtures.py writes this layout.
    if fmt == "seed":
        state = {_strip(k, ("module.",))[len("student."):]: v for k, v in state.items()
                 if _strip(k, ("module.",)).startswith("student.")}
    else:
        state = {_strip(k, ("module.",)): v for k, v in state.items()}
    body, head = split_student_state(state, backbone)
    load_backbone_strict(backbone, body, f"{path} ({fmt})")
    head_file = path.with_name(path.stem + ".head.pt")
    if fmt == "export" and head_file.is_file():
        head = _read(head_file)
    meta = {k: info[k] for k in ("student", "teacher", "method", "epochs", "steps", "teacher_fingerprint",
                                 "data_fingerprint", "config_hash") if k in info}
    meta.setdefault("student", arch)
    return LoadedBackbone(backbone.eval(), arch, path, fmt, head, meta)


def meta_from_checkpoint(ckpt: dict, root: Optional[Path] = None) -> dict:
    """The run's identity for result tables: student, teacher, method, epochs, steps, fingerprints."""
    cfg = ckpt["config"]
    method = cfg["method"]["name"]
    teacher = None
    if method.startswith("seed"):
        t = cfg["teacher"]
        teacher = f"{t['arch']}" + (f" ({Path(t['checkpoint']).name})" if t.get("checkpoint") else " (random)")
    optim = cfg["optim"]
    data_fp = None
    try:
        data_fp = json.loads(Path(cfg["data"]["train"]).with_suffix(".json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        pass
    return {"student": cfg["student"]["arch"], "teacher": teacher, "method": method,
            "epochs": optim["epochs"] if optim.get("max_steps") is None else None, "steps": ckpt.get("step"),
            "teacher_fingerprint": ckpt.get("teacher_fingerprint"), "data_fingerprint": data_fp,
            "config_hash": ckpt.get("config_hash"), "data": cfg["data"]["name"],
            "run_dir": str(root) if root else None}


def source_data(data: Optional[DataConfig], path: str | Path) -> DataConfig:
    """`data` if given, else the data section of the run the source checkpoint belongs to."""
    if data is not None:
        return data
    try:
        ckpt = load(find_checkpoint(path))
    except CheckpointError:
        ckpt = None
    if ckpt is None:
        raise ConfigError(f"source.checkpoint={path} is no seed-cluster run, so it has no data section; "
                          "pass data=<preset> data.train=... data.val=...")
    return DataConfig(**ckpt["config"]["data"])


# -- features --------------------------------------------------------------------------------------------

def shard(num_samples: int, rank: int, world_size: int) -> range:
    """Contiguous shard of `rank`: concatenating the shards in rank order gives 0..num_samples-1."""
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def centre_batches(path: str, data: DataConfig, device: torch.device, indices: Optional[list[int]] = None,
                   batch_size: int = 256, crop_fraction: float = 0.875
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(centre view [B, 3, R, R], labels [B]) over `indices` of `path` (all samples by default), in order."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor

    from .augment import normalize_images
    from .data import check_dataset, eval_decoder

    check_dataset(path, "data")
    if indices is not None and len(indices) == 0:
        return
    pipelines = {"image": [eval_decoder(data.resolution, crop_fraction), ToTensor()],
                 "label": [IntDecoder(), ToTensor(), Squeeze(1)], "index": None}
    loader = Loader(path, batch_size=batch_size, num_workers=data.num_workers, order=OrderOption.SEQUENTIAL,
                    indices=indices, pipelines=pipelines, drop_last=False, os_cache=data.os_cache)
    for images, labels in loader:
        yield normalize_images(images.to(device), mean=data.mean, std=data.std), labels.to(device).clone()


@torch.no_grad()
def extract_features(encoder: Optional[nn.Module], path: str, data: DataConfig,
                     device: Optional[torch.device] = None, *, indices: Optional[list[int]] = None,
                     batch_size: int = 256, deadline: Optional[float] = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (or, with encoder=None, the normalised centre view's raw pixels) and labels, on CPU.

    `encoder`: an `Encoder` (its `features()`) or a bare backbone. `deadline`: time.monotonic() after which
    extraction stops early (what was extracted is returned).
    """
    device = device or torch.device("cpu")
    forward = None if encoder is None else encoder.features if isinstance(encoder, Encoder) else encoder
    features, labels = [], []
    for images, y in centre_batches(path, data, device, indices, batch_size):
        f = images.flatten(1) if forward is None else forward(images)
        features.append(f.float().cpu())
        labels.append(y.cpu())
        if deadline is not None and time.monotonic() > deadline:
            break
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(labels).long()


def gather_shards(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate per-rank tensors of different lengths along dim 0, in rank order (every rank gets all)."""
    import torch.distributed as dist

    from .distributed import is_distributed, world_size

    if not is_distributed() or world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    trailing = tuple(x.shape[1:])
    width = torch.tensor([x.shape[1] if x.ndim > 1 else 0], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank that extracted nothing has an empty [0, 0] tensor
    if x.ndim > 1:
        trailing = (int(width),)
    padded = torch.zeros((max(sizes), *trailing), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).cpu()


def extract_sharded(backbone: Optional[nn.Module], path: str, data: DataConfig, device: torch.device,
                    rank: int, world_size: int, num_samples: int, batch_size: int = 256,
                    subset: Optional[list[int]] = None, deadline: Optional[float] = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample (or of `subset`), each rank extracting its shard, gathered."""
    items = list(subset) if subset is not None else list(range(num_samples))
    mine = [items[i] for i in shard(len(items), rank, world_size)]
    f, y = extract_features(backbone, path, data, device, indices=mine, batch_size=batch_size, deadline=deadline)
    comm = device if _backend_is_nccl() else torch.device("cpu")
    return gather_shards(f, comm), gather_shards(y, comm)


def _backend_is_nccl() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"


# -- kNN report ------------------------------------------------------------------------------------------

def knn_report(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               num_classes: int, per_class: int = 10, draws: int = 5, seed: int = 0, ks: tuple[int, ...] = (20, 1),
               temperature: float = 0.07, max_chunk_mb: float = 256.0) -> dict[str, float]:
    """`knn_top1`/`knn_top5` (first k), `knn<k>_top1`/`_top5` for every k, and the few-shot mean and std."""
    accs = knn_accuracies(train[0], train[1], test[0], test[1], num_classes, list(ks), temperature,
                          max_chunk_mb=max_chunk_mb)
    out = {"knn_top1": accs[ks[0]]["top1"], "knn_top5": accs[ks[0]]["top5"]}
    for k, acc in accs.items():
        out[f"knn{k}_top1"], out[f"knn{k}_top5"] = acc["top1"], acc["top5"]
    if per_class:
        few = knn_few_shot(train[0], train[1], test[0], test[1], num_classes, per_class=per_class, draws=draws,
                           seed=seed, k=ks[0], temperature=temperature)
        out[f"knn_{per_class}shot_top1"], out[f"knn_{per_class}shot_std"] = few["mean"], few["std"]
    return out


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


# -- the kNN job (launch/eval.py) ------------------------------------------------------------------------

def eval_dir(cfg, kind: str) -> Path:
    """Where an evaluation writes: run_dir, else <source run>/eval/<kind>-<hash>, else <output_dir>/<name>-..."""
    from .eval_config import eval_hash

    if cfg.run_dir:
        return Path(cfg.run_dir)
    root = run_root(cfg.source.checkpoint)
    if root is not None:
        return root / "eval" / f"{kind}-{eval_hash(cfg, kind)}"
    return Path(cfg.output_dir) / f"{cfg.name}-{kind}-{eval_hash(cfg, kind)}"


def results_dir(cfg, kind: str) -> Path:
    """The directory whose results.json collects this evaluation: the source's run, else the eval dir."""
    return run_root(cfg.source.checkpoint) or eval_dir(cfg, kind)


def num_samples(path: str) -> tuple[int, int]:
    """(samples, classes) from the .beton's manifest."""
    from .data import check_dataset

    manifest = check_dataset(path, "data")
    return int(manifest["num_samples"]), int(manifest.get("num_classes") or 0)


def run_knn(cfg, env=None, preemption=None) -> Optional[dict[str, float]]:
    """The offline kNN of `cfg` (an EvalConfig) on this rank; rank 0 returns and records the results.

    Features are extracted into resumable chunk stores (`feature_store`): a requeued job extracts only
    the chunks its previous attempts did not finish.
    """
    import shutil

    from .distributed import DistEnv, broadcast_object
    from .feature_store import extract_chunks, my_chunks, read_all, resolve_source, stores_for
    from .preemption import Preemption
    from .report import record
    from .trainer import pick_device

    env = env or DistEnv.detect()
    preemption = preemption or Preemption()
    device = pick_device(cfg.device, env.local_rank)
    data = source_data(cfg.data, cfg.source.checkpoint)
    if not data.val:
        raise ConfigError("kNN needs a labelled held-out set: set data.val=FILE.beton")
    features_dir = eval_dir(cfg, "knn") / "features"
    splits = {"train": data.train, "val": data.val}
    counts = {name: num_samples(path) for name, path in splits.items()}
    sizes = {name: n for name, (n, _) in counts.items()}
    chunk_size = cfg.knn.batch_size * cfg.knn.batches_per_chunk
    # One collective, before any extraction: every rank gets rank 0's source and list of finished chunks.
    plan = None
    if env.rank == 0:
        source = resolve_source(features_dir, cfg.source.checkpoint)
        stores = stores_for(features_dir, splits, sizes, chunk_size, source)
        for store in stores.values():
            store.prepare()
        plan = {"source": source, "done": {name: store.done() for name, store in stores.items()}}
        if any(plan["done"].values()):
            logger.info("resuming the kNN feature extraction: %s", ", ".join(s.progress() for s in stores.values()))
    plan = broadcast_object(plan)
    loaded = load_backbone(plan["source"], cfg.source.arch)
    backbone = loaded.backbone.to(device).eval()
    stores = stores_for(features_dir, splits, sizes, chunk_size, plan["source"])
    start = time.perf_counter()
    extracted = sum(extract_chunks(store, my_chunks(plan["done"][name], len(store.ranges), env.rank, env.world_size),
                                   backbone, data, device, cfg.knn.batch_size, env.rank, preemption)
                    for name, store in stores.items())
    features = read_all(stores, env.rank, preemption)
    extract_s = time.perf_counter() - start
    if features is None:
        return None
    train, val = features["train"], features["val"]
    num_classes = max(counts["train"][1], counts["val"][1], int(train[1].max()) + 1, int(val[1].max()) + 1)
    start = time.perf_counter()
    results = knn_report(train, val, num_classes, per_class=0, ks=tuple(cfg.knn.k),
                         temperature=cfg.knn.temperature, max_chunk_mb=cfg.knn.max_chunk_mb)
    results.update({"knn_train_samples": float(len(train[1])), "knn_val_samples": float(len(val[1])),
                    "knn_extract_s": extract_s, "knn_search_s": time.perf_counter() - start})
    from .report import write_json_atomic

    write_json_atomic(features_dir.parent / "knn.json", {"source": str(loaded.path), "results": results})
    record(results_dir(cfg, "knn"), "knn", {k: v for k, v in results.items() if k.startswith("knn")},
           {**loaded.meta, "source": str(loaded.path)})
    logger.info("kNN of %s (%d feature chunks extracted by this rank in this attempt): %s", loaded.path,
                extracted, json.dumps(results))
    if not cfg.knn.keep_features:
        shutil.rmtree(features_dir, ignore_errors=True)
    return results


class KNNJob(submitit.helpers.Checkpointable):
    """submitit callable of the offline kNN; a requeue resumes the feature extraction from its finished chunks."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self) -> Optional[dict[str, float]]:
        from .job import run_task

        return run_task(eval_dir(self.cfg, "knn"), self.cfg.device, partial(run_knn, self.cfg))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 after the ranks left: requeue the same job (config only)."""
        from .feature_store import progress

        directory = eval_dir(self.cfg, "knn")
        logger.info("requeueing kNN evaluation %s (%s)", directory, progress(directory / "features"))
        return submitit.helpers.DelayedSubmission(KNNJob(self.cfg))


def submit(cfg, job, kind: str) -> int:
    """Submit `job` with cfg.cluster through submitit (as training does); wait and stream when local."""
    from .job import executor_for, stream_until_done

    directory = eval_dir(cfg, kind)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the evaluation directory {directory} ({e.strerror})") from None
    executor = executor_for(cfg, directory / "submitit")
    submitted = executor.submit(job)
    print(f"job {submitted.job_id} ({cfg.cluster.backend}, {cfg.world_size} ranks)\n"
          f"evaluation directory: {directory}\nresults: {results_dir(cfg, kind) / 'results.json'}", flush=True)
    if cfg.cluster.backend == "slurm" and not cfg.cluster.wait:
        return 0
    from submitit.core.utils import FailedJobError, UncompletedJobError

    stream_until_done(submitted)
    try:
        submitted.results()
    except (FailedJobError, UncompletedJobError):
        from .launcher import last_error_line

        print(f"error: {last_error_line(submitted) or 'the job failed'} (log: {submitted.paths.stdout})",
              file=sys.stderr)
        return 1
    return 0


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


def preflight(cfg, kind: str) -> None:
    """What can be checked before submitting: the source loads, the data is readable, the output is writable."""
    from .data import check_dataset

    problems: list[str] = []
    for check in (lambda: load_backbone(cfg.source.checkpoint, cfg.source.arch),
                  lambda: check_dataset(source_data(cfg.data, cfg.source.checkpoint).train, "data.train"),
                  lambda: check_dataset(source_data(cfg.data, cfg.source.checkpoint).val or "", "data.val")):
        try:
            check()
        except SeedClusterError as e:
            problems.append(str(e))
    from .launcher import cluster_problems

    problems += cluster_problems(cfg.cluster)
    if problems:
        raise ConfigError("; ".join(dict.fromkeys(problems)))


def launch(argv: list[str], kind: str) -> int:
    """launch/eval.py (kind knn) and launch/linear.py (kind linear): compose, check, submit, report."""
    from omegaconf import OmegaConf

    from .eval_config import load_eval_config

    print_only = "--cfg" in argv
    try:
        cfg = load_eval_config([a for a in argv if a != "--cfg"])
        if print_only:
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return 0
        preflight(cfg, kind)
        if kind == "knn":
            job = KNNJob(cfg)
        else:
            from .linear import LinearJob

            job = LinearJob(cfg)
        return submit(cfg, job, kind)
    except SeedClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
