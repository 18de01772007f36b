"""Transport "nvlink" host side on the CPU: heap offsets and the kernel's arguments."""

from __future__ import annotations

import types

import numpy as np
import pytest

from flashmoe_gen.layout import SymmetricLayout
from flashmoe_gen.persistent import ALIGN, HeapLayout, PersistentForward
from flashmoe_gen.render import PERSISTENT_TASK_CLOCKS, PERSISTENT_TRACE_TASKS
from flashmoe_gen.signatures import PERSISTENT


def test_heap_sections_follow_the_layout_aligned():
    lay = SymmetricLayout(world_size=4, local_experts=3, capacity=100, hidden=520)
    h = HeapLayout(lay)
    assert h.counts_off >= lay.elements * 2 and h.counts_off % ALIGN == 0
    assert h.flags_off >= h.counts_off + 4 * 3 * 4 and h.flags_off % ALIGN == 0
    assert h.nbytes >= h.flags_off + 2 * 4 * 8 and h.nbytes % ALIGN == 0
    # The kernel indexes the flags as u64 [2][P] from flags_off: 8-byte aligned.
    assert h.flags_off % 8 == 0


def test_launch_arguments_name_every_parameter():
    """The launch passes each of the kernel's parameters once, packed in signature order."""
    arr = np.zeros(1)
    tok = types.SimpleNamespace(topk_idx=arr, topk_w=arr, pos=arr, shared_act=arr,
                                shared_out=arr)
    w = types.SimpleNamespace(expert_bias=None, w1=arr, w3=arr, w2=arr, sw1=arr, sw3=arr,
                              sw2=arr, shared_gate=None)
    layer = types.SimpleNamespace(_tok=tok, weights=w, w_gate=arr, rank=2)
    pf = object.__new__(PersistentForward)
    lay = HeapLayout(SymmetricLayout(4, 2, 16, 64))
    pf.layer, pf.counts, pf.act, pf.peers, pf.state = layer, arr, arr, arr, arr
    pf.heap = types.SimpleNamespace(base=4096)
    pf.heap_layout, pf.capacity, pf.spin_limit, pf.status_dev = lay, 16, 10**9, 8192
    pf.stats = None  # SM-busy recording off: a null pointer
    pf.wmaps = None  # no TMA weight loads: a null pointer
    args = pf.arguments(arr, 7, arr)
    assert set(args) == set(PERSISTENT.names)
    packed = PERSISTENT.pack(args)
    assert len(packed) == len(PERSISTENT.names)
    assert packed[PERSISTENT.names.index("self_rank")] == 2
    assert packed[PERSISTENT.names.index("flags_off")] == lay.flags_off
    assert packed[PERSISTENT.names.index("bias")] == 0  # no expert bias: a null pointer
    assert packed[PERSISTENT.names.index("stats")] == 0


def test_launch_packs_the_fixed_arguments_once():
    """A forward fills in x, tokens and out; every other argument was packed at the first
    launch (host time per call is the decode latency's floor outside a graph)."""
    import contextlib

    from flashmoe_gen.persistent import _OUT, _TOKENS, _X

    calls, built = [], []
    pf = object.__new__(PersistentForward)
    pf._launch, pf._static, pf.grid = None, [], 132
    layer = types.SimpleNamespace(
        module={"k": lambda grid, block, args, shared_mem: calls.append((grid, block, args,
                                                                          shared_mem))},
        kernels=types.SimpleNamespace(persistent="k"),
        config=types.SimpleNamespace(persistent_threads=256),
        compiled=types.SimpleNamespace(dynamic_smem={"k": 99_000}))
    pf.layer = layer

    def arguments(x, tokens, out):
        built.append(1)
        return {n: 1000 + i for i, n in enumerate(PERSISTENT.names)}

    pf.arguments = arguments

    def buf(ptr):
        return types.SimpleNamespace(data=types.SimpleNamespace(ptr=ptr))

    for t in (5, 0):
        pf.launch(buf(7 + t), t, buf(9 + t), contextlib.nullcontext())
    assert len(built) == 1 and len(calls) == 2
    for (grid, block, args, smem), t in zip(calls, (5, 0), strict=True):
        assert grid == (132,) and block == (256,) and smem == 99_000
        assert args[_X] == 7 + t and args[_TOKENS] == t and args[_OUT] == 9 + t
        rest = [a for i, a in enumerate(args) if i not in (_X, _TOKENS, _OUT)]
        assert rest == [1000 + i for i in range(len(args)) if i not in (_X, _TOKENS, _OUT)]


