"""Transport "nvlink" with a late and a lost rank, on 2 GPUs (it starts mpirun itself;
marked ``gpu`` because ``multigpu`` means "already under mpirun")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TIMEOUT_S = 4

pytestmark = [pytest.mark.gpu, pytest.mark.gpus(2)]


@pytest.mark.parametrize("case", ["ws", "producer"])
def test_late_rank_is_waited_for_and_a_lost_one_ends_in_an_error(case):
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("no mpirun")
    cmd = [exe, "-np", "2", "-x", "NCCL_NVLS_ENABLE=0", "-x", "FLASHMOE_COMM_TIMEOUT",
           "-x", "PYTHONPATH", "-x", "FLASHMOE_WATCHDOG_CASE"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    env = dict(os.environ, FLASHMOE_COMM_TIMEOUT=str(TIMEOUT_S), PYTHONUNBUFFERED="1",
               FLASHMOE_WATCHDOG_CASE=case,
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([*cmd, sys.executable, str(HERE / "mpi" / "nvlink_watchdog_gpu.py")],
                       capture_output=True, text=True, timeout=180, env=env)
    out = r.stdout + r.stderr
    assert out.count("ok=True") == 2, out[-4000:]
    m = re.search(r"NVLINK lost peer after ([\d.]+) s: (\w+); (.*)", out)
    assert m, out[-4000:]
    assert float(m.group(1)) < TIMEOUT_S + 10, out[-4000:]
    assert "rank 1's dispatch" in m.group(3), out[-4000:]


def test_close_releases_graphs_before_nccl():
    # A graph-mode layer alive in a reference cycle when the Communicator closes: without
    # releasing its captured graphs first, ncclCommDestroy never returned (2 and 4 x H200).
    exe = shutil.which("mpirun")
    if exe is None:
        pytest.skip("no mpirun")
    cmd = [exe, "-np", "2", "-x", "NCCL_NVLS_ENABLE=0", "-x", "PYTHONPATH"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([*cmd, sys.executable, str(HERE / "mpi" / "graph_close_gpu.py")],
                           capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"close() or the exit hung: {(e.stdout or b'')[-2000:]!r}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert len(re.findall(r"CLOSED rank \d captures=1", out)) == 2, out[-4000:]
