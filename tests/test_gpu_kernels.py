"""Every generated kernel and the whole layer at world size 1, against the float64 reference.

Run on a GPU machine: ``pytest -m gpu``. Inputs are fresh random bf16, outputs poisoned
with a NaN pattern first, relative error <= 1e-2.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error, route
from flashmoe_gen.weights import MoEWeights, random_tokens

pytestmark = pytest.mark.gpu
TOL = 1e-2
POISON = 0xFFFF  # a bf16 NaN

SEED_EXAMPLE = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
DSV2_LITE = MoEProblem(2048, 1408, 64, 6, shared_experts=2, tokens_per_rank=512)
RAGGED = MoEProblem(1024, 704, 16, 4, shared_experts=1, shared_intermediate=512,
                    tokens_per_rank=333)
GPT_OSS_LIKE = MoEProblem(2880, 2880, 60, 4, tokens_per_rank=200)
MANY_EXPERTS = MoEProblem(2048, 2048, 128, 2, tokens_per_rank=512)
DSV3_LIKE = MoEProblem(1024, 512, 256, 8, shared_experts=1, tokens_per_rank=300)


def _layer(problem, config=None, weights=None, seed=0):
    from flashmoe_gen.runtime import FlashMoE
    return FlashMoE(problem, config, weights=weights, seed=seed)


def _run_checked(layer, x_bits: np.ndarray, weights: MoEWeights, capacity: int | None = None):
    """Forward twice (second time with every buffer poisoned) and compare with float64."""
    import cupy

    p = layer.problem
    x = cupy.asarray(x_bits)
    layer.forward(x)  # allocate buffers, then poison them so stale data cannot pass
    layer.poison()
    out = cupy.full((x_bits.shape[0], p.hidden), POISON, np.uint16)
    layer.forward(x, out=out)
    cupy.cuda.Device().synchronize()
    idx, _, _ = layer.last_routing()
    idx = idx.get().astype(np.int64)
    ref = moe_reference(p, [x_bits], weights, topk_idx=[idx], capacity=capacity)
    got = bf16.from_bits(out.get()).astype(np.float64)
    assert np.isfinite(got).all(), "NaN/Inf in the output (unwritten or overflow)"
    err = relative_error(got, ref.out[0])
    assert err <= TOL, f"relative error {err:.3e} > {TOL}"
    # Routing agrees with the reference wherever the k-th and (k+1)-th probs are apart.
    own = route(p, x_bits, weights.gate)
    probs = np.sort(own.probs, axis=1)[:, ::-1]
    if p.top_k < p.experts:
        clear = probs[:, p.top_k - 1] - probs[:, p.top_k] > 1e-4
        assert (np.sort(idx[clear], 1) == np.sort(own.topk_idx[clear], 1)).all()
    return err, ref


@pytest.mark.parametrize("problem,tokens", [
    (SEED_EXAMPLE, 256), (DSV2_LITE, 512), (RAGGED, 333), (GPT_OSS_LIKE, 200),
    (MANY_EXPERTS, 512), (DSV3_LIKE, 300)],
    ids=["seed", "dsv2lite", "ragged333", "h2880_e60", "e128", "e256_k8"])
def test_layer_world_size_1(problem, tokens):
    w = MoEWeights.random(problem, seed=tokens)
    layer = _layer(problem, weights=w)
    x = random_tokens(tokens, problem.hidden, seed=tokens + 1)
    err, _ = _run_checked(layer, x, w)
    print(f"{problem.name}: rel err {err:.2e}")


def test_layer_other_token_counts_and_zero():
    p = SEED_EXAMPLE
    w = MoEWeights.random(p, seed=7)
    layer = _layer(p, weights=w)
    for t in (1, 77, 1000):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t), w)
    import cupy
    out = layer.forward(cupy.zeros((0, p.hidden), np.uint16))
    assert out.shape == (0, p.hidden)


def test_layer_skewed_routing_and_capacity():
    """Most tokens to expert 0: exact mode keeps all; a capacity factor drops the excess."""
    p = MoEProblem(512, 1024, 8, 2, shared_experts=1, tokens_per_rank=300)
    w = MoEWeights.random(p, seed=3)
    g = bf16.from_bits(w.gate)
    g[0, 0] = 4.0
    w.gate = bf16.to_bits(g)
    xf = bf16.from_bits(random_tokens(300, p.hidden, seed=4))
    xf[:240, 0] = 8.0
    x = bf16.to_bits(xf)
    layer = _layer(p, weights=w)
    _, ref = _run_checked(layer, x, w)
    assert layer.dropped_tokens == 0
    assert (ref.routing[0].topk_idx[:, 0] == 0).mean() > 0.7

    pc = p.replace(capacity_factor=1.0)
    layer_c = _layer(pc, weights=w)
    cap = pc.fixed_capacity(layer_c.config.block_m)
    _, ref_c = _run_checked(layer_c, x, w, capacity=cap)
    assert layer_c.capacity == cap
    assert layer_c.dropped_tokens == ref_c.dropped > 0


@pytest.mark.parametrize("gu,dn", [
    (GemmTile(64, 64, 64, 2, 2, 3), GemmTile(64, 128, 64, 2, 4, 3)),
    (GemmTile(128, 64, 32, 4, 2, 4), GemmTile(128, 128, 32, 2, 4, 2)),
    (GemmTile(32, 32, 64, 1, 2, 2), GemmTile(16, 64, 64, 1, 2, 5)),
    (GemmTile(128, 128, 64, 2, 4, 3), GemmTile(256, 128, 64, 4, 2, 3)),
    (GemmTile(128, 128, 64, 8, 1, 4, "wgmma"), GemmTile(128, 128, 64, 8, 1, 3, "wgmma")),
    (GemmTile(64, 64, 64, 4, 1, 3, "wgmma"), GemmTile(64, 256, 64, 4, 1, 3, "wgmma")),
    (GemmTile(64, 32, 64, 4, 1, 5, "wgmma"), GemmTile(64, 128, 64, 2, 4, 3)),
    # Weight streaming: ~83 rows per expert, so several token passes per block; N = 704
    # is not a multiple of bn = 128.
    (GemmTile(64, 64, 64, 4, 1, 4, "ws"), GemmTile(64, 128, 64, 4, 1, 4, "ws")),
    (GemmTile(16, 128, 32, 8, 1, 3, "ws"), GemmTile(128, 128, 64, 2, 4, 3)),
    (GemmTile(32, 32, 64, 2, 1, 6, "ws"), GemmTile(32, 64, 32, 1, 1, 2, "ws")),
    # ... a pass of 128 token rows on 64 threads (each thread sets two rows' pointers: one
    # each, and the layer hung on Qwen3-30B-A3B's shape, 4 x H200)
    (GemmTile(128, 32, 64, 2, 1, 3, "ws"), GemmTile(128, 64, 64, 2, 1, 4)),
    # The persistent TMA kernel: 333 tokens x 4 of 16 experts, N = 704 ragged for bn 128.
    (GemmTile(128, 128, 64, 8, 1, 4, "tma"), GemmTile(128, 256, 64, 8, 1, 3, "tma")),
    (GemmTile(128, 64, 64, 8, 1, 2, "tma"), GemmTile(128, 128, 64, 2, 4, 3)),
], ids=["default_small", "bk32", "tiny_tiles", "big_tiles", "wgmma_128", "wgmma_64_n256",
        "wgmma_mixed", "ws_64", "ws_16_mixed", "ws_32_s6", "ws_128_2warps", "tma_128",
        "tma_mixed_2stages"])
def test_layer_tile_configs(gu, dn):
    p = RAGGED
    cfg = KernelConfig(gu, dn, router_tokens_per_block=4, chunks_per_peer=2)
    w = MoEWeights.random(p, seed=11)
    layer = _layer(p, cfg, weights=w)
    _run_checked(layer, random_tokens(333, p.hidden, seed=12), w)


@pytest.mark.parametrize("mma", ["wgmma", "tma"])
def test_layer_split_gated_mma(mma):
    """Gate and up in two MMAs of BN (config split_gated_mma; the tile cases above issue
    one of 2 BN) on both Hopper kernels, N = 704 ragged for bn 128."""
    gu = GemmTile(128, 128, 64, 8, 1, 4, mma)
    cfg = KernelConfig(gu, dataclasses.replace(gu, bn=256, stages=3),
                       router_tokens_per_block=4, split_gated_mma=True)
    w = MoEWeights.random(RAGGED, seed=13)
    layer = _layer(RAGGED, cfg, weights=w)
    _run_checked(layer, random_tokens(333, RAGGED.hidden, seed=14), w)


@pytest.mark.parametrize("tokens", [1, 5, 24, 97], ids=lambda t: f"t{t}")
def test_weight_streaming_rows_per_expert(tokens):
    """The decode kernel from 1 row per expert up to several passes, on a shape whose K and
    N are not multiples of its tiles (K = 520, 344; N = 344, 520), every expert ragged."""
    p = MoEProblem(520, 344, 32, 4, shared_experts=1, tokens_per_rank=tokens)
    ws = GemmTile(16, 32, 64, 2, 1, 4, "ws")
    cfg = KernelConfig(ws, dataclasses.replace(ws, bn=64), router_tokens_per_block=4)
    w = MoEWeights.random(p, seed=tokens)
    layer = _layer(p, cfg, weights=w)
    _run_checked(layer, random_tokens(tokens, p.hidden, seed=tokens + 3), w)


@pytest.mark.parametrize("skew", [False, True], ids=["spread", "skewed_empty_experts"])
def test_tma_kernel_persistent_loop(skew):
    """More tiles than SMs (each block loops), K and N not multiples of the tiles (K = 1096,
    712), ragged groups, and (skewed) experts that get no rows; called twice per layer so
    the tensor maps are reused, then with another token count."""
    p = MoEProblem(1096, 712, 16, 4, shared_experts=1, tokens_per_rank=2000)
    cfg = KernelConfig(GemmTile(128, 128, 64, 8, 1, 4, "tma"),
                       GemmTile(128, 256, 64, 8, 1, 3, "tma"), router_tokens_per_block=4)
    w = MoEWeights.random(p, seed=41)
    x = random_tokens(2000, p.hidden, seed=42)
    if skew:  # most tokens to experts 0-3, several experts empty
        g = bf16.from_bits(w.gate)
        g[0, :4] = 6.0
        w.gate = bf16.to_bits(g)
        xf = bf16.from_bits(x)
        xf[:, 0] = 4.0
        x = bf16.to_bits(xf)
    layer = _layer(p, cfg, weights=w)
    _run_checked(layer, x, w)
    _run_checked(layer, random_tokens(517, p.hidden, seed=43), w)
    assert 0 < len(layer._tma) <= 8  # one struct per launch site and buffer, reused


def test_nvlink_persistent_kernel_one_rank():
    """Transport "nvlink" on one GPU (no peers): the persistent kernel's phases, task queue,
    shared experts and combine, called with several token counts (epochs advance)."""
    p = SEED_EXAMPLE.replace(tokens_per_rank=300)
    ws = GemmTile(32, 128, 64, 8, 1, 4, "ws")
    cfg = KernelConfig(ws, ws, router_tokens_per_block=8, transport="nvlink")
    w = MoEWeights.random(p, seed=61)
    layer = _layer(p, cfg, weights=w)
    for t in (300, 1, 77):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 5), w)


def test_nvlink_ws_wgmma_one_rank():
    """Weight-streaming tasks on warpgroup MMAs (ws_wgmma) on one GPU: 300 tokens x 2 of 8
    experts (~75 rows: one warpgroup's tokens hold rows, the other's not always), then
    1000 (~250: two passes), 1 and 0; shared experts over every token; outputs poisoned
    and checked against the float64 reference."""
    p = SEED_EXAMPLE.replace(tokens_per_rank=1000)
    ws = GemmTile(128, 128, 64, 8, 1, 4, "ws")
    cfg = KernelConfig(ws, ws, router_tokens_per_block=8, transport="nvlink", ws_tma=True,
                       ws_wgmma=True)
    w = MoEWeights.random(p, seed=63)
    layer = _layer(p, cfg, weights=w)
    for t in (300, 1000, 1, 0):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 7), w)


def test_nvlink_tma_stores_one_rank():
    """The gate/up TMA row tasks' results by TMA stores left in flight into the next task
    (stage_epilogue 3: a tile counted once they are complete, the down tasks' results
    staged) on one GPU: shared experts, ragged row tiles, a 256-wide down tile, at 1000
    tokens (~250 rows per expert), then 77, 1 and 0."""
    p = SEED_EXAMPLE.replace(tokens_per_rank=1000)
    cfg = dataclasses.replace(KernelConfig.persistent_default(p, "sm_90"), stage_epilogue=3,
                              stream_down=False, early_down=False)  # (counted as stored)
    assert cfg.ws_tma and cfg.down.bn == 256, cfg.name
    w = MoEWeights.random(p, seed=67)
    layer = _layer(p, cfg, weights=w)
    for t in (1000, 77, 1, 0):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 11), w)


@pytest.mark.parametrize("case", ["seed_default", "e32_pairs_unstaged"])
def test_nvlink_task_producer_one_rank(case):
    """A producer warpgroup feeding the TMA row tasks (task_producer) on one GPU: the seed
    example's default at 1000 tokens (shared experts by cp.async through the ring's memory,
    the down results staged in it: the producer holds off for both), and E=32 at 4096 tokens
    with two row tiles per task and unstaged results; then fewer tokens (ragged row tiles,
    one token, none), outputs poisoned and checked against the float64 reference."""
    p = (SEED_EXAMPLE.replace(tokens_per_rank=1000) if case == "seed_default" else
         MoEProblem(1024, 1024, 32, 2, tokens_per_rank=4096))
    cfg = dataclasses.replace(KernelConfig.persistent_default(p, "sm_90"), task_producer=True,
                              stream_down=False, early_down=False,  # (waits inputs out)
                              shared_front=False)  # (it claims the tasks)
    if case != "seed_default":
        cfg = dataclasses.replace(cfg, task_tiles=2, stage_epilogue=0)
    cfg.validate(p, "sm_90")
    w = MoEWeights.random(p, seed=69)
    layer = _layer(p, cfg, weights=w)
    for t in (p.tokens_per_rank, 333, 1, 0):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 13), w)


def test_nvlink_task_trace_one_rank():
    """The persistent kernel's task trace (flashmoe_gen.task_trace) on one GPU: the seed
    example's TMA row default at 256 tokens traces every task once, by kind as many as the
    routing gives (the shared expert's 16 x 2 gate/up and 2 x 2 down tiles; per expert
    ceil(rows / 128) row tiles of 16 gate/up and 2 down columns), each taken before its GEMM
    started and ended after; no down GEMM starts before its group's gate/up tiles ended (the
    kernel's dependency counters, seen on the global timer: 2 us of slack for its ticks;
    the default's down tasks without stream_down, which starts them earlier on purpose:
    test_nvlink_stream_down_one_rank)."""
    from flashmoe_gen.task_trace import complete, entries

    p = SEED_EXAMPLE.replace(tokens_per_rank=256)
    w = MoEWeights.random(p, seed=81)
    cfg = dataclasses.replace(KernelConfig.persistent_default(p, "sm_90"), stream_down=False,
                              early_down=False)
    layer = _layer(p, cfg, weights=w)
    x = random_tokens(256, p.hidden, seed=83)
    _run_checked(layer, x, w)
    layer._persistent.enable_stats()
    _run_checked(layer, x, w)
    st = layer._persistent.stats.get()
    assert complete(st)
    got = entries(st)
    idx = layer.last_routing()[0].get().astype(np.int64)
    tiles = -(-np.bincount(idx.ravel(), minlength=p.experts) // 128)
    counts = {k: sum(e["kind"] == k for e in got) for k in
              ("shared_gate_up", "shared_down", "gate_up", "down")}
    assert counts == {"shared_gate_up": 32, "shared_down": 4, "gate_up": 16 * int(tiles.sum()),
                      "down": 2 * int(tiles.sum())}, counts
    assert all(e["took_us"] <= e["start_us"] <= e["end_us"] for e in got)
    for kind, before in (("down", "gate_up"), ("shared_down", "shared_gate_up")):
        for d in (e for e in got if e["kind"] == kind):
            ready = max(g["end_us"] for g in got if g["kind"] == before
                        and (kind == "shared_down" or g["expert"] == d["expert"]))
            assert d["start_us"] >= ready - 2.0, (d, ready)


@pytest.mark.parametrize("early", [False, True], ids=["in_order", "early_down"])
def test_nvlink_stream_down_one_rank(early):
    """Down TMA row tasks that stream their K range (stream_down) on one GPU, in list order
    or ahead of the gate/up tasks in the queue (early_down), where they may wait on gate/up
    tiles no block has taken yet: the seed example's TMA row default at 256 tokens (two
    waves of gate/up tasks), 1000, 77, 1 and 0, then under capacity drops; outputs and
    activations poisoned (a k-tile read before its gate/up n-tile is stored would carry the
    poison), float64 reference. The task trace shows the streaming: some down GEMM starts
    before its group's last gate/up tile ends."""
    from flashmoe_gen.task_trace import entries

    p = SEED_EXAMPLE.replace(tokens_per_rank=1000)
    cfg = dataclasses.replace(KernelConfig.persistent_default(p, "sm_90"), stream_down=True,
                              early_down=early)
    cfg.validate(p, "sm_90")
    w = MoEWeights.random(p, seed=85)
    layer = _layer(p, cfg, weights=w)
    layer._persistent.enable_stats()
    for t in (256, 1000, 77, 1, 0):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 31), w)
        if t == 256:
            got = entries(layer._persistent.stats.get())
            streamed = 0
            for d in (e for e in got if e["kind"] == "down"):
                streamed += d["start_us"] < max(g["end_us"] for g in got if g["kind"] ==
                                                "gate_up" and g["expert"] == d["expert"])
            assert streamed > 0, "no down task started before its gate/up tiles all ended"
    capped = p.replace(capacity_factor=1.0, tokens_per_rank=256)
    w = MoEWeights.random(capped, seed=87)
    layer = _layer(capped, cfg, weights=w)
    _run_checked(layer, random_tokens(256, p.hidden, seed=37), w, capacity=layer.capacity)


