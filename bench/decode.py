"""Decode benchmark (run under mpirun, one GPU per rank): small token counts per rank.

For each shape and token count T, in one run on P GPUs: our layer in host mode and in graph
mode (device-side counts, one CUDA graph per forward), both PyTorch EP baselines (sync, and
padded + graph-captured; "PyTorch EP" = the faster), the host time of our Python call, and the
per-rank roofline floor. Each shape's weights are made once (on the GPU) and shared by every
layer of that shape; layer builds are cached in-process (one compile per config).

    mpirun -np 4 python bench/decode.py --out bench/results/decode_4.md \\
        --json bench/results/decode_4.json --plot bench/results/decode_4.png
    python bench/decode.py --from-json a.json,b.json --out decode_4.md --plot decode_4.png  # CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap import floor_note, nvlink_stats, peak_bytes, phases_text  # noqa: E402
from report import emit, md_table  # noqa: E402

SHAPES = {
    "seed": dict(hidden=512, intermediate=2048, experts=8, top_k=2, shared_experts=1),
    "dsv2lite": dict(hidden=2048, intermediate=1408, experts=64, top_k=6, shared_experts=2),
    "dsv3": dict(hidden=7168, intermediate=2048, experts=256, top_k=8, shared_experts=1),
}
TOKENS = (1, 8, 32, 128, 512)
#: GPU memory kept free beyond a shape's weights (layers' buffers, baselines, graphs).
HEADROOM_BYTES = 6 << 30
#: Table columns (the JSON has every field).
COLS = ["shape", "tokens", "ours_host_ms", "ours_graph_ms", "ours_nvlink_ms",
        "ours_nvlink_graph_ms", "torch_sync_ms", "torch_graph_ms", "torch_ep_ms", "speedup_host",
        "speedup_graph", "speedup_nvlink", "speedup_nvlink_graph", "host_us_host",
        "host_us_graph", "host_us_nvlink", "host_us_nvlink_graph", "kernel_us_nvlink",
        "sm_busy_nvlink", "floor_ms", "graph_over_floor"]
#: The plot's lines: (JSON field, label, style).
LINES = (("ours_host_ms", "ours, host mode", "o-"), ("ours_graph_ms", "ours, graph mode", "s-"),
         ("ours_nvlink_ms", "ours, nvlink (one persistent kernel)", "d-"),
         ("ours_nvlink_graph_ms", "ours, nvlink, graph-launched", "v-"),
         ("torch_sync_ms", "PyTorch EP, sync", "x--"),
         ("torch_graph_ms", "PyTorch EP, graph", "^--"), ("floor_ms", "per-rank floor", "k:"))


def weight_bytes(p) -> int:
    """One rank's weights (bf16): local experts, shared experts, router."""
    return (3 * p.local_experts * p.hidden * p.intermediate + 3 * p.hidden * p.shared_width
            + p.hidden * p.experts) * 2


def device_weights(p, rank: int, seed: int = 1):
    """Random weights ~ N(0,1)/sqrt(fan_in) made on this GPU in the layer's layouts (host
    generation of a DeepSeek-V3-sized rank takes minutes). Router and shared experts are the
    same on every rank, routed experts differ."""
    import torch

    from flashmoe_gen.device_weights import DeviceWeights, as_bits

    dev = torch.device("cuda", torch.cuda.current_device())

    def normal(name: str, shape: tuple, fan_in: int, s: int):
        g = torch.Generator(device=dev).manual_seed(s)
        t = torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16)
        return as_bits(t.mul_(fan_in ** -0.5), name)

    h, i, e, el, sw = p.hidden, p.intermediate, p.experts, p.local_experts, p.shared_width
    mine = seed + 1000 * (rank + 1)
    dw = DeviceWeights(gate=normal("gate", (h, e), h, seed),
                       w1=normal("w1", (el, i, h), h, mine + 1),
                       w3=normal("w3", (el, i, h), h, mine + 3),
                       w2=normal("w2", (el, h, i), i, mine + 2))
    if sw:
        dw.sw1 = normal("sw1", (sw, h), h, seed + 11)
        dw.sw3 = normal("sw3", (sw, h), h, seed + 13)
        dw.sw2 = normal("sw2", (h, sw), p.shared_intermediate, seed + 12)
    return dw


