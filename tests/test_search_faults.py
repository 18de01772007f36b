"""Faults with the compile pool on (2 ranks on CPU, the real tune command, the fake
evaluator, real NVRTC in the pool): rank 0's workers end with it, and --resume completes."""

import os
import signal
import subprocess
import time

from test_faults import KILL_BOUND_S, Job, _state, resume_and_agree, work  # noqa: F401


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_rank_0_takes_its_compile_workers_along_and_resume_completes(work):  # noqa: F811
    job = Job(work, trials=12, sleep=0.2, FAKE_COMPILE_AHEAD="1")
    job.wait_for_calls(0, 3)
    rank0 = job.pid(0)
    helpers = _children(rank0)  # the compile workers (and multiprocessing's tracker)
    assert helpers, "rank 0 started no compile worker"
    t0 = time.monotonic()
    os.kill(rank0, signal.SIGKILL)
    rc, _, _ = job.ended_within(t0, KILL_BOUND_S)
    assert rc != 0
    until = time.monotonic() + 5
    while any(_state(p) not in ("gone", "Z") for p in helpers) and time.monotonic() < until:
        time.sleep(0.1)
    assert all(_state(p) in ("gone", "Z") for p in helpers), "a compile worker outlived rank 0"
    resume_and_agree(work)
