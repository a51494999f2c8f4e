"""Pytest plugin: a real 4-node SLURM cluster on this host (launch/local_cluster.sh).

Load it with ``pytest_plugins = ["slurm_cluster"]`` (tests/ on sys.path) or ``-p slurm_cluster``.

Fixture ``slurm_cluster`` (session scope): starts the cluster (or reuses a healthy running one),
puts ``SLURM_CONF`` into ``os.environ`` so that sbatch/sacct/submitit in this process and in the
jobs it submits find it, yields a :class:`SlurmCluster`, and at session end cancels the jobs left
and stops the cluster (unless it was already running before the session, or SEED_SLURM_KEEP=1).

It skips only when the cluster cannot be started here at all (not root); as root with SLURM
missing it fails and points at ``make setup``. Every subprocess call has a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "local_cluster.sh"
NEEDED_BINARIES = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "squeue")

# sacct states after which a job will not run again (a REQUEUED job will).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


class SlurmCommandError(RuntimeError):
    pass


@dataclass
class SlurmCluster:
    """Handle on the running local cluster; all commands run with this cluster's SLURM_CONF."""

    state_dir: Path
    script: Path = SCRIPT
    nodes: tuple[str, ...] = ("n1", "n2", "n3", "n4")
    cpus_per_node: int = 4
    partitions: tuple[str, ...] = ("low", "high")  # low is the default and preemptible
    started_here: bool = field(default=False, repr=False)

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "SEED_SLURM_DIR": str(self.state_dir)}

    # -- raw commands ----------------------------------------------------------------------
    def run(self, args: list[str], timeout: float = 30, check: bool = True, input: str | None = None) -> str:
        """Run a SLURM client command; returns stdout. Raises SlurmCommandError on failure/timeout."""
        try:
            proc = subprocess.run(
                args, env=self.env, capture_output=True, text=True, timeout=timeout, input=input
            )
        except subprocess.TimeoutExpired as e:
            raise SlurmCommandError(f"{args} timed out after {timeout}s") from e
        if check and proc.returncode != 0:
            raise SlurmCommandError(f"{args} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def script_cmd(self, action: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(self.script), action],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- jobs --------------------------------------------------------------------------------
    def sbatch(self, *args: str, script: str | None = None, timeout: float = 30) -> int:
        """``sbatch --parsable ARGS`` (script body on stdin when given); returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], timeout=timeout, input=script)
        return int(out.strip().split(";")[0])

    def sacct_records(self, job_id: int | str, duplicates: bool = False) -> list[dict[str, str]]:
        """Allocation records of a job (no steps); with duplicates=True also earlier (requeued) runs."""
        fields = ["JobID", "State", "ExitCode", "Partition", "NodeList", "Start", "End"]
        args = ["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", ",".join(fields)]
        if duplicates:
            args.append("-D")
        out = self.run(args, timeout=20)
        rows = []
        for line in out.splitlines():
            if line.strip():
                rows.append(dict(zip(fields, line.split("|"), strict=False)))
        return rows

    def sacct_state(self, job_id: int | str) -> str | None:
        """Current sacct state (first word, e.g. 'CANCELLED by 0' -> 'CANCELLED'), None if unknown yet."""
        rows = self.sacct_records(job_id)
        if not rows:
            return None
        return rows[-1]["State"].split()[0]

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, NodeList, ...); {} once purged."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], timeout=20, check=False)
        info: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                info[key] = value
        return info

    def squeue(self, *args: str) -> list[dict[str, str]]:
        """Jobs in the queue: dicts with id, partition, name, state, nodes, reason."""
        out = self.run(["squeue", "-h", "-o", "%i|%P|%j|%T|%N|%r", *args], timeout=20)
        keys = ("id", "partition", "name", "state", "nodes", "reason")
        return [dict(zip(keys, line.split("|"), strict=False)) for line in out.splitlines() if line.strip()]

    def wait_for_state(
        self,
        job_id: int | str,
        states: str | Iterable[str],
        timeout: float = 60,
        poll: float = 0.5,
        source: str = "sacct",
    ) -> str:
        """Wait until the job's state (from sacct, or scontrol with source='scontrol') is in ``states``.

        Returns the state. Raises TimeoutError (with the last state seen), or AssertionError
        when the job reaches a final state that was not asked for.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = None
        while True:
            if source == "scontrol":
                state = self.job_info(job_id).get("JobState")
            else:
                state = self.sacct_state(job_id)
            if state in wanted:
                return state
            if state in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state}, expected {sorted(wanted)}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} not in {sorted(wanted)} after {timeout}s (last state {state}); "
                    f"logs in {self.log_dir}"
                )
            time.sleep(poll)

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait (bounded) until the queue is empty."""
        self.run(["scancel", "--user", str(os.getuid())], timeout=20, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.squeue():
                    return
            except SlurmCommandError:
                return
            time.sleep(0.5)

    def idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-p", "low", "-o", "%T"], timeout=20)
        states = out.split()
        return len(states) == len(self.nodes) and all(s == "idle" for s in states)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not idle after {timeout}s: {self.run(['sinfo', '-N'])}")
            time.sleep(0.5)


def _skip_reason() -> str | None:
    missing = [b for b in NEEDED_BINARIES if shutil.which(b) is None]
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (it runs munged/slurmd and edits /etc/hosts)" + (
            f"; also missing: {', '.join(missing)}" if missing else ""
        )
    if missing:
        pytest.fail(
            f"SLURM binaries missing ({', '.join(missing)}): run `make setup` "
            "(apt packages slurmctld slurmd slurm-client munge slurmdbd mariadb-server)",
            pytrace=False,
        )
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state_dir = Path(os.environ.get("SEED_SLURM_DIR", "/tmp/seed-cluster-slurm"))
    cluster = SlurmCluster(state_dir=state_dir)
    was_running = cluster.script_cmd("status", timeout=60).returncode == 0
    t0 = time.monotonic()
    proc = cluster.script_cmd("start", timeout=240)
    if proc.returncode != 0:
        pytest.fail(
            f"launch/local_cluster.sh start failed ({proc.returncode}):\n{proc.stderr}\nlogs: {cluster.log_dir}",
            pytrace=False,
        )
    cluster.started_here = not was_running
    start_s = time.monotonic() - t0
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    print(f"\nlocal SLURM cluster up in {start_s:.1f}s (state {state_dir})")
    try:
        yield cluster
    finally:
        try:
            cluster.cancel_all()
        except Exception as e:  # noqa: BLE001 - teardown must go on to stop the daemons
            print(f"cancelling leftover jobs failed: {e}")
        if cluster.started_here and os.environ.get("SEED_SLURM_KEEP") != "1":
            cluster.script_cmd("stop", timeout=180)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the local SLURM cluster (launch/local_cluster.sh)")
