"""A run's evaluation results: one JSON per run, TensorBoard hparams, and a paper-like table.

`RUN/results.json` holds `{"run": {student, teacher, method, epochs, steps, fingerprints...},
"knn": {...}, "linear": {...}}`; each evaluation job updates its own section (written
atomically). After each update the whole record is also written as TensorBoard hparams
(`RUN/tensorboard/results`), so runs compare side by side in TensorBoard's HPARAMS tab.

`python -m seed_cluster.report RUN_DIR...` prints one row per run, like SEED's tables:
student, teacher, method, epochs, kNN top-1, linear top-1 / top-5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

RESULTS = "results.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as JSON through `checkpoint.atomic_write`: readers see the old or the new file, never half."""
    from .checkpoint import atomic_write

    text = json.dumps(obj, indent=2, sort_keys=True)
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def read_results(run_dir: Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def record(run_dir: Path, section: str, values: dict[str, float], meta: Optional[dict] = None) -> dict:
    """Set `section` of RUN/results.json to `values` (and merge `meta` into its `run` part); then hparams."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = read_results(run_dir)
    results[section] = values
    results["run"] = {**results.get("run", {}), **{k: v for k, v in (meta or {}).items() if v is not None}}
    write_json_atomic(run_dir / RESULTS, results)
    write_hparams(run_dir, results)
    return results


def write_hparams(run_dir: Path, results: dict) -> None:
    """The record as one TensorBoard hparams entry (rewritten in full on every update)."""
    from torch.utils.tensorboard import SummaryWriter

    directory = Path(run_dir) / "tensorboard" / "results"
    shutil.rmtree(directory, ignore_errors=True)
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
               for k, v in results.get("run", {}).items() if v is not None}
    metrics = {f"{section}/{k}": float(v) for section, values in results.items() if section != "run"
               for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    writer = SummaryWriter(str(directory))
    writer.add_hparams(hparams, metrics, run_name=".")
    writer.close()


def _pick(values: dict, *keys: str) -> Optional[float]:
    return next((values[k] for k in keys if isinstance(values.get(k), (int, float))), None)


def row(run_dir: Path) -> dict[str, Any]:
    """One table row from RUN/results.json (the checkpoint's config fills in what the JSON lacks)."""
    results = read_results(run_dir)
    run = dict(results.get("run", {}))
    if "student" not in run:
        try:
            from .checkpoint import load
            from .evaluate import find_checkpoint, meta_from_checkpoint

            run.update(meta_from_checkpoint(load(find_checkpoint(run_dir)), Path(run_dir)))
        except Exception:  # noqa: BLE001 - a directory without a readable checkpoint still gets a row
            pass
    knn, linear = results.get("knn", {}), results.get("linear", {})
    return {"run": Path(run_dir).name, "student": run.get("student", "?"), "teacher": run.get("teacher") or "-",
            "method": run.get("method", "?"),
            "epochs": run.get("epochs") if run.get("epochs") is not None else f"{run.get('steps', '?')} st",
            "knn": _pick(knn, "knn20_top1", "knn_top1"), "knn1": _pick(knn, "knn1_top1"),
            "top1": _pick(linear, "top1"), "top5": _pick(linear, "top5"),
            "linear_epochs": linear.get("epochs_done")}


def table(run_dirs: list[Path]) -> str:
    def fmt(v: Optional[float]) -> str:
        return f"{v:.1f}" if isinstance(v, (int, float)) else "-"

    header = ("run", "student", "teacher", "method", "epochs", "kNN k=20", "kNN k=1", "linear top-1",
              "linear top-5")
    rows = [header]
    for d in run_dirs:
        r = row(d)
        rows.append((r["run"], r["student"], r["teacher"], r["method"], str(r["epochs"]), fmt(r["knn"]),
                     fmt(r["knn1"]), fmt(r["top1"]), fmt(r["top5"])))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i < 5 else str(c).rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="print the evaluation results of runs as a table")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with results.json)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.runs if not d.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(json.dumps([row(d) for d in args.runs], indent=2) if args.json else table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
