"""The distributed layer under mpirun, one GPU per rank, against the float64 reference.

Run on a machine with P GPUs::

    mpirun -np P python -m pytest -m multigpu tests/test_multigpu.py

Every test is collective: all ranks run the same tests in the same order, and the
assertion comes after the collectives so a failing rank cannot leave the others waiting.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.check import check_layer
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.weights import MoEWeights, random_tokens

pytestmark = pytest.mark.multigpu


def _check(comm, problem, tokens_by_rank, config=None, weights=None, seed=0, skew=False):
    from flashmoe_gen.runtime import FlashMoE

    p = problem.replace(world_size=comm.world_size)
    w = weights or MoEWeights.random(p, seed)
    x = random_tokens(tokens_by_rank[comm.rank % len(tokens_by_rank)], p.hidden,
                      seed=seed * 100 + comm.rank)
    if skew:  # most tokens to expert 0 (on rank 0): one rank gets nearly all the traffic
        g = bf16.from_bits(w.gate)
        g[0, 0] = 4.0
        w.gate = bf16.to_bits(g)
        xf = bf16.from_bits(x)
        xf[: int(0.8 * len(xf)), 0] = 8.0
        x = bf16.to_bits(xf)
    if config is not None:
        config.validate(p)
    layer = FlashMoE(p, config, weights=w, comm=comm)
    layer.forward(__import__("cupy").asarray(x))   # allocate, then poison every buffer
    layer.poison()
    res = check_layer(layer, x, w, comm, seed)
    assert res.finite, f"rank {comm.rank}: NaN/Inf in the output"
    assert res.max_rel_error <= 1e-2, f"rank {comm.rank}: rel err {res.rel_error:.3e}"
    assert res.routing_mismatches == 0
    return layer, res


SEED = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
DSV2 = MoEProblem(2048, 1408, 64, 6, shared_experts=2, tokens_per_rank=512)
MIXTRAL = MoEProblem(4096, 14336, 8, 2, tokens_per_rank=512)


@pytest.mark.parametrize("problem", [SEED, DSV2, MIXTRAL], ids=["seed", "dsv2lite", "mixtral"])
def test_shapes(comm, problem):
    _check(comm, problem, [problem.tokens_per_rank])


def test_ragged_and_empty_rank(comm):
    # Ranks see different counts; the last rank sees none at all.
    tokens = [333, 1, 190, 57][: comm.world_size - 1] + [0]
    _check(comm, SEED, tokens, seed=5)


def test_skewed_routing(comm):
    layer, _ = _check(comm, SEED, [300], seed=6, skew=True)
    assert layer.dropped_tokens == 0


def test_capacity_factor_drops(comm):
    p = SEED.replace(capacity_factor=1.0, tokens_per_rank=300)
    layer, _ = _check(comm, p, [300], seed=7, skew=True)
    dropped = comm.mpi.allgather(layer.dropped_tokens)
    assert sum(dropped) > 0
    assert layer.capacity == p.replace(world_size=comm.world_size).fixed_capacity(
        layer.config.block_m)


@pytest.mark.parametrize("chunks,streams,overlap,fuse,packed", [
    (2, 2, True, False, True), (4, 1, True, False, False), (4, 2, True, False, True),
    (1, 1, False, False, True), (1, 2, True, True, True), (2, 1, False, True, False)],
    ids=["chunks2_streams2_packed", "chunks4_expert_slots", "chunks4_streams2_packed",
         "serialized_packed", "fused_packed", "fused_serialized_expert_slots"])
def test_overlap_knobs(comm, chunks, streams, overlap, fuse, packed):
    p = DSV2.replace(world_size=comm.world_size)
    base = KernelConfig.default(p)
    cfg = KernelConfig(base.gate_up, base.down, base.router_tokens_per_block, chunks, streams,
                       shared_stream=overlap, overlap=overlap, fuse_sources=fuse,
                       packed_slots=packed)
    _check(comm, DSV2, [400, 512, 200, 64], config=cfg, seed=8)


# -- weight streaming (decode GEMMs): one block per (n-tile, expert) gathers every source -----
WS_DECODE = MoEProblem(1024, 512, 32, 8, shared_experts=1, tokens_per_rank=24)


@pytest.mark.parametrize("mode,fuse,packed", [
    ("host", True, True), ("host", False, True), ("host", True, False), ("graph", True, True),
    ("graph", False, False)],
    ids=["host_fused_packed", "host_per_source", "host_fused_expert_slots", "graph_fused",
         "graph_per_source_expert_slots"])
def test_weight_streaming_sources(comm, mode, fuse, packed):
    """Few rows per expert from every source (one rank sends none), ragged per source."""
    ws = GemmTile(16, 64, 64, 4, 1, 4, "ws")
    cfg = KernelConfig(ws, dataclasses.replace(ws, bn=128), router_tokens_per_block=4,
                       fuse_sources=fuse, packed_slots=packed, mode=mode)
    _check(comm, WS_DECODE, [24, 3, 0, 17], config=cfg, seed=31)


def test_weight_streaming_fused_expert_slots_many_experts(comm):
    """Fused sources with expert slots and many local experts (256 experts, top 8, the
    DeepSeek-V3 tune's stuck candidate's tiles): one piece per (peer, expert) in each
    group, this rank's own rows copied per expert. Passes on 4 ranks, where the same config
    on the DeepSeek-V3-like shape (H=7168, shared expert) hangs: that cause is still open."""
    ws = GemmTile(32, 128, 32, 8, 1, 4, "ws")
    cfg = KernelConfig(ws, dataclasses.replace(ws, bm=64, bk=64, stages=3),
                       router_tokens_per_block=16, fuse_sources=True, packed_slots=False)
    _check(comm, MoEProblem(512, 256, 256, 8, tokens_per_rank=128), [128, 97, 128, 5],
           config=cfg, seed=33)


@pytest.mark.parametrize("mode,fuse,own", [
    ("host", True, ""), ("host", False, ""), ("graph", True, ""), ("host", True, "split"),
    ("graph", True, "split"), ("host", True, "stream"), ("graph", True, "stream"),
    ("host", True, "gather"), ("host", True, "split_gather")],
    ids=["host_fused", "host_per_source", "graph_fused", "host_fused_own_split",
         "graph_fused_own_split", "host_fused_own_stream", "graph_fused_own_stream",
         "host_fused_gather", "host_fused_own_split_gather"])
def test_tma_kernel_sources(comm, mode, fuse, own):
    """The persistent TMA kernel over every source's slot (fused: one launch for all peers,
    this rank's slot skipped; own_split: this rank's tokens half before, half after it;
    own_stream: those halves on the shared stream beside the fused launches; gather: each
    expert's peer rows in one run, one group per expert), ragged and empty ranks."""
    t = GemmTile(128, 128, 64, 8, 1, 4, "tma")
    cfg = KernelConfig(t, dataclasses.replace(t, bn=256, stages=3), router_tokens_per_block=4,
                       fuse_sources=fuse, packed_slots=True, mode=mode,
                       own_split=own in ("split", "stream", "split_gather"),
                       own_stream=own == "stream", gather_experts="gather" in own)
    _check(comm, DSV2.replace(tokens_per_rank=700), [700, 333, 0, 64], config=cfg, seed=41)


