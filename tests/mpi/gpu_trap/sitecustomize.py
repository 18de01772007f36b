"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder: the GPU
restart check (tests/test_gpu_tune_restart.py) plants a real fault in a real tune.

With ``TRAP_AT=<n>``, ``TRAP_RANK=<r>`` and ``TRAP_DIR``: rank r's n-th candidate first runs
a kernel that executes ``trap`` (a sticky CUDA error: the process's context is lost), once
per TRAP_DIR (a marker file), so the resumed job in fresh processes goes past it. Without
TRAP_AT this file does nothing.
"""

import os

if os.environ.get("TRAP_AT"):
    from pathlib import Path

    import flashmoe_gen.tuner.tune_cmd as _tune_cmd

    _real = _tune_cmd.GpuBackend.evaluator

    def _evaluator(self, problem, world, space, a):
        evaluate, comm = _real(self, problem, world, space, a)
        rank = world.Get_rank() if world is not None else 0
        at, on = int(os.environ["TRAP_AT"]), int(os.environ.get("TRAP_RANK", "0"))
        marker = Path(os.environ["TRAP_DIR"], "trapped")
        calls = [0]

        def trapping(cfg):
            calls[0] += 1
            if rank == on and calls[0] == at and not marker.exists():
                import cupy
                marker.write_text(cfg.name)
                kernel = cupy.RawKernel(
                    'extern "C" __global__ void planted_trap() { asm volatile("trap;"); }',
                    "planted_trap")
                kernel((1,), (1,), ())  # asynchronous: the evaluation meets the error
            return evaluate(cfg)
        return trapping, comm

    _tune_cmd.GpuBackend.evaluator = _evaluator
