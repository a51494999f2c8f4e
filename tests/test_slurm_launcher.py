"""The SLURM side of the launcher without a cluster: the generated sbatch script (golden file) and
the checks made before submitting."""

from __future__ import annotations

from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from seed_cluster.errors import ConfigError
from seed_cluster.job import slurm_parameters
from seed_cluster.launcher import load_config, preflight

GOLDEN = Path(__file__).parent / "golden"


def test_sbatch_script_maps_every_cluster_key(tmp_path):
    cfg = load_config(["cluster=slurm", "nodes=4", "student=mobilenetv3_large", "data.train=/data/train.beton",
                       "cluster.partition=gpu", "cluster.qos=high", "cluster.account=vision",
                       "cluster.constraint=volta32gb", "cluster.mem_gb=480", "cluster.setup=[module load cuda]",
                       "+cluster.additional_parameters.exclusive=true"])
    script = _make_sbatch_string(command="CMD", folder="/runs/x/submitit", **slurm_parameters(cfg))
    assert script == (GOLDEN / "sbatch_4_nodes.sh").read_text()
    # What the fault tolerance relies on: the signal reaches Python through srun, requeue is allowed,
    # and one dead rank ends the step.
    assert "#SBATCH --signal=USR2@120" in script and "#SBATCH --requeue" in script
    assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script


def test_zero_gpus_and_memory_are_left_to_the_cluster():
    cfg = load_config(["cluster=slurm", "cluster.gpus_per_node=0", "cluster.mem_gb=0", "data.train=/x"])
    params = slurm_parameters(cfg)
    assert "gpus_per_node" not in params and "mem" not in params and "partition" not in params


def test_timeout_below_one_minute_is_refused_before_submitting(tmp_path):
    cfg = load_config(["cluster=slurm", "cluster.timeout_min=0", f"data.train={tmp_path / 'none.beton'}",
                       "student=convnet_s", "teacher=convnet_l", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"cluster.timeout_min=0 must be >= 1"):
        preflight(cfg)
