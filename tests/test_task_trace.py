"""The persistent kernel's task trace on the CPU: the words the template writes
(``traced``, ``task_desc``) decoded by flashmoe_gen.task_trace onto the kernel's clock, the
ring of each block's last entries, and the timeline per kind of task."""
import numpy as np
import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import (
    PERSISTENT_STATS_WORDS,
    PERSISTENT_TRACE_AT,
    PERSISTENT_TRACE_TASKS,
    render,
)
from flashmoe_gen.task_trace import KINDS, complete, entries, timeline, timeline_text


def desc(kind, s, e, n):  # the template's task_desc
    return kind << 30 | min(s, 63) << 24 | (e & 1023) << 14 | (n & 16383)


def put(st, block, i, kind, s, e, n, took_ns, start_ns, end_ns):
    """Entry i of the block's ring, as traced writes it (times in ns since its start)."""
    at = PERSISTENT_TRACE_AT + 1 + 2 * (i % PERSISTENT_TRACE_TASKS)
    st[block, at] = took_ns << 32 | start_ns
    st[block, at + 1] = end_ns << 32 | desc(kind, s, e, n)
    st[block, PERSISTENT_TRACE_AT] = i + 1


def test_the_template_writes_what_the_decoder_reads():
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=4, tokens_per_rank=256)
    code = " ".join(render(p, KernelConfig.persistent_default(p, "sm_90")).code.split())
    for text in (
            f"constexpr int TRACE_AT = {PERSISTENT_TRACE_AT}, TRACE_TASKS = "
            f"{PERSISTENT_TRACE_TASKS};",
            "return static_cast<unsigned>(kind) << 30 | static_cast<unsigned>(min(s, 63)) << "
            "24 | static_cast<unsigned>(e & 1023) << 14 | static_cast<unsigned>(n & 16383);",
            "unsigned long long* w = tr.row + TRACE_AT + 1 + 2 * (tr.n % TRACE_TASKS); "
            "w[0] = tr.took << 32 | tr.start; w[1] = (global_ns() - tr.ns0) << 32 | tr.desc;",
            "stats[STATS_WORDS * blockIdx.x + TRACE_AT] = trace.n;",
            "traced(busy, trace, task_desc(0, 0, 0, n),",
            "traced(busy, trace, task_desc(1, 0, 0, n),",
            "traced(busy, trace, task_desc(2, s, e, n),",
            "traced(busy, trace, task_desc(3, s, e, n),",
            "took_task(); if (threadIdx.x == 0) task = static_cast<int>(atomicAdd(state + "
            "ST_TASK, 1ull));"):
        assert text in code, text
    assert "timed(busy, [&]" not in code  # every task GEMM is traced


def test_entries_and_timeline_on_the_kernels_clock():
    st = np.zeros((2, PERSISTENT_STATS_WORDS), np.uint64)
    st[:, 2] = [10_000, 12_000]  # the blocks' starts (ns): block 1 2 us later
    put(st, 0, 0, 0, 0, 0, 3, 100, 200, 9_200)          # shared gate/up 0.2-9.2 us
    put(st, 0, 1, 1, 0, 0, 1, 9_300, 9_500, 40_500)     # shared down 9.5-40.5
    put(st, 1, 0, 2, 2, 5, 7, 0, 1_000, 8_000)          # gate/up (source 2, expert 5) 3-10
    put(st, 1, 1, 3, 2, 5, 1, 8_100, 10_000, 30_000)    # down 12-32
    got = entries(st)
    assert [(e["block"], e["kind"]) for e in got] == [(0, "shared_gate_up"), (0, "shared_down"),
                                                      (1, "gate_up"), (1, "down")]
    assert (got[2]["source"], got[2]["expert"], got[2]["n"]) == (2, 5, 7)
    assert got[3]["start_us"] == pytest.approx(12.0) and got[3]["end_us"] == pytest.approx(32.0)
    tl = timeline(st)
    assert tl["tl_shared_down_first_us"] == 9.5 and tl["tl_shared_down_last_us"] == 40.5
    assert tl["tl_shared_down_gemm_us"] == 31.0 and tl["tl_shared_down_wait_us"] == 0.2
    assert tl["tl_down_wait_us"] == 1.9 and tl["tl_gate_up_n"] == 1
    assert KINDS[int(tl["tl_last_kind"])] == "shared_down" and tl["tl_last_end_us"] == 40.5
    assert tl["tl_complete"] == 1.0
    text = timeline_text(tl)
    assert "shared_down (1) 9.5-40.5 us, GEMM 31.0, wait 0.2" in text
    assert text.endswith("last: shared_down 9.5-40.5")


def test_the_ring_keeps_each_blocks_last_tasks():
    st = np.zeros((1, PERSISTENT_STATS_WORDS), np.uint64)
    total = PERSISTENT_TRACE_TASKS + 5
    for i in range(total):
        put(st, 0, i, 2, 0, 0, i, 1_000 * i, 1_000 * i + 100, 1_000 * i + 900)
    got = entries(st)
    assert len(got) == PERSISTENT_TRACE_TASKS and not complete(st)
    assert [e["n"] for e in got] == list(range(5, total))  # oldest first
    assert "last 64 tasks" in timeline_text(timeline(st))
    assert timeline(np.zeros((3, PERSISTENT_STATS_WORDS), np.uint64)) == {"tl_complete": 1.0}
