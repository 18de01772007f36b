"""Overlap benchmark (run under mpirun, one GPU per rank).

For each problem, in one run on P GPUs: (a) the layer, (b) the same kernels with
communication and compute serialized (config ``overlap=False``), (c) communication alone,
(d) compute alone, overlap efficiency ((b) - (a)) / min((c), (d)), (a) in graph mode, both
PyTorch expert-parallel baselines (sync and graph-captured, "PyTorch EP" = the faster) on the
same weights and tokens, and the per-rank roofline floor.

    mpirun -np 2 python bench/overlap.py --out bench/results/overlap.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit, md_table  # noqa: E402

from flashmoe_gen.task_trace import timeline_text  # noqa: E402

#: Measured ceilings of this workplace's cards (docs/results.md, "Anchors"): bf16 matrix
#: product (both cards, same SMs) and device copy bandwidth per card; other cards: H100's.
PEAK_FLOPS = 790e12
PEAK_BYTES = {"H100": 3.0e12, "H200": 4.3e12}


@functools.cache  # one GPU per rank: its name is looked up once
def peak_bytes() -> float:
    """The copy bandwidth of the current CUDA device (H100's where unknown or no GPU)."""
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    except Exception:  # no GPU, no CuPy: the CPU tests of this module
        return PEAK_BYTES["H100"]
    return next((bw for card, bw in PEAK_BYTES.items() if card in name), PEAK_BYTES["H100"])


def floor_note(tbs: float | None) -> str:
    """The floor's definition with the bandwidth a row recorded (older rows: H100's)."""
    tbs = PEAK_BYTES["H100"] / 1e12 if tbs is None else tbs
    return f"max(FLOPs/{PEAK_FLOPS / 1e12:.0f} TFLOP/s, bytes/{tbs:.1f} TB/s)"


def nvlink_stats(layer, x, comm, chain: int = 8) -> dict:
    """Transport nvlink's own clocks (collective): the last of ``chain`` forwards back to
    back, median of 5 chains: SM busy (GEMM cycles / all, mean over ranks), the kernel's
    time and where it went (per phase, the slowest rank's critical path), the SMs' clock
    (mean over ranks: under tensor-core load below the boost clock)."""
    from flashmoe_gen.comm import allgather

    got = allgather(comm.mpi, layer._persistent.measure(x, chain=chain), "kernel clocks")
    # the task timeline of the rank whose kernel took longest (its tasks closed the forward)
    slowest = max(range(len(got)), key=lambda r: got[r]["kernel_us"])
    timelines = [{k: g.pop(k) for k in list(g) if k.startswith("tl_")} for g in got]
    busy = float(np.mean([g.pop("sm_busy") for g in got]))
    ghz = float(np.mean([g.pop("sm_ghz", 0.0) for g in got]))
    kernel = max(g.pop("kernel_us") for g in got)
    tasks = [{k: g.pop(k) for k in list(g) if k.startswith("row_")} for g in got]
    return {"sm_busy_nvlink": round(busy, 3), "sm_ghz_nvlink": round(ghz, 3),
            "kernel_us_nvlink": kernel,
            "phases_us_nvlink": {k: max(g[k] for g in got) for k in got[0]},
            # the TMA row tiles' time per tile and the waits per block, mean over ranks
            "tasks_us_nvlink": {k[4:]: round(float(np.mean([t[k] for t in tasks])), 3)
                                for k in tasks[0]},
            "timeline_us_nvlink": timelines[slowest]}


def phases_text(row: dict) -> str:
    """A row's nvlink phases as "route 6.3, positions 2.1, ..." (microseconds), then the
    task loop's clocks: the TMA row tiles' time per tile where it has them (and per GEMM
    where the row has them: prologue / loop / epilogue), the waits per block, the router's
    time per block (logits, then scores and choices), the SMs' clock and the task
    timeline (flashmoe_gen.task_trace.timeline_text)."""
    text = ", ".join(f"{k} {v}" for k, v in row["phases_us_nvlink"].items())
    tasks = dict(row.get("tasks_us_nvlink") or {})
    tiles = tasks.pop("tiles", 0)
    parts = ("prologue_us", "loop_us", "epilogue_us")
    per_tile = [f"{k} {tasks.pop(k)}" for k in parts if k in tasks]
    per_gemm = []
    for g, label in (("gu", "gate/up"), ("dn", "down")):
        n = tasks.pop(f"{g}_tiles", 0)
        clocks = [str(tasks.pop(f"{g}_{k}", 0.0)) for k in parts]
        if n:
            per_gemm.append(f"{label} ({int(n)}) " + " / ".join(clocks))
    if tiles:
        text += f"; per TMA row tile ({int(tiles)}): " + ", ".join(per_tile)
        if per_gemm:
            text += " (prologue / loop / epilogue: " + ", ".join(per_gemm) + ")"
    route = [f"{k[6:]} {v}" for k in ("route_logits_us", "route_select_us")
             if (v := tasks.pop(k, 0.0))]  # zero: a router without that loop
    if tasks:
        text += "; waits per block: " + ", ".join(f"{k} {v}" for k, v in tasks.items())
    if route:
        text += "; router per block: " + ", ".join(route)
    if row.get("sm_ghz_nvlink"):
        text += f"; SM clock {row['sm_ghz_nvlink']} GHz"
    if tl := timeline_text(row.get("timeline_us_nvlink") or {}):
        text += f"; tasks (the slowest rank, us since the kernel's start): {tl}"
    return text


PROBLEMS = {
    "seed": dict(hidden=512, intermediate=2048, experts=8, top_k=2, shared_experts=1,
                 tokens_per_rank=256),
    "dsv2lite_t512": dict(hidden=2048, intermediate=1408, experts=64, top_k=6,
                          shared_experts=2, tokens_per_rank=512),
    "dsv2lite_t4096": dict(hidden=2048, intermediate=1408, experts=64, top_k=6,
                           shared_experts=2, tokens_per_rank=4096),
    "mixtral_t4096": dict(hidden=4096, intermediate=14336, experts=8, top_k=2,
                          tokens_per_rank=4096),
    "flashdmoe_e64_t4096": dict(hidden=2048, intermediate=2048, experts=64, top_k=2,
                                tokens_per_rank=4096),
}


def floor_ms(p, experts_used: int | None = None) -> float:
    """Per-rank floor: max(FLOPs / peak, bytes / bandwidth), local expert weights read once.

    ``experts_used``: the local experts that get a row (decode: few), default all of them."""
    flops = p.flops()
    used = p.local_experts if experts_used is None else experts_used
    weights = (3 * used * p.hidden * p.intermediate
               + 3 * p.hidden * p.shared_width + p.hidden * p.experts) * 2
    tokens = 2 * p.tokens_per_rank * p.hidden * 2
    return max(flops / PEAK_FLOPS, (weights + tokens) / peak_bytes()) * 1e3


def measure(p, comm, a) -> dict:
    """Time (a)-(d), (a) in graph mode and both torch baselines for one problem; every rank
    calls it."""
    import cupy
    import torch
    from torch_ep_graph import time_baselines, to_f64

    from flashmoe_gen import bf16
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.reference import relative_error
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.tuner.bench import time_callable
    from flashmoe_gen.weights import random_tokens

    # --config: one config for every problem (host mode; (a) in graph mode is its twin;
    # an nvlink config gives (a) and the baselines alone)
    cfg = dataclasses.replace(KernelConfig.parse(a.config), mode="host") if a.config else \
        KernelConfig.default(p)
    cfg.validate(p)
    layer = FlashMoE(p, cfg, comm=comm, seed=1)
    # transport nvlink is one persistent kernel per forward: (a) alone, no serialized twin,
    # parts, expert slots or graph mode to split it into
    nvlink = cfg.transport == "nvlink"
    if not nvlink:
        # serialized: nothing in flight to hide, so no own_split either
        serial = dataclasses.replace(cfg, overlap=False, shared_stream=False, own_split=False)
        layer_s = FlashMoE(p, serial, comm=comm, seed=1, weights=layer.weights)
        # The same config with expert slots (one NCCL op per (peer, expert)) for comparison.
        layer_x = FlashMoE(p, dataclasses.replace(cfg, packed_slots=False), comm=comm,
                           weights=layer.weights)
    # The same config in graph mode (device-side counts, one CUDA graph per forward).
    layer_g = None if nvlink else graph_layer(p, cfg, comm, layer.weights)
    x_bits = random_tokens(p.tokens_per_rank, p.hidden, seed=100 + comm.rank)
    x = cupy.asarray(x_bits)
    ours = layer.forward(x)
    xt = torch.from_dlpack(x).view(torch.bfloat16)
    kw = dict(warmup=a.warmup, iters=a.iters, comm=comm)
    rounds = []
    for r in range(a.rounds):
        # Odd rounds time ours first, so a drift between the two (clocks, the order's
        # after-effects) shows as rounds that disagree instead of a bias of one side.
        if r % 2:
            t_a = time_callable(lambda: layer.forward(x), **kw)
        base = time_baselines(layer, xt, comm, warmup=a.warmup, iters=a.iters)
        if not r % 2:
            t_a = time_callable(lambda: layer.forward(x), **kw)
        rounds.append((t_a, base))
    theirs = to_f64(rounds[0][1].pop("out"))
    agree = relative_error(bf16.from_bits(ours.get()).astype(np.float64), theirs)
    t_a, base = rounds[0]
    t = {"a_layer": t_a}
    if not nvlink:
        t |= {"b_serial": time_callable(lambda: layer_s.forward(x), **kw),
              "a_expert_slots": time_callable(lambda: layer_x.forward(x), **kw),
              "c_comm": time_callable(lambda: layer.forward(x, parts="comm"), **kw),
              "d_compute": time_callable(lambda: layer.forward(x, parts="compute"), **kw)}
    ms = {k: v.median_ms for k, v in t.items()}
    ms |= {k: None for k in ("b_serial", "a_expert_slots", "c_comm", "d_compute") if nvlink}
    graph = {"a_graph": None, "vs_torch_graph_mode": None, "agree_graph_mode": None}
    if layer_g is not None:
        out_g = layer_g.forward(x)
        diff = relative_error(bf16.from_bits(out_g.get()).astype(np.float64), theirs)
        graph["agree_graph_mode"] = float(f"{diff:.2e}")
        g_ms = time_callable(lambda: layer_g.forward(x), **kw).median_ms
        graph["a_graph"] = round(g_ms, 4)
        graph["vs_torch_graph_mode"] = round(g_ms / base["torch_ep_ms"], 3)
    eff = None if nvlink else \
        (ms["b_serial"] - ms["a_layer"]) / min(ms["c_comm"], ms["d_compute"])
    floor = floor_ms(p)
    per_round = round_rows(rounds)
    return dict(problem=p.name, config=cfg.name,
                **{k: None if v is None else round(v, 4) for k, v in ms.items()},
                overlap_eff=None if eff is None else round(eff, 3), **base, **graph,
                vs_torch=round(float(np.median([r["vs_torch"] for r in per_round])), 3),
                floor_ms=round(floor, 4), floor_tbs=peak_bytes() / 1e12,
                over_floor=round(ms["a_layer"] / floor, 2),
                agree_torch=float(f"{agree:.2e}"),
                p20_p80=(round(t["a_layer"].p20_ms, 4), round(t["a_layer"].p80_ms, 4)),
                rounds=per_round)


def round_rows(rounds) -> list[dict]:
    """Per round of (a) and PyTorch EP timed back to back: both medians, (a)'s p20-p80 and
    the spread of every rank's own median, and the ratio (the row's vs_torch is the median
    of these ratios)."""
    out = []
    for t_a, base in rounds:
        out.append(dict(a_layer=round(t_a.median_ms, 4),
                        a_p20_p80=(round(t_a.p20_ms, 4), round(t_a.p80_ms, 4)),
                        a_rank_medians=[round(m, 4) for m in t_a.per_rank_median_ms],
                        torch_ep_ms=base["torch_ep_ms"], torch_ep_is=base["torch_ep_is"],
                        vs_torch=round(t_a.median_ms / base["torch_ep_ms"], 3)))
    return out


def rounds_text(row: dict) -> str:
    """A row's rounds as "r1 6.39 (5.98-6.74) / 7.09 sync = 0.901; r2 ..." (ms)."""
    return "; ".join(
        f"r{i + 1} {r['a_layer']} ({r['a_p20_p80'][0]}-{r['a_p20_p80'][1]}) / "
        f"{r['torch_ep_ms']} {r['torch_ep_is']} = {r['vs_torch']}"
        for i, r in enumerate(row.get("rounds", ())))


def graph_layer(p, cfg, comm, weights):
    """Our layer in graph mode on shared weights, or None (with a note on rank 0) where the
    mode refuses this problem/config (the same typed error on every rank: no collective is
    left half done)."""
    from flashmoe_gen.errors import FlashMoEError
    from flashmoe_gen.runtime import FlashMoE

    try:
        return FlashMoE(p, cfg.graph_mode(), comm=comm, weights=weights)
    except FlashMoEError as e:
        if comm.rank == 0:
            print(f"graph mode skipped for {p.name}: {e}", flush=True)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="seed,dsv2lite_t512,dsv2lite_t4096,mixtral_t4096",
                    help=f"comma list of {sorted(PROBLEMS)}")
    ap.add_argument("--config", default=None,
                    help="a config name for every problem (default: the heuristic default)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time (a) and PyTorch EP this many times, alternating which goes "
                         "first; vs torch is the median of the rounds' ratios")
    ap.add_argument("--out", default=None, help="markdown table to write (rank 0)")
    ap.add_argument("--json", default=None, help="raw numbers as JSON (rank 0)")
    ap.add_argument("--commit", default=None, help="git commit to name in the table")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds {a.rounds}: at least one round")

    import cupy
    import torch
    from torch_ep import init_torch_dist

    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.problem import MoEProblem

    comm = Communicator(n_streams=1)
    P, rank = comm.world_size, comm.rank
    init_torch_dist(comm.mpi, comm.device.id)
    card = cupy.cuda.runtime.getDeviceProperties(comm.device.id)["name"].decode()
    rows = []
    for key in a.problems.split(","):
        p = MoEProblem(**PROBLEMS[key], world_size=P)
        rows.append(measure(p, comm, a))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()

    if rank == 0:
        commit = a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
        head = (f"# Overlap benchmark: {P} x {card}, {datetime.date.today()}, commit {commit}\n\n"
                f"bf16, median of {a.iters} iterations after {a.warmup} warm-ups (CUDA events, "
                "max over ranks per iteration). (a) layer, (b) serialized, (c) comm alone, "
                "(d) compute alone; a_expert_slots = (a) with expert slots (one NCCL op per "
                "(peer, expert)) instead of packed ones; overlap eff = ((b)-(a))/min((c),(d)); "
                "a_graph = (a) in graph mode (device-side counts, one CUDA graph); a transport "
                "'nvlink' config (one persistent kernel) has (a) alone. PyTorch "
                "baselines (all_to_all_single + torch._grouped_mm): torch_sync reads the split "
                "sizes on the host, torch_graph is padded fixed-size and graph-captured; "
                "torch_ep = the faster of the two (torch_ep_is names it); vs torch = ours / "
                f"torch_ep (< 1: ours faster; the median over {a.rounds} round(s) of (a) and "
                "torch_ep timed back to back, alternating which goes first, listed below "
                "the table; the other columns are round 1's); floor = per-rank "
                f"{floor_note(rows[0].get('floor_tbs'))}; agree = rel. diff ours vs torch "
                "(agree_baselines: graph vs sync baseline, asserted < 1e-2).\n\n")
        cols = ["problem", "a_layer", "a_graph", "a_expert_slots", "b_serial", "c_comm",
                "d_compute", "overlap_eff", "torch_sync_ms", "torch_graph_ms", "torch_ep_ms",
                "torch_ep_is", "vs_torch", "vs_torch_graph_mode", "floor_ms", "over_floor",
                "agree_torch", "agree_graph_mode", "agree_baselines"]
        table = md_table(cols, [[r[c] for c in cols] for r in rows])
        configs = "\n".join(f"- {r['problem']}: `{r['config']}`" for r in rows)
        configs += "\n\nrounds ((a) median (p20-p80) / PyTorch EP = ratio, ms):\n" + \
            "\n".join(f"- {r['problem']}: {rounds_text(r)}" for r in rows)
        which = "--config" if a.config else "heuristic defaults"
        emit(head + table + f"\nconfigs ({which}):\n" + configs + "\n", rows, a.out,
             a.json)
    comm.barrier()
    import torch.distributed as dist
    dist.destroy_process_group()
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
