"""The gated epilogue's silu(g) * u (templates/gemm.cu.j2 silu_mul, rcp_newton) ported to
float32 numpy: the reciprocal's Newton steps from the exponent-bit guess, over every
denominator the epilogue can meet, against float64; tied to the template's text."""
import numpy as np

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

MAGIC = 0x7EF311C3


def _fma(a, b, c):
    # float32 fmaf: the float64 product of two float32s is exact, one rounding after
    return (a.astype(np.float64) * b + c).astype(np.float32)


def rcp_newton(d):
    d = np.asarray(d, np.float32)
    y = (np.int32(MAGIC) - d.view(np.int32)).view(np.float32)
    for _ in range(3):
        y = (y * _fma(-d, y, np.float32(2))).astype(np.float32)
    return y


def silu_mul(g, u):
    g = np.asarray(g, np.float32)
    e = np.exp(-np.maximum(g, np.float32(-80)), dtype=np.float32)
    return g * rcp_newton(np.float32(1) + e) * np.asarray(u, np.float32)


def test_reciprocal_over_every_denominator():
    # 1 + exp(-g) for g in [-80, inf): [1, 5.6e34]; dense in [1, 4) where most g fall
    d = np.concatenate([np.logspace(0, 34.7, 200_000, dtype=np.float64),
                        np.linspace(1, 4, 200_000)]).astype(np.float32)
    rel = np.abs(rcp_newton(d).astype(np.float64) * d - 1)
    assert rel.max() < 1e-6, rel.max()


def test_silu_mul_against_float64():
    rng = np.random.default_rng(5)
    g = np.concatenate([rng.normal(0, 4, 100_000), np.linspace(-200, 60, 50_000)])
    g = g.astype(np.float32)
    u = rng.normal(0, 1, g.size).astype(np.float32)
    want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    got = silu_mul(g, u).astype(np.float64)
    assert np.all(np.isfinite(got))
    err = np.abs(got - want)
    assert np.all(err <= 2e-6 * np.abs(want) + 1e-30), err.max()
    # far below bf16's rounding (2^-9 relative): the epilogue's error is its output's
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def test_the_port_is_the_templates():
    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    code = " ".join(render(p, KernelConfig.persistent_default(p, "sm_90")).code.split())
    for line in ("float y = __int_as_float(0x7EF311C3 - __float_as_int(d)); "
                 "y *= fmaf(-d, y, 2.f); y *= fmaf(-d, y, 2.f); return y * fmaf(-d, y, 2.f);",
                 "return g * rcp_newton(1.f + __expf(-fmaxf(g, -80.f))) * u;"):
        assert line in code, line
    assert f"0x{MAGIC:X}" in code
