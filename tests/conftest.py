"""Shared fixtures: small real datasets built once per test session, and the local SLURM cluster plugin."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # so the plugin module below imports

pytest_plugins = ["slurm_cluster"] if (Path(__file__).parent / "slurm_cluster.py").exists() else []

# Keep torch/numba from oversubscribing the 2 cores when tests start several processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """Real Fashion-MNIST (Debian's idx files), 2000 train / 500 test, as .beton files with manifests."""
    from ffcv_build import build_fashion_mnist

    out = tmp_path_factory.mktemp("fashion_mnist")
    build_fashion_mnist(out, limit=2000)
    return out


def run_launcher(*overrides: str, script: str = "slurm.py", timeout: int = 600, env: dict | None = None):
    """Run `python launch/<script> ...` (training by default) as a user would; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