@pytest.mark.parametrize("atomic", [False, True], ids=["scan", "atomic_front"])
def test_nvlink_shared_front_one_rank(atomic):
    """The shared experts' gate/up tiles on blocks of their own beside the front
    (shared_front) on one GPU: the seed example's default at 1000 tokens (streamed down
    tasks first), then 256 (the front on 100 of 132 blocks), 77, 1 (one block's front) and
    0, and under capacity drops; with the positions scan or slots by atomics (the last of
    the front's blocks raises the flags); outputs poisoned, float64 reference."""
    p = SEED_EXAMPLE.replace(tokens_per_rank=1000)
    cfg = dataclasses.replace(KernelConfig.persistent_default(p, "sm_90"), shared_front=True,
                              atomic_front=atomic)
    cfg.validate(p, "sm_90")
    w = MoEWeights.random(p, seed=89)
    layer = _layer(p, cfg, weights=w)
    for t in (1000, 256, 77, 1, 0):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 41), w)
    capped = p.replace(capacity_factor=1.0, tokens_per_rank=256)
    w = MoEWeights.random(capped, seed=91)
    layer = _layer(capped, cfg, weights=w)
    _run_checked(layer, random_tokens(256, p.hidden, seed=43), w, capacity=layer.capacity)


@pytest.mark.parametrize("case", ["seed_rows", "e64_fused"])
def test_nvlink_atomic_front_one_rank(case):
    """Rows' slots by atomics as they are routed (atomic_front) on one GPU: the seed
    example's TMA row default at 1000 tokens (shared experts), and E=64's fused weight
    streaming at 1024; then fewer tokens (one, none), outputs poisoned and checked against
    the float64 reference; a capped layer (rows may drop) takes the positions scan."""
    p = (SEED_EXAMPLE.replace(tokens_per_rank=1000) if case == "seed_rows" else
         MoEProblem(1024, 1024, 64, 2, tokens_per_rank=1024))
    cfg = dataclasses.replace(KernelConfig.persistent_default(p, "sm_90"), atomic_front=True)
    w = MoEWeights.random(p, seed=75)
    layer = _layer(p, cfg, weights=w)
    for t in (p.tokens_per_rank, 333, 1, 0):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 17), w)
    capped = p.replace(capacity_factor=1.0)
    w = MoEWeights.random(capped, seed=75)
    layer = _layer(capped, cfg, weights=w)
    _run_checked(layer, random_tokens(p.tokens_per_rank, p.hidden, seed=19), w,
                 capacity=layer.capacity)


