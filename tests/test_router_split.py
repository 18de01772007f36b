"""The router's split-H logits (templates/router.cu.j2, render.router_split) emulated on the
CPU: the loops of every (warp, lane) of a block, run as written, must add each
x[t, h] * wg[h, e] exactly once into the token's logit of expert e."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gen.render import router_split


def emulate(x: np.ndarray, wg: np.ndarray, warps: int, block: int) -> np.ndarray:
    """Logits of block ``block``'s tokens as the split kernel computes them (fp64)."""
    tokens, hidden = x.shape
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
                for h in range(warp * lanes_h + vh, hidden, warps * lanes_h):
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

    p = MoEProblem(7168, 2048, 256, 8, world_size=4, tokens_per_rank=128)
    code = render(p, KernelConfig.default(p)).code
    for line in ("for (int h = warp * V_LANES_H + vh; h < HIDDEN; h += ROUTER_WARPS * V_LANES_H)",
                 "const uint4 w = wrow[ve + v * V_LANES_E];",
                 "for (int off = V_LANES_E; off < 32; off <<= 1)",
                 "for (int w = 0; w < ROUTER_WARPS; ++w) {",  # warps add in order 0, 1, ...
                 "if (warp == w && vh == 0)",
                 "s_logit[(tb + k) * EXPERTS + (ve + v * V_LANES_E) * 8 + i] += a[k][v][i];",
                 "constexpr int V_LANES_E = 32;", "constexpr int R_TB = 8;"):
        assert line in code, line
    odd = MoEProblem(1024, 512, 60, 4, world_size=4, tokens_per_rank=64)
    assert "s_logit" not in render(odd, KernelConfig.default(odd)).code  # warp per token
