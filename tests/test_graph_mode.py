"""Mode "graph" on the CPU: the knob, the fixed sizes, the plan and the row-offset rule.

The GPU side (capture, replay, poisoned buffers between replays, ragged and changing token
counts) is in tests/test_gpu_graph.py and tests/test_multigpu.py.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.layout import fixed_row_offsets
from flashmoe_gen.plan import Call, ExchangeCounts, Gemms, Lit, build_plan, fixed_slots
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.runtime import graph_memory_bytes
from flashmoe_gen.tuner.space import SearchSpace

DSV2 = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=4, tokens_per_rank=512)
CAPPED = MoEProblem(1024, 704, 16, 4, world_size=2, capacity_factor=1.25, tokens_per_rank=333)


def _graph(problem, **knobs) -> KernelConfig:
    return dataclasses.replace(KernelConfig.default(problem), mode="graph", **knobs)


def test_mode_knob_names_and_validation():
    cfg = _graph(DSV2)
    assert "__pk__graph" in cfg.name and KernelConfig.from_name(cfg.name) == cfg
    assert KernelConfig.from_json(cfg.to_json()) == cfg
    assert "graph" not in KernelConfig.default(DSV2).name  # host mode: names unchanged
    with pytest.raises(ConfigError, match="mode.*choose one of \\['host', 'graph'\\]"):
        dataclasses.replace(cfg, mode="eager").validate(DSV2)
    assert SearchSpace.for_problem(DSV2, "sm_90", "full").choices["mode"] == ("host", "graph")
    assert SearchSpace.for_problem(DSV2, "sm_90", "small").choices["mode"] == ("host",)
    space = SearchSpace.for_problem(DSV2, "sm_90", "full")
    assert space.config_from_params(space.params_from_config(cfg)) == cfg


@pytest.mark.parametrize("chunks", [1, 3, 16])
@pytest.mark.parametrize("packed", [True, False])
def test_fixed_slots_bound_every_source(chunks, packed):
    """Exact mode: C = T (an expert gets at most one row per token of a source); a chunk's
    region holds the most one source can send its experts; regions tile the slot."""
    cfg = _graph(DSV2, chunks_per_peer=chunks, packed_slots=packed)
    f = fixed_slots(DSV2, cfg)
    el, t, k = DSV2.local_experts, DSV2.tokens_per_rank, DSV2.top_k
    assert f.capacity == t and len(f.chunk_rows) == min(chunks, el)
    assert f.chunk_base[0] == 0 and sum(f.chunk_rows) <= el * f.capacity
    for c in range(1, len(f.chunk_base)):
        assert f.chunk_base[c] == f.chunk_base[c - 1] + f.chunk_rows[c - 1]
    if packed and chunks == 1:
        assert f.chunk_rows == (t * k,)  # not el * C: each token sends a rank <= k rows
    capped = fixed_slots(CAPPED, _graph(CAPPED))
    assert capped.capacity == CAPPED.fixed_capacity(_graph(CAPPED).block_m)


@pytest.mark.parametrize("packed", [True, False])
def test_fixed_row_offsets_stay_in_their_regions(packed):
    """Random and extreme counts: every expert's rows lie inside its chunk's region, and no
    two experts of one (source, destination) slot share a row."""
    cfg = _graph(DSV2, chunks_per_peer=3, packed_slots=packed)
    f = fixed_slots(DSV2, cfg)
    from flashmoe_gen.config import expert_chunks
    chunks = expert_chunks(DSV2, cfg)
    region = f.region
    rng = np.random.default_rng(0)
    el, t, k = DSV2.local_experts, DSV2.tokens_per_rank, DSV2.top_k
    cases = [rng.integers(0, t + 1, (4, 64)), np.full((4, 64), t), np.zeros((4, 64), int)]
    for counts in cases:
        # a real source sends each rank at most t * min(k, |chunk|) rows per chunk
        for s, d, (e0, e1) in itertools.product(range(4), range(4), chunks):
            cols = slice(d * el + e0, d * el + e1)
            over = counts[s, cols].sum() - t * min(k, e1 - e0)
            while over > 0:
                j = int(np.argmax(counts[s, cols]))
                take = min(over, counts[s, cols][j])
                counts[s, d * el + e0 + j] -= take
                over -= take
        off = fixed_row_offsets(counts, f.capacity, el, region, packed)
        for s, d in itertools.product(range(4), range(4)):
            used = np.zeros(el * f.capacity, bool)
            for c, (e0, e1) in enumerate(chunks):
                for j in range(e0, e1):
                    n = min(counts[s, d * el + j], f.capacity)
                    r0 = off[s, d * el + j]
                    assert f.chunk_base[c] <= r0 and r0 + n <= f.chunk_base[c] + f.chunk_rows[c]
                    assert not used[r0:r0 + n].any()
                    used[r0:r0 + n] = True


def test_graph_plan_reads_nothing_on_the_host():
    """Device counts, fixed transfers and fixed GEMM grids: no expression calls a host
    helper of the count tables."""
    for knobs in (dict(), dict(fuse_sources=True), dict(chunks_per_peer=4, comm_streams=2),
                  dict(overlap=False), dict(packed_slots=False)):
        cfg = _graph(DSV2, **knobs)
        plan = build_plan(DSV2, cfg)
        f = fixed_slots(DSV2, cfg)
        assert ExchangeCounts(device=True) in plan.ops
        transfers = plan.transfers()  # those of NCCL groups too
        assert transfers and all(op.rows is not None for op in transfers)
        assert {(op.base, op.rows) for op in transfers} == set(zip(f.chunk_base, f.chunk_rows,
                                                                   strict=True))
        for op in plan.ops:
            if isinstance(op, Gemms) and op.step is not None or \
                    isinstance(op, Gemms) and "fused" in op.what:
                for g in op.launches:
                    assert g.rows == Lit(f.capacity)
                    assert not any(isinstance(a, Call) for _, a in g.args)
    host = build_plan(DSV2, KernelConfig.default(DSV2))
    assert ExchangeCounts(device=False) in host.ops
    assert all(op.rows is None for op in host.transfers())


def test_graph_memory_grows_with_the_token_bound():
    cfg = _graph(DSV2)
    small, big = (graph_memory_bytes(DSV2.replace(tokens_per_rank=t), cfg) for t in (128, 512))
    assert 3.5 < big / small < 4.5
    # the symmetric tensor dominates: 4 * P * E_local * C * H bf16 values
    assert big > 4 * 4 * 16 * 512 * 2048 * 2


def test_direct_graphs_are_captured_on_the_second_call_with_the_same_buffers():
    """Transport nvlink: a caller reusing its x and out buffers (a decode loop) gets a graph
    captured with its own pointers from the second call on; other calls copy through the
    static buffers (None here)."""
    import types

    from flashmoe_gen.graphs import MAX_GRAPHS, GraphCache

    gc = object.__new__(GraphCache)
    gc.direct, gc.direct_captures, gc._last_key = __import__("collections").OrderedDict(), 0, None
    ran = []

    class Stream:
        def begin_capture(self):
            ran.append("begin")

        def end_capture(self):
            return f"graph{len(ran)}"

    def buf(ptr, rows=3):
        return types.SimpleNamespace(shape=(rows, 8), data=types.SimpleNamespace(ptr=ptr))

    def run_plan(x, tokens, out):
        ran.append((x.data.ptr, tokens, out.data.ptr))

    s = Stream()
    assert gc._direct(run_plan, buf(100), buf(200), s) is None  # first sight: static path
    g = gc._direct(run_plan, buf(100), buf(200), s)  # second in a row: captured
    assert g is not None and ran == ["begin", (100, 3, 200)] and gc.direct_captures == 1
    assert gc._direct(run_plan, buf(100), buf(200), s) is g and gc.direct_captures == 1
    assert gc._direct(run_plan, buf(100), buf(300), s) is None  # another out buffer
    assert gc._direct(run_plan, buf(100, rows=1), buf(200), s) is None  # another T
    assert gc._direct(run_plan, buf(100), buf(200), s) is g  # kept
    # A captured direct graph is found without capturing (FlashMoE.forward launches it on
    # the caller's stream); anything else is left to the layer stream's path.
    gc._direct_ok = True
    assert gc.captured_direct(buf(100), buf(200)) is g and gc._last_key == (3, 100, 200)
    assert gc.captured_direct(buf(100), buf(300)) is None and gc.direct_captures == 1
    gc._direct_ok = False  # transport nccl: never
    assert gc.captured_direct(buf(100), buf(200)) is None
    for i in range(MAX_GRAPHS + 3):  # bounded, oldest first
        gc._direct(run_plan, buf(1000 + i), buf(200), s)
        gc._direct(run_plan, buf(1000 + i), buf(200), s)
    assert len(gc.direct) == MAX_GRAPHS and (3, 100, 200) not in gc.direct