# -- transport "nvlink": one persistent kernel per forward, rows stored over NVLink ------------
NVL_TILE = GemmTile(32, 128, 64, 8, 1, 4, "ws")


def _nvl_cfg(**knobs):
    return KernelConfig(NVL_TILE, dataclasses.replace(NVL_TILE, stages=3),
                        router_tokens_per_block=8, transport="nvlink", **knobs)


#: transport nvlink's cases by the problem each starts with (its tokens per rank: the
#: first call's)
NVL_CASES = (
    (SEED.replace(tokens_per_rank=300),
     ("seed", "graph", "fused_atomic", "fused", "fused_split_k")),
    (DSV2.replace(tokens_per_rank=96),
     ("dsv2lite", "fused_dsv2lite_graph", "fused_ws_tma")),
    (SEED.replace(capacity_factor=1.0, tokens_per_rank=300),
     ("capped_skewed", "capped_skewed_atomic", "fused_capped_skewed",
      "capped_skewed_interleaved")),
    (SEED.replace(tokens_per_rank=1000),
     ("row_tiles", "row_tiles_wgmma", "row_tiles_wgmma_tma", "row_tiles_wgmma_tma_pairs",
      "row_tiles_wgmma_tma_deferred", "row_tiles_wgmma_tma_staged", "row_tiles_wgmma_tma_tstore",
      "row_tiles_wgmma_tma_phased", "row_tiles_phased", "row_tiles_wgmma_tma_producer",
      "row_tiles_wgmma_tma_producer_pairs", "row_tiles_wgmma_tma_atomic", "row_tiles_send_blocks",
      "fused_ws_wgmma", "row_tiles_wgmma_tma_interleaved", "row_tiles_wgmma_tma_own_first",
      "row_tiles_wgmma_tma_down_last", "row_tiles_wgmma_tma_own_first_down_last",
      "row_tiles_wgmma_tma_stream", "row_tiles_wgmma_tma_stream_interleaved",
      "row_tiles_wgmma_tma_stream_own_first", "row_tiles_wgmma_tma_stream_early_interleaved")),
    (SEED.replace(tokens_per_rank=128), ("seed_default_rows",)),
    (DSV2.replace(tokens_per_rank=2200),
     ("dsv2lite_default_producer", "dsv2lite_default_many_batches",
      "dsv2lite_default_quad_batches", "dsv2lite_default_staged", "dsv2lite_default_tstore",
      "dsv2lite_default_interleaved", "dsv2lite_default_own_first",
      "dsv2lite_default_stream_interleaved", "dsv2lite_default_stream_early_interleaved",
      "dsv2lite_default_shared_front")),
    (DSV2.replace(tokens_per_rank=600),
     ("dsv2lite_wgmma_tma_graph",)),
    (DSV2.replace(tokens_per_rank=300),
     ("dsv2lite_default_fused", "dsv2lite_fused_ws128", "dsv2lite_fused_ws_wgmma")),
)


