"""Compose the config, check what can be checked before submitting, submit, report.

`launch/slurm.py` is a thin wrapper over `main`. Every problem the user can fix is
reported here, in the terminal, as one line — not hours later in a SLURM log.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .config import TrainConfig, register, run_dir
from .errors import ConfigError, SeedClusterError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
logger = logging.getLogger(__name__)


KEYS_HINT = "`python launch/slurm.py --cfg` prints every key"
"""How to see the valid keys of the training config (the evaluation jobs have their own)."""


def load_config(overrides: Sequence[str]) -> TrainConfig:
    """Compose conf/config.yaml with `overrides` into a validated TrainConfig (ConfigError on any problem)."""
    register()
    return _absolute_paths(compose_validated("config", TrainConfig, overrides, KEYS_HINT))


def compose_validated(config_name: str, root: type, overrides: Sequence[str], keys_hint: str):
    """Compose conf/<config_name>.yaml with `overrides` into a validated instance of the dataclass `root`.

    Serves the training config and the evaluation config alike (the schema must already be in the
    ConfigStore). Every problem becomes one ConfigError line: all the sections' validation messages at
    once, a missing mandatory key with the `key=...` to pass, or Hydra's own error folded into one line
    (an unknown key ends with `keys_hint`: which launch/ script prints every key).
    """
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name=config_name, overrides=list(overrides))
        return OmegaConf.to_object(composed)
    except (ConfigError, MissingMandatoryValue) as first:
        # to_object stops at the first section that fails (invalid or missing value): report them all at once.
        fallback = _missing(first) if isinstance(first, MissingMandatoryValue) else str(first)
        raise ConfigError("; ".join(_all_problems(composed, root)) or fallback) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e, keys_hint)) from None


def _missing(e: MissingMandatoryValue) -> str:
    key = getattr(e, "full_key", "?")
    hint = " (build a .beton with `python -m ffcv_build`)" if key.startswith("data.") else ""
    return f"{key} is required but not set; pass {key}=...{hint}"


def _all_problems(composed, root: type) -> list[str]:
    """The validation message of every section (and of the top-level keys) of a composed config."""
    problems, scalars = [], {}
    for f in dataclasses.fields(root):
        node = composed[f.name]
        if not OmegaConf.is_config(node):
            scalars[f.name] = node
            continue
        try:
            OmegaConf.to_object(node)
        except ConfigError as e:
            problems.append(str(e))
        except MissingMandatoryValue as e:
            problems.append(_missing(e))
    try:
        root(**scalars)  # default sections: only the top-level checks can fail here
    except ConfigError as e:
        problems.append(str(e))
    except MissingMandatoryValue as e:
        problems.append(_missing(e))
    return problems


def _one_line(e: BaseException, keys_hint: str = KEYS_HINT) -> str:
    """Hydra/OmegaConf errors folded into one line: the message, its cause, no search-path dump."""
    parts = []
    while e is not None and len(parts) < 3:
        text = " ".join(str(e).split()).split(" Config search path:")[0]
        text = text.split(" To append to your config use")[0].split(" reference_type=")[0].rstrip(".")
        if text and text not in parts:
            parts.append(text.replace("\n", " "))
        e = e.__cause__
    line = ": ".join(parts)
    if "not in '" in line or "not in struct" in line:
        line += f" (unknown key: check its spelling; {keys_hint})"
    return line


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Paths as the user meant them from their shell: resolved once, here, before the job moves elsewhere."""
    def absolute(p: Optional[str]) -> Optional[str]:
        return str(Path(p).expanduser().resolve()) if p else p

    data = dataclasses.replace(cfg.data, train=absolute(cfg.data.train), val=absolute(cfg.data.val))
    teacher = dataclasses.replace(cfg.teacher, checkpoint=absolute(cfg.teacher.checkpoint))
    return dataclasses.replace(cfg, data=data, teacher=teacher, output_dir=absolute(cfg.output_dir),
                               run_dir=absolute(cfg.run_dir))


def preflight(cfg: TrainConfig) -> None:
    """Everything knowable before submission: dataset readable, models exist, teacher file present, output writable."""
    from .data import check_dataset
    from .models import build_backbone
    from .step import check_perf

    problems: list[str] = []
    for check in (
        lambda: check_dataset(cfg.data.train, "data.train"),
        lambda: cfg.data.val and check_dataset(cfg.data.val, "data.val"),
        lambda: build_backbone(cfg.student.arch, "student.arch"),
        lambda: cfg.method.name != "mocov2" and build_backbone(cfg.teacher.arch, "teacher.arch"),
        lambda: cfg.method.name != "mocov2" and cfg.teacher.checkpoint and _teacher_exists(cfg.teacher.checkpoint),
        lambda: _writable(run_dir(cfg)),
        lambda: check_perf(cfg.perf),
    ):
        try:
            check()
        except SeedClusterError as e:
            problems.append(str(e))
    problems += cluster_problems(cfg.cluster)
    if not problems and cfg.mode == "precompute":
        from .precompute import cache_summary, check_space

        print(cache_summary(cfg), flush=True)
        if problem := check_space(cfg):
            problems.append(problem)
    if not problems and cfg.mode == "train" and cfg.teacher.cache == "on":
        _cache_ready(cfg, problems)
    if problems:
        raise ConfigError("; ".join(problems))


