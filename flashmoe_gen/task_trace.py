"""The persistent kernel's task trace (its stats buffer, render.PERSISTENT_TRACE_AT): per
block, its last ``PERSISTENT_TRACE_TASKS`` task GEMMs, each with its descriptor (kind,
source, local expert, n-tile: templates/persistent.cu.j2 ``task_desc``) and, in ns since
the block's start, when the block took the task, when its GEMM started and when it ended.

``entries`` decodes them onto the kernel's clock (us since the first block's start);
``timeline`` condenses them per kind of task (when the first started and the last ended,
the mean GEMM and the mean wait from taking a task to its GEMM: dependencies, flags) and
names the task that ended last: where a forward's task phase is spent and which chain
closes it.
"""

from __future__ import annotations

import numpy as np

from .render import PERSISTENT_TRACE_AT, PERSISTENT_TRACE_TASKS

#: Task kinds by the descriptor's top two bits (task_desc's first argument).
KINDS = ("shared_gate_up", "shared_down", "gate_up", "down")
#: ``timeline``'s figures per kind, then its summary of the task that ended last.
FIGURES = ("n", "first_us", "last_us", "gemm_us", "wait_us")


def entries(st: np.ndarray) -> list[dict]:
    """Every block's traced tasks (its last PERSISTENT_TRACE_TASKS), oldest first per block:
    block, kind, source (the kernel's SOURCES for a fused task: every source), expert,
    n-tile and times in us since the kernel's start (the earliest block's start)."""
    st = np.asarray(st).astype(np.uint64)
    starts = st[:, 2].astype(np.int64)
    t0 = int(starts.min()) if len(st) else 0
    out = []
    for b, row in enumerate(st):
        n = int(row[PERSISTENT_TRACE_AT])
        base_us = (int(starts[b]) - t0) / 1e3
        for i in range(max(0, n - PERSISTENT_TRACE_TASKS), n):
            at = PERSISTENT_TRACE_AT + 1 + 2 * (i % PERSISTENT_TRACE_TASKS)
            w0, w1 = int(row[at]), int(row[at + 1])
            desc = w1 & 0xFFFFFFFF
            out.append({"block": b, "kind": KINDS[desc >> 30], "source": desc >> 24 & 63,
                        "expert": desc >> 14 & 1023, "n": desc & 16383,
                        "took_us": base_us + (w0 >> 32) / 1e3,
                        "start_us": base_us + (w0 & 0xFFFFFFFF) / 1e3,
                        "end_us": base_us + (w1 >> 32) / 1e3})
    return out


def complete(st: np.ndarray) -> bool:
    """Whether the trace holds every block's every task (none ran more than the ring)."""
    return bool((np.asarray(st)[:, PERSISTENT_TRACE_AT] <= PERSISTENT_TRACE_TASKS).all())


def timeline(st: np.ndarray) -> dict[str, float]:
    """Per kind with traced tasks, ``tl_<kind>_<figure>`` (FIGURES): the count, the first
    GEMM's start and the last one's end, the mean GEMM and the mean wait from taking a task
    to its GEMM, in us on the kernel's clock; then the task that ended last: its kind (an
    index into KINDS), start and end (``tl_last_kind``, ``tl_last_start_us``,
    ``tl_last_end_us``), and ``tl_complete`` (1.0 where every task is in the trace; else
    the counts and the first starts are the last PERSISTENT_TRACE_TASKS per block's)."""
    got = entries(st)
    out: dict[str, float] = {}
    for kind in KINDS:
        mine = [e for e in got if e["kind"] == kind]
        if not mine:
            continue
        figures = (len(mine), min(e["start_us"] for e in mine),
                   max(e["end_us"] for e in mine),
                   float(np.mean([e["end_us"] - e["start_us"] for e in mine])),
                   float(np.mean([e["start_us"] - e["took_us"] for e in mine])))
        out |= {f"tl_{kind}_{f}": round(float(v), 2)
                for f, v in zip(FIGURES, figures, strict=True)}
    if got:
        last = max(got, key=lambda e: e["end_us"])
        out |= {"tl_last_kind": float(KINDS.index(last["kind"])),
                "tl_last_start_us": round(last["start_us"], 2),
                "tl_last_end_us": round(last["end_us"], 2)}
    return out | {"tl_complete": float(complete(st))}


def timeline_text(tl: dict[str, float]) -> str:
    """``timeline``'s figures as "shared_down (4) 9.8-44.5 us, GEMM 33.1, wait 0.4; ...;
    last: shared_down 11.2-44.5" (empty without a trace)."""
    parts = []
    for kind in KINDS:
        if f"tl_{kind}_n" in tl:
            parts.append(f"{kind} ({int(tl[f'tl_{kind}_n'])}) {tl[f'tl_{kind}_first_us']}-"
                         f"{tl[f'tl_{kind}_last_us']} us, GEMM {tl[f'tl_{kind}_gemm_us']}, "
                         f"wait {tl[f'tl_{kind}_wait_us']}")
    if "tl_last_kind" in tl:
        parts.append(f"last: {KINDS[int(round(tl['tl_last_kind']))]} "
                     f"{tl['tl_last_start_us']}-{tl['tl_last_end_us']}")
    if parts and not tl.get("tl_complete", 1.0):
        parts.append(f"(each block's last {PERSISTENT_TRACE_TASKS} tasks)")
    return "; ".join(parts)
