"""The job callable that submitit runs on every task, locally or on SLURM.

It lives in the library (submitit pickles it and the callable must be importable).
It carries only the resolved config: what to resume from is found when the job
starts, by listing the run directory, never baked into the pickle.

Signals: submitit installs its USR2 handler (checkpoint + requeue) before calling the
job. `TrainJob.__call__` replaces it at once with `Preemption.on_signal`, which only sets
a flag; the trainer acts on the flag at a step boundary (collective save) and then hands
the signal back to submitit's handler on global rank 0, which calls `checkpoint()` below
and runs `scontrol requeue`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import submitit

from .config import TrainConfig, run_dir
from .distributed import DistEnv, backend_for, init_process_group
from .errors import SeedClusterError
from .preemption import Preemption

logger = logging.getLogger(__name__)
T = TypeVar("T")


def setup_logging(env: DistEnv) -> None:
    """One format for every rank (rank and job id in each line); only rank 0 logs below WARNING."""
    fmt = f"%(asctime)s [rank {env.rank} job {env.job_id}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING, format=fmt,
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    logging.getLogger("submitit").propagate = False  # it has its own handler: print its lines once


_NUMBA_DISPATCHER = os.path.join("numba", "core", "dispatcher.py")


def _is_numba_finalizer_error(unraisable) -> bool:
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(unraisable.exc_value, KeyError) and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith(_NUMBA_DISPATCHER))


def quiet_numba_finalizers() -> None:
    """Drop the KeyError tracebacks numba's dispatcher finalizer prints when FFCV's compiled pipelines are
    garbage-collected (numba's own cleanup, harmless; dozens per run, they read like failures). Every other
    unraisable exception still reaches the previous hook. Installing it again is a no-op."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_numba_finalizer_errors", False):
        return

    def hook(unraisable) -> None:
        if not _is_numba_finalizer_error(unraisable):
            previous(unraisable)

    hook.drops_numba_finalizer_errors = True
    sys.unraisablehook = hook


def run_task(directory: Path, device: str, work: Callable[[DistEnv, Preemption], T]) -> Optional[T]:
    """What every job (training, precompute, kNN, linear) does on each of its tasks: keep signals from the
    first moment, log with the rank, join the process group (rendezvous files under `directory`), run
    `work(env, preemption)`, and return its result from global rank 0 (None elsewhere)."""
    preemption = Preemption().install()  # first: a signal during start-up is kept, not lost
    env = DistEnv.detect()
    setup_logging(env)
    quiet_numba_finalizers()
    try:
        init_process_group(env, directory / ".rendezvous", backend_for(device))
        result = work(env, preemption)
    except SeedClusterError as e:
        # One line in the log, then fail the task: the user's input is wrong, retrying won't help.
        logger.error("%s", e)
        raise
    finally:
        preemption.uninstall()
    return result if env.rank == 0 else None


class TrainJob(submitit.helpers.Checkpointable):
    """Training, or (mode=precompute) writing the teacher feature cache: both resume from what is on disk."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self) -> Optional[dict[str, float]]:
        return run_task(run_dir(self.cfg), self.cfg.device, self._work)

    def _work(self, env: DistEnv, preemption: Preemption) -> dict[str, float]:
        from .precompute import precompute  # heavy imports (ffcv, timm) only inside the job
        from .trainer import Trainer, pick_device

        if self.cfg.mode == "precompute":
            return precompute(self.cfg, env, preemption, pick_device(self.cfg.device, env.local_rank))
        return Trainer(self.cfg, env, preemption).train()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on global rank 0 after the trainer's collective save: requeue the same job.

        Only the config travels; the requeued job finds its checkpoint by listing the run directory.
        """
        logger.info("requeueing %s", run_dir(self.cfg))
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg))


def stream_until_done(job: submitit.Job, poll_s: float = 1.0) -> None:
    """Copy rank 0's stdout and stderr to this terminal while the job runs."""
    paths = [Path(job.paths.stdout), Path(job.paths.stderr)]
    offsets = {p: 0 for p in paths}
    while True:
        done = job.done()
        for p in paths:
            if p.exists():
                with open(p, "rb") as f:
                    f.seek(offsets[p])
                    chunk = f.read()
                offsets[p] += len(chunk)
                (sys.stdout if p == paths[0] else sys.stderr).buffer.write(chunk)
        sys.stdout.flush()
        sys.stderr.flush()
        if done:
            return
        time.sleep(poll_s)


def executor_for(cfg: TrainConfig, folder: Path) -> submitit.Executor:
    """A submitit executor for cfg.cluster: LocalExecutor (all ranks on this machine) or SlurmExecutor."""
    c = cfg.cluster
    if c.backend == "local":
        executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=c.max_num_timeout)
        executor.update_parameters(timeout_min=c.timeout_min, tasks_per_node=cfg.nodes * c.tasks_per_node,
                                   gpus_per_node=c.gpus_per_node, signal_delay_s=c.signal_delay_s)
        # Each rank gets its share of the cores for torch's and FFCV's threads.
        os.environ.setdefault("OMP_NUM_THREADS", str(c.cpus_per_task))
        return executor
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=c.max_num_timeout)
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


def slurm_parameters(cfg: TrainConfig) -> dict:
    """submitit SlurmExecutor parameters for cfg (names as sbatch spells them, via submitit)."""
    c = cfg.cluster
    params = {
        "job_name": cfg.name,
        "nodes": cfg.nodes,
        "ntasks_per_node": c.tasks_per_node,
        "cpus_per_task": c.cpus_per_task,
        "time": c.timeout_min,
        "signal_delay_s": c.signal_delay_s,
        "use_srun": True,  # the USR2 reaches Python only through a job step
        # One rank dying (kill -9, OOM) ends the whole step instead of leaving the others blocked.
        "srun_args": ["--kill-on-bad-exit=1"],
        # Each rank's share of the cores for torch's and FFCV's threads.
        "setup": [f"export OMP_NUM_THREADS={c.cpus_per_task}", *c.setup],
    }
    # --requeue: a preempted job is requeued rather than cancelled, even where JobRequeue=0.
    optional = {"gpus_per_node": c.gpus_per_node or None, "mem": f"{c.mem_gb}GB" if c.mem_gb else None,
                "partition": c.partition, "qos": c.qos, "account": c.account, "constraint": c.constraint,
                "additional_parameters": {"requeue": True, **c.additional_parameters}}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params
