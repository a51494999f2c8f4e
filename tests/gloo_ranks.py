"""Run a test's worker on real gloo ranks in spawned processes, never hanging the suite."""

from __future__ import annotations

import socket
import time
from typing import Callable

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, *args, nprocs: int = 2, timeout_s: float = 120) -> None:
    """Calls worker(rank, port, *args) on nprocs processes; fails the test (and kills them) after timeout_s."""
    context = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"gloo workers did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