def test_sm_busy_is_the_gemm_share_of_all_block_cycles():
    from flashmoe_gen.errors import ConfigError

    pf = object.__new__(PersistentForward)
    pf.stats = None
    with pytest.raises(ConfigError, match="enable_stats"):
        pf.sm_busy()
    # busy, total cycles, then start, the phase marks and end (global ns, per block; the
    # blocks start 0-2 us apart)
    us = 1000
    per_block = np.array([[30, 100, *(us * np.array([1000, 1010, 1020, 1040, 1060, 1070,
                                                      1080, 1100]))],
                          [90, 100, *(us * np.array([1002, 1012, 1020, 1040, 1050, 1070,
                                                      1085, 1098]))],
                          [0, 0, *(us * np.array([1001, 1011, 1020, 1040, 1065, 1070, 1080,
                                                  1095]))]], np.uint64)
    pf.stats = types.SimpleNamespace(get=lambda: per_block)
    assert pf.sm_busy() == pytest.approx(120 / 200)
    assert pf.phase_us() == {"route": 12, "positions": 8, "dispatch": 20, "own_tasks": 25,
                             "all_tasks": 5, "combine_wait": 15, "combine": 15}
    assert pf.kernel_us() == 100  # first start to last end, not one block's own span


def test_measure_reads_the_last_call_of_each_chain():
    pf = object.__new__(PersistentForward)
    calls = []

    # chain i's last call: kernel time 100 + i, GEMM share 0.5; earlier calls (which a lone
    # measurement would read: the peers' launch skew) are much slower.
    def forward(x):
        calls.append(x)
        n = len(calls)
        last = n % 3 == 0
        total = 100 + n // 3 if last else 10_000
        marks = [5_000, *(5_000 + 1_000 * np.arange(1, 7)), 5_000 + 1_000 * total]  # ns
        clocks = [0] * len(PERSISTENT_TASK_CLOCKS)  # no TMA row tiles, no waits
        trace = [0] * (1 + 2 * PERSISTENT_TRACE_TASKS)  # no task traced
        pf.stats = types.SimpleNamespace(get=lambda: np.array(
            [[total // 2, total, *marks, *clocks, *trace], [0, total, *marks, *clocks, *trace]],
            np.uint64))

    pf.layer = types.SimpleNamespace(forward=forward, _graph_cache=None)
    pf.stats = None
    pf.enable_stats = lambda: None
    got = pf.measure("x", chain=3, repeats=5)
    assert len(calls) == 15
    assert got["kernel_us"] == 103 and got["sm_busy"] == pytest.approx(0.25, abs=0.01)
    assert got["route"] == 1 and got["combine"] == pytest.approx(103 - 6)
    assert got["row_tiles"] == 0 and got["row_loop_us"] == 0  # no TMA row tiles
    # each block ran `total` cycles over 1000 x total ns: 0.001 GHz
    assert got["sm_ghz"] == pytest.approx(1e-3, abs=1e-4)
    assert got["tl_complete"] == 1.0 and "tl_last_kind" not in got  # no task traced


def test_row_anatomy_converts_each_blocks_cycles_at_its_own_rate():
    """TMA row tiles' prologue, loop and epilogue cycles (summed per block, per GEMM) as us
    per tile, over both GEMMs and per GEMM: each block's cycles over its span on the ns
    timer give its clock rate; the waits as us per block."""
    from flashmoe_gen.persistent import _row_anatomy
    from flashmoe_gen.render import (
        PERSISTENT_STAT_END,
        PERSISTENT_STATS_WORDS,
        PERSISTENT_TASK_CLOCKS,
    )

    st = np.zeros((3, PERSISTENT_STATS_WORDS), np.uint64)
    st[:, 2], st[:, PERSISTENT_STAT_END] = 5_000, 6_000  # 1000 ns each
    st[:, 1] = [2000, 1000, 1500]  # 2, 1 and 1.5 GHz
    at = {k: PERSISTENT_STAT_END + 1 + i for i, k in enumerate(PERSISTENT_TASK_CLOCKS)}

    def put(block, **words):
        for k, v in words.items():
            st[block, at[k]] = v

    # block 0: two gate/up tiles at 2 GHz; block 1: one down tile at 1 GHz
    put(0, gu_prologue=200, gu_loop=1600, gu_epilogue=200, gu_row_tiles=2, dep_wait=600)
    put(1, dn_prologue=100, dn_loop=800, dn_epilogue=400, dn_row_tiles=1, flag_wait=300,
        barrier_wait=1000)
    put(2, dep_wait=1500, barrier_wait=3000, route_logits=1500)  # no row tile
    got = _row_anatomy(st)
    from flashmoe_gen.persistent import _sm_ghz
    assert _sm_ghz(st) == pytest.approx(1.5)  # the blocks' mean clock
    assert got["row_tiles"] == 3 and (got["row_gu_tiles"], got["row_dn_tiles"]) == (2, 1)
    assert got["row_prologue_us"] == pytest.approx(0.2 / 3, abs=1e-3)
    assert got["row_loop_us"] == pytest.approx(1.6 / 3, abs=1e-3)
    assert got["row_epilogue_us"] == pytest.approx(0.5 / 3, abs=1e-3)
    assert got["row_gu_epilogue_us"] == pytest.approx(0.05, abs=1e-3)
    assert got["row_dn_epilogue_us"] == pytest.approx(0.4, abs=1e-3)
    assert got["row_dn_loop_us"] == pytest.approx(0.8, abs=1e-3)
    # waits per block: 0.3, 0 and 1.0 us on dependencies; 0, 0.3 and 0 on flags; 0, 1.0
    # and 2.0 in grid barriers
    assert got["row_dep_wait_us"] == pytest.approx(1.3 / 3, abs=1e-3)
    assert got["row_flag_wait_us"] == pytest.approx(0.1, abs=1e-3)
    assert got["row_barrier_wait_us"] == pytest.approx(1.0, abs=1e-3)
    # the router's logits: 1.0 us on the third block (1.5 GHz), none on the others
    assert got["row_route_logits_us"] == pytest.approx(1.0 / 3, abs=1e-3)
    assert got["row_route_select_us"] == 0


def test_row_anatomy_words_follow_the_template():
    """The kernel writes the block's end at STAT_END and the row tiles' four words after it;
    the TMA row task passes its clocks."""
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import PERSISTENT_STAT_END, PERSISTENT_TASK_CLOCKS, render

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    code = " ".join(render(p, KernelConfig.persistent_default(p, "sm_90")).code.split())
    assert f"constexpr int STAT_END = {PERSISTENT_STAT_END};" in code
    assert f"constexpr int TASK_CLOCKS = {len(PERSISTENT_TASK_CLOCKS)};" in code
    assert (f"constexpr int DEP_WAIT = {PERSISTENT_TASK_CLOCKS.index('dep_wait')}, "
            f"FLAG_WAIT = {PERSISTENT_TASK_CLOCKS.index('flag_wait')};") in code
    assert (f"constexpr int BARRIER_WAIT = "
            f"{PERSISTENT_TASK_CLOCKS.index('barrier_wait')};") in code
    assert (f"constexpr int GU_CLK = {PERSISTENT_TASK_CLOCKS.index('gu_prologue')}, "
            f"DN_CLK = {PERSISTENT_TASK_CLOCKS.index('dn_prologue')};") in code
    # wt_gemm_tile's clk[0..3]: prologue, loop, epilogue, tiles, as the words' order per GEMM
    assert PERSISTENT_TASK_CLOCKS[:8] == tuple(f"{g}_{k}" for g in ("gu", "dn") for k in (
        "prologue", "loop", "epilogue", "row_tiles"))
    assert code.count("grid_sync(state, front, spin_limit, status, task_clk + BARRIER_WAIT);") >= 2
    assert "stats[STATS_WORDS * blockIdx.x + STAT_END] = global_ns();" in code
    assert "for (int i = 0; i < TASK_CLOCKS; ++i) " \
           "stats[STATS_WORDS * blockIdx.x + STAT_END + 1 + i] =" in code
    assert code.count("task_clk + GU_CLK, &pend, wm(7), act_row(s, e)); });") == 1
    assert code.count("m_tiles, task_clk + DN_CLK, &pend); });") == 1  # down tasks
    # the router's two words, logits then choices, next to each other
    route = PERSISTENT_TASK_CLOCKS.index("route_logits")
    assert PERSISTENT_TASK_CLOCKS[route + 1] == "route_select"
    assert f"constexpr int ROUTE_CLK = {route};" in code
    assert ("task_clk[ROUTE_CLK] += c1 - c0, task_clk[ROUTE_CLK + 1] += clock64() - c1;"
            in code)
    # per source: the list's flag wait and the down tasks' dependency waits are timed
    assert code.count("timed_wait(task_clk + FLAG_WAIT,") == 1
    assert code.count("timed_wait(task_clk + DEP_WAIT,") == 2  # shared and routed down
    assert " wait_until([&] { return ld_acquire_gpu(dep" not in code


def test_enable_stats_drops_captured_graphs(monkeypatch):
    import sys

    released = []
    pf = object.__new__(PersistentForward)
    pf.stats, pf.grid = None, 4
    pf.layer = types.SimpleNamespace(_graph_cache=types.SimpleNamespace(
        release=lambda: released.append(1)))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(zeros=np.zeros))
    pf.enable_stats()
    assert released == [1] and pf.stats.shape[0] == 4 and pf._launch is None


def test_stats_words_follow_the_template():
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import PERSISTENT_PHASES, PERSISTENT_STATS_WORDS, render

    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=64)
    code = render(p, KernelConfig.persistent_default(p)).code
    assert f"constexpr int STATS_WORDS = {PERSISTENT_STATS_WORDS};" in code
    assert [f"mark({i});" in code for i in range(len(PERSISTENT_PHASES))] == \
        [True] * len(PERSISTENT_PHASES) and f"mark({len(PERSISTENT_PHASES)});" not in code


