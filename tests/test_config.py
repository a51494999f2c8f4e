"""Config composition through the launcher: typed schema, one-line errors, run-dir hash, derived values, the CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seed_cluster.config import TrainConfig, config_hash, derive, run_dir
from seed_cluster.errors import ConfigError
from seed_cluster.launcher import load_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "data.train=/data/train.beton"  # composition never opens it


def _config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- composition ---------------------------------------------------------------------------------------------

def test_defaults_compose_into_a_typed_config_except_for_the_missing_dataset():
    message = _config_error([])
    assert message.startswith("data.train is required")
    assert "data.train=" in message  # says how to set it


def test_defaults_with_a_dataset_give_the_paper_recipe():
    cfg = load_config([TRAIN])
    assert isinstance(cfg, TrainConfig)
    assert cfg.data.train == "/data/train.beton"
    assert (cfg.student.arch, cfg.teacher.arch, cfg.method.name) == ("resnet18", "resnet50", "seed")
    assert (cfg.method.dim, cfg.method.queue_size, cfg.method.tau_s, cfg.method.tau_t) == (128, 65536, 0.2, 1e-4)
    assert (cfg.optim.base_lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.03, 0.9, 1e-4)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs) == (200, 5.0)


def test_the_briefs_command_line_composes_four_nodes_of_mobilenet():
    cfg = load_config(["nodes=4", "student=mobilenetv3_large", "data.train=x"])
    assert cfg.nodes == 4
    assert cfg.world_size == 4 * cfg.cluster.tasks_per_node
    assert cfg.cluster.backend == "slurm" and cfg.cluster.tasks_per_node == 8
    assert cfg.student.arch == "mobilenetv3_large_100"


def test_relative_paths_are_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["data.train=sub/train.beton", "output_dir=runs", "teacher.checkpoint=t.pth"])
    assert cfg.data.train == str(tmp_path / "sub" / "train.beton")
    assert cfg.output_dir == str(tmp_path / "runs")
    assert cfg.teacher.checkpoint == str(tmp_path / "t.pth")
    assert cfg.data.val is None and cfg.run_dir is None


def test_cluster_local_preset_runs_one_process_per_node():
    cfg = load_config([TRAIN, "cluster=local", "nodes=2"])
    assert cfg.cluster.backend == "local" and cfg.world_size == 2


# -- errors --------------------------------------------------------------------------------------------------

def test_unknown_key_is_a_one_line_error_naming_it():
    message = _config_error([TRAIN, "optim.foo=1"])
    assert "optim.foo" in message
    assert "Traceback" not in message


def test_unknown_top_level_key_is_named():
    assert "'foo'" in _config_error([TRAIN, "foo=1"])


def test_wrong_type_names_the_key_and_the_value():
    message = _config_error([TRAIN, "optim.base_lr=abc"])
    assert "optim.base_lr" in message and "abc" in message


@pytest.mark.parametrize("override,key", [
    ("method.tau_s=-1", "method.tau_s"),
    ("method.tau_t=0", "method.tau_t"),
    ("checkpoint.keep=1", "checkpoint.keep"),
    ("optim.precision=fp16", "optim.precision"),
    ("method.name=byol", "method.name"),
    ("data.resolution=0", "data.resolution"),
    ("data.recipe=autoaugment", "data.recipe"),
    ("nodes=0", "nodes"),
    ("teacher.head=conv", "teacher.head"),
    ("cluster.backend=k8s", "cluster.backend"),
])
def test_invalid_values_are_one_line_errors_naming_the_key(override, key):
    message = _config_error([TRAIN, override])
    assert message.startswith(f"{key}="), message
    assert override.split("=")[1] in message  # the value received


def test_every_invalid_value_is_reported_at_once():
    message = _config_error([TRAIN, "method.tau_s=-1", "checkpoint.keep=1", "optim.precision=fp16", "nodes=0"])
    for key in ("method.tau_s=", "checkpoint.keep=", "optim.precision=", "nodes="):
        assert key in message, message


def test_an_invalid_value_and_the_missing_dataset_are_reported_together():
    message = _config_error(["checkpoint.keep=1"])
    assert "checkpoint.keep=1" in message and "data.train is required" in message


def test_unknown_group_option_lists_the_available_ones():
    message = _config_error([TRAIN, "student=foo"])
    assert "student/foo" in message
    for option in ("mobilenetv3_large", "efficientnet_b0", "resnet18", "resnet50"):
        assert option in message


# -- run directory -------------------------------------------------------------------------------------------

def test_run_dir_is_deterministic():
    a, b = load_config([TRAIN, "output_dir=/out"]), load_config([TRAIN, "output_dir=/out"])
    assert config_hash(a) == config_hash(b)
    assert run_dir(a) == run_dir(b) == Path("/out") / f"seed-{config_hash(a)}"
    assert len(config_hash(a)) == 8 and int(config_hash(a), 16) >= 0


@pytest.mark.parametrize("override", [
    "cluster=local", "nodes=4", "cluster.partition=preempt", "cluster.timeout_min=10", "logging.every_steps=5",
    "logging.progress_bar=false", "checkpoint.every_steps=7", "checkpoint.keep=9", "output_dir=/elsewhere",
    "device=cpu",
])
def test_run_hash_ignores_where_and_how_the_job_runs(override):
    assert config_hash(load_config([TRAIN, override])) == config_hash(load_config([TRAIN]))


@pytest.mark.parametrize("override", [
    "method.tau_t=0.01", "method=mocov2", "method.queue_size=4096", "optim.base_lr=0.06", "optim.epochs=100",
    "data.train=/data/other.beton", "data.resolution=192", "student=mobilenetv3_large", "seed=1",
    "teacher.checkpoint=/ckpt/t.pth",
])
def test_run_hash_changes_with_what_the_job_computes(override):
    assert config_hash(load_config([TRAIN, override])) != config_hash(load_config([TRAIN]))


def test_explicit_run_dir_wins_and_name_prefixes_the_hashed_one():
    assert run_dir(load_config([TRAIN, "run_dir=/runs/mine"])) == Path("/runs/mine")
    cfg = load_config([TRAIN, "name=ablation-1", "output_dir=/out"])
    assert run_dir(cfg).name.startswith("ablation-1-")


# -- derived values ------------------------------------------------------------------------------------------

def test_derive_scales_lr_and_counts_steps():
    cfg = load_config([TRAIN, "data.batch_size_per_rank=64", "optim.epochs=10", "optim.warmup_epochs=2"])
    d = derive(cfg, num_samples=10_000, world_size=4)
    assert d.global_batch == 256 and d.world_size == 4
    assert d.lr == pytest.approx(0.03)  # 0.03 x 256 / 256
    assert d.steps_per_epoch == 39  # (10000 // 4) // 64 = 2500 // 64
    assert d.total_steps == 390
    assert d.warmup_steps == 78


def test_derive_with_the_papers_batch():
    cfg = load_config([TRAIN])  # 256 per rank
    d = derive(cfg, num_samples=1_281_167, world_size=8)
    assert d.global_batch == 2048
    assert d.lr == pytest.approx(0.03 * 2048 / 256)
    assert d.steps_per_epoch == (1_281_167 // 8) // 256 == 625
    assert d.total_steps == 200 * 625
    assert d.warmup_steps == 5 * 625


def test_derive_rounds_fractional_warmup_up_and_caps_it_at_the_total():
    cfg = load_config([TRAIN, "data.batch_size_per_rank=10", "optim.warmup_epochs=0.25", "optim.epochs=3"])
    assert derive(cfg, num_samples=100, world_size=1).warmup_steps == 3  # ceil(0.25 x 10)
    capped = load_config([TRAIN, "data.batch_size_per_rank=10", "optim.warmup_epochs=5", "optim.max_steps=7"])
    d = derive(capped, num_samples=100, world_size=1)
    assert (d.total_steps, d.warmup_steps) == (7, 7)


def test_derive_max_steps_overrides_epochs():
    cfg = load_config([TRAIN, "data.batch_size_per_rank=10", "optim.max_steps=25"])
    assert derive(cfg, num_samples=1000, world_size=2).total_steps == 25


def test_derive_refuses_a_batch_larger_than_the_dataset():
    cfg = load_config([TRAIN, "data.batch_size_per_rank=64"])
    with pytest.raises(ConfigError) as info:
        derive(cfg, num_samples=200, world_size=4)  # 50 images per rank < 64
    message = str(info.value)
    assert "\n" not in message
    assert "data.batch_size_per_rank=64" in message and "200" in message


def test_derive_does_not_mutate_the_config():
    cfg = load_config([TRAIN])
    before = dataclasses.asdict(cfg)
    derive(cfg, num_samples=100_000, world_size=2)
    assert dataclasses.asdict(cfg) == before


# -- the command line, as a user runs it -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_beton(tmp_path_factory) -> Path:
    """A real (tiny) .beton with its manifest: 100 of scikit-learn's digits."""
    from ffcv_build.build import build_digits

    out = tmp_path_factory.mktemp("digits")
    build_digits(out, limit=100, workers=1)
    return out / "train.beton"


def _launch(args: list[str], path: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "slurm.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_unknown_key_exits_2_with_a_one_line_error(tmp_path):
    result = _launch(["optim.foo=1"], os.environ["PATH"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "optim.foo" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_cli_cluster_slurm_without_sbatch_points_to_local_options(tmp_path, digits_beton):
    no_sbatch = tmp_path / "bin"
    no_sbatch.mkdir()  # a PATH on which `sbatch` cannot be found (it is installed on this machine)
    result = _launch(["cluster=slurm", f"data.train={digits_beton}", f"output_dir={tmp_path / 'runs'}"],
                     str(no_sbatch), tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert "sbatch" in lines[0] and "cluster=local" in lines[0] and "launch/local_cluster.sh" in lines[0]
    assert "data.train" not in lines[0]  # the dataset itself passed the pre-flight check
