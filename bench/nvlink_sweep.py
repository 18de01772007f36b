"""Transport-nvlink configs side by side (run under mpirun, one GPU per rank): for each
shape and token count, each config's persistent kernel, graph-launched, 8 forwards back to
back (CUDA events, median), its own clocks (kernel time, SM busy, phases) and its output
against the NCCL path's graph-mode default on the same weights and tokens.

    mpirun -np 2 python bench/nvlink_sweep.py --problems seed --tokens 1,8 \\
        --vary "dn_s=4,8;gu_s=4,6" --out sweep.md --json sweep.json

``--vary`` changes the persistent default: ``gu_``/``dn_`` + a GemmTile field (bm, bn, bk,
stages as ``s``), ``b`` (blocks per SM), ``d`` (dispatch blocks), ``wt`` (TMA loads),
``sb`` (blocks that send the peers' rows), ``rb`` (router batches per logit tile), ``tt``
(row tiles per TMA row task), ``dr`` (deferred refills, 0/1), ``se`` (staged epilogue: 0
none, 1 down, 2 both, 3 down staged and gate/up by TMA stores), ``ph`` (phased task lists,
0/1), ``pr`` (a producer warpgroup feeds the TMA row tasks, 0/1), ``af`` (rows' slots by
atomics as they are routed, 0/1), ``g2`` (gate and up in two MMAs, 0/1), ``ts`` (silu by
tanh.approx, 0/1), ``il`` (one task list over every source, 0/1), ``ks`` (K splits,
``GxD``), values comma-separated; every combination is timed (configs the build refuses
are reported, not fatal). ``--config`` adds named configs (repeatable; a name per shape as
``shape:name``, else every shape) after the variants, to compare other tiles or fused
sources with the default in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES, collective, device_weights, release  # noqa: E402
from overlap import nvlink_stats, phases_text  # noqa: E402
from report import add_output_args, emit, int_list, md_table  # noqa: E402

from flashmoe_gen.config import FIELD_OF_TAG, KernelConfig  # noqa: E402
from flashmoe_gen.tuner.moot import without_moot  # noqa: E402
from flashmoe_gen.tuner.space import SearchSpace  # noqa: E402

FIELDS = {"bm": "bm", "bn": "bn", "bk": "bk", "s": "stages"}
#: --vary's config knobs (besides tile fields and ks), by the tags of the config name
#: (``config.FIELD_OF_TAG``), and the ones that take 0/1.
KNOBS = {t: FIELD_OF_TAG[t]
         for t in ("b", "d", "wt", "sb", "rb", "tt", "dr", "se", "ph", "pr", "af", "g2", "ts",
                   "il", "of", "odl", "sd", "ed", "sf")}
_DEFAULTS = {d.name: d.default for d in dataclasses.fields(KernelConfig)}
BOOL_KNOBS = tuple(t for t, f in KNOBS.items() if isinstance(_DEFAULTS[f], bool))
#: Large-batch shapes beside decode's (issue 12's Mixtral, FlashDMoE's E=64 setting): the
#: persistent kernel's row tiles at thousands of tokens per rank (FlashDMoE's E = 8, 32 too).
SHAPES = SHAPES | {
    "mixtral": dict(hidden=4096, intermediate=14336, experts=8, top_k=2, shared_experts=0),
    "e64": dict(hidden=2048, intermediate=2048, experts=64, top_k=2, shared_experts=0),
    "e32": dict(hidden=2048, intermediate=2048, experts=32, top_k=2, shared_experts=0),
    "e8": dict(hidden=2048, intermediate=2048, experts=8, top_k=2, shared_experts=0),
    "qwen3": dict(hidden=2048, intermediate=768, experts=128, top_k=8, shared_experts=0),
    # one GPU standing in for a rank of 4 at E=64: 16 experts, as many rows per expert at
    # the same tokens per rank (no dispatch over NVLink)
    "e16": dict(hidden=2048, intermediate=2048, experts=16, top_k=2, shared_experts=0),
    # the seed example without its shared expert (its shared down tiles, K=2048 through one
    # SM each, run beside the routed ones at T=256)
    "seed_ns": dict(hidden=512, intermediate=2048, experts=8, top_k=2, shared_experts=0),
}


def variants(base, vary: str) -> list:
    """The persistent default ``base`` with every combination of ``vary``'s values: tile
    fields (``gu_``/``dn_`` + bm, bn, bk, s), ``b`` (blocks per SM), ``d`` (dispatch
    blocks), ``wt`` (TMA loads, 0/1), ``sb`` (send blocks), ``rb`` (router batches), ``tt``
    (row tiles per task), ``dr`` (deferred refills, 0/1), ``se`` (staged epilogue, 0-3),
    ``ph`` (phased task lists, 0/1), ``pr`` (task producer, 0/1), ``af`` (atomic front,
    0/1), ``g2`` (two gated MMAs, 0/1), ``ts`` (silu by tanh, 0/1), ``il`` (one list over
    every source, 0/1), ``of`` (its own rows first, 0/1; e.g. ``il=1;of=0,1``), ``odl``
    (the phased lists' own down tasks last, 0/1), ``sd`` (streamed down tasks, 0/1),
    ``ed`` (those first in the queue, 0/1; e.g. ``sd=0,1;ed=0,1``) and ``ks`` (K splits,
    ``GxD``)."""
    axes = []
    for part in filter(None, vary.split(";")):
        knob, values = part.split("=")
        if knob in KNOBS:
            field = KNOBS[knob]
            cast = bool if knob in BOOL_KNOBS else (lambda v: v)
            axes.append([{field: cast(int(v))} for v in values.split(",")])
            continue
        if knob == "ks":
            axes.append([{"gu_splits": int(v.split("x")[0]), "dn_splits": int(v.split("x")[1])}
                         for v in values.split(",")])
            continue
        gemm, _, field = knob.partition("_")
        if gemm not in ("gu", "dn") or field not in FIELDS:
            raise SystemExit(f"--vary {knob}: use one of {[*KNOBS, 'ks']}, or "
                             f"gu_|dn_ + one of {list(FIELDS)}")
        attr = "gate_up" if gemm == "gu" else "down"
        axes.append([{attr: (FIELDS[field], int(v))} for v in values.split(",")])
    varied = {k for axis in axes for change in axis for k in change}
    out = []
    for combo in itertools.product(*axes):
        cfg = base
        for change in combo:
            for k, v in change.items():
                if isinstance(v, tuple):  # a tile field
                    v = dataclasses.replace(getattr(cfg, k), **{v[0]: v[1]})
                cfg = dataclasses.replace(cfg, **{k: v})
        if cfg.task_tiles > 1 and cfg.stage_epilogue and "stage_epilogue" not in varied:
            # the staged epilogue needs the ring free at a tile's end (one row tile per
            # task): a variant that asks for two drops the default's staging, as the
            # tuner's moot-knob rule does
            cfg = dataclasses.replace(cfg, stage_epilogue=0)
        # the one list, its own-first split and the own down tasks last where the tuner's
        # moot rules keep them (not with fused sources, unphased lists or the producer;
        # the last not over the one list alone; the down tasks first only streamed):
        # elsewhere the variant is the config without them
        kept = without_moot(SearchSpace.params_from_config(cfg))
        cfg = dataclasses.replace(cfg, interleave_sources=kept["interleave"],
                                  own_first=kept["own_first"],
                                  own_down_last=kept["own_down_last"],
                                  early_down=kept["early_down"])
        out.append(cfg)
    return list(dict.fromkeys(out)) or [base]


def measure(p, cfg, x, ref, dw, comm, a) -> dict:
    from flashmoe_gen import bf16
    from flashmoe_gen.comm import allgather
    from flashmoe_gen.reference import relative_error
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.tuner.bench import time_callable

    row = dict(config=cfg.name)
    layer, err = collective(comm, "building", lambda: FlashMoE(
        p, cfg.graph_mode(), comm=comm, weights=dw))
    if err:
        return row | {"note": err}
    out = bf16.from_bits(layer(x).get()).astype(np.float64)
    row["err"] = float(f"{max(allgather(comm.mpi, relative_error(out, ref), 'err')):.2e}")
    t = time_callable(lambda: layer(x), warmup=a.warmup, iters=a.iters, comm=comm, chain=8)
    row["ms"] = round(t.median_ms, 4)
    # the spread and each rank's own median (json only): a slow rank or a few slow
    # iterations show here where the median of the slowest rank hides which
    row["ms_p20_p80"] = [round(t.p20_ms, 4), round(t.p80_ms, 4)]
    row["ms_ranks"] = [round(m, 4) for m in t.per_rank_median_ms]
    row.update(nvlink_stats(layer, x, comm))
    if row.get("sm_ghz_nvlink"):  # clock-free: an A/B whose sides ran at other SM clocks
        # (the cards' power cap under a denser kernel) compares its cycles
        row["kernel_kcycles"] = round(row["kernel_us_nvlink"] * row["sm_ghz_nvlink"], 1)
    return row


def torch_ep(layer, x, comm, a) -> dict:
    """PyTorch EP on ``layer``'s weights and ``x`` in the same run: the faster of the
    host-synced and the graph-captured padded baselines, 8 forwards back to back as ours."""
    import torch
    from torch_ep_graph import time_baselines

    base = time_baselines(layer, torch.from_dlpack(x).view(torch.bfloat16), comm,
                          warmup=a.warmup, iters=a.iters, chain=8)
    base.pop("out")
    return base


def run(a) -> list[dict]:
    import cupy

    from flashmoe_gen import bf16
    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.runtime import FlashMoE
    from flashmoe_gen.weights import random_tokens

    comm = Communicator(n_streams=1)
    if a.torch:  # the baselines' all_to_all runs on torch.distributed's NCCL
        from torch_ep import init_torch_dist
        init_torch_dist(comm.mpi, comm.device.id)
    card = cupy.cuda.runtime.getDeviceProperties(comm.device.id)["name"].decode()
    rows = []
    for key in a.problems:
        p0 = MoEProblem(**SHAPES[key], world_size=comm.world_size,
                        tokens_per_rank=max(a.tokens))
        dw, err = collective(comm, "making the weights",
                             lambda p0=p0: device_weights(p0, comm.rank))
        if err:
            rows.append(dict(shape=key, note=err))
            continue
        for t in a.tokens:
            p = p0.replace(tokens_per_rank=t)
            x = cupy.asarray(random_tokens(t, p.hidden, seed=100 + comm.rank))
            nccl = FlashMoE(p, KernelConfig.default(p).graph_mode(),
                            comm=comm, weights=dw)
            ref = bf16.from_bits(nccl(x).get()).astype(np.float64)
            base = torch_ep(nccl, x, comm, a) if a.torch else {}
            del nccl
            release()
            named = [KernelConfig.parse(n.partition(":")[2] or n) for n in a.config
                     if ":" not in n or n.partition(":")[0] == key]
            for cfg in list(dict.fromkeys(
                    [*variants(KernelConfig.persistent_default(p), a.vary), *named])):
                row = dict(shape=key, tokens=t, card=card, gpus=comm.world_size,
                           commit=a.commit, date=str(datetime.date.today())) | base
                row |= measure(p, cfg, x, ref, dw, comm, a)
                if base and "ms" in row:  # < 1: ours faster
                    row["vs_torch"] = round(row["ms"] / base["torch_ep_ms"], 3)
                rows.append(row)
                release()  # the layer and its IPC heap go before the next config's
                if comm.rank == 0:
                    print(json.dumps(rows[-1]), flush=True)
                    if a.json:  # row by row: a run cut short by a timeout still reports
                        Path(a.json).write_text(json.dumps(rows, indent=1))
        del dw
        release()
    if a.torch:
        import torch.distributed as dist
        comm.barrier()
        dist.destroy_process_group()
    return rows


def report(rows: list[dict], a) -> None:
    r0 = next((r for r in rows if "card" in r), {})
    cols = ["shape", "tokens", "config", "ms", "kernel_us_nvlink", "sm_ghz_nvlink",
            "kernel_kcycles", "sm_busy_nvlink", "err"]
    if any("torch_ep_ms" in r for r in rows):
        cols[4:4] = ["torch_ep_ms", "vs_torch"]
    text = (f"# nvlink configs: {r0.get('gpus', '?')} x {r0.get('card', '?')}, "
            f"{r0.get('date')}, commit {a.commit}\n\nGraph-launched persistent kernel, "
            f"median of {a.iters} iterations of 8 forwards back to back; kernel time, SM busy "
            "and phases from its own clocks (last of 8, median of 5 chains), kernel_kcycles "
            "its time at the SM clock it ran at (sides of an A/B may run at other clocks: "
            "the cards' power cap); err: relative to the NCCL path's graph-mode default."
            + (" Router logits by split_logits (--split-logits: the staged logits off)."
               if a.split_logits else "")
            + (" Staged router logits wherever they apply (--staged-all)."
               if a.staged_all else "")
            + (" Every staged router call from hidden stage 0 (--no-staged-rotate)."
               if a.no_staged_rotate else "")
            + (" The shared experts' down tiles by cp.async (--no-shared-tma)."
               if a.no_shared_tma else "") + "\n\n"
            + md_table(cols, [[r.get(c, "—") for c in cols] for r in rows])
            + "\nphases (us):\n" + "".join(
                f"- {r['shape']} T={r['tokens']} `{r['config']}`: {phases_text(r)}\n"
                for r in rows if r.get("phases_us_nvlink"))
            + "".join(f"- {r.get('shape')} {r.get('config', '')}: {r['note']}\n"
                      for r in rows if r.get("note")))
    emit(text, rows, a.out, a.json)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=lambda s: s.split(","), default=["seed"])
    ap.add_argument("--tokens", type=int_list, default=[1, 8])
    ap.add_argument("--vary", default="", help='e.g. "dn_s=4,8;gu_s=4,6"')
    ap.add_argument("--config", action="append", default=[], metavar="[SHAPE:]NAME",
                    help="also time this transport 'nvlink' config (repeatable)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--torch", action="store_true",
                    help="time PyTorch EP (the faster baseline) per shape and T, same run")
    ap.add_argument("--split-logits", action="store_true",
                    help="every config's router with split_logits (the staged logits off: "
                         "an A/B of flashmoe_gen.router_staged, not a config knob)")
    ap.add_argument("--staged-all", action="store_true",
                    help="the staged logits wherever they apply, not only where measured "
                         "(router_staged.STAGED_ALL: 8-expert units, 64-expert blocks of "
                         "more experts)")
    ap.add_argument("--no-staged-rotate", action="store_true",
                    help="every staged router call from hidden stage 0, not from its own "
                         "(router_staged.STAGED_ROTATE off: the A/B of the default)")
    ap.add_argument("--no-shared-tma", action="store_true",
                    help="the shared experts' down tiles by cp.async, not as TMA row tasks "
                         "(render.SHARED_DOWN_TMA off: the A/B of the default)")
    add_output_args(ap, iters=30)
    a = ap.parse_args()
    from flashmoe_gen import render
    render.SHARED_DOWN_TMA = not a.no_shared_tma
    from flashmoe_gen import router_staged  # set before anything renders: the generated
    if a.split_logits:                      # code, and with it the compile cache's key
        router_staged.STAGED_MAX_STAGES = 0
    router_staged.STAGED_ALL = a.staged_all
    router_staged.STAGED_ROTATE = not a.no_staged_rotate
    rows = run(a)
    from mpi4py import MPI
    if MPI.COMM_WORLD.rank == 0:
        report(rows, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
