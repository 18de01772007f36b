"""Lane-exact emulation, on the CPU, of the persistent router's staged logits
(templates/router_staged.cu.j2, flashmoe_gen.router_staged): the ring's cp.async placement
(load_tile and the gemm tiles' swizzle swz, ported in test_mma_emulation), ldmatrix .x2 /
.x4 and their .trans (PTX ISA: lane t holds row t // 4, elements 2 (t % 4) and + 1 of the
8 x 8 matrix its register names; after .trans, of its transpose), mma.m16n8k16
(test_mma_emulation's emulator, whose control kernel passed its GPU tests), the k lanes'
sums and each warp's writes to s_logit. Compared with a float64 product; then which configs
take the path."""

from __future__ import annotations

import numpy as np
import pytest
from test_mma_emulation import load_tile, mma_16816, swz

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render
from flashmoe_gen.router_layout import router_mma_experts, router_mtiles
from flashmoe_gen.router_staged import STAGED_KC, staged_plan


def ldmatrix(s: np.ndarray, addrs: list[int], n: int = 4,
             trans: bool = False) -> list[list[np.ndarray]]:
    """A warp's ldmatrix.xN: lane l (l < 8 n) gives the address of row l % 8 of matrix
    l // 8; each lane's N registers (two elements each)."""
    mats = [np.stack([s[addrs[8 * m + i]: addrs[8 * m + i] + 8] for i in range(8)])
            for m in range(n)]
    if trans:
        mats = [m.T for m in mats]
    return [[mats[m][t // 4, 2 * (t % 4): 2 * (t % 4) + 2].copy() for m in range(n)]
            for t in range(32)]


def staged_logits(x: np.ndarray, wg: np.ndarray, t0: int, tokens: int, warps: int,
                  batches: int, mtiles: int, stages: int, unit: int, block: int,
                  kc: int = STAGED_KC, rotate: bool = False) -> np.ndarray:
    """s_logit of one block's call (batches x warps token rows), statement by statement;
    rotate (STAGED_ROTATE): the ring's k-tile kt holds hidden stage (kt + the call's index)
    mod the stages, the call's index t0 / (batches x warps)."""
    hidden, experts = wg.shape
    nj, n_per_tile = unit // 8, experts // unit
    units = mtiles * n_per_tile
    kw_n = 1 if units >= warps else warps // units
    per_warp = 1 if kw_n > 1 else units // warps
    nt = min(batches * warps, tokens - t0)
    ra, rb = mtiles * 16 * kc, kc * experts
    sa, sb = np.full(stages * ra, np.nan), np.full(stages * rb, np.nan)
    s_logit = np.full((batches * warps, experts), np.nan)

    def load_stage(stage: int, kt: int) -> None:
        if rotate:
            kt = (kt + t0 // (batches * warps)) % (hidden // kc)
        load_tile(sa[stage * ra:(stage + 1) * ra], x[t0:], 0, nt, kt * kc, mtiles * 16, kc)
        for cb in range(experts // block):
            base = stage * rb + cb * kc * block
            # the weights' column block: its rows k, its columns from cb * block
            load_tile(sb[base:base + kc * block], wg[:, cb * block:], kt * kc, hidden, 0, kc,
                      block)

    def unit_of(warp: int, u: int) -> int:
        return warp % units if kw_n > 1 else warp * per_warp + u

    acc = np.zeros((warps, per_warp, nj, 32, 4))
    kt_n = hidden // kc
    for st in range(min(stages - 1, kt_n)):
        load_stage(st, st)
    for kt in range(kt_n):
        nxt = kt + stages - 1
        if nxt < kt_n:
            load_stage(nxt % stages, nxt)
        a_s, b_s = (kt % stages) * ra, (kt % stages) * rb
        for kk in range(kc // 16):
            for warp in range(warps):
                kw = warp // units if kw_n > 1 else 0
                if kw_n > 1 and (kt * (kc // 16) + kk) % kw_n != kw:
                    continue
                for u in range(per_warp):
                    unit_i = unit_of(warp, u)
                    mt, e0 = unit_i // n_per_tile, (unit_i % n_per_tile) * unit
                    if mt * 16 >= nt:
                        continue
                    a = ldmatrix(sa, [a_s + swz(kc, mt * 16 + (ln & 15), kk * 2 + (ln >> 4))
                                      for ln in range(32)])
                    kr = [kk * 16 + (ln & 7) + ((ln >> 3) & 1) * 8 for ln in range(32)]
                    b = ldmatrix(sb, [b_s + (e0 // block) * kc * block +
                                      swz(block, kr[ln], (e0 % block) // 8 + (ln >> 4) * (nj - 1))
                                      for ln in range(32)], n=2 * nj, trans=True)
                    for j in range(nj):
                        mma_16816(acc[warp, u, j], a, [b[t][2 * j] for t in range(32)],
                                  [b[t][2 * j + 1] for t in range(32)])
    for r in range(kw_n):  # k lane r stores (r = 0) or adds, in turn
        for warp in range(warps):
            if (warp // units if kw_n > 1 else 0) != r:
                continue
            for u in range(per_warp):
                unit_i = unit_of(warp, u)
                mt, e0 = unit_i // n_per_tile, (unit_i % n_per_tile) * unit
                for lane in range(32):
                    g, c = lane >> 2, lane & 3
                    for j in range(nj):
                        for h in range(2):
                            row, e = mt * 16 + g + 8 * h, e0 + j * 8 + 2 * c
                            if row < nt:
                                v = acc[warp, u, j, lane, 2 * h:2 * h + 2]
                                s_logit[row, e:e + 2] = v if r == 0 else s_logit[row, e:e + 2] + v
    return s_logit


@pytest.mark.parametrize("experts,batches,tokens,t0", [
    (64, 4, 100, 64), (64, 4, 90, 64), (128, 4, 40, 0), (64, 4, 3, 0),  # whole units
    (32, 4, 70, 32), (8, 4, 50, 0), (8, 1, 13, 8), (64, 1, 9, 0), (64, 2, 30, 16),  # k lanes
    (128, 1, 20, 8), (16, 2, 16, 0),
    (64, 8, 200, 128), (64, 8, 40, 0), (32, 8, 64, 0),  # 64-token calls: four m16 tiles
    (64, 8, 400, 192), (32, 4, 200, 96)])  # calls 3: rotated by three of four stages
@pytest.mark.parametrize("rotate", [False, True], ids=["from0", "rotated"])
def test_staged_logits_match_a_float64_product(experts, batches, tokens, t0, rotate):
    """Full and ragged calls (26 tokens: the second m16 tile part zeros; 3: its second
    tile skipped), one and two 64-expert column blocks (two units per warp), fewer units
    than warps (E=32: two k lanes; E=8: 8-expert units, four k lanes; 8- and 16-token
    calls), narrow column blocks (E=8, 16, 32), 64-token calls (router_batches 8: E=64 two
    units per warp, E=32 one); each from hidden stage 0 and rotated by its call's index
    (STAGED_ROTATE: the sums' order moves, not what they sum)."""
    rng = np.random.default_rng(experts + tokens)
    hidden, warps = 256, 8
    x = rng.standard_normal((tokens, hidden))
    wg = rng.standard_normal((hidden, experts))
    mtiles = router_mtiles(batches, warps)
    unit = 16 if experts % 16 == 0 else 8
    block = 64 if experts % 64 == 0 else experts
    got = staged_logits(x, wg, t0, tokens, warps, batches, mtiles, 3, unit, block,
                        rotate=rotate)
    nt = min(batches * warps, tokens - t0)
    np.testing.assert_allclose(got[:nt], x[t0:t0 + nt] @ wg, rtol=1e-12, atol=1e-12)
    assert np.isnan(got[nt:]).all()  # rows past the call's tokens: never written


def test_which_configs_take_the_staged_logits(monkeypatch):
    """Transport nvlink's tensor-core router with 16-expert units and every expert in one
    column block (E=64 and 32: router quads, k lanes, 8-token calls), within the tiles'
    shared memory; not the NCCL path's router kernel, not E=8 (8-expert units: the FMA
    router's problems, slower on the GPU) or E=128 (two 64-expert blocks, not yet timed)
    unless STAGED_ALL."""
    from flashmoe_gen import router_staged

    big = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    cfg = KernelConfig.persistent_default(big, "sm_90")
    warps = cfg.router_tokens_per_block
    mt = router_mtiles(cfg.router_batches, warps)
    plan = staged_plan(big, cfg, mt, router_mma_experts(big, warps), True)
    assert cfg.router_batches == 8 and plan.stages >= 3 and (plan.unit, plan.block) == (16, 64)
    code = render(big, cfg, arch="sm_90").code
    assert f"constexpr int RS_STAGES = {plan.stages};" in code
    assert f"constexpr int RS_KC = {STAGED_KC};" in code
    assert "staged_logits(b, x, wg, tokens);" in code
    for p in (big.replace(tokens_per_rank=1024), big.replace(experts=32),
              big.replace(experts=32, tokens_per_rank=1024)):
        c = KernelConfig.persistent_default(p, "sm_90")
        assert "staged_logits(b, x, wg, tokens);" in render(p, c, arch="sm_90").code, p
    others = (big.replace(experts=8), big.replace(experts=128, tokens_per_rank=4096),
              MoEProblem(4096, 14336, 8, 2, world_size=4, tokens_per_rank=4096))
    for p in others:
        c = KernelConfig.persistent_default(p, "sm_90")
        assert "staged_logits" not in render(p, c, arch="sm_90").code, p
    assert staged_plan(big, KernelConfig.default(big, "sm_90"), 2, 64, True) is None
    # each call from its own hidden stage: the ring's loads of both operands move together
    # each call from its own hidden stage by default; off, from stage 0
    rotated = " ".join(code.split())
    monkeypatch.setattr(router_staged, "STAGED_ROTATE", False)
    assert "constexpr bool RS_ROTATE = false;" in render(big, cfg, arch="sm_90").code
    for text in ("constexpr bool RS_ROTATE = true;",
                 "if constexpr (RS_ROTATE) kt = (kt + block / R_BATCHES) % KT; "
                 "load_tile<R_MT * 16, RS_KC, P_THREADS>(sA + stage * RS_A, xt, 0, nt, "
                 "kt * RS_KC, HIDDEN);", "wg + cb * RS_CB, kt * RS_KC, HIDDEN, 0, EXPERTS);"):
        assert text in rotated, text
    monkeypatch.setattr(router_staged, "STAGED_ALL", True)
    for p in others:
        c = KernelConfig.persistent_default(p, "sm_90")
        assert "staged_logits(b, x, wg, tokens);" in render(p, c, arch="sm_90").code, p