def cluster_problems(cluster) -> list[str]:
    """What is wrong with cfg.cluster before submitting (training and evaluation jobs alike)."""
    problems = []
    if cluster.backend == "slurm" and shutil.which("sbatch") is None:
        problems.append("cluster=slurm but `sbatch` is not on PATH; run here with cluster=local, or start the "
                        "local test cluster (launch/local_cluster.sh start) and eval \"$(launch/local_cluster.sh env)\"")
    if cluster.backend == "slurm" and cluster.timeout_min < 1:
        problems.append(f"cluster.timeout_min={cluster.timeout_min} must be >= 1 (SLURM time limits are whole "
                        "minutes)")
    return problems


def _cache_ready(cfg: TrainConfig, problems: list[str]) -> None:
    """teacher.cache=on: the cache must exist, be complete and match (checksums are left to the job)."""
    from .cache import FeatureCache, default_path, fingerprint
    from .methods import view_specs
    from .teachers import teacher_identity

    try:
        expected = fingerprint(cfg, view_specs(cfg), teacher_identity(cfg.teacher, cfg.method.dim, cfg.seed))
        FeatureCache.open(default_path(cfg, expected), expected, verify=False)
    except SeedClusterError as e:
        problems.append(str(e))


def _teacher_exists(path: str) -> None:
    from .teachers import resolve_checkpoint_path

    resolve_checkpoint_path(path)


def _writable(directory: Path) -> None:
    from .checkpoint import Checkpointer

    Checkpointer(directory / "checkpoints").prepare()


def submit(cfg: TrainConfig):
    """Submit (or, locally, start) the training job; returns the submitit Job."""
    from submitit.core.utils import FailedJobError

    from .job import TrainJob, executor_for

    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    executor = executor_for(cfg, directory / "submitit")
    try:
        return executor.submit(TrainJob(cfg))
    except FailedJobError as e:  # sbatch refused: say why in one line (no submitit traceback)
        reason = " ".join(str(e).split()) or "no reason given"
        raise ConfigError(f"sbatch failed: {reason}; check the cluster.* settings and `sinfo` (for the local "
                          "test cluster: launch/local_cluster.sh status)") from None


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: python launch/slurm.py [key=value ...] [group=option ...]\n"
              f"groups: {', '.join(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()))} "
              f"(see {CONF_DIR}); print the composed config with --cfg")
        return 0
    print_only = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    try:
        cfg = load_config(argv)
        if print_only:
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return 0
        preflight(cfg)
        job = submit(cfg)
    except SeedClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    directory = run_dir(cfg)
    print(f"job {job.job_id} ({cfg.cluster.backend}, {cfg.world_size} ranks)\n"
          f"run directory: {directory}\nlogs: {job.paths.stdout} and {job.paths.stderr}\n"
          f"watch it: tensorboard --logdir {directory / 'tensorboard'}", flush=True)
    if cfg.cluster.backend == "slurm" and not cfg.cluster.wait:
        return 0
    return wait(job)


def wait(job) -> int:
    """Stream rank 0's log until the job ends; on failure print the job's one-line error."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from .job import stream_until_done

    try:
        stream_until_done(job)
    except KeyboardInterrupt:
        # Ctrl-C here must not leave local ranks running (on SLURM the job would keep its allocation).
        job.cancel(check=False)
        print(f"\ninterrupted: cancelled job {job.job_id}; resubmit the same command to resume", file=sys.stderr)
        return 130
    try:
        job.results()
    except (FailedJobError, UncompletedJobError):
        print(f"error: {last_error_line(job) or 'the job failed'} (log: {job.paths.stdout})", file=sys.stderr)
        return 1
    return 0


def last_error_line(job) -> Optional[str]:
    for path in (Path(job.paths.stdout), Path(job.paths.stderr)):
        if path.exists():
            errors = [line for line in path.read_text(errors="replace").splitlines() if "] ERROR seed_cluster" in line]
            if errors:
                return errors[-1].split(": ", 1)[-1]
    return None
