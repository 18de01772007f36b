"""Host time per forward on one GPU: wall time of the Python ``layer(x)`` call against the
GPU time of the same forwards (CUDA events), median of many calls after a warm-up.

    python bench/host_time.py [--problems seed,dsv2lite_t512] [--iters 200] [--label NAME]
                              [--mode host|graph]

Prints one JSON line per problem. The layer synchronises once per forward (count exchange),
so the wall time per call is what a caller waits for; ``host_us`` is measured with the GPU
idle at the start of each call (synchronised before), so it is the Python side alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

PROBLEMS = {
    "seed": dict(hidden=512, intermediate=2048, experts=8, top_k=2, shared_experts=1,
                 tokens_per_rank=256),
    "dsv2lite_t512": dict(hidden=2048, intermediate=1408, experts=64, top_k=6,
                          shared_experts=2, tokens_per_rank=512),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="seed,dsv2lite_t512")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--label", default="")
    ap.add_argument("--mode", choices=("host", "graph"), default="host",
                    help="the config's mode (graph: the replayed forward's host time)")
    a = ap.parse_args()

    import cupy

    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.weights import random_tokens

    card = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    for key in a.problems.split(","):
        p = MoEProblem(**PROBLEMS[key])
        cfg = KernelConfig.default(p)
        if a.mode != "host":  # an older package (bench/device_compare.sh) has no mode field
            cfg = dataclasses.replace(cfg, mode=a.mode)
        layer = FlashMoE(p, cfg, seed=1)
        x = cupy.asarray(random_tokens(p.tokens_per_rank, p.hidden, seed=2))
        for _ in range(20):
            layer(x)
        cupy.cuda.Device().synchronize()
        host, wall, gpu = [], [], []
        stream = cupy.cuda.get_current_stream()
        for _ in range(a.iters):
            cupy.cuda.Device().synchronize()
            e0 = stream.record()
            t0 = time.perf_counter()
            layer(x)
            t1 = time.perf_counter()
            e1 = stream.record()
            e1.synchronize()
            t2 = time.perf_counter()
            host.append((t1 - t0) * 1e6)
            wall.append((t2 - t0) * 1e6)
            gpu.append(cupy.cuda.get_elapsed_time(e0, e1) * 1e3)
        print(json.dumps({"label": a.label, "card": card, "problem": p.name, "mode": a.mode,
                          "host_us": round(statistics.median(host), 1),
                          "wall_us": round(statistics.median(wall), 1),
                          "gpu_us": round(statistics.median(gpu), 1)}), flush=True)


if __name__ == "__main__":
    main()
