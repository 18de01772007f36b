"""``flashmoe-tune run``: build the layer on every rank, check it once, time it, report."""

from __future__ import annotations

import argparse
import sys


def run_layer(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flashmoe_gen.arch import visible_gpu_count
    from flashmoe_gen.check import check_layer_sampled
    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.device_weights import DeviceWeights
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.tuner.args import config_from_args, problem_from_args, resolve_arch
    from flashmoe_gen.tuner.bench import time_callable
    from flashmoe_gen.tuner.launch import mpi_ranks
    from flashmoe_gen.weights import random_tokens

    visible_gpu_count()  # no GPU: one clear line before MPI, NCCL or a compile
    world, P, rank = mpi_ranks(a.gpus)
    problem = problem_from_args(a, world_size=P)
    arch = resolve_arch(a)
    config = config_from_args(a, problem, arch)
    comm = Communicator(world, n_streams=config.comm_streams) if P > 1 else None
    # Weights made on each rank's GPU (counter-based); the check samples rows against a
    # float64 reference of only the experts they use: set-up scales with what is checked.
    weights = DeviceWeights.generate(problem, rank, a.seed)
    layer = FlashMoE(problem, config, weights=weights, comm=comm)

    import cupy
    x_bits = random_tokens(problem.tokens_per_rank, problem.hidden, seed=a.seed * 1000 + rank + 1)
    x = cupy.asarray(x_bits)
    check = None
    if not a.no_check:
        check = check_layer_sampled(layer, x, x_bits, a.seed, comm)
    timing = time_callable(lambda: layer.forward(x), warmup=a.warmup, iters=a.iters, comm=comm)
    if rank == 0:
        t = Table(title=f"{problem.name}\n{config.name}\n"
                        f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()} x {P}")
        for col in ("rank", "tokens", "median ms (own)"):
            t.add_column(col, justify="right")
        for r, ms in enumerate(timing.per_rank_median_ms):
            t.add_row(str(r), str(problem.tokens_per_rank), f"{ms:.4f}")
        Console().print(t)
        total_tokens = P * problem.tokens_per_rank
        sec = timing.median_ms / 1e3
        print(f"latency (max over ranks per iteration): median {timing.median_ms:.4f} ms, "
              f"p20 {timing.p20_ms:.4f}, p80 {timing.p80_ms:.4f} ({timing.iters} iters)")
        print(f"throughput: {total_tokens / sec / 1e6:.3f} M tokens/s, "
              f"{P * problem.flops() / sec / 1e12:.1f} TFLOP/s over {P} GPU(s)")
        if check is not None:
            print(f"check vs float64 reference: max rel err {check.max_rel_error:.2e} "
                  f"({check.rows_checked} rows/rank), routing mismatches "
                  f"{check.routing_mismatches}: {'PASS' if check.ok else 'FAIL'}")
    if comm is not None:
        comm.barrier()
        comm.close()
    if check is not None and not check.ok:
        print(f"rank {rank}: reference check failed (rel err {check.rel_error:.2e})",
              file=sys.stderr)
        return 1
    return 0