@pytest.mark.parametrize("case", [c for _, cases in NVL_CASES for c in cases])
def test_nvlink_persistent_kernel(comm, case):
    """Ragged ranks (one sends nothing), shared experts, capacity drops under skew, and the
    graph-captured launch; each layer is called again with other token counts (the flags'
    epochs advance, nothing is reset between calls). Fused: tasks over every source's rows,
    results stored into each source's heap; split K: tiles whose rows fit one pass summed
    from parts (the split counters' epochs advance too)."""
    p = next(q for q, cases in NVL_CASES if case in cases)
    knobs = dict(fuse_sources=case.startswith("fused"))
    cfg = _nvl_cfg(mode="graph", **knobs) if case.endswith("graph") else _nvl_cfg(**knobs)
    if case == "fused_split_k":  # K over parts where rows fit one pass (the later calls)
        cfg = dataclasses.replace(cfg, gu_splits=2, dn_splits=4)
    if case == "fused_ws_tma":  # weights by TMA boxes, K split too, shared experts
        cfg = dataclasses.replace(cfg, ws_tma=True, dn_splits=2)
    if case == "fused_ws_wgmma":  # weight streaming on warpgroup MMAs, tokens on the
        # 64-row side: ~270 rows per expert, three 128-token passes (the last part-empty)
        ws = GemmTile(128, 128, 64, 8, 1, 4, "ws")
        cfg = KernelConfig(ws, ws, transport="nvlink", fuse_sources=True, ws_tma=True,
                           ws_wgmma=True)
    if case.startswith("row_tiles") and "wgmma" not in case:  # mma.sync row tiles: several
        # 64-row tiles per (source, expert); send_blocks: 8 blocks send the peers' rows while
        # the others start this rank's own tasks (no grid barrier after the dispatch)
        # phased: every source's gate/up tasks before any down task
        cfg = KernelConfig(GemmTile(64, 128, 64, 2, 4, 4), GemmTile(128, 128, 32, 4, 2, 4),
                           transport="nvlink", send_blocks=8 if "send" in case else 0,
                           phased_tasks=case.endswith("phased"))
    if case == "row_tiles_wgmma":  # two warpgroups per 128-row tile (Hopper, as tma above)
        wg = GemmTile(128, 128, 64, 8, 1, 4, "wgmma")
        cfg = KernelConfig(wg, dataclasses.replace(wg, stages=3), transport="nvlink")
    if "wgmma_tma" in case:  # routed row tasks fed by TMA (the shared experts' by cp.async):
        # the default's 256-wide down tile, and a 3-stage gate/up ring under graph capture
        gu = GemmTile(128, 128, 64, 8, 1, 4 if case.startswith("row") else 3, "wgmma")
        dn = GemmTile(128, 256, 64, 8, 1, 3, "wgmma") if case.startswith("row") else \
            dataclasses.replace(gu, stages=4)
        cfg = KernelConfig(gu, dn, transport="nvlink", ws_tma=True,
                           mode="graph" if case.endswith("graph") else "host",
                           send_blocks=16 if case.endswith("graph") else 0,
                           task_tiles=2 if case.endswith("pairs") else 1,  # ~250 rows:
                           # one task of two row tiles per (source, expert, n-tile), ragged
                           # ones of one; deferred: refills that wait only where they must;
                           # staged: both GEMMs' results in 16-byte stores through the ring;
                           # tstore: the gate/up results by TMA stores left in flight (a tile
                           # counted once they are complete), the down results staged
                           defer_refill=case.endswith("deferred"),
                           stage_epilogue=2 if case.endswith("staged") else
                           3 if case.endswith("tstore") else 0,
                           phased_tasks=case.endswith("phased"))
    if "producer" in case:  # a producer warpgroup claims the tasks and feeds one ring kept
        # across them (both GEMMs 4 stages); the down results staged in the ring (the
        # producer holds off until they are out), the shared experts' tasks by cp.async
        # through its memory (likewise); pairs: two row tiles per task, results unstaged
        if case.startswith("row"):
            gu = GemmTile(128, 128, 64, 8, 1, 4, "wgmma")
            pairs = case.endswith("pairs")
            cfg = KernelConfig(gu, dataclasses.replace(gu, bn=256), transport="nvlink",
                               ws_tma=True, task_producer=True, task_tiles=2 if pairs else 1,
                               stage_epilogue=0 if pairs else 1, phased_tasks=not pairs)
        else:  # the default at 2200 tokens (I = 1408: 11 column tiles; 2 shared experts)
            cfg = dataclasses.replace(KernelConfig.persistent_default(
                p.replace(world_size=comm.world_size)), task_producer=True,
                interleave_sources=False)  # (the producer learns per-source lists)
    if case.endswith("atomic"):  # rows take their slots by atomics as they are routed (no
        # positions scan, no grid barrier before the tasks) where none can drop; capped:
        # every call may drop, so the scan runs (the knob's fallback)
        cfg = dataclasses.replace(KernelConfig.persistent_default(
            p.replace(world_size=comm.world_size)), atomic_front=True)
    if case.startswith("dsv2lite_default_") and case.endswith("batches"):  # the persistent
        # default at 2200 tokens: TMA row tiles, senders, dense lists, shared experts, and a
        # router that takes two 8-token batches per tensor-core tile (275 batches: no hidden
        # slices), or four, two m16 tiles per weight fragment (the last call's three)
        cfg = dataclasses.replace(KernelConfig.persistent_default(
            p.replace(world_size=comm.world_size)),
            router_batches=4 if case.endswith("quad_batches") else 2)
        assert cfg.ws_tma and cfg.gate_up.mma == "wgmma"
    if "_stream" in case:  # the down tasks stream their K range (stream_down): the phased
        # per-source lists (or, below, the one list over every source) n-tile-major, each
        # k-tile loaded once its gate/up n-tile counts every row tile of the group; staged
        cfg = dataclasses.replace(cfg, phased_tasks=True, stage_epilogue=2, stream_down=True)
    if case == "seed_default_rows":  # the persistent default at 128 tokens per rank: on 4
        # ranks (2 local experts: too few fused tasks, defaults.FUSED_MIN_TASKS) TMA row
        # tiles in one list over every source, 128 rows per expert; on 2 fused tasks
        q = p.replace(world_size=comm.world_size)
        cfg = KernelConfig.persistent_default(q)
        assert cfg.fuse_sources == (q.local_experts > 2), cfg.name
        assert cfg.fuse_sources or (cfg.ws_tma and cfg.interleave_sources), cfg.name
    if case == "dsv2lite_default_staged":  # the default at 2200 tokens, the down GEMM's
        # results alone staged (ragged row tiles; the shared experts' tiles unstaged)
        cfg = dataclasses.replace(KernelConfig.persistent_default(
            p.replace(world_size=comm.world_size)), stage_epilogue=1)
        assert cfg.ws_tma and cfg.gate_up.mma == "wgmma"
    if case.endswith(("interleaved", "own_first")):  # one list over every source, an
        # (expert, n-tile)'s tasks of all sources side by side: weight-streaming tiles under
        # capacity drops (one rank sends nothing), TMA row tiles, the default with shared
        # experts; own_first (3+ ranks): the own rows' list ahead of the peers' one list
        if case.endswith("own_first") and comm.world_size < 3:
            pytest.skip("own_first splits the one list from 3 ranks on")
        base = (KernelConfig.persistent_default(p.replace(world_size=comm.world_size))
                if case.startswith("dsv2lite") else cfg)
        cfg = dataclasses.replace(base, phased_tasks=True, interleave_sources=True,
                                  own_first=case.endswith("own_first"),
                                  stream_down=cfg.stream_down, early_down="_early" in case)
    if case.endswith("down_last"):  # this rank's own down tasks after the peers'
        # (own_down_last): the phased per-source lists; with own_first (3+ ranks) the own
        # list's down part after the peers' one list
        own = "own_first" in case
        if own and comm.world_size < 3:
            pytest.skip("own_first splits the one list from 3 ranks on")
        cfg = dataclasses.replace(cfg, phased_tasks=True, interleave_sources=own,
                                  own_first=own, own_down_last=True)
    if case.endswith("shared_front"):  # the shared experts' gate/up tiles beside the front
        # (shared_front): the default at 2200 tokens (17 x 22 shared tiles: half the grid),
        # the send blocks' front on the other half
        cfg = dataclasses.replace(KernelConfig.persistent_default(
            p.replace(world_size=comm.world_size)), shared_front=True)
    if case == "dsv2lite_default_tstore":  # ... and the gate/up results by TMA stores left
        # in flight (I = 1408: 11 column tiles, ragged row tiles, shared experts unstaged)
        cfg = dataclasses.replace(KernelConfig.persistent_default(
            p.replace(world_size=comm.world_size)), stage_epilogue=3)
        assert cfg.ws_tma and cfg.gate_up.mma == "wgmma"
    if case.startswith("dsv2lite_") and "fused" in case:  # the persistent default at 56
        # (2 ranks) or 112 (4 ranks) rows per expert: from WS_WGMMA_MIN_ROWS 128-token tasks
        # on warpgroup MMAs (at 56 rows the second warpgroup's tokens are mostly empty), a
        # 256-wide down tile; every source fused, the weights by TMA boxes, shared experts
        from flashmoe_gen.defaults import WS_WGMMA_MIN_ROWS, expert_rows

        q = p.replace(world_size=comm.world_size)
        cfg = KernelConfig.persistent_default(q)
        assert cfg.fuse_sources and cfg.ws_tma, cfg.name
        assert cfg.ws_wgmma == (expert_rows(q) >= WS_WGMMA_MIN_ROWS), cfg.name
        assert cfg.gate_up.bm == (128 if cfg.ws_wgmma else 64), cfg.name
        if case.endswith(("ws128", "ws_wgmma")):  # 128-token tiles, the down tile 128 wide:
            # on mma.sync (ws128) or warpgroup MMAs (one K range per task; most experts'
            # second warpgroup has no rows)
            ws = GemmTile(128, 128, 64, 8, 1, 4, "ws")
            cfg = dataclasses.replace(cfg, gate_up=ws, down=ws, gu_splits=1, dn_splits=1,
                                      ws_wgmma=case.endswith("ws_wgmma"))
    tokens = [p.tokens_per_rank, 77, 0, 5]
    skewed = "capped_skewed" in case
    layer, _ = _check(comm, p, tokens, config=cfg, seed=51, skew=skewed)
    if skewed:
        assert sum(comm.mpi.allgather(layer.dropped_tokens)) > 0
        return  # the layer's gate is the skewed one: the calls below use plain weights
    q = p.replace(world_size=comm.world_size)
    w = MoEWeights.random(q, 51)
    # (odd ranks, even ranks): at most 8 tokens take the solo front (no grid barrier before
    # the tasks), on one rank or on all.
    for i, (t_odd, t_even) in enumerate([(13, 40), (p.tokens_per_rank, 40), (0, 40), (3, 1),
                                         (8, 0)]):
        layer.poison()
        res = check_layer(layer, random_tokens(t_odd if comm.rank % 2 else t_even, q.hidden,
                                               seed=700 + i + 10 * comm.rank), w, comm)
        assert res.max_rel_error <= 1e-2 and res.routing_mismatches == 0, (i, res)


