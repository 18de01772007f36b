"""The router's split-H logits (templates/router.cu.j2, router_layout.router_split) emulated on the
CPU: the loops of every (warp, lane) of a block, run as written, must add each
x[t, h] * wg[h, e] exactly once into the token's logit of expert e."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.router_layout import ROUTER_ITEMS, router_slices, router_split


def emulate(x: np.ndarray, wg: np.ndarray, warps: int, block: int, h0: int = 0,
            h1: int | None = None) -> np.ndarray:
    """Logits of block ``block``'s tokens over hidden rows [h0, h1) as split_logits computes
    them (fp64)."""
    tokens, hidden = x.shape
    h1 = hidden if h1 is None else h1
    experts = wg.shape[1]
    lay = router_split(experts, warps)
    lanes_e, per_lane, tb_size = (lay["router_vec_lanes_e"], lay["router_vec_per_lane"],
                                  lay["router_token_batch"])
    lanes_h = 32 // lanes_e
    s_logit = np.zeros(warps * experts)
    t0 = block * warps
    nt = min(warps, tokens - t0)
    for warp in range(warps):  # the kernel's warps add their sums in this order (deterministic)
        # a[lane][k][v][i] for every lane, then the shuffle sum over the hidden lanes
        for tb in range(0, nt, tb_size):
            a = np.zeros((32, tb_size, per_lane, 8))
            for lane in range(32):
                ve, vh = lane % lanes_e, lane // lanes_e
                for h in range(h0 + warp * lanes_h + vh, h1, warps * lanes_h):
                    xv = [x[t0 + tb + k, h] if tb + k < nt else 0.0 for k in range(tb_size)]
                    for v in range(per_lane):
                        w8 = wg[h, 8 * (ve + v * lanes_e): 8 * (ve + v * lanes_e) + 8]
                        for i in range(8):
                            for k in range(tb_size):
                                a[lane, k, v, i] += xv[k] * w8[i]
            off = lanes_e
            while off < 32:  # __shfl_xor_sync over the hidden lane bits
                a = a + a[np.arange(32) ^ off]
                off <<= 1
            for lane in range(32):
                ve, vh = lane % lanes_e, lane // lanes_e
                if vh:
                    continue
                for k in range(tb_size):
                    if tb + k >= nt:
                        continue
                    for v in range(per_lane):
                        for i in range(8):
                            s_logit[(tb + k) * experts + (ve + v * lanes_e) * 8 + i] += \
                                a[lane, k, v, i]
    return s_logit.reshape(warps, experts)[:nt]


@pytest.mark.parametrize("experts,warps,hidden,tokens", [
    (8, 8, 72, 5), (16, 4, 40, 4), (64, 8, 48, 11), (160, 4, 24, 3), (384, 8, 16, 9),
    (256, 8, 40, 8), (512, 16, 8, 17)])
def test_split_logits_cover_every_product_once(experts, warps, hidden, tokens):
    rng = np.random.default_rng(experts + hidden)
    x = rng.standard_normal((tokens, hidden))
    wg = rng.standard_normal((hidden, experts))
    want = x @ wg
    for block in range(-(-tokens // warps)):
        got = emulate(x, wg, warps, block)
        np.testing.assert_allclose(got, want[block * warps: block * warps + len(got)],
                                   rtol=1e-12, atol=1e-12)


def emulate_sliced(x: np.ndarray, wg: np.ndarray, warps: int) -> np.ndarray:
    """The persistent kernel's router phase: router_partial for every (batch, slice) item
    into part[slice][batch][token][expert], then router_block's sum in slice order."""
    tokens, hidden = x.shape
    experts = wg.shape[1]
    batches = -(-tokens // warps)
    slices = router_slices(batches, hidden, experts)
    rows = -(-hidden // slices)  # router_slice_rows
    part = np.full(slices * batches * warps * experts, np.nan)
    for item in range(batches * slices):
        b, s = item // slices, item % slices
        got = emulate(x, wg, warps, b, s * rows, min(hidden, (s + 1) * rows))
        base = (s * batches + b) * warps * experts
        part[base: base + got.size] = got.ravel()
    out = np.zeros((tokens, experts))
    for t in range(tokens):
        b, w = t // warps, t % warps
        for s in range(slices):
            base = ((s * batches + b) * warps + w) * experts
            out[t] += part[base: base + experts]
    return out, batches * slices


@pytest.mark.parametrize("experts,warps,hidden,tokens", [
    (256, 8, 200, 1), (256, 8, 136, 8), (64, 8, 96, 19), (16, 8, 64, 40), (8, 8, 72, 2)])
def test_sliced_router_covers_every_product_once(experts, warps, hidden, tokens, monkeypatch):
    """Hidden slices over the grid (few tokens): every x[t, h] wg[h, e] exactly once, the
    partials within the state buffer's scratch."""
    from flashmoe_gen import router_layout

    monkeypatch.setattr(router_layout, "ROUTER_SLICE_MIN_ROWS", 8)  # several slices of small H
    monkeypatch.setattr(router_layout, "ROUTER_SLICE_MIN_BYTES", 0)
    rng = np.random.default_rng(experts + hidden + tokens)
    x = rng.standard_normal((tokens, hidden))
    wg = rng.standard_normal((hidden, experts))
    got, items = emulate_sliced(x, wg, warps)
    np.testing.assert_allclose(got, x @ wg, rtol=1e-12, atol=1e-12)
    assert router_slices(-(-tokens // warps), hidden, experts) > 1 or tokens > 8 * warps
    p = MoEProblem(hidden, 32, experts, 2, world_size=2, tokens_per_rank=tokens)
    assert 2 * router_layout.router_scratch_words(p, warps) >= items * warps * experts


def test_slices_per_batch():
    """Many slices while batches are few, one at large batch counts, none below 64 rows."""
    assert router_slices(1, 7168, 256) == 64 and router_slices(16, 7168, 256) == 16
    assert router_slices(300, 7168, 256) == 1 and router_slices(0, 7168, 256) == 1
    assert router_slices(1, 2048, 128) == 32 and router_slices(1, 512, 8) == 1  # 8 KB: whole
    big = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=16384)
    assert render_scratch(big, 8) == 0  # 256 KB of gate weights: one block per batch reads
    v3 = MoEProblem(7168, 2048, 256, 8, world_size=2, tokens_per_rank=16384)
    assert render_scratch(v3, 8) == 256 * 8 * 256 // 2  # <= ROUTER_ITEMS items, any T
    assert render_scratch(v3.replace(experts=260), 8) == 0  # no split router: no scratch


def render_scratch(p, warps):
    from flashmoe_gen.router_layout import router_scratch_words

    return router_scratch_words(p, warps)


def test_layouts_fit_the_hardware():
    for experts in (8, 16, 24, 40, 64, 128, 160, 256, 384, 512):
        for warps in (4, 8, 16):
            lay = router_split(experts, warps)
            if lay is None:
                assert warps * experts * 4 > 32 * 1024
                continue
            lanes_e, per_lane = lay["router_vec_lanes_e"], lay["router_vec_per_lane"]
            assert 32 % lanes_e == 0 and lanes_e * per_lane * 8 == experts
            assert lay["router_token_batch"] * per_lane * 8 <= 64 or \
                lay["router_token_batch"] == 1  # accumulators per lane
    assert router_split(60, 8) is None and router_split(1024, 16) is None


def test_the_template_runs_the_emulated_loops():
    """The lines the emulation mirrors, as the generated router spells them (a change to one
    must change the other)."""
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import render

    # hidden not a multiple of 16: the FMA layout (router_layout.router_mma_experts 0)
    p = MoEProblem(7176, 2048, 256, 8, world_size=4, tokens_per_rank=128)
    code = render(p, KernelConfig.default(p)).code
    assert "constexpr bool R_MMA = false;" in code
    for line in ("for (int h = h0 + warp * V_LANES_H + vh; h < h1; h += ROUTER_WARPS * V_LANES_H)",
                 "const uint4 w = wrow[ve + v * V_LANES_E];",
                 "for (int off = V_LANES_E; off < 32; off <<= 1)",
                 "for (int w = 0; w < ROUTER_WARPS; ++w) {",  # warps add in order 0, 1, ...
                 "if (warp == w && vh == 0)",
                 "s_logit[(tb + k) * EXPERTS + (ve + v * V_LANES_E) * 8 + i] += a[k][v][i];",
                 "constexpr int V_LANES_E = 32;", "constexpr int R_TB = 8;"):
        assert line in code, line
    # The persistent kernel's slices (emulate_sliced), router.cu.j2 and persistent.cu.j2.
    nvl = render(p, KernelConfig.persistent_default(p)).code
    for line in ("const int rows = (HIDDEN + slices - 1) / slices;",
                 "return R_MMA ? (rows + 15) / 16 * 16 : rows;",
                 "return batches > 0 ? max(1, min(R_SLICES_MAX, R_ITEMS / batches)) : 1;",
                 f"constexpr int R_ITEMS = {ROUTER_ITEMS};", "constexpr int R_SLICES_MAX = 64;",
                 "const int b = item / slices, s = item % slices, rows = "
                 "router_slice_rows(slices);",
                 "split_logits(b, s * rows, min(HIDDEN, (s + 1) * rows), x, wg, tokens);",
                 "float* dst = part + (static_cast<long long>(s) * batches + b) * ROUTER_WARPS "
                 "* EXPERTS;",
                 "for (int s = 0; s < slices; ++s) {",
                 "const float* row = part + ((static_cast<long long>(s) * batches + block) * "
                 "ROUTER_WARPS + w) * EXPERTS;",
                 "float* part = reinterpret_cast<float*>(state + ST_WORDS);",
                 "for (int i = blockIdx.x; i < batches * slices; i += front)",
                 "router_partial(i, slices, x, wg, tokens, part);",
                 "router_block(b, x, wg, bias, tokens, topk_idx, topk_w, part, slices);"):
        assert line in nvl, line
    odd = MoEProblem(1024, 512, 60, 4, world_size=4, tokens_per_rank=64)
    assert "s_logit" not in render(odd, KernelConfig.default(odd)).code  # warp per token


def test_the_template_runs_the_emulated_tensor_core_loops():
    """The lines tests/test_router_mma_emulation.py mirrors, as the generated router spells
    them on DeepSeek-V2-Lite's shape (64 experts, hidden 2048: one pass) and the
    DeepSeek-V3-like one (256 experts: four passes side by side)."""
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import render

    lite = MoEProblem(2048, 1408, 64, 6, world_size=4, tokens_per_rank=128)
    v3 = MoEProblem(7168, 2048, 256, 8, world_size=4, tokens_per_rank=128)
    for p, cfg in ((lite, KernelConfig.default(lite)),
                   (lite, KernelConfig.persistent_default(lite)),
                   (v3, KernelConfig.persistent_default(v3))):
        code = " ".join(render(p, cfg).code.split())
        pw = 1 if p.experts == 64 else 4
        for line in ("constexpr bool R_MMA = true;", "constexpr int R_MMA_E = 64;",
                     f"constexpr int R_MMA_PW = {pw};",
                     "constexpr int NPASS = EXPERTS / R_MMA_E, KW = ROUTER_WARPS / R_MMA_PW;",
                     "const int pl = warp % R_MMA_PW, kw = warp / R_MMA_PW;",
                     "for (int i = 0; i < NPASS / R_MMA_PW; ++i) {",
                     "const int e0 = (pl + i * R_MMA_PW) * R_MMA_E;",
                     "for (int r = 0; r < KW; ++r) {", "if (kw == r)",
                     "movmatrix.sync.aligned.m8n8.trans.b16",
                     "const int ksteps = (h1 - h0) / 16;",
                     "for (int ks = kw; ks < ksteps; ks += KW) {",
                     "for (int m0 = 0; m0 < nt; m0 += 16 * R_MT) {",
                     "const elem_t* x0 = xb + 16 * mt * HIDDEN + h;",
                     "a[mt][0] = r0 < nt ? *reinterpret_cast<const unsigned*>(x0) : 0u;",
                     "a[mt][3] = r1 < nt ? *reinterpret_cast<const unsigned*>(x1 + 8) : 0u;",
                     "constexpr int NJ = R_MMA_E >= 32 ? 4 : 1, GW = 8 * NJ;",
                     "const elem_t* w = wg + static_cast<long long>(h + g) * EXPERTS + e0 + "
                     "2 * NJ * c;",
                     "load_words<NJ>(w + 8 * EXPERTS + GW * q, wh);",
                     "const uint4 v = *reinterpret_cast<const uint4*>(p);",
                     "w[0] = *reinterpret_cast<const unsigned*>(p);",
                     "if (m0 + 16 * mt < nt) mma_16816(d[mt][q][j], a[mt], b0, b1);",
                     "const int e = e0 + GW * q + 2 * NJ * c + 2 * j + b;",
                     "if (r1 < nt) s_logit[r1 * EXPERTS + e] += d[mt][q][j][2 + b];"):
            assert line in code, line
