#!/usr/bin/env python
"""What fault tolerance costs, measured on this machine (not a test: it prints figures).

1. Checkpoint save and load time and size for a mobilenetv3_large_100 student with a
   65536 x 128 queue (the real Trainer payload after one SGD step: student, heads, queue,
   optimizer momentum, RNG, config; the ResNet-50 teacher is not stored).
2. On the local SLURM cluster (launch/local_cluster.sh; started here if it is not running,
   stopped again afterwards): a tiny 2-node job is hit by `scancel --signal=USR2` twice;
   reports the time from each signal to the requeued job's first training step (the
   trainer's `preemption/time_lost_s`) and the steps recomputed per preemption, read from
   the raw TensorBoard event files of each attempt (goal: 0 — the state at the signal is saved).

    python bench/checkpoint_and_requeue.py               # both parts (the cluster needs root)
    python bench/checkpoint_and_requeue.py --no-cluster  # part 1 only
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def build_data(out: Path) -> Path:
    from ffcv_build import build_fashion_mnist

    if not (out / "train.beton").exists():
        build_fashion_mnist(out, limit=2000)
    return out / "train.beton"


def checkpoint_costs(train: Path, run: Path, repeats: int = 3) -> None:
    from seed_cluster.checkpoint import load
    from seed_cluster.distributed import DistEnv
    from seed_cluster.launcher import load_config
    from seed_cluster.trainer import Trainer

    cfg = load_config(["cluster=local", "data=fashion_mnist", f"data.train={train}", "data.batch_size_per_rank=8",
                       "data.num_workers=1", "student=mobilenetv3_large", "teacher=resnet50", "method=seed",
                       "method.queue_size=65536", "method.dim=128", f"run_dir={run}", "device=cpu",
                       "optim.max_steps=1000", f"checkpoint.keep={repeats}", "logging.progress_bar=false"])
    trainer = Trainer(cfg, DistEnv.detect())
    trainer.open_metrics()
    trainer.train_step(next(iter(trainer.data)))  # momentum buffers exist, as in any real checkpoint
    saves, loads = [], []
    for i in range(repeats):
        trainer.state.step = i + 1
        start = time.perf_counter()
        trainer.save()
        saves.append(time.perf_counter() - start)
    for path in trainer.checkpointer.paths():
        start = time.perf_counter()
        state = load(path)
        loads.append(time.perf_counter() - start)
    size = trainer.checkpointer.latest().stat().st_size
    queue = state["model"]["queue.queue"]
    params = sum(p.numel() for p in trainer.method.student.parameters())
    print(f"checkpoint: mobilenetv3_large_100 student ({params / 1e6:.2f} M parameters) + queue "
          f"{tuple(queue.shape)} {queue.dtype} + SGD momentum + RNG + config")
    print(f"  size {size / 1e6:.1f} MB; save {statistics.median(saves):.2f} s (median of {repeats}: "
          f"{', '.join(f'{s:.2f}' for s in saves)}); load {statistics.median(loads):.2f} s "
          f"(median of {repeats}: {', '.join(f'{s:.2f}' for s in loads)})")


def cluster_env() -> dict[str, str]:
    state = os.environ.get("SEED_SLURM_DIR", "/tmp/seed-cluster-slurm")
    return {**os.environ, "SLURM_CONF": f"{state}/slurm.conf"}


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=cluster_env(), cwd=ROOT)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout} s")
        time.sleep(poll)
    return value


def job_state(job_id: str) -> str:
    out = run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"], timeout=20).stdout.split()
    return out[-1] if out else ""


def attempt_steps(tensorboard: Path) -> list[tuple[int, int]]:
    """(first, last) loss/train step of each attempt's event file, in the order they were written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    attempts = []
    for path in sorted(tensorboard.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        steps = [e.step for e in EventFileLoader(str(path)).Load()
                 if any(v.tag == "loss/train" for v in e.summary.value)]
        if steps:
            attempts.append((min(steps), max(steps)))
    return attempts


def requeue_costs(train: Path, out: Path, preemptions: int = 2, steps: int = 400) -> None:
    script = ROOT / "launch" / "local_cluster.sh"
    was_running = run(["bash", str(script), "status"], timeout=60).returncode == 0
    if not was_running:
        start = run(["bash", str(script), "start"], timeout=240)
        if start.returncode != 0:
            sys.exit(f"launch/local_cluster.sh start failed:\n{start.stderr}")
    try:
        result = run([sys.executable, "launch/slurm.py", "cluster=slurm", "nodes=2", "cluster.tasks_per_node=1",
                      "cluster.gpus_per_node=0", "cluster.cpus_per_task=1", "cluster.timeout_min=30", "device=cpu",
                      "data=fashion_mnist", f"data.train={train}", "data.batch_size_per_rank=32",
                      "data.num_workers=1", "student=convnet_s", "teacher=convnet_l", "teacher.hidden_dim=64",
                      "method.dim=32", "method.queue_size=100", f"output_dir={out}", "logging.progress_bar=false",
                      "logging.every_steps=1", f"optim.max_steps={steps}", "checkpoint.every_steps=10"], timeout=120)
        if result.returncode != 0:
            sys.exit(result.stderr)
        job_id = re.search(r"^job (\d+)", result.stdout, re.M).group(1)
        directory = Path(re.search(r"^run directory: (.+)$", result.stdout, re.M).group(1))
        log = directory / "submitit" / f"{job_id}_0_log.out"

        def text() -> str:
            return log.read_text(errors="replace") if log.exists() else ""

        wait_for(lambda: (directory / "checkpoints" / "step-00000010.pt").exists(), 180, "the first checkpoint")
        for i in range(preemptions):
            run(["scancel", "--signal=USR2", job_id], timeout=20)
            wait_for(lambda i=i: text().count("lost since the signal") > i, 240, f"resumed training #{i + 1}")
            time.sleep(3)  # let the resumed attempt make some progress before the next signal
        wait_for(lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the job's end")
        state = job_state(job_id)
        if state != "COMPLETED":
            sys.exit(f"job {job_id} ended {state}; see {log}")

        lost = [float(x) for x in re.findall(r"first step after the preemption: ([\d.]+) s lost", text())]
        attempts = attempt_steps(directory / "tensorboard")
        recomputed = [prev[1] - (nxt[0] - 1) for prev, nxt in zip(attempts, attempts[1:], strict=False)]
        print(f"requeue on the local SLURM cluster (2 nodes x 1 task, job {job_id}, {steps} steps, "
              f"{len(lost)} USR2 preemptions)")
        print(f"  signal -> first step of the requeued job: {', '.join(f'{s:.1f}' for s in lost)} s "
              f"(mean {statistics.mean(lost):.1f} s)")
        print(f"  attempts' step ranges {attempts}; steps recomputed per preemption {recomputed} "
              f"(fraction of the run: {sum(recomputed) / steps:.3f})")
    finally:
        if not was_running:
            run(["bash", str(script), "stop"], timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cluster", action="store_true", help="only the checkpoint figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="seed-bench-") as tmp:
        tmp = Path(tmp)
        train = build_data(tmp / "fashion_mnist")
        checkpoint_costs(train, tmp / "ckpt-run")
        if not args.no_cluster:
            requeue_costs(train, tmp / "runs")


if __name__ == "__main__":
    main()
