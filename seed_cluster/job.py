"""The job callable that submitit runs on every task, locally or on SLURM.

It lives in the library (submitit pickles it and the callable must be importable).
It carries only the resolved config: what to resume from is found when the job
starts, by listing the run directory, never baked into the pickle.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import submitit

from .config import TrainConfig, run_dir
from .distributed import DistEnv, init_process_group
from .errors import SeedClusterError

logger = logging.getLogger(__name__)


def setup_logging(env: DistEnv) -> None:
    """One format for every rank (rank and job id in each line); only rank 0 logs below WARNING."""
    fmt = f"%(asctime)s [rank {env.rank} job {env.job_id}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING, format=fmt,
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self) -> Optional[dict[str, float]]:
        from .trainer import Trainer  # heavy imports (ffcv, timm) only inside the job

        env = DistEnv.detect()
        setup_logging(env)
        directory = run_dir(self.cfg)
        try:
            backend = "nccl" if self.cfg.device != "cpu" and _cuda_available() else "gloo"
            if self.cfg.device == "cpu":
                backend = "gloo"
            init_process_group(env, directory / ".rendezvous", backend)
            trainer = Trainer(self.cfg, env)
            result = trainer.train()
        except SeedClusterError as e:
            # One line in the log, then fail the task: the user's input is wrong, retrying won't help.
            logger.error("%s", e)
            raise
        return result if env.rank == 0 else None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=c.timeout_min, tasks_per_node=cfg.nodes * c.tasks_per_node,
                                   gpus_per_node=c.gpus_per_node, signal_delay_s=c.signal_delay_s)
        # Each rank gets its share of the cores for torch's and FFCV's threads.
        os.environ.setdefault("OMP_NUM_THREADS", str(c.cpus_per_task))
        return executor
    raise NotImplementedError("cluster=slurm is built by the SLURM launcher issue")
