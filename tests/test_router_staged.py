"""Lane-exact emulation, on the CPU, of the persistent router's staged logits
(templates/router_staged.cu.j2, flashmoe_gen.router_staged): the ring's cp.async placement
(load_tile and the gemm tiles' swizzle swz), ldmatrix .x4 and .x4.trans (PTX ISA: lane t
holds row t // 4, elements 2 (t % 4) and + 1 of the 8 x 8 matrix its register names; after
.trans, of its transpose), mma.m16n8k16 (test_mma_emulation's emulator, whose control kernel
passed its GPU tests) and each warp's writes to s_logit. Compared with a float64 product;
then which configs take the path."""

from __future__ import annotations

import numpy as np
import pytest
from test_mma_emulation import mma_16816

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render, router_mma_experts, router_mtiles
from flashmoe_gen.router_staged import STAGED_KC, router_staged_stages

VEC = 8


def swz(bk: int, row: int, chunk: int) -> int:
    """templates/gemm.cu.j2 swz<BK>: element offset of a 16-byte chunk of a tile row."""
    cpr = bk // VEC
    rows_per_128b = 8 // cpr
    return row * bk + ((chunk ^ ((row // rows_per_128b) % cpr)) * VEC)


def load_tile(s: np.ndarray, g: np.ndarray, rows: int, bk: int, row0: int, row_limit: int,
              k0: int, k: int) -> None:
    """load_tile<ROWS, BK>: g is a flat row-major array of row pitch k; zeros past the
    limits (cp.async with 0 source bytes)."""
    for c in range(rows * (bk // VEC)):
        r, ch = divmod(c, bk // VEC)
        gr, gk = row0 + r, k0 + ch * VEC
        ok = gr < row_limit and gk < k
        off = swz(bk, r, ch)
        s[off:off + VEC] = g[gr * k + gk: gr * k + gk + VEC] if ok else 0.0


def ldmatrix_x4(s: np.ndarray, addrs: list[int], trans: bool = False) -> list[list[np.ndarray]]:
    """A warp's ldmatrix.x4: lane l gives the address of row l % 8 of matrix l // 8; each
    lane's four registers (two elements each)."""
    mats = [np.stack([s[addrs[8 * m + i]: addrs[8 * m + i] + 8] for i in range(8)])
            for m in range(4)]
    if trans:
        mats = [m.T for m in mats]
    return [[mats[m][t // 4, 2 * (t % 4): 2 * (t % 4) + 2].copy() for m in range(4)]
            for t in range(32)]


def staged_logits(x: np.ndarray, wg: np.ndarray, t0: int, tokens: int, warps: int,
                  batches: int, mtiles: int, stages: int, kc: int = STAGED_KC) -> np.ndarray:
    """s_logit of one block's call (batches x warps token rows), statement by statement."""
    hidden, experts = wg.shape
    np_units = experts // 16
    per_warp = mtiles * np_units // warps
    nt = min(batches * warps, tokens - t0)
    ra, rb = mtiles * 16 * kc, kc * experts
    sa, sb = np.full(stages * ra, np.nan), np.full(stages * rb, np.nan)
    xt, wflat = x[t0:].reshape(-1), wg.reshape(-1)
    s_logit = np.full((batches * warps, experts), np.nan)

    def load_stage(stage: int, kt: int) -> None:
        load_tile(sa[stage * ra:(stage + 1) * ra], xt, mtiles * 16, kc, 0, nt, kt * kc, hidden)
        for eb in range(experts // 64):
            base = stage * rb + eb * kc * 64
            # the weights' column block: row pitch EXPERTS, its columns from eb * 64
            load_tile(sb[base:base + kc * 64], wflat[eb * 64:], kc, 64, kt * kc, hidden,
                      0, experts)

    acc = np.zeros((warps, per_warp, 2, 32, 4))
    kt_n = hidden // kc
    for s in range(min(stages - 1, kt_n)):
        load_stage(s, s)
    for kt in range(kt_n):
        nxt = kt + stages - 1
        if nxt < kt_n:
            load_stage(nxt % stages, nxt)
        a_s = (kt % stages) * ra
        b_s = (kt % stages) * rb
        for kk in range(kc // 16):
            for warp in range(warps):
                for u in range(per_warp):
                    unit = warp * per_warp + u
                    mt, npu = divmod(unit, np_units)
                    if mt * 16 >= nt:
                        continue
                    a = ldmatrix_x4(sa, [a_s + swz(kc, mt * 16 + (ln & 15), kk * 2 + (ln >> 4))
                                         for ln in range(32)])
                    kr = [kk * 16 + (ln & 7) + ((ln >> 3) & 1) * 8 for ln in range(32)]
                    b = ldmatrix_x4(sb, [b_s + (npu // 4) * kc * 64 +
                                         swz(64, kr[ln], (npu % 4) * 2 + (ln >> 4))
                                         for ln in range(32)], trans=True)
                    mma_16816(acc[warp, u, 0], a, [b[t][0] for t in range(32)],
                              [b[t][1] for t in range(32)])
                    mma_16816(acc[warp, u, 1], a, [b[t][2] for t in range(32)],
                              [b[t][3] for t in range(32)])
    for warp in range(warps):
        for u in range(per_warp):
            mt, npu = divmod(warp * per_warp + u, np_units)
            for lane in range(32):
                g, c = lane >> 2, lane & 3
                for j in range(2):
                    for h in range(2):
                        row, e = mt * 16 + g + 8 * h, npu * 16 + j * 8 + 2 * c
                        if row < nt:
                            s_logit[row, e:e + 2] = acc[warp, u, j, lane, 2 * h:2 * h + 2]
    return s_logit


@pytest.mark.parametrize("experts,tokens,t0", [(64, 100, 64), (64, 90, 64), (128, 40, 0),
                                              (64, 3, 0)])
def test_staged_logits_match_a_float64_product(experts, tokens, t0):
    """Full and ragged calls (90 - 64 = 26 tokens: the second m16 tile part zeros, 3 tokens:
    its second tile skipped), one and two 64-expert column blocks (two units per warp)."""
    rng = np.random.default_rng(experts + tokens)
    hidden, warps, batches = 256, 8, 4
    x = rng.standard_normal((tokens, hidden))
    wg = rng.standard_normal((hidden, experts))
    mtiles = router_mtiles(batches, warps)
    got = staged_logits(x, wg, t0, tokens, warps, batches, mtiles, stages=3)
    nt = min(batches * warps, tokens - t0)
    np.testing.assert_allclose(got[:nt], x[t0:t0 + nt] @ wg, rtol=1e-12, atol=1e-12)
    assert np.isnan(got[nt:]).all()  # rows past the call's tokens: never written


def test_which_configs_take_the_staged_logits():
    """E=64 with router quads (32-token calls) on transport nvlink, within the tiles' shared
    memory: H=I=2048 from 2048 tokens per rank. Not below (one 8-token batch per call), not
    the NCCL path's router kernel, not E=32 (units the warps cannot share evenly)."""
    big = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    cfg = KernelConfig.persistent_default(big, "sm_90")
    warps = cfg.router_tokens_per_block
    mt = router_mtiles(cfg.router_batches, warps)
    stages = router_staged_stages(big, cfg, router_mma_experts(big, warps), mt)
    assert cfg.router_batches == 4 and stages >= 3
    code = render(big, cfg, arch="sm_90").code
    assert f"constexpr int RS_STAGES = {stages};" in code
    assert f"constexpr int RS_KC = {STAGED_KC};" in code
    assert "staged_logits(b, x, wg, tokens);" in code
    for p in (big.replace(tokens_per_rank=1024), big.replace(experts=32)):
        c = KernelConfig.persistent_default(p, "sm_90")
        assert "staged_logits" not in render(p, c, arch="sm_90").code, p
    nccl = KernelConfig.default(big, "sm_90")
    assert router_staged_stages(big, nccl, 64, 2) == 0