def test_nvlink_direct_graph_replays_read_the_callers_current_input(comm):
    """A decode loop's pattern: the same x and out buffers every call, new tokens written
    into x in place. From the second call on a graph captured with those buffers replays
    (no copies); every output must match the reference of that call's tokens."""
    import cupy

    from flashmoe_gen.check import POISON
    from flashmoe_gen.reference import moe_reference, relative_error
    from flashmoe_gen.runtime import FlashMoE

    p = SEED.replace(world_size=comm.world_size, tokens_per_rank=8)
    w = MoEWeights.random(p, 61)
    layer = FlashMoE(p, dataclasses.replace(KernelConfig.persistent_default(p), mode="graph"),
                     weights=w, comm=comm)
    x = cupy.empty((8, p.hidden), np.uint16)
    out = cupy.empty((8, p.hidden), np.uint16)
    for i in range(4):
        x_bits = random_tokens(8, p.hidden, seed=900 + i + 10 * comm.rank)
        x.set(x_bits)
        out.fill(POISON)
        layer.forward(x, out=out)
        got = bf16.from_bits(out.get()).astype(np.float64)
        xs = [np.zeros((0, p.hidden), np.uint16)] * p.world_size
        xs[comm.rank] = x_bits
        want = moe_reference(p, xs, w).out[comm.rank]
        err = max(comm.mpi.allgather(relative_error(got, want)))
        assert err <= 1e-2, (i, err)
    assert layer._graph_cache.direct_captures == 1  # captured on call 2, replayed on 3, 4


