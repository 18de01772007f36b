"""FlashDMoE's setting (H=2048, I=2048, top-2, bf16): our layer vs the PyTorch EP baselines.

Run under mpirun on P GPUs (one per rank); each run appends its rows to a JSON file, so
weak scaling comes from running P = 2, 4, 8 into the same file, then ``--plot``:

    mpirun -np 4 python bench/scaling.py --json scaling.json
    python bench/scaling.py --plot scaling.json --out bench/results/scaling
Config: the tuned winner from the database when there is one (lookup), else the default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvlink_sweep import variants  # noqa: E402
from overlap import floor_note, nvlink_stats, peak_bytes  # noqa: E402
from report import md_table  # noqa: E402

EXPERTS = (8, 32, 64, 128)
TOKENS = (1024, 4096, 16384)


def measure_one(p, cfg, comm, a) -> dict:
    """Ours (host and graph mode; with --fuse, ours with fused sources) and both PyTorch
    baselines on the same weights and tokens; every rank calls it."""
    import dataclasses

    import cupy
    import torch
    from overlap import graph_layer
    from torch_ep_graph import time_baselines, to_f64

    from flashmoe_gen import bf16
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.errors import ConfigError
    from flashmoe_gen.reference import relative_error
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.tuner.bench import time_callable
    from flashmoe_gen.weights import random_tokens

    layer = FlashMoE(p, cfg, comm=comm, seed=1)
    x = cupy.asarray(random_tokens(p.tokens_per_rank, p.hidden, seed=7 + comm.rank))
    xt = torch.from_dlpack(x).view(torch.bfloat16)
    ours = layer.forward(x)
    base = time_baselines(layer, xt, comm, warmup=a.warmup, iters=a.iters, chain=a.chain)
    theirs = to_f64(base.pop("out"))
    agree = relative_error(bf16.from_bits(ours.get()).astype(np.float64), theirs)
    agree = max(comm.mpi.allgather(agree))
    kw = dict(warmup=a.warmup, iters=a.iters, comm=comm, chain=a.chain)
    ms = time_callable(lambda: layer.forward(x), **kw).median_ms
    ms_t = base["torch_ep_ms"]
    extra = {"ours_graph_ms": None, "speedup_graph": None}

    def variant(other, name: str, agree_key: str) -> None:
        """Another layer on the same weights and tokens: its agreement with the baseline,
        its time and its speed-up, under ``name``."""
        out = other.forward(x)
        diff = relative_error(bf16.from_bits(out.get()).astype(np.float64), theirs)
        extra[agree_key] = float(f"{max(comm.mpi.allgather(diff)):.2e}")
        ms_v = time_callable(lambda: other.forward(x), **kw).median_ms
        extra[f"ours_{name}_ms"] = round(ms_v, 4)
        extra[f"speedup_{name}"] = round(ms_t / ms_v, 3)

    layer_g = graph_layer(p, cfg, comm, layer.weights)
    if layer_g is not None:
        variant(layer_g, "graph", "agree_graph_mode")
        del layer_g
    if a.fuse and comm.world_size > 1:
        fused = FlashMoE(p, dataclasses.replace(cfg, fuse_sources=True), weights=layer.weights,
                         comm=comm)
        extra["ours_fused_ms"] = round(
            time_callable(lambda: fused.forward(x), **kw).median_ms, 4)
        out_f = fused.forward(x)
        diff = relative_error(bf16.from_bits(out_f.get()).astype(np.float64),
                              bf16.from_bits(ours.get()).astype(np.float64))
        extra["fused_vs_unfused"] = float(f"{diff:.1e}")
    if a.nvlink:  # transport nvlink: one persistent kernel per forward
        nvl = FlashMoE(p, KernelConfig.persistent_default(p), weights=layer.weights, comm=comm)
        variant(nvl, "nvlink", "agree_nvlink")
        extra["config_nvlink"] = nvl.config.name
        extra.update(nvlink_stats(nvl, x, comm))
        del nvl
    if a.nvlink_knobs:  # the persistent default with knobs changed, where valid
        cfg = variants(KernelConfig.persistent_default(p), a.nvlink_knobs)[0]
        try:
            cfg.validate(p)
        except ConfigError as e:
            extra["config_nvlink_k"] = f"refused: {e.field}"
        else:
            nvl = FlashMoE(p, cfg, weights=layer.weights, comm=comm)
            variant(nvl, "nvlink_k", "agree_nvlink_k")
            extra["config_nvlink_k"] = nvl.config.name
            extra.update({k.replace("_nvlink", "_nvlink_k"): v
                          for k, v in nvlink_stats(nvl, x, comm).items()})
            del nvl
    for i, name in enumerate(a.nvlink_config or [], 1):  # other nvlink configs, same inputs
        nvl = FlashMoE(p, KernelConfig.parse(name), weights=layer.weights, comm=comm)
        variant(nvl, f"nvlink_{i}", f"agree_nvlink_{i}")
        extra[f"config_nvlink_{i}"] = nvl.config.name
        extra.update({k.replace("_nvlink", f"_nvlink_{i}"): v
                      for k, v in nvlink_stats(nvl, x, comm).items()})
        del nvl
    n = comm.world_size * p.tokens_per_rank
    return dict(ours_ms=round(ms, 4), **base, speedup=round(ms_t / ms, 3),
                ours_mtok_s=round(n / ms / 1e3, 3), torch_mtok_s=round(n / ms_t / 1e3, 3),
                agree_torch=float(f"{agree:.2e}"), **extra)


def measure_all(a) -> list[dict]:
    import warnings

    import cupy
    import torch
    from overlap import floor_ms
    from torch_ep import init_torch_dist

    from flashmoe_gen.api import lookup
    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.problem import MoEProblem

    comm = Communicator(n_streams=2)
    P, rank = comm.world_size, comm.rank
    init_torch_dist(comm.mpi, comm.device.id)
    card = cupy.cuda.runtime.getDeviceProperties(comm.device.id)["name"].decode()
    rows = []
    for e in a.experts:
        for t in a.tokens:
            p = MoEProblem(2048, 2048, e, 2, world_size=P, tokens_per_rank=t)
            k = None
            if rank == 0:
                with warnings.catch_warnings(record=True):  # a default is fine here
                    k = lookup(p, device=card, db=a.db)
            k = comm.mpi.bcast(k, root=0)
            row = dict(card=card, gpus=P, experts=e, tokens_per_gpu=t, chain=a.chain,
                       config=k.config.name,
                       config_source=k.provenance, floor_ms=round(floor_ms(p), 4),
                       floor_tbs=peak_bytes() / 1e12,
                       **measure_one(p, k.config, comm, a))
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
    comm.barrier()
    import torch.distributed as dist
    dist.destroy_process_group()
    comm.close()
    return rows if rank == 0 else []


def chain_note(rows: list[dict]) -> str:
    """How the rows were timed, where not one forward per iteration."""
    n = rows[0].get("chain", 1) if rows else 1
    return f"; {n} forwards back to back per iteration, per forward" if n > 1 else ""


def plot(rows: list[dict], out: str, commit: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for r in rows:  # files written before both PyTorch baselines had one: torch_ms
        r.setdefault("torch_ep_ms", r.get("torch_ms"))
    card = rows[0]["card"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    gpus = sorted({r["gpus"] for r in rows})
    experts = sorted({r["experts"] for r in rows})
    # One colour per expert count in every panel, so ours/torch and the weak-scaling lines
    # of one E read together (the default cycle repeats after 10 lines).
    colour = {e: plt.cm.tab10(i % 10) for i, e in enumerate(experts)}
    for e in experts:
        for g in gpus[-1:]:
            sel = sorted((r for r in rows if r["experts"] == e and r["gpus"] == g),
                         key=lambda r: r["tokens_per_gpu"])
            ts = [r["tokens_per_gpu"] for r in sel]
            c = colour[e]
            for ax, ours, theirs in ((axes[0], "ours_ms", "torch_ep_ms"),
                                     (axes[1], "ours_mtok_s", "torch_mtok_s")):
                ax.plot(ts, [r[ours] for r in sel], "o-", color=c, label=f"ours E={e}")
                ax.plot(ts, [r[theirs] for r in sel], "x--", color=c,
                        label=f"PyTorch EP E={e}")
            if any(r.get("ours_graph_ms") for r in sel):
                axes[0].plot(ts, [r.get("ours_graph_ms") for r in sel], "s:", color=c,
                             label=f"ours graph E={e}")
            if any(r.get("ours_nvlink_ms") for r in sel):  # --nvlink: the persistent kernel
                axes[0].plot(ts, [r.get("ours_nvlink_ms") for r in sel], "D-", color=c,
                             lw=2, label=f"ours nvlink E={e}")
            axes[0].plot(ts, [r["floor_ms"] for r in sel], "_:", color=c, alpha=0.6,
                         label=f"floor E={e}")
    styles = ("o-", "s--", "^:", "d-.")
    for e in experts:
        for i, t in enumerate(sorted({r["tokens_per_gpu"] for r in rows})):
            sel = sorted((r for r in rows if r["experts"] == e and r["tokens_per_gpu"] == t),
                         key=lambda r: r["gpus"])
            if len(sel) > 1:
                nvl = all(r.get("ours_nvlink_ms") for r in sel)  # the persistent kernel's
                key = "ours_nvlink_ms" if nvl else "ours_ms"
                axes[2].plot([r["gpus"] for r in sel], [r[key] for r in sel],
                             styles[i % len(styles)], color=colour[e],
                             label=f"E={e}, T={t}" + (" nvlink" if nvl else ""))
    if len(gpus) < 2:
        axes[2].text(0.5, 0.5, "needs runs at several GPU counts\n(this file has "
                     f"{gpus[0]} only)", ha="center", va="center", transform=axes[2].transAxes)
    for ax, title, ylab in ((axes[0], f"latency, {gpus[-1]} GPUs", "ms"),
                            (axes[1], f"throughput, {gpus[-1]} GPUs", "M tokens/s"),
                            (axes[2], "weak scaling (ours)", "ms")):
        ax.set_title(title)
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    axes[0].set_xscale("log", base=2)
    axes[1].set_xscale("log", base=2)
    axes[0].set_xlabel("tokens per GPU")
    axes[1].set_xlabel("tokens per GPU")
    axes[2].set_xlabel("GPUs")
    fig.suptitle(f"H=2048, I=2048, top-2, bf16 on {card}, {datetime.date.today()}, "
                 f"commit {commit}")
    fig.savefig(out + ".png", dpi=100, bbox_inches="tight")
    cols = ["gpus", "experts", "tokens_per_gpu", "ours_ms", "ours_graph_ms", "torch_sync_ms",
            "torch_graph_ms", "torch_ep_ms", "speedup", "speedup_graph", "ours_mtok_s",
            "torch_mtok_s", "floor_ms", "agree_torch", "agree_baselines", "config_source"]
    if any("ours_nvlink_ms" in r for r in rows):  # --nvlink: the persistent kernel beside
        cols[5:5] = ["ours_nvlink_ms", "speedup_nvlink", "sm_busy_nvlink", "agree_nvlink"]
    md = [f"# H=2048, I=2048, top-2, bf16: FlashMoE vs PyTorch EP on {card}",
          "", f"{datetime.date.today()}, commit {commit}. Median of CUDA-event timings (max "
          f"over ranks per iteration{chain_note(rows)}). ours: host mode; ours_graph: "
          "graph mode (device-side counts, one CUDA graph). PyTorch EP baselines: torch_sync "
          "(split sizes read on the host), torch_graph (padded fixed-size transfers, "
          "graph-captured); torch_ep = the faster of the two. speedup = torch_ep / ours (> 1: "
          "ours faster). floor = "
          f"per-rank {floor_note(rows[0].get('floor_tbs'))}. agree = rel. diff ours vs "
          "torch_sync; agree_baselines = torch_graph vs torch_sync. ours_nvlink (with "
          "--nvlink): transport nvlink, one persistent kernel per forward; sm_busy_nvlink: "
          "its blocks' cycles in GEMM tiles / all their cycles (mean over ranks).", ""]
    ordered = sorted(rows, key=lambda r: (r["gpus"], r["experts"], r["tokens_per_gpu"]))
    table = md_table(cols, [[r.get(c) for c in cols] for r in ordered])
    weak = weak_scaling(rows)
    if weak:
        table += ("\n\nWeak scaling (same tokens per GPU; the persistent kernel's time where "
                  "every GPU count has it, else host mode's): growth = time at the most GPUs "
                  "/ time at the fewest - 1.\n\n" + md_table(list(weak[0]),
                                                             [list(w.values()) for w in weak]))
    Path(out + ".md").write_text("\n".join(md) + "\n" + table)


def weak_scaling(rows: list[dict]) -> list[dict]:
    """Per (experts, tokens per GPU) measured at several GPU counts: the time at each count
    and the growth from the fewest GPUs to the most (nvlink's where every count has it)."""
    out = []
    for e, t in sorted({(r["experts"], r["tokens_per_gpu"]) for r in rows}):
        sel = sorted((r for r in rows if r["experts"] == e and r["tokens_per_gpu"] == t),
                     key=lambda r: r["gpus"])
        if len({r["gpus"] for r in sel}) < 2:
            continue
        key = "ours_nvlink_ms" if all(r.get("ours_nvlink_ms") for r in sel) else "ours_ms"
        ms = {r["gpus"]: r[key] for r in sel}  # (a count measured twice: the later run)
        lo, hi = min(ms), max(ms)
        out.append({"experts": e, "tokens_per_gpu": t, "timing": key,
                    **{f"ms_{g}gpus": ms[g] for g in sorted(ms)},
                    "growth": f"{ms[hi] / ms[lo] - 1:+.1%}"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=lambda s: [int(v) for v in s.split(",")],
                    default=list(EXPERTS))
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")],
                    default=list(TOKENS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--chain", type=int, default=1,
                    help="forwards back to back per timed iteration, ours and PyTorch EP's "
                    "alike (1: one forward after a barrier, the ranks' launch skew in it; 8: "
                    "steady state, as bench/nvlink_sweep.py)")
    ap.add_argument("--db", default=None, help="winners database for lookup()")
    ap.add_argument("--fuse", action="store_true",
                    help="also time the same config with fuse_sources=True")
    ap.add_argument("--nvlink", action="store_true",
                    help="also time transport 'nvlink' (one persistent kernel per forward)")
    ap.add_argument("--nvlink-config", action="append", metavar="NAME",
                    help="also time this transport 'nvlink' config (a name; repeatable): "
                         "keys ours_nvlink_1_ms, ... in the JSON")
    ap.add_argument("--nvlink-knobs", default=None, metavar="K=V[;K=V]",
                    help="also time the persistent default with these knobs changed, one "
                         "value each in nvlink_sweep.py --vary's spelling (e.g. pr=1), where "
                         "the build takes it: keys ours_nvlink_k_ms, ...")
    ap.add_argument("--json", default="scaling.json", help="rows are appended here")
    ap.add_argument("--plot", default=None, help="JSON file to plot instead of measuring")
    ap.add_argument("--out", default="scaling", help="plot/table path stem")
    ap.add_argument("--commit", default="unknown")
    a = ap.parse_args()
    if a.nvlink_knobs and any("," in part.partition("=")[2]
                              for part in a.nvlink_knobs.split(";")):
        raise SystemExit("--nvlink-knobs: one value per knob (one config)")
    if a.plot:
        plot(json.loads(Path(a.plot).read_text()), a.out, a.commit)
        return 0
    rows = measure_all(a)
    if rows:
        path = Path(a.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
