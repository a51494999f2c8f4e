"""`make demo`: the paper's comparison in miniature, on real data, on a laptop-sized CPU.

1. Build Fashion-MNIST .beton files from Debian's idx files (once).
2. Pretrain a teacher (convnet_m) with MoCo-v2.
3. Distil a smaller student (convnet_s) from it with SEED.
4. Train the same student with MoCo-v2 alone for the same number of steps.
5. Print weighted-kNN top-1 on the held-out split for raw pixels, teacher, student-MoCo-v2
   and student-SEED, with the full training set as the bank and with 10 labelled images
   per class (mean and std over 5 draws).

Each stage is an ordinary `launch/slurm.py` run (the commands are printed), so re-running
the demo resumes finished stages from their checkpoints instead of training again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from .config import run_dir
from .errors import SeedClusterError
from .job import quiet_numba_finalizers
from .launcher import load_config
from .launcher import main as launch

STAGES = {
    "teacher": ["experiment=demo_teacher"],
    "student_mocov2": ["experiment=demo_mocov2"],
    "student_seed": ["experiment=demo_seed"],
}


def ensure_dataset(directory: Path) -> None:
    if (directory / "train.beton").exists() and (directory / "test.beton").exists():
        return
    from ffcv_build import build_fashion_mnist

    print(f"building Fashion-MNIST .beton files in {directory}", flush=True)
    build_fashion_mnist(directory)


def train(stage: str, overrides: list[str]) -> Path:
    print(f"\n=== {stage}: python launch/slurm.py {' '.join(overrides)}", flush=True)
    started = time.perf_counter()
    if launch(overrides) != 0:
        raise SeedClusterError(f"demo stage {stage} failed; its log is printed above")
    print(f"=== {stage} done in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir(load_config(overrides))


def evaluate(runs: dict[str, Path], data_dir: Path, per_class: int, draws: int, seed: int) -> dict[str, dict]:
    from .evaluate import extract_features, knn_report, load_student

    results = {}
    _, cfg = load_student(runs["teacher"])
    from .config import DataConfig

    data = DataConfig(**cfg["data"])
    train_path, test_path = str(data_dir / "train.beton"), str(data_dir / "test.beton")
    for name in ("pixels", *runs):
        encoder = None if name == "pixels" else load_student(runs[name])[0]
        train_set = extract_features(encoder, train_path, data)
        test_set = extract_features(encoder, test_path, data)
        results[name] = knn_report(train_set, test_set, num_classes=10, per_class=per_class, draws=draws, seed=seed)
        print(f"evaluated {name}: {results[name]}", flush=True)
    return results


def format_table(results: dict[str, dict], per_class: int) -> str:
    labels = {"pixels": "raw pixels", "teacher": "teacher convnet_m (MoCo-v2)",
              "student_mocov2": "student convnet_s, MoCo-v2", "student_seed": "student convnet_s, SEED"}
    lines = [f"{'representation':<30} {'kNN top-1 (full bank)':>22} {f'kNN top-1 ({per_class}/class)':>22}"]
    for name, r in results.items():
        few = f"{r[f'knn_{per_class}shot_top1']:.2f} ± {r[f'knn_{per_class}shot_std']:.2f}"
        lines.append(f"{labels.get(name, name):<30} {r['knn_top1']:>22.2f} {few:>22}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/fashion_mnist")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0, help="run seed of all three trainings")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every stage's steps (e.g. 0.1 for a quick check)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args(argv)
    quiet_numba_finalizers()

    data_dir, out = Path(args.data_dir).resolve(), Path(args.output_dir).resolve()
    common = [f"data.train={data_dir / 'train.beton'}", f"data.val={data_dir / 'test.beton'}",
              f"output_dir={out}", f"seed={args.seed}"]
    started = time.perf_counter()
    try:
        ensure_dataset(data_dir)
        runs: dict[str, Path] = {}
        for stage, overrides in STAGES.items():
            extra = list(common)
            if args.steps_scale != 1.0:
                steps = load_config(overrides + common).optim.max_steps
                extra.append(f"optim.max_steps={max(1, round(steps * args.steps_scale))}")
            if stage == "student_seed":
                extra.append(f"teacher.checkpoint={runs['teacher']}")
            runs[stage] = train(stage, overrides + extra)
        results = evaluate(runs, data_dir, args.per_class, args.draws, args.seed)
    except SeedClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = format_table(results, args.per_class)
    report = {"seed": args.seed, "runs": {k: str(v) for k, v in runs.items()}, "results": results,
              "minutes": (time.perf_counter() - started) / 60}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-seed{args.seed}.json").write_text(json.dumps(report, indent=2))
    print(f"\nFashion-MNIST test split, weighted kNN (k=20, T=0.07), seed {args.seed}, "
          f"{report['minutes']:.1f} min in all:\n{table}\n\nresults: {out / f'results-seed{args.seed}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