@pytest.mark.parametrize("packed", [False, True], ids=["expert_slots", "packed"])
def test_slot_layouts_skewed_and_capped(comm, packed):
    """Both row placements under skew, with and without a capacity factor (full slots)."""
    for p, seed in ((SEED.replace(tokens_per_rank=300), 11),
                    (SEED.replace(capacity_factor=1.0, tokens_per_rank=300), 12)):
        q = p.replace(world_size=comm.world_size)
        cfg = dataclasses.replace(KernelConfig.default(q), packed_slots=packed)
        _check(comm, p, [300, 120, 7, 300], config=cfg, seed=seed, skew=True)


def test_repeated_calls_grow_capacity(comm):
    """Exact mode: a call that needs a larger C grows the slots; later calls reuse them."""
    from flashmoe_gen.runtime import FlashMoE

    p = SEED.replace(world_size=comm.world_size)
    w = MoEWeights.random(p, 9)
    layer = FlashMoE(p, weights=w, comm=comm)
    caps = []
    for i, t in enumerate([64, 512, 128]):
        res = check_layer(layer, random_tokens(t, p.hidden, seed=900 + i + 10 * comm.rank), w,
                          comm)
        caps.append(layer.capacity)
        assert res.max_rel_error <= 1e-2
    assert caps[1] >= caps[0] and caps[2] == caps[1]
    assert len(set(comm.mpi.allgather(tuple(caps)))) == 1  # every rank, the same layout
    assert np.all(np.array(caps) % layer.config.block_m == 0)


