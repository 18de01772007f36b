"""Timing on every rank with CUDA events; per iteration the max over ranks decides.

Each iteration: synchronise the device, MPI barrier (all ranks start together), events
around one forward, synchronise. The slowest rank's time is the layer's time for that
iteration, so every rank computes the same statistics and agrees on the result. With
``chain`` = K, K forwards run back to back between the events and the time is per forward:
the host issues the next call while the GPU runs the last, as in a model's layer stack, so
neither the host's issue time nor the barrier's skew across ranks is counted K times.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np

from flashmoe_gen.comm import wait_gpu


@dataclass(frozen=True)
class Timing:
    """Milliseconds. ``per_rank_median``: each rank's own median, for the report table."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    iters: int
    per_rank_median_ms: tuple[float, ...]

    @classmethod
    def failed(cls) -> Timing:
        inf = float("inf")
        return cls(inf, inf, inf, 0, ())


def time_callable(fn, *, warmup: int = 5, iters: int = 20, comm=None,
                  chain: int = 1) -> Timing:
    """Time ``fn()`` (which launches GPU work on the current stream) on every rank; per
    forward when ``chain`` calls run between the events."""
    import cupy

    if chain < 1:
        raise ValueError(f"chain={chain}: at least one call per timed iteration")

    stream = cupy.cuda.get_current_stream()
    for _ in range(warmup):
        fn()
    wait_gpu(comm, "the warm-up forwards")
    mine = np.empty(iters)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    # No garbage collection between the events (as timeit): a host stall while the events'
    # forwards are issued leaves the GPU idle inside the timed span, and a previous layer's
    # cycle collected there frees device memory (cudaFree synchronises the device)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iters):
            stream.synchronize()
            if comm is not None:
                comm.barrier()
            start.record(stream)
            for _ in range(chain):
                fn()
            end.record(stream)
            wait_gpu(comm, "a timed forward", end)
            mine[i] = cupy.cuda.get_elapsed_time(start, end) / chain
    finally:
        if was_enabled:
            gc.enable()
    if comm is not None:
        from flashmoe_gen.watchdog import allgather
        all_ranks = np.array(allgather(comm.mpi, mine, "gathering the timings"))  # [P, iters]
    else:
        all_ranks = mine[None, :]
    slowest = all_ranks.max(axis=0)
    return Timing(float(np.median(slowest)), float(np.percentile(slowest, 20)),
                  float(np.percentile(slowest, 80)), iters,
                  tuple(float(np.median(r)) for r in all_ranks))