def collective(comm, what: str, fn):
    """``fn()`` on every rank: (result, None) where it worked on all, else (None, reason) on
    all (a typed refusal or an out-of-memory on any rank skips the row everywhere)."""
    import cupy
    import torch

    from flashmoe_gen.comm import allgather
    from flashmoe_gen.errors import FlashMoEError

    try:
        res, err = fn(), None
    except (FlashMoEError, MemoryError, torch.cuda.OutOfMemoryError,
            cupy.cuda.memory.OutOfMemoryError) as e:
        res, err = None, f"{type(e).__name__}: {e}"
    errs = allgather(comm.mpi, err, what)
    bad = [f"rank {r}: {e}" for r, e in enumerate(errs) if e]
    return (res, None) if not bad else (None, f"{what} failed ({bad[0]})")


def host_us(fn, comm, iters: int) -> float:
    """Median over iterations of the slowest rank's wall time of the Python call ``fn()``,
    started with the GPU idle and all ranks together (the host side alone: bench/host_time.py)."""
    import cupy

    from flashmoe_gen.comm import allgather

    dev = cupy.cuda.Device()
    mine = np.empty(iters)
    for i in range(iters):
        dev.synchronize()
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        mine[i] = (time.perf_counter() - t0) * 1e6
    dev.synchronize()
    return float(np.median(np.array(allgather(comm.mpi, mine, "gathering host times")).max(0)))


def floor_for(p, base, xt, comm) -> float:
    """The per-rank floor (overlap.floor_ms) of the slowest rank, counting only the local
    experts this call's routing gives a row (at T=1 a rank reads few experts' weights)."""
    import torch
    import torch.distributed as dist
    from overlap import floor_ms

    _, idx = base.route(xt)
    hits = torch.zeros(p.experts, dtype=torch.int64, device=xt.device)
    hits.scatter_add_(0, idx.flatten(), torch.ones_like(idx.flatten()))
    dist.all_reduce(hits)
    used = (hits.view(p.world_size, p.local_experts) > 0).sum(1).tolist()
    return max(floor_ms(p, u) for u in used)


def measure(key: str, p, dw, comm, a) -> dict:
    """One (shape, T) row; every rank calls it."""

    import cupy
    import torch
    from torch_ep import TorchEP
    from torch_ep_graph import time_baselines, to_f64

    from flashmoe_gen import bf16
    from flashmoe_gen.comm import allgather
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.reference import relative_error
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.tuner.bench import time_callable
    from flashmoe_gen.weights import random_tokens

    t = p.tokens_per_rank
    row = dict(shape=key, tokens=t, problem=p.name)
    ours = {}
    ours["host"], err = collective(comm, "our layer (host mode)",
                                   lambda: FlashMoE(p, comm=comm, weights=dw))
    if err:
        return row | {"note": err}
    cfg = ours["host"].config
    row["config"] = cfg.name
    others = [("graph", "graph mode", cfg.graph_mode())]
    if a.nvlink:  # transport "nvlink": one persistent kernel per forward, launched by Python
        nvl = KernelConfig.persistent_default(p)  # and from a CUDA graph (less host time)
        row["config_nvlink"] = nvl.name
        others += [("nvlink", "nvlink", nvl),
                   ("nvlink_graph", "nvlink, graph", nvl.graph_mode())]
    for mode, label, c in others:
        if mode == "nvlink_graph" and "nvlink" not in ours:
            continue  # the kernel did not build
        ours[mode], err = collective(comm, f"our layer ({label})",
                                     lambda c=c: FlashMoE(p, c, comm=comm, weights=dw))
        if err:
            row["note"] = (row.get("note", "") + " " + err).strip()
            del ours[mode]
    x = cupy.asarray(random_tokens(t, p.hidden, seed=100 + comm.rank))
    xt = torch.from_dlpack(x).view(torch.bfloat16)
    base = time_baselines(ours["host"], xt, comm, warmup=a.warmup, iters=a.iters,
                          chain=a.chain)
    theirs = to_f64(base.pop("out"))
    row.update(base)
    kw = dict(warmup=a.warmup, iters=a.iters, comm=comm, chain=a.chain)
    for mode, layer in ours.items():
        out = bf16.from_bits(layer(x).get()).astype(np.float64)  # graph mode: captures
        diff = max(allgather(comm.mpi, relative_error(out, theirs), "comparing outputs"))
        ms = time_callable(lambda layer=layer: layer(x), **kw).median_ms
        row[f"ours_{mode}_ms"] = round(ms, 4)
        row[f"speedup_{mode}"] = round(base["torch_ep_ms"] / ms, 3)
        row[f"host_us_{mode}"] = round(host_us(lambda layer=layer: layer(x), comm,
                                               a.host_iters), 1)
        row[f"agree_{mode}"] = float(f"{diff:.2e}")
        if mode == "nvlink":
            row.update(nvlink_stats(layer, x, comm, chain=max(a.chain, 8)))
    row["floor_ms"] = round(floor_for(p, TorchEP(ours["host"]), xt, comm), 4)
    row["floor_tbs"] = peak_bytes() / 1e12
    if "ours_graph_ms" in row:
        row["graph_over_floor"] = round(row["ours_graph_ms"] / row["floor_ms"], 2)
    return row


