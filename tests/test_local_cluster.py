"""The local SLURM cluster (launch/local_cluster.sh) behaves like a real multi-node cluster:
multi-node batch jobs, sacct accounting, submitit + torch.distributed across nodes, and
partition preemption with requeue."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(poll)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_two_node_sbatch_completes(slurm_cluster, tmp_path):
    out = tmp_path / "two_node.out"
    job_id = slurm_cluster.sbatch(
        "-N2",
        "--ntasks-per-node=1",
        "-J",
        "two-node",
        "-o",
        str(out),
        "-t",
        "2",
        script="#!/bin/bash\nsrun bash -c 'echo task=$SLURM_PROCID node=$SLURMD_NODENAME'\n",
    )
    assert slurm_cluster.wait_for_state(job_id, "COMPLETED", timeout=60) == "COMPLETED"
    lines = sorted(line for line in _read(out).splitlines() if line.startswith("task="))
    assert len(lines) == 2, _read(out)
    nodes = {line.split("node=")[1] for line in lines}
    assert len(nodes) == 2 and nodes <= set(slurm_cluster.nodes), lines
    record = slurm_cluster.sacct_records(job_id)[-1]
    assert record["ExitCode"] == "0:0"
    assert len(record["NodeList"]) > 0


def _allreduce_across_nodes() -> dict:
    """Runs inside each SLURM task: a real gloo process group from submitit's environment."""
    import datetime
    import os

    import submitit
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        value = torch.tensor([float(2**env.rank)])  # one bit per rank: the sum names who took part
        dist.all_reduce(value)
        nodes = [None] * env.world_size
        dist.all_gather_object(nodes, os.environ["SLURMD_NODENAME"])
    finally:
        dist.destroy_process_group()
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "sum": value.item(),
        "nodes": nodes,
        "master": f"{env.master_addr}:{env.master_port}",
        "python": sys.executable,
    }


def test_submitit_torch_distributed_two_nodes(slurm_cluster, tmp_path):
    import cloudpickle
    import submitit

    # The job cannot import this test module by name (tests/ is not on its sys.path): ship
    # the function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
        executor.update_parameters(
            nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5, slurm_partition="low", name="gloo"
        )
        job = executor.submit(_allreduce_across_nodes)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    _wait_for(lambda: job.done(force_check=True), timeout=150, what=f"submitit job {job.job_id} done", poll=2)
    results = job.results()
    assert len(results) == 2
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["world_size"] == 2
        assert r["sum"] == 3.0  # 2**0 + 2**1: both ranks contributed
        assert len(set(r["nodes"])) == 2, r["nodes"]  # one rank on each of two nodes
        assert r["master"].split(":")[0] in slurm_cluster.nodes
        assert r["python"] == sys.executable  # the job ran this venv's Python
    # submitit sees the result files first; slurmdbd records the end a moment later.
    assert slurm_cluster.wait_for_state(job.job_id, "COMPLETED", timeout=30) == "COMPLETED"


LOW_JOB = """#!/bin/bash
echo "start restart=${SLURM_RESTART_COUNT:-0} $(date +%s.%N)"
@TRAP@
for i in $(seq 1500); do sleep 0.2; done
"""
# What submitit does on a preemption signal: note it and requeue itself (no GraceTime wait).
SELF_REQUEUE = (
    'trap \'echo "USR2 restart=${SLURM_RESTART_COUNT:-0} $(date +%s.%N)"; '
    "scontrol requeue $SLURM_JOB_ID; exit 0' USR2"
)
# A job that ignores the signal: SLURM itself kills and requeues it after the partition's GraceTime.
IGNORE_USR2 = "trap 'echo \"USR2 restart=${SLURM_RESTART_COUNT:-0} $(date +%s.%N)\"' USR2"


def test_high_partition_preempts_and_requeues_low_jobs(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    out_self = tmp_path / "low_self.out"
    out_slurm = tmp_path / "low_slurm.out"
    common = ["-p", "low", "-N1", "-n1", "-t", "10", "--requeue", "--open-mode=append", "--signal=B:USR2@60"]
    low_self = cluster.sbatch(
        *common, "-J", "low-self", "-o", str(out_self), script=LOW_JOB.replace("@TRAP@", SELF_REQUEUE)
    )
    low_slurm = cluster.sbatch(
        *common, "-J", "low-slurm", "-o", str(out_slurm), script=LOW_JOB.replace("@TRAP@", IGNORE_USR2)
    )
    for job in (low_self, low_slurm):
        cluster.wait_for_state(job, "RUNNING", timeout=30, source="scontrol")
    _wait_for(
        lambda: "start restart=0" in _read(out_self) and "start restart=0" in _read(out_slurm),
        20,
        "low jobs started",
    )

    # Needs every CPU of every node: only possible by preempting the low jobs.
    t_submit = time.time()
    high = cluster.sbatch(
        "-p",
        "high",
        "-N4",
        f"--ntasks-per-node={cluster.cpus_per_node}",
        "-t",
        "2",
        "-J",
        "high",
        "-o",
        str(tmp_path / "high.out"),
        script="#!/bin/bash\nsleep 3\n",
    )

    # Both low jobs get the preemption signal right away (preempt_send_user_signal).
    _wait_for(
        lambda: "USR2 restart=0" in _read(out_self) and "USR2 restart=0" in _read(out_slurm),
        20,
        "USR2 delivered",
    )
    # The self-requeueing one is requeued at once; the other by SLURM after GraceTime (+KillWait).
    t_signal = time.time() - t_submit
    _wait_for(lambda: cluster.job_info(low_self).get("Restarts") == "1", 20, "low-self requeued")
    t_self = time.time() - t_submit
    _wait_for(lambda: cluster.job_info(low_slurm).get("Restarts") == "1", 90, "low-slurm requeued by SLURM")
    t_slurm = time.time() - t_submit
    assert cluster.wait_for_state(high, "COMPLETED", timeout=60) == "COMPLETED"

    # Then both run again, as their second start.
    for job, out in ((low_self, out_self), (low_slurm, out_slurm)):
        cluster.wait_for_state(job, "RUNNING", timeout=60, source="scontrol")
        _wait_for(lambda out=out: "start restart=1" in _read(out), 30, f"job {job} restarted")
    resumed = time.time() - t_submit
    print(
        f"\npreemption (s after the high job's submission): USR2 seen {t_signal:.1f}, self-requeued "
        f"{t_self:.1f}, requeued by SLURM {t_slurm:.1f}, both running again {resumed:.1f}"
    )

    # Accounting keeps the interrupted runs: requeued by the job itself / preempted by SLURM.
    states_self = [r["State"].split()[0] for r in cluster.sacct_records(low_self, duplicates=True)]
    states_slurm = [r["State"].split()[0] for r in cluster.sacct_records(low_slurm, duplicates=True)]
    assert "REQUEUED" in states_self and states_self[-1] == "RUNNING", states_self
    assert "PREEMPTED" in states_slurm and states_slurm[-1] == "RUNNING", states_slurm
    cluster.run(["scancel", str(low_self), str(low_slurm)])
    cluster.wait_for_state(low_self, "CANCELLED", timeout=30)
    cluster.wait_for_state(low_slurm, "CANCELLED", timeout=30)
