"""A real 2-rank tune on 2 GPUs whose candidate traps on rank 0 (a sticky CUDA error,
planted by tests/mpi/gpu_trap/sitecustomize.py): the trial is recorded as failed, every
rank ends with RESUME_EXIT, and `flashmoe-tune tune`'s launcher resumes the study in fresh
processes, which run the rest of the trials (marked ``gpu``: it starts mpirun itself)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
COMM_TIMEOUT_S = 20
TRIALS = 5
SEED = ["--hidden", "512", "--intermediate", "2048", "--experts", "8", "--top-k", "2",
        "--shared-experts", "1", "--tokens", "256"]

pytestmark = [pytest.mark.gpu, pytest.mark.gpus(2)]


def test_a_trapped_candidate_is_recorded_and_the_tune_resumes_past_it(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun")
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLASHMOE_COMM_TIMEOUT=str(COMM_TIMEOUT_S),
               FLASHMOE_CACHE=str(tmp_path / "cache"), FLASHMOE_DB=f"sqlite:///{tmp_path}/w.db",
               FLASHMOE_STUDIES=f"sqlite:///{tmp_path}/s.db", TRAP_AT="2", TRAP_RANK="0",
               TRAP_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(HERE / "mpi" / "gpu_trap"), str(HERE.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    cli = [sys.executable, "-m", "flashmoe_gen.tuner.cli"]
    t0 = time.monotonic()
    r = subprocess.run([*cli, "tune", "--gpus", "2", *SEED, "--space", "small", "--sampler",
                        "random", "--trials", str(TRIALS), "--transport", "nccl",
                        "--iters", "5", "--warmup", "1", "--restarts", "2"],
                       capture_output=True, text=True, timeout=900, env=env)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    print(f"tune with a planted trap: rc={r.returncode} in {took:.0f} s\n{out[-3000:]}")
    assert (tmp_path / "trapped").exists(), out[-4000:]  # the fault was planted
    assert r.returncode == 0, out[-4000:]
    assert "resuming the study in fresh processes (restart 1 of 2)" in out, out[-4000:]
    assert "restart 2 of 2" not in out, out[-4000:]
    shown = subprocess.run([*cli, "show", *SEED, "--world-size", "2", "--limit", "50", "--json"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    trials = json.loads(shown.stdout)["trials"]
    trapped = (tmp_path / "trapped").read_text()
    failed = [t for t in trials if t["config"] == trapped]
    assert failed and failed[0]["status"] != "ok", trials
    assert "context lost" in json.dumps(failed[0]) or "hung" in json.dumps(failed[0]), failed
    assert sum(t["status"] == "ok" for t in trials) >= TRIALS - 1, trials