def release() -> None:
    """Give freed GPU memory back (both allocators), so the next row sees it free."""
    import cupy
    import torch

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def run(a) -> list[dict]:
    import cupy
    from torch_ep import init_torch_dist

    from flashmoe_gen.comm import Communicator, allgather
    from flashmoe_gen.problem import MoEProblem

    comm = Communicator(n_streams=1)
    P, rank = comm.world_size, comm.rank
    init_torch_dist(comm.mpi, comm.device.id)
    a.card = cupy.cuda.runtime.getDeviceProperties(comm.device.id)["name"].decode()
    rows = []
    for key in a.problems:
        p0 = MoEProblem(**SHAPES[key], world_size=P, tokens_per_rank=max(a.tokens))
        free = min(allgather(comm.mpi, cupy.cuda.runtime.memGetInfo()[0], "free memory"))
        need = weight_bytes(p0) + HEADROOM_BYTES
        if need > free:
            gib = 2.0 ** 30
            dw, err = None, (f"needs ~{need / gib:.1f} GiB per rank "
                             f"({weight_bytes(p0) / gib:.1f} GiB of weights), "
                             f"{free / gib:.1f} GiB free")
        else:
            dw, err = collective(comm, "making the weights", lambda p0=p0: device_weights(p0, rank))
        for t in a.tokens:
            p = p0.replace(tokens_per_rank=t)
            row = measure(key, p, dw, comm, a) if dw is not None else \
                dict(shape=key, tokens=t, problem=p.name, note=f"skipped: {err}")
            rows.append(row | dict(card=a.card, gpus=P, commit=a.commit,
                                   date=str(datetime.date.today()), iters=a.iters,
                                   chain=a.chain,
                                   warmup=a.warmup, host_iters=a.host_iters))
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
                if a.json:  # row by row: a run cut short by a timeout still reports
                    Path(a.json).write_text(json.dumps(rows, indent=1))
            release()  # layers and captured graphs of this row go before the next
        del dw
        release()  # the weights live in torch's cache until emptied
    comm.barrier()
    import torch.distributed as dist
    dist.destroy_process_group()
    comm.close()
    return rows if rank == 0 else []