@pytest.mark.parametrize("batches", [4, 8])
def test_nvlink_staged_router_one_rank(batches):
    """The persistent router's staged logits (32- or 64-token calls through a shared-memory
    ring, flashmoe_gen.router_staged) on one GPU: E=64 with router quads or eights, a ragged
    last call (2100 = 65 x 32 + 20 tokens = 32 x 64 + 52), then 2048 and 45 (a call of 13
    tokens: its later token tiles empty); routing and outputs checked against the float64
    reference."""
    from flashmoe_gen.router_layout import router_mma_experts, router_mtiles
    from flashmoe_gen.router_staged import staged_plan

    p = MoEProblem(512, 1024, 64, 2, tokens_per_rank=2100)
    cfg = KernelConfig.persistent_default(p, "sm_90")
    assert cfg.router_batches == 4
    cfg = dataclasses.replace(cfg, router_batches=batches)
    mtiles = router_mtiles(batches, 8)
    assert staged_plan(p, cfg, mtiles, router_mma_experts(p, 8), True).stages >= 3
    w = MoEWeights.random(p, seed=71)
    layer = _layer(p, cfg, weights=w)
    for t in (2100, 2048, 45):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + 9), w)


@pytest.mark.parametrize("experts,shared", [(8, 1), (32, 0), (128, 0)])
def test_nvlink_staged_router_all_regimes_one_rank(monkeypatch, experts, shared):
    """The staged logits beyond the measured regime (router_staged.STAGED_ALL): E=8 (the
    FMA router's problems: 8-expert units, eight k lanes adding in turn, shared experts),
    E=32 (router quads: two k lanes), E=128 (8-token calls over two 64-expert blocks);
    routing and outputs against the float64 reference at ragged counts."""
    from flashmoe_gen import router_staged
    from flashmoe_gen.render import render

    monkeypatch.setattr(router_staged, "STAGED_ALL", True)
    p = MoEProblem(512, 1024, experts, 2, shared_experts=shared, tokens_per_rank=2100)
    cfg = KernelConfig.persistent_default(p, "sm_90")
    assert "staged_logits(b, x, wg, tokens);" in render(p, cfg, arch="sm_90").code
    w = MoEWeights.random(p, seed=73 + experts)
    layer = _layer(p, cfg, weights=w)
    for t in (2100, 45):
        _run_checked(layer, random_tokens(t, p.hidden, seed=t + experts), w)


