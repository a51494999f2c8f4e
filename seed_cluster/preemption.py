"""Preemption and time limits: a signal only sets a flag; the ranks act on it together at a step boundary.

SLURM warns a job with submitit's USR2 (`--signal=USR2@signal_delay_s`: time limit or
partition preemption) and, on some clusters or after the grace time, with SIGTERM.
Saving inside a signal handler is unsafe (the step may be half done, the handler can
interrupt a collective, and a second signal could interrupt the save), so the handler
here only records what arrived. At the next step boundary the ranks agree on it with an
all-reduce MAX, save one checkpoint together, and then:

- USR2: global rank 0 hands over to submitit's own USR2 handler (kept when ours was
  installed). It calls `TrainJob.checkpoint()`, counts the time-outs against
  `max_num_timeout`, runs `scontrol requeue` and exits; the other ranks just exit.
- SIGTERM only: SLURM itself is ending (scancel) or requeueing (preemption without a user
  signal, `scontrol requeue`) the job, so every rank saves and exits without requeueing.

Against requeue loops, `RestartGuard` counts how many starts in a row resumed from the same
checkpoint (a job that dies, or is killed before its first step, keeps doing that); the
trainer refuses to go on past a limit, with a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, Union

from .distributed import all_reduce_max
from .errors import SeedClusterError

logger = logging.getLogger(__name__)

NO_SIGNAL, TERMINATE, REQUEUE = 0, 1, 2
"""What the ranks agree on at a step boundary (larger wins in the all-reduce MAX)."""
STALL_S = 3600.0
"""How long `Preemption.wait_until` waits without any progress before it concludes that a rank died."""

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


def requeue_signal() -> signal.Signals:
    """submitit's preemption/time-out signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


class Preemption:
    """Records preemption signals; `agree()` turns them into one decision shared by every rank."""

    def __init__(self) -> None:
        self.usr_signal = requeue_signal()
        self.received: int = NO_SIGNAL
        """The strongest request seen so far by this process (REQUEUE > TERMINATE > NO_SIGNAL)."""
        self.received_at: Optional[float] = None
        """Wall-clock time (time.time()) of the first signal."""
        self.count = 0
        """Signals received in total; the ones after the first change nothing but are counted."""
        self._previous: dict[int, _Handler] = {}

    # -- the handler: flags only, safe to run at any instruction, any number of times ------------------
    def on_signal(self, signum: int, frame: Optional[FrameType] = None) -> None:
        self.count += 1
        if self.received_at is None:
            self.received_at = time.time()
        self.received = max(self.received, REQUEUE if signum == self.usr_signal else TERMINATE)

    def install(self) -> "Preemption":
        """Replace the current USR2 and SIGTERM handlers (submitit's, in a job) by `on_signal`."""
        for signum in (self.usr_signal, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self.on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- at a step boundary -------------------------------------------------------------------------
    def agree(self) -> int:
        """The strongest request on any rank (a collective: every rank must call it at the same step)."""
        return int(all_reduce_max(self.received))

    def requeue_or_exit(self, decision: int, rank: int, step: int, progress: Optional[str] = None) -> None:
        """After the collective save: rank 0 requeues through submitit (USR2); everyone else exits.

        Never returns. On rank 0 with REQUEUE, submitit's handler raises UncompletedJobError
        (the job fails with that message) once `max_num_timeout` time-outs are used up.
        `progress` replaces "checkpoint saved at step N" in the log for jobs that resume from
        finished files rather than from a step (see `leave`).
        """
        submitit_handler = self._previous.get(self.usr_signal)
        self.uninstall()
        done = progress or f"checkpoint saved at step {step}"
        if decision == REQUEUE and rank == 0 and callable(submitit_handler):
            logger.info("%s; requeueing through submitit", done)
            submitit_handler(self.usr_signal, None)  # checkpoint() -> scontrol requeue -> sys.exit
            raise SystemExit(-1)  # a handler that returned (it should not): still leave, without a result
        why = "requeue" if decision == REQUEUE else "termination"
        logger.info("%s after a %s signal; exiting (rank %d)", done, why, rank)
        # SystemExit is no Exception: submitit writes no result file, so a requeued job runs again.
        sys.exit(0 if rank != 0 else 143)

    # -- jobs whose resume point is a set of finished files (precompute, kNN feature extraction) ----------
    def leave(self, rank: int, progress: str) -> None:
        """A signal arrived: stop now, keeping only the files already finished, and requeue (rank 0) or exit.

        No collective: each rank leaves on its own signal, so a rank that left never blocks another
        in a collective. `progress` (e.g. "3/8 chunks done") goes to the log. Never returns.
        """
        logger.info("signal received: stopping with %s", progress)
        self.requeue_or_exit(self.received, rank, -1, progress=progress)

    def wait_until(self, condition: Callable[[], bool], rank: int, progress: Callable[[], str],
                   poll_s: float = 2.0, stall_s: float = STALL_S) -> None:
        """Poll `condition` (e.g. every rank's files are there) until true; a signal meanwhile: `leave`.

        Raises StalledError when `progress()` (e.g. "5/8 chunks done") has not changed for `stall_s`:
        the rank being waited for has most likely died, and without a process group nothing else tells."""
        last, since = progress(), time.monotonic()
        while not condition():
            if self.received != NO_SIGNAL:
                self.leave(rank, progress())
            now = progress()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise StalledError(
                    f"no progress for {stall_s:.0f} s while waiting for the other ranks ({now}): one of them has "
                    "most likely died (see its log); finished chunks are kept, so submitting the same command "
                    "again resumes from them")
            time.sleep(poll_s)

    def lost_since_signal(self) -> Optional[float]:
        return None if self.received_at is None else time.time() - self.received_at


class StalledError(SeedClusterError):
    """Waiting for other ranks' files made no progress for `STALL_S` seconds."""


class RequeueLoopError(SeedClusterError):
    """The run keeps restarting from the same checkpoint without getting past it."""


class RestartGuard:
    """Counts consecutive starts from the same checkpoint step in a small JSON file (rank 0 writes it)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, step: int) -> int:
        """Record a start from `step`; returns how many starts in a row began from it (1 = first)."""
        previous = self._read()
        count = previous.get("count", 0) + 1 if previous.get("step") == step else 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"step": step, "count": count, "time": time.time()}))
        os.replace(tmp, self.path)
        return count

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