def plot(rows: list[dict], path: str, title: str) -> None:
    """Latency vs T per shape (log-log), one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.4), squeeze=False)
    for ax, key in zip(axes[0], shapes, strict=True):
        sel = sorted((r for r in rows if r["shape"] == key), key=lambda r: r["tokens"])
        for field, label, style in LINES:
            pts = [(r["tokens"], r[field]) for r in sel if r.get(field)]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        d = SHAPES.get(key, {})
        ax.set_title(f"{key}: H{d.get('hidden')} I{d.get('intermediate')} E{d.get('experts')} "
                     f"k{d.get('top_k')} S{d.get('shared_experts', 0)}", fontsize=9)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("ms per forward")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def report(rows: list[dict], a) -> None:
    """Markdown table (card, date, commit), JSON, and the plot where asked."""
    r0 = rows[0]
    title = (f"Decode: {r0.get('gpus', '?')} x {r0.get('card', '?')}, "
             f"{r0.get('date', datetime.date.today())}, commit {r0.get('commit', a.commit)}")
    chain = r0.get("chain", 1)
    per = (f" of {chain} forwards back to back (time per forward)" if chain > 1 else "")
    head = (f"# {title}\n\nbf16, tokens per rank T; median of {r0.get('iters')} iterations{per} "
            f"after {r0.get('warmup')} warm-ups (CUDA events, max over ranks per iteration). "
            "ours: host mode "
            "(counts read on the host) and graph mode (device-side counts, fixed-size "
            "transfers, one CUDA graph per T). PyTorch EP baselines on the same weights and "
            "tokens: torch_sync (split sizes read on the host) and torch_graph (padded "
            "fixed-size all_to_all_single, graph-captured; checked against torch_sync, < 1e-2); "
            "torch_ep = the faster of the two; speedup = torch_ep / ours (> 1: ours faster). "
            "host_us: wall time of our Python call (GPU idle at its start, median of "
            f"{r0.get('host_iters')}). floor = per-rank {floor_note(r0.get('floor_tbs'))} "
            "counting only the local experts this call's routing uses.\n\n")
    table = md_table(COLS, [["—" if r.get(c) is None else r[c] for c in COLS] for r in rows])
    notes = "".join(f"- {r['shape']} T={r['tokens']}: {r['note']}\n" for r in rows
                    if r.get("note"))
    configs = "".join(f"- {r['problem']}: `{r['config']}`"
                      + (f"; nvlink `{r['config_nvlink']}`" if r.get("config_nvlink") else "")
                      + "\n" for r in rows if r.get("config"))
    phases = "".join(f"- {r['shape']} T={r['tokens']}: {phases_text(r)}\n"
                     for r in rows if r.get("phases_us_nvlink"))
    text = head + table + ("\nnotes:\n" + notes if notes else "") + \
        ("\nconfigs (host mode; graph mode adds __graph):\n" + configs if configs else "") + \
        ("\nnvlink phases, us at the nominal SM clock (the persistent kernel's own clocks; "
         "per phase the latest block, slowest rank; the last of 8 forwards back to back, "
         "median of 5):\n" + phases
         if phases else "")
    emit(text, rows, a.out, a.json)
    if a.plot:
        plot(rows, a.plot, title)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=lambda s: s.split(","), default=list(SHAPES),
                    help=f"comma list of {list(SHAPES)} (default: all)")
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")],
                    default=list(TOKENS), help="comma list of tokens per rank "
                    f"(default: {','.join(map(str, TOKENS))})")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--host-iters", type=int, default=50, help="calls timed for host_us")
    ap.add_argument("--chain", type=int, default=1,
                    help="forwards back to back per timed iteration, time per forward (ours "
                    "and both baselines): the host issues ahead as in a model's layer stack")
    ap.add_argument("--nvlink", action="store_true",
                    help="also time transport 'nvlink' (one persistent kernel per forward)")
    ap.add_argument("--out", default=None, help="markdown table to write (rank 0)")
    ap.add_argument("--json", default=None, help="raw rows as JSON (rank 0)")
    ap.add_argument("--plot", default=None, help="PNG to write (rank 0)")
    ap.add_argument("--commit", default=None, help="git commit to name (default: HEAD)")
    ap.add_argument("--from-json", default=None,
                    help="report (table, plot) from JSON files written by --json (comma list: "
                    "rows of several runs, e.g. one per shape); no GPU needed")
    a = ap.parse_args()
    if any(t < 1 for t in a.tokens):
        ap.error(f"--tokens: every count must be >= 1, got {a.tokens}")
    a.commit = a.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True).stdout.strip()
    unknown = [k for k in a.problems if k not in SHAPES]
    if unknown:
        ap.error(f"--problems: unknown {unknown}; choose from {list(SHAPES)}")
    if a.from_json:
        files = a.from_json.split(",")
        rows = [r for f in files for r in json.loads(Path(f).read_text())]
        a.json = None if a.json in files else a.json
    else:
        rows = run(a)
    if rows:
        report(rows, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
