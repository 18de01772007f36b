"""Lane-exact emulation, on the CPU, of the split router's tensor-core logits
(templates/router.cu.j2, split_logits where router_layout.router_mma_experts > 0), transcribed
statement by statement: each lane's A fragment from the tokens, its two weight loads (16
bytes over four n tiles; 4 bytes of E=8's one), movmatrix.trans (PTX ISA: lane t holds row
t // 4, elements 2 (t % 4) and + 1 of an 8 x 8 matrix; after .trans, of its transpose) into
B fragments, mma.m16n8k16 (the emulator of test_mma_emulation, whose control kernel passed
its GPU tests), and the lanes' writes to s_logit by the permuted expert columns. Compared
with a float64 product."""

from __future__ import annotations

import numpy as np
import pytest
from test_mma_emulation import mma_16816

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.presets import get_preset
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render
from flashmoe_gen.router_layout import (
    router_mma_experts,
    router_mma_pass_warps,
    router_mtiles,
    router_pairs_fit,
)


def movmatrix_trans(regs: list[np.ndarray]) -> list[np.ndarray]:
    """movmatrix.sync.aligned.m8n8.trans.b16 over a warp's 32 registers (2 elements each)."""
    m = np.zeros((8, 8))
    for t in range(32):
        m[t // 4, 2 * (t % 4):2 * (t % 4) + 2] = regs[t]
    mt = m.T
    return [mt[t // 4, 2 * (t % 4):2 * (t % 4) + 2].copy() for t in range(32)]


def split_logits(x: np.ndarray, wg: np.ndarray, t0: int, nt: int, h0: int, h1: int,
                 warps: int, mma_e: int, pass_warps: int = 1, mtiles: int = 1) -> np.ndarray:
    """s_logit of one block: tokens [t0, t0 + nt), hidden rows [h0, h1); ``pass_warps``
    (router_layout.router_mma_pass_warps): warp w takes passes w % pass_warps + k pass_warps and
    k steps w // pass_warps + k (warps // pass_warps); ``mtiles`` (router_layout.router_mtiles):
    m16 tiles of tokens fed by each weight fragment (tiles past nt skip their MMAs)."""
    experts = wg.shape[1]
    s_logit = np.zeros((max(warps, nt), experts))  # nb * ROUTER_WARPS rows for nb batches
    nj = 4 if mma_e >= 32 else 1  # n tiles per group: a lane's words per weight row
    gw = 8 * nj
    groups = mma_e // gw
    ksteps = (h1 - h0) // 16
    npass, kw_n = experts // mma_e, warps // pass_warps
    assert npass % pass_warps == 0 and warps % pass_warps == 0
    for m0 in range(0, nt, 16 * mtiles):
        for p in range(npass):
            e0 = p * mma_e
            mine = [w for w in range(warps) if w % pass_warps == p % pass_warps]
            d = {w: [[[np.zeros((32, 4)) for _ in range(nj)] for _ in range(groups)]
                     for _ in range(mtiles)] for w in mine}
            for w in mine:
                for ks in range(w // pass_warps, ksteps, kw_n):
                    h = h0 + ks * 16
                    a = []  # a[mt]: the tile's lanes' fragments
                    for mt in range(mtiles):
                        a.append([])
                        for t in range(32):
                            g, c = t // 4, t % 4
                            r0 = m0 + 16 * mt + g
                            r1 = r0 + 8

                            def pair(r, col):
                                return x[t0 + r, col:col + 2] if r < nt else np.zeros(2)
                            a[mt].append([pair(r0, h + 2 * c), pair(r1, h + 2 * c),
                                          pair(r0, h + 2 * c + 8), pair(r1, h + 2 * c + 8)])
                    for q in range(groups):
                        # lane (g, c): 4 nj bytes of rows h + g and h + g + 8, experts
                        # e0 + gw q + 2 nj c .. ; word j = experts + 2 j, + 2 j + 1
                        lo = [wg[h + t // 4, e0 + gw * q + 2 * nj * (t % 4):][:2 * nj]
                              for t in range(32)]
                        hi = [wg[h + t // 4 + 8, e0 + gw * q + 2 * nj * (t % 4):][:2 * nj]
                              for t in range(32)]
                        for j in range(nj):
                            b0 = movmatrix_trans([v[2 * j:2 * j + 2] for v in lo])
                            b1 = movmatrix_trans([v[2 * j:2 * j + 2] for v in hi])
                            for mt in range(mtiles):
                                if m0 + 16 * mt < nt:
                                    mma_16816(d[w][mt][q][j], a[mt], b0, b1)
            for w in sorted(mine, key=lambda w: w // pass_warps):  # the fixed k-lane order
                for mt in range(mtiles):
                    for t in range(32):
                        g, c = t // 4, t % 4
                        r0 = m0 + 16 * mt + g
                        r1 = r0 + 8
                        for q in range(groups):
                            for j in range(nj):
                                for b in range(2):
                                    e = e0 + gw * q + 2 * nj * c + 2 * j + b
                                    if r0 < nt:
                                        s_logit[r0, e] += d[w][mt][q][j][t, b]
                                    if r1 < nt:
                                        s_logit[r1, e] += d[w][mt][q][j][t, 2 + b]
    return s_logit[:nt]


@pytest.mark.parametrize("experts,warps,nt,h0,h1,pass_warps,mtiles", [
    (64, 8, 32, 0, 256, 1, 2),   # four batches of 8 (router_batches 4): two tiles a fragment
    (64, 8, 27, 0, 256, 1, 2),   # ... the second tile partial
    (32, 8, 11, 16, 128, 1, 2),  # ... the second tile past nt: its MMAs skipped
    (64, 8, 8, 0, 256, 1, 1),     # E=64 (two groups per pass), a full batch
    (64, 8, 3, 48, 160, 1, 1),    # a slice, 3 tokens (rows past nt are zero)
    (64, 8, 16, 0, 256, 1, 1),    # two batches of 8 (router_batches 2): the whole m tile
    (32, 8, 13, 0, 256, 1, 1),    # two batches, the second partial
    (96, 4, 4, 0, 128, 1, 1),     # 32 experts per pass, three passes one after another
    (256, 32, 20, 0, 64, 4, 1),   # 32 tokens a block: two m tiles, the second partial
    (32, 1, 1, 16, 48, 1, 1),     # one warp, one token
    (256, 8, 5, 0, 112, 4, 1),    # four passes side by side, two k lanes (DeepSeek-V3's T=1)
    (512, 4, 4, 16, 64, 4, 1),    # more passes than warps: each warp takes two, one k lane
    (8, 8, 32, 0, 256, 1, 2),     # E=8: one n tile from a word per lane, four batches
    (8, 8, 13, 16, 128, 1, 1),    # ... a slice, the second half-tile partial
    (8, 8, 1, 0, 256, 1, 1),      # ... one token
])
def test_tensor_core_logits_are_the_product(experts, warps, nt, h0, h1, pass_warps, mtiles):
    rng = np.random.default_rng(experts + nt)
    hidden = 256
    x = rng.standard_normal((40, hidden)).astype(np.float32).astype(np.float64)
    wg = rng.standard_normal((hidden, experts))
    mma_e = 64 if experts % 64 == 0 else 32 if experts % 32 == 0 else 8
    t0 = 5
    got = split_logits(x, wg, t0, nt, h0, h1, warps, mma_e, pass_warps, mtiles)
    want = x[t0:t0 + nt, h0:h1] @ wg[h0:h1]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)


def test_router_mma_applies_where_the_layout_fits():
    assert router_mma_experts(MoEProblem(2048, 2048, 64, 2), 8) == 64
    assert router_mma_experts(get_preset("deepseek-v2-lite").problem(), 8) == 64
    assert router_mma_experts(MoEProblem(2048, 2048, 32, 2), 8) == 32
    assert router_mma_experts(get_preset("deepseek-v3").problem(), 8) == 64
    assert router_mma_experts(MoEProblem(2048, 2048, 96, 2), 8) == 32
    assert router_mma_experts(MoEProblem(2048, 2048, 512, 2), 8) == 0  # past the maximum
    assert router_mma_experts(MoEProblem(2048, 2048, 8, 2), 8) == 8  # one n tile per pass
    assert router_mma_experts(get_preset("mixtral-8x7b").problem(), 8) == 8


def test_pass_warps_divide_the_passes_and_the_warps():
    dsv3 = get_preset("deepseek-v3").problem()
    assert router_mma_pass_warps(dsv3, 8) == 4      # 4 passes side by side, 2 k lanes
    assert router_mma_pass_warps(dsv3, 2) == 2
    assert router_mma_pass_warps(MoEProblem(2048, 2048, 64, 2), 8) == 1   # one pass
    assert router_mma_pass_warps(MoEProblem(2048, 2048, 96, 2), 8) == 1   # 3 passes
    assert router_mma_pass_warps(MoEProblem(2048, 2048, 128, 2), 16) == 2
    assert router_mma_pass_warps(MoEProblem(512, 2048, 16, 2), 8) == 0    # FMA path
    assert router_mma_pass_warps(MoEProblem(512, 2048, 8, 2), 8) == 1     # E=8: one pass
    assert router_mma_experts(MoEProblem(512, 2048, 16, 2), 8) == 0  # 16 experts: FMA path
    assert router_mma_experts(MoEProblem(520, 344, 32, 4), 8) == 0   # hidden not by 16
    assert router_mma_experts(MoEProblem(2048, 1408, 60, 4), 8) == 0  # no split layout


def test_two_batches_per_logit_tile_where_one_pass_takes_every_expert(monkeypatch):
    """router_batches 2: the persistent kernel's router fills the m16 tile with two 8-token
    batches, 4: two m16 tiles per weight fragment, only where the tensor cores take every
    expert in one pass (32 or 64 experts), 8 four; with several passes, the FMA path or
    more than four m16 tiles of tokens the config is refused."""
    from dataclasses import replace

    from flashmoe_gen.errors import ConfigError

    e64 = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    assert router_pairs_fit(e64, 8) and router_pairs_fit(MoEProblem(2048, 2048, 32, 2), 8)
    assert not router_pairs_fit(get_preset("deepseek-v3").problem(), 8)  # 4 passes
    assert not router_pairs_fit(MoEProblem(512, 2048, 16, 2), 8)         # FMA path
    assert router_pairs_fit(MoEProblem(512, 2048, 8, 2), 8)              # E=8: one pass
    assert router_pairs_fit(e64, 16, 4) and not router_pairs_fit(e64, 16, 8)  # <= 4 m tiles
    cfg = KernelConfig.persistent_default(e64)  # 16384 tokens: eights by default (8-token
    assert cfg.router_batches == 8  # batches: four m16 tiles), pairs where quads don't fit
    cfg.validate(e64)
    assert cfg.name.endswith("__rb8__se2__ph__ts__il__of")
    assert KernelConfig.from_name(cfg.name) == cfg
    dsv3 = get_preset("deepseek-v3").problem(world_size=4, tokens_per_rank=128)
    for bad, p, text in ((replace(cfg, router_batches=3), e64, "choose one of"),
                         (replace(KernelConfig.default(e64), router_batches=2), e64,
                          "only transport 'nvlink'"),
                         (replace(KernelConfig.persistent_default(dsv3), router_batches=2),
                          dsv3, "in one pass only")):
        with pytest.raises(ConfigError, match=text):
            bad.validate(p)
    assert "constexpr int R_BATCHES = 1;" in render(e64, replace(cfg, router_batches=1)).code
    code = render(e64, replace(cfg, router_batches=2)).code
    assert "constexpr int R_BATCHES = 2;" in code
    assert "__shared__ float s_logit[R_BATCHES * ROUTER_WARPS * EXPERTS];" in code
    assert "staged_logits(b, x, wg, tokens);" in code  # E=64 pairs stage their logits
    from flashmoe_gen import router_staged

    monkeypatch.setattr(router_staged, "STAGED_MAX_STAGES", 0)  # no ring: split_logits
    code = render(e64, replace(cfg, router_batches=2)).code
    assert "split_logits(b, 0, HIDDEN, x, wg, tokens, R_BATCHES);" in code
    assert "const int nt = min(nb * ROUTER_WARPS, tokens - t0);" in code
    assert "constexpr int R_MT = 1;" in code  # two batches: one m16 tile
    # router_batches 4: four batches, two m16 tiles per weight fragment
    quad = " ".join(render(e64, replace(cfg, router_batches=4)).code.split())
    assert "constexpr int R_BATCHES = 4;" in quad and "constexpr int R_MT = 2;" in quad
    for line in ("for (int m0 = 0; m0 < nt; m0 += 16 * R_MT) {",
                 "const int r0 = m0 + 16 * mt + g, r1 = r0 + 8;",
                 "const unsigned b0 = movmatrix_trans(wl[j]), b1 = movmatrix_trans(wh[j]);",
                 "if (m0 + 16 * mt < nt) mma_16816(d[mt][q][j], a[mt], b0, b1);",
                 "if (r0 < nt) s_logit[r0 * EXPERTS + e] += d[mt][q][j][b];"):
        assert line in quad, line
    assert router_mtiles(4, 8) == 2 and router_mtiles(2, 8) == router_mtiles(1, 8) == 1
    assert router_mtiles(8, 8) == 4
    assert router_pairs_fit(e64, 8, 8) and not router_pairs_fit(e64, 16, 8)
