"""Where a forward's GPU time goes, kernel by kernel (run under mpirun, one GPU per rank).

torch.profiler (CUPTI) records every kernel of the process, CuPy's and NCCL's alike. Per
problem: ``--iters`` forwards of the whole layer, then of its compute alone
(``parts="compute"``), after warm-ups; per kernel name its launches and GPU microseconds per
forward on each rank, beside the forward's own time (CUDA events), and how much of the
profiled span some kernel was running (the union of the kernels' intervals): the rest is
the GPU idle, waiting for the host (launch gaps, the count exchange's host sync). Rank 0
writes the table (the slowest rank per kernel) and every rank's numbers as JSON.

    mpirun -np 4 python bench/kernel_breakdown.py --problems mixtral_t4096 --out kb.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap import PROBLEMS  # noqa: E402
from report import emit, md_table  # noqa: E402

#: Kernel names are shortened to this many characters in the table (templates make long ones).
NAME_CHARS = 60


def short(name: str) -> str:
    """A kernel's name without template arguments' noise, at most NAME_CHARS long."""
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def device_us(avg) -> float:
    """Total GPU time of a profiler average, in microseconds (the attribute's name moved
    between torch versions)."""
    for attr in ("device_time_total", "cuda_time_total", "self_device_time_total"):
        v = getattr(avg, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def kernel_intervals(events) -> list[tuple[float, float]]:
    """(start, end) in us of every GPU kernel among profiler ``events`` (copies and sets
    left out: they run on the copy engines, not the SMs)."""
    out = []
    for e in events:
        if not str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue
        if e.name.startswith(("Memcpy", "Memset")):
            continue
        start, end = float(e.time_range.start), float(e.time_range.end)
        if end > start:
            out.append((start, end))
    return out


def coverage(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy, span) in us: how long at least one kernel ran, and from the first kernel's
    start to the last one's end (0, 0 without kernels)."""
    if not intervals:
        return 0.0, 0.0
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    return busy, max(e for _, e in intervals) - min(s for s, _ in intervals)


def kernels(fn, iters: int) -> tuple[dict[str, dict], dict[str, float]]:
    """Per kernel name: launches and GPU us per call of ``fn`` over ``iters`` calls; and per
    call the us some kernel ran and the profiled span (first kernel to last)."""
    import cupy
    from torch.profiler import ProfilerActivity, profile

    cupy.cuda.Device().synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        cupy.cuda.Device().synchronize()
    out: dict[str, dict] = {}
    for avg in prof.key_averages():
        us = device_us(avg)
        if us <= 0:
            continue
        d = out.setdefault(short(avg.key), {"calls": 0.0, "us": 0.0})
        d["calls"] += avg.count / iters
        d["us"] += us / iters
    busy, span = coverage(kernel_intervals(prof.events()))
    return out, {"busy_us": busy / iters, "span_us": span / iters}


def measure(key: str, p, comm, a) -> dict:
    """One problem on every rank: the forward's time and its kernels, whole and compute."""
    import cupy

    from flashmoe_gen.comm import allgather
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.tuner.bench import time_callable
    from flashmoe_gen.weights import random_tokens

    cfg = KernelConfig.from_name(a.config) if a.config else KernelConfig.default(p)
    if a.mode == "graph":  # without the knobs only mode "host" has (gather_experts)
        cfg = cfg.graph_mode()
    elif a.mode:
        cfg = dataclasses.replace(cfg, mode=a.mode)
    layer = FlashMoE(p, cfg, comm=comm, seed=1)
    x = cupy.asarray(random_tokens(p.tokens_per_rank, p.hidden, seed=100 + comm.rank))
    row = {"problem": key, "config": cfg.name, "parts": {}}
    for part in ("all", "compute"):
        fn = (lambda: layer.forward(x)) if part == "all" else \
            (lambda: layer.forward(x, parts="compute"))
        ms = time_callable(fn, warmup=a.warmup, iters=a.iters, comm=comm).median_ms
        mine, cover = kernels(fn, a.iters)
        every = allgather(comm.mpi, (mine, cover), "kernel breakdown")
        row["parts"][part] = {"forward_ms": ms, "ranks": [m for m, _ in every],
                              "cover": [c for _, c in every]}
    return row


def cover_text(cover: list[dict] | None) -> str:
    """"; some kernel running 5.10 of 5.60 ms per forward (idle 9%, the idlest rank)"."""
    if not cover:
        return ""  # rows from before the union was measured
    idlest = max(cover, key=lambda c: c["span_us"] - c["busy_us"])
    idle = idlest["span_us"] - idlest["busy_us"]
    share = idle / idlest["span_us"] if idlest["span_us"] else 0.0
    return (f"; some kernel running {idlest['busy_us'] / 1e3:.2f} of "
            f"{idlest['span_us'] / 1e3:.2f} ms per forward (idle {100 * share:.0f}%, the "
            f"idlest rank)")


def table(row: dict) -> str:
    """Per part: each kernel's slowest rank (us per forward, launches), largest first."""
    out = []
    for part, d in row["parts"].items():
        names = sorted({n for r in d["ranks"] for n in r},
                       key=lambda n: -max(r.get(n, {}).get("us", 0.0) for r in d["ranks"]))
        rows = []
        for n in names:
            us = max(r.get(n, {}).get("us", 0.0) for r in d["ranks"])
            calls = max(r.get(n, {}).get("calls", 0.0) for r in d["ranks"])
            rows.append([n, round(calls, 2), round(us, 1),
                         round(100 * us / (1e3 * d["forward_ms"]), 1)])
        busy = max(sum(v["us"] for v in r.values()) for r in d["ranks"])
        out.append(f"### {row['problem']}, {part}: forward {d['forward_ms']:.4f} ms, kernels "
                   f"{busy / 1e3:.4f} ms (slowest rank's sum; overlapping streams count "
                   f"twice){cover_text(d.get('cover'))}\n\n"
                   + md_table(["kernel", "launches", "us", "% of forward"], rows))
    return "\n\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="mixtral_t4096",
                    help=f"comma list of {sorted(PROBLEMS)}")
    ap.add_argument("--config", default=None, help="a config name (default: the heuristic)")
    ap.add_argument("--mode", default=None, choices=("host", "graph"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown to write (rank 0)")
    ap.add_argument("--json", default=None, help="every rank's numbers as JSON (rank 0)")
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args()

    import cupy
    import torch

    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.problem import MoEProblem

    comm = Communicator(n_streams=1)
    torch.cuda.set_device(comm.device.id)  # the profiler's context is CuPy's (primary)
    card = cupy.cuda.runtime.getDeviceProperties(comm.device.id)["name"].decode()
    rows = []
    for key in a.problems.split(","):
        rows.append(measure(key, MoEProblem(**PROBLEMS[key], world_size=comm.world_size),
                            comm, a))
        cupy.get_default_memory_pool().free_all_blocks()
    if comm.rank == 0:
        head = (f"# Kernel breakdown: {comm.world_size} x {card}, {datetime.date.today()}, "
                f"commit {a.commit}\n\nbf16; {a.iters} forwards after {a.warmup} warm-ups "
                "under torch.profiler (CUPTI); per kernel the slowest rank's GPU us per "
                "forward; forward = median CUDA-event time (max over ranks).\n\n")
        body = "\n\n".join(f"configs: `{r['config']}`\n\n" + table(r) for r in rows)
        emit(head + body + "\n", rows, a.out, a.json)
    comm.barrier()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
