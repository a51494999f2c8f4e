"""Process-group helpers: rank queries and collectives that work with or without DDP."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order). Same shape on every rank; no grad."""
    if not is_distributed() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


_control_group = None


def _cpu_group():
    """A gloo group for small control values: with NCCL, agreeing on a flag every step through it
    does not synchronise the GPU stream. Created on first use, which is collective like its caller."""
    global _control_group
    if dist.get_backend() == "gloo":
        return None  # the default group already works on CPU tensors
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo")
    return _control_group


def all_reduce_max(value: float | int | bool) -> float:
    """The maximum of a Python scalar over all ranks (used to agree on flags such as 'stop now')."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return float(t.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank (any picklable value; through the gloo control group, so no GPU
    stream is involved). Used where ranks must act on one view of shared state, e.g. which feature
    chunks a resumed job still has to extract: each rank listing the directory itself could disagree."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_cpu_group())
    return box[0]


# -- process-group set-up --------------------------------------------------------------------------------

RENDEZVOUS_TIMEOUT_S = 300


@dataclass(frozen=True)
class DistEnv:
    """Who this process is: from submitit's JobEnvironment (SLURM or local executor), else a single process."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    job_id: str
    attempt: int
    """SLURM_RESTART_COUNT: 0 for a first run, then +1 per requeue."""

    @classmethod
    def detect(cls) -> "DistEnv":
        import submitit

        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # not started by submitit
            return cls(0, 0, 1, "127.0.0.1", f"pid{os.getpid()}", 0)
        addr = env.hostnames[0] if env.cluster == "slurm" else "127.0.0.1"
        return cls(env.global_rank, env.local_rank, env.num_tasks, addr, str(env.job_id),
                   int(os.environ.get("SLURM_RESTART_COUNT", "0")))


def backend_for(device: str) -> str:
    """NCCL when the job trains on CUDA (device auto or cuda with a GPU visible), gloo otherwise."""
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def init_process_group(env: DistEnv, rendezvous_dir: Path, backend: str) -> None:
    """Join the job's process group through a fresh port chosen by rank 0 and published in a file.

    The port is never fixed and never derived from the job id: rank 0 lets the OS pick a
    free one for each job and each requeue (`attempt`), so jobs sharing a host never collide.
    """
    if env.world_size == 1:
        return
    rendezvous_dir.mkdir(parents=True, exist_ok=True)
    address_file = rendezvous_dir / f"{env.job_id}-{env.attempt}"
    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    if env.rank == 0:
        store = dist.TCPStore("0.0.0.0", 0, world_size=env.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        tmp = address_file.with_suffix(".tmp")
        tmp.write_text(f"{env.master_addr}:{store.port}")
        os.replace(tmp, address_file)
    else:
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
        while not address_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {env.rank}: rank 0 never published {address_file}")
            time.sleep(0.2)
        host, port = address_file.read_text().rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world_size=env.world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    dist.barrier()
    if env.rank == 0:
        address_file.unlink(missing_ok=True)