def test_persistent_kernel_with_48kb_dynamic_and_static_shared_memory():
    """Exactly 48 KB of dynamic shared memory plus the router's static array: over the
    default limit, which counts both (2 x H200: "does not fit one SM" until every kernel
    opted in to its dynamic size)."""
    p = MoEProblem(2048, 1408, 64, 6, shared_experts=2, tokens_per_rank=96)
    cfg = KernelConfig(GemmTile(64, 64, 64, 4, 2, 2), GemmTile(128, 128, 32, 2, 4, 3),
                       router_tokens_per_block=8, transport="nvlink", blocks_per_sm=1)
    assert cfg.persistent_smem() == 48 * 1024
    w = MoEWeights.random(p, seed=67)
    layer = _layer(p, cfg, weights=w)
    _run_checked(layer, random_tokens(96, p.hidden, seed=68), w)


@pytest.mark.parametrize("transport", ["nccl", "nvlink"])
def test_split_router_few_and_many_tokens(transport):
    """The split router (gate weights >= 512 KB): several blocks per token batch while
    batches are few (standalone kernel: the last slice to finish sums; persistent kernel:
    items, a barrier, then the sums), one block per batch at many tokens. Right experts and
    output at each count, the same bits on a second call (the sums run in a fixed order)."""
    import cupy

    from flashmoe_gen.router_layout import router_grid

    p = DSV3_LIKE
    cfg = (KernelConfig.persistent_default(p) if transport == "nvlink"
           else KernelConfig.default(p))
    w = MoEWeights.random(p, seed=71)
    layer = _layer(p, cfg, weights=w)
    counts = (1, 5, 64, 300) if transport == "nvlink" else (1, 5, 64, 300, 2100)
    assert router_grid(p, cfg, 1) > 1 and router_grid(p, cfg, 2100) == 2100 // 8 + 1
    for t in counts:
        x = random_tokens(t, p.hidden, seed=t + 70)
        _run_checked(layer, x, w)
        a = layer.forward(cupy.asarray(x)).get()
        b = layer.forward(cupy.asarray(x)).get()
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["exact", "capped"])
def test_layer_packed_slots_one_rank(capacity_factor):
    """Packed slots on one GPU: the row-offset table drives permute, both GEMMs and combine."""
    p = DSV2_LITE.replace(tokens_per_rank=333, capacity_factor=capacity_factor)
    cfg = dataclasses.replace(KernelConfig.default(p), packed_slots=True, chunks_per_peer=3)
    w = MoEWeights.random(p, seed=21)
    layer = _layer(p, cfg, weights=w)
    cap = p.fixed_capacity(cfg.block_m)
    _, ref = _run_checked(layer, random_tokens(333, p.hidden, seed=22), w, capacity=cap)
    assert layer.dropped_tokens == ref.dropped


