"""The tune command on CPU: ``tune_cmd.GpuBackend`` with the GPU replaced by the fake
evaluator, and faults planted on request (environment variables, read per process):

- ``FAKE_DIR``: each rank writes ``rank<R>.pid`` there and appends a line to
  ``rank<R>.calls`` per evaluation, so a test can time a kill or a stop;
- ``FAKE_SLEEP``: seconds each evaluation takes (default 0);
- ``FAKE_COMM_ERROR=<rank>:<call>``: that rank's timing step raises CommError at that call
  (what the real evaluator raises when a collective of the timing step fails);
- ``FAKE_HANG=<call>``: every rank's evaluation at that call returns the outcome of a
  forward that hung and had NCCL aborted (what the real evaluator returns then);
- ``FAKE_DIE_AFTER_RECORD=<n>``: rank 0 SIGKILLs itself right after the n-th trial was
  written to the winners database, before the study is told;
- ``FAKE_COMPILE_AHEAD=1``: rank 0 compiles the candidates ahead in the real compile pool
  (NVRTC on CPU) and asks trials ahead; without it there is no pool (the fake evaluator
  compiles nothing, so a pool would only spend the CPUs).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fake_evaluator import FakeEvaluator

from flashmoe_gen.db import Environment
from flashmoe_gen.errors import CommError
from flashmoe_gen.tuner.objective import COMM_LOST, TIMEOUT, Outcome
from flashmoe_gen.tuner.tune_cmd import GpuBackend


def fake_environment(world_size: int) -> Environment:
    return Environment("fake CPU (tests/fake_backend.py)", "9.0", world_size, "fake-templates")


class CpuBackend(GpuBackend):
    def limits(self):
        return "sm_90"

    def environment(self, world_size: int) -> Environment:
        return fake_environment(world_size)

    def compile_pool(self, limits, a):
        if os.environ.get("FAKE_COMPILE_AHEAD") != "1":
            return None
        return super().compile_pool(limits, a)

    def evaluator(self, problem, world, space, a):
        rank = world.Get_rank()
        fake = FakeEvaluator(rank)
        folder = os.environ.get("FAKE_DIR")
        if folder:
            Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))
        sleep = float(os.environ.get("FAKE_SLEEP", "0"))
        err_rank, err_call = map(int, os.environ.get("FAKE_COMM_ERROR", "-1:-1").split(":"))
        hang_call = int(os.environ.get("FAKE_HANG", "-1"))

        def evaluate(cfg):
            if folder:
                with open(Path(folder, f"rank{rank}.calls"), "a") as f:
                    f.write(cfg.name + "\n")
            time.sleep(sleep)
            if rank == err_rank and fake.calls + 1 == err_call:
                raise CommError(f"rank {rank}: timing {cfg.name} failed: planted NCCL failure")
            if fake.calls + 1 == hang_call:
                fake.calls += 1
                return Outcome(TIMEOUT, reason=COMM_LOST + f"rank {rank}: the checked "
                               "forward did not finish (planted); NCCL aborted")
            return fake(cfg)

        return evaluate, None


def plant_death_after_record() -> None:
    """With ``FAKE_DIE_AFTER_RECORD=n``: rank 0 dies between the n-th database write and
    the study's tell (the window the reconciliation on --resume repairs)."""
    n = int(os.environ.get("FAKE_DIE_AFTER_RECORD", "0"))
    if not n:
        return
    import flashmoe_gen.db as db
    real, count = db.record_trial, [0]

    def record_then_die(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    db.record_trial = record_then_die