# -- mode "graph": device-side counts, fixed-size transfers, one CUDA graph per token count ----
def _graph_cfg(comm, problem, **knobs):
    q = problem.replace(world_size=comm.world_size)
    return dataclasses.replace(KernelConfig.default(q), mode="graph", **knobs)


@pytest.mark.parametrize("case", ["seed", "dsv2lite_chunks2_streams2", "fused", "expert_slots",
                                  "serialized"])
def test_graph_mode_matches_reference(comm, case):
    knobs = {"seed": {}, "dsv2lite_chunks2_streams2": dict(chunks_per_peer=2, comm_streams=2),
             "fused": dict(fuse_sources=True), "expert_slots": dict(packed_slots=False),
             "serialized": dict(overlap=False, shared_stream=False)}[case]
    p = DSV2 if case.startswith("dsv2") else SEED
    layer, _ = _check(comm, p, [p.tokens_per_rank, 100, 37, 5],
                      config=_graph_cfg(comm, p, **knobs), seed=20)
    assert layer._graph_cache is not None and layer._graph_cache.captures >= 1


def test_graph_mode_ragged_empty_and_skewed(comm):
    p = SEED.replace(tokens_per_rank=333)
    tokens = [333, 1, 190, 57][: comm.world_size - 1] + [0]
    _check(comm, p, tokens, config=_graph_cfg(comm, p), seed=21)
    layer, _ = _check(comm, p, [300], config=_graph_cfg(comm, p), seed=22, skew=True)
    assert layer.dropped_tokens == 0  # exact mode: C is the true worst case