#: The gate/up activations' own bound (bf16 rounding of the results: ~1e-3 normwise): silu
#: by tanh.approx (config tanh_silu) moves sigmoid by at most 2.5e-4.
ACT_TOL = 4e-3


@pytest.mark.parametrize("mma,tanh_silu", [("sync", False), ("wgmma", False),
                                           ("sync", True), ("wgmma", True)])
def test_expert_gemm_kernels_alone(mma, tanh_silu):
    """Gate/up and down GEMMs on random slots: exact rows written, rows past count untouched.
    K = 720 and 1000 are not multiples of the 64-wide k tile (zero-filled tails). Silu
    exact or by tanh.approx, the activations within ACT_TOL of float64 either way."""
    import cupy

    p = MoEProblem(1000, 720, 16, 4, shared_experts=1, tokens_per_rank=333)
    cfg = KernelConfig.default(p)
    if mma == "wgmma":
        cfg = KernelConfig(GemmTile(128, 64, 64, 8, 1, 3, "wgmma"),
                           GemmTile(64, 128, 64, 4, 1, 4, "wgmma"))
    layer = _layer(p, dataclasses.replace(cfg, tanh_silu=tanh_silu))
    el, h, i = p.local_experts, p.hidden, p.intermediate
    cap = 128
    rng = np.random.default_rng(5)
    counts = rng.integers(0, cap + 1, el).astype(np.int32)
    counts[1] = 0
    counts[2] = cap
    a = bf16.to_bits(rng.standard_normal((el, cap, h), dtype=np.float32))
    a_d, counts_d = cupy.asarray(a), cupy.asarray(counts)
    act = cupy.full((el, cap, i), POISON, np.uint16)
    grouped = dict(counts=counts_d, count_cap=cap, rows_fixed=0, inner_groups=0,
                   a_outer_stride=0, c_outer_stride=0, counts_outer_stride=0, skip_outer=-1,
                   a_row_off=0, c_row_off=0)
    layer.gemm(True, cap, el, A=a_d, a_group_stride=cap * h, B0=layer.w1, B1=layer.w3,
               b_group_stride=i * h, C=act, c_group_stride=cap * i, N=i, K=h, **grouped)
    y = cupy.full((el, cap, h), POISON, np.uint16)
    layer.gemm(False, cap, el, A=act, a_group_stride=cap * i, B0=layer.w2, B1=0,
               b_group_stride=h * i, C=y, c_group_stride=cap * h, N=h, K=i, **grouped)
    act_h, y_h = act.get(), y.get()
    w1 = bf16.from_bits(layer.w1.get()).astype(np.float64)
    w3 = bf16.from_bits(layer.w3.get()).astype(np.float64)
    w2 = bf16.from_bits(layer.w2.get()).astype(np.float64)
    for e in range(el):
        n = counts[e]
        assert (act_h[e, n:] == POISON).all() and (y_h[e, n:] == POISON).all()
        if n == 0:
            continue
        xa = bf16.from_bits(a[e, :n]).astype(np.float64)
        g, u = xa @ w1[e].T, xa @ w3[e].T
        ref_act = g / (1 + np.exp(-g)) * u
        got_act = bf16.from_bits(act_h[e, :n]).astype(np.float64)
        assert relative_error(got_act, ref_act) <= ACT_TOL
        ref_y = got_act @ w2[e].T
        assert relative_error(bf16.from_bits(y_h[e, :n]).astype(np.float64), ref_y) <= TOL


def test_router_and_positions_kernels():
    import cupy

    p = MoEProblem(256, 256, 40, 3, tokens_per_rank=500, normalize_topk=False)
    w = MoEWeights.random(p, seed=21)
    layer = _layer(p, weights=w)
    x = random_tokens(500, p.hidden, seed=22)
    layer.forward(cupy.asarray(x))
    idx, wts, pos = (a.get() for a in layer.last_routing())
    ref = route(p, x, w.gate)
    probs = np.sort(ref.probs, 1)[:, ::-1]
    clear = probs[:, p.top_k - 1] - probs[:, p.top_k] > 1e-4
    assert clear.mean() > 0.9
    assert (idx[clear] == ref.topk_idx[clear]).all()
    np.testing.assert_allclose(wts[clear], ref.topk_w[clear], rtol=2e-2, atol=1e-4)
    # Positions: token order within each expert, counts on the device.
    for e in range(p.experts):
        t, j = np.nonzero(idx == e)
        assert (pos[t, j] == np.arange(len(t))).all()
    assert (layer.counts.get()[0] == np.bincount(idx.ravel(), minlength=p.experts)).all()