def test_collected_shared_heaps_wait_for_a_point_every_rank_reaches():
    """A multi-rank layer's heap is not freed when the layer is collected (cudaFree waits for
    the device, which may wait on a peer's NCCL transfer): release_pending frees it, closing
    every rank's view of the peers' heaps before any rank frees its own."""
    from flashmoe_gen import persistent
    from flashmoe_gen.persistent import _PENDING, _Resources, release_pending

    log = []

    class Heap:
        def __init__(self, name, shared):
            self.name, self.shared = name, shared

        def close_imports(self):
            log.append(("close_imports", self.name))

        def close(self):
            log.append(("free", self.name))

    comm = types.SimpleNamespace(barrier=lambda: log.append(("barrier",)))
    assert _PENDING == []
    _Resources(Heap("one_rank", False), 0).collected()
    assert log == [("free", "one_rank")]  # no peer: freed at once
    log.clear()
    for name in ("a", "b"):
        _Resources(Heap(name, True), 0).collected()
    assert log == [] and len(persistent._PENDING) == 2
    release_pending(comm)
    assert log == [("barrier",), ("close_imports", "a"), ("close_imports", "b"), ("barrier",),
                   ("free", "a"), ("free", "b")]
    assert persistent._PENDING == []
    log.clear()
    _Resources(Heap("c", True), 0).collected()
    release_pending(comm, collective=False)  # Communicator.close: no barrier
    assert log == [("close_imports", "c"), ("free", "c")]