def test_graph_mode_capacity_drops(comm):
    p = SEED.replace(capacity_factor=1.0, tokens_per_rank=300)
    layer, _ = _check(comm, p, [300], config=_graph_cfg(comm, p), seed=23, skew=True)
    assert sum(comm.mpi.allgather(layer.dropped_tokens)) > 0  # counted on the device
    assert layer.capacity == p.replace(world_size=comm.world_size).fixed_capacity(
        layer.config.block_m)


def test_graph_mode_token_count_changes_between_calls(comm):
    """One layer, token counts changing per call and per rank (a new graph per count, the
    old ones replayed), every buffer poisoned before each call."""
    import cupy

    from flashmoe_gen.runtime import FlashMoE

    p = SEED.replace(world_size=comm.world_size, tokens_per_rank=300)
    w = MoEWeights.random(p, 24)
    layer = FlashMoE(p, _graph_cfg(comm, p), weights=w, comm=comm)
    errs = []
    schedule = [64, 300, 64, 0, 300, 17]
    for i, t in enumerate(schedule):
        t = t if (comm.rank + i) % 3 else max(t - 7 * comm.rank, 0)
        layer.poison()
        res = check_layer(layer, random_tokens(t, p.hidden, seed=2400 + i + 10 * comm.rank), w,
                          comm)
        errs.append(res.max_rel_error if res.finite else float("inf"))
    cupy.cuda.Device().synchronize()
    assert max(errs) <= 1e-2, errs
    assert layer._graph_cache.captures == len(set(layer._graph_cache.graphs))