def test_tensor_maps_acquired_once_per_launch():
    """ws_tma: the persistent kernel's thread that issues every TMA box (thread 0, or the
    producer's first with task_producer) acquires each of the maps tile_map_specs lists once
    at its start; no task acquires them again."""
    from dataclasses import replace

    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.persistent import tile_map_specs
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import persistent_tile_maps, render

    rows = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    fused = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=4, tokens_per_rank=300)
    for p in (rows, fused):
        cfg = KernelConfig.persistent_default(p, "sm_90")
        assert cfg.ws_tma
        n = persistent_tile_maps(p, cfg)
        assert n == len(tile_map_specs(p, cfg, 512)) == (8 if p is rows else 6)
        code = " ".join(render(p, cfg).code.split())
        assert f"constexpr int TILE_MAPS = {n};" in code
        assert ("if (wmaps != nullptr && threadIdx.x == TMA_THREAD) for (int i = 0; i < "
                "TILE_MAPS; ++i) tensormap_acquire(wm(i));") in code
        assert "constexpr int TMA_THREAD = TASK_PRODUCER ? P_THREADS : 0;" in code
        assert code.count("tensormap_acquire(") == 2  # its definition and that loop
        off = replace(cfg, ws_tma=False, stage_epilogue=0, ws_wgmma=False)
        assert persistent_tile_maps(p, off) == 0
        assert "constexpr int TILE_MAPS = 0;" in render(p, off).code


def test_router_prefetches_each_calls_rows_into_l2():
    """The persistent router's many-batch loop asks L2 for a call's token rows (one bulk
    request per row, a thread each) before its logits, and for the next call's while it
    computes; a hint only before Hopper."""
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import render

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    code = " ".join(render(p, KernelConfig.persistent_default(p, "sm_90")).code.split())
    for line in (
            'asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\\n" ::"l"(p), "r"(bytes) '
            ': "memory");',
            "if (b0 < batches && threadIdx.x < R_BATCHES * ROUTER_WARPS && r < tokens) "
            "prefetch_l2(x + static_cast<long long>(r) * HIDDEN, HIDDEN * sizeof(elem_t));",
            "prefetch_rows(R_BATCHES * blockIdx.x); for (int b = R_BATCHES * blockIdx.x; b < "
            "batches; b += R_BATCHES * front) { prefetch_rows(b + R_BATCHES * front); "
            "const long long c0 = clock64(); staged_logits(b, x, wg, tokens);"):
        assert line in code, line
    # (E=8 keeps split_logits there: the staged logits only where measured)
    p8 = p.replace(experts=8)
    code = " ".join(render(p8, KernelConfig.persistent_default(p8, "sm_90")).code.split())
    assert ("const long long c0 = clock64(); split_logits(b, 0, HIDDEN, x, wg, tokens, "
            "R_BATCHES);") in code
    assert "#if __CUDA_ARCH__ >= 900 asm volatile(\"cp.async.bulk.prefetch" in code
