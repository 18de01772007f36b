"""Mode "graph" on one GPU: the captured forward against the float64 reference.

Replays with three different inputs through one graph, every buffer poisoned between
replays, token counts changing between calls, the device-side row offsets against their
Python twin, the eager (``graphs=False``) path, and the refusals (token bound, memory).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError, ProblemError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error
from flashmoe_gen.weights import MoEWeights, random_tokens

pytestmark = pytest.mark.gpu
POISON = 0xFFFF

SEED = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
DSV2 = MoEProblem(2048, 1408, 64, 6, shared_experts=2, tokens_per_rank=256)
CAPPED = MoEProblem(1024, 704, 16, 4, shared_experts=1, capacity_factor=1.0,
                    tokens_per_rank=333)


def _graph_layer(problem, weights, graphs=True, **knobs):
    from flashmoe_gen.runtime import FlashMoE
    cfg = dataclasses.replace(KernelConfig.default(problem), mode="graph", **knobs)
    return FlashMoE(problem, cfg, weights=weights, graphs=graphs)


def _forward_checked(layer, weights, tokens: int, seed: int) -> float:
    import cupy

    p = layer.problem
    x_bits = random_tokens(tokens, p.hidden, seed=seed)
    layer.poison()
    out = cupy.full((tokens, p.hidden), POISON, np.uint16)
    layer.forward(cupy.asarray(x_bits), out=out)
    cupy.cuda.Device().synchronize()
    idx = layer.last_routing()[0].get().astype(np.int64)
    cap = layer.capacity if p.capacity_factor is not None else None
    ref = moe_reference(p, [x_bits], weights, topk_idx=[idx], capacity=cap)
    got = bf16.from_bits(out.get()).astype(np.float64)
    assert np.isfinite(got).all(), "NaN/Inf in the output (a stale or unwritten row)"
    if cap is not None:
        assert layer.dropped_tokens == ref.dropped
    return relative_error(got, ref.out[0]) if tokens else 0.0


@pytest.mark.parametrize("problem", [SEED, DSV2, CAPPED], ids=["seed", "dsv2lite", "capped"])
def test_replays_of_one_graph_match_the_reference(problem):
    w = MoEWeights.random(problem, 1)
    layer = _graph_layer(problem, w)
    errs = [_forward_checked(layer, w, problem.tokens_per_rank, seed=s) for s in (2, 3, 4)]
    assert max(errs) <= 1e-2, errs
    assert layer._graph_cache.captures == 1  # three inputs, one capture, three replays


def test_token_counts_change_between_calls():
    w = MoEWeights.random(SEED, 5)
    layer = _graph_layer(SEED, w, chunks_per_peer=1)
    counts = [256, 17, 0, 256, 1, 17]
    errs = [_forward_checked(layer, w, t, seed=50 + i) for i, t in enumerate(counts)]
    assert max(errs) <= 1e-2, errs
    assert layer._graph_cache.captures == len(set(counts))


@pytest.mark.parametrize("packed", [True, False])
def test_eager_device_schedule_and_offsets(packed):
    """graphs=False: the same host-free schedule run eagerly; the kernel's row offsets
    equal layout.fixed_row_offsets."""
    from flashmoe_gen.layout import fixed_row_offsets

    w = MoEWeights.random(CAPPED, 6)
    layer = _graph_layer(CAPPED, w, graphs=False, packed_slots=packed)
    assert layer._graph_cache is None
    assert _forward_checked(layer, w, 300, seed=7) <= 1e-2
    f = layer.fixed
    region = f.region
    want = fixed_row_offsets(layer.counts.get(), f.capacity, CAPPED.local_experts, region,
                             packed)
    assert (layer.row_off.get() == want).all()


def test_refusals_name_what_fits():
    w = MoEWeights.random(SEED, 8)
    layer = _graph_layer(SEED, w)
    import cupy
    with pytest.raises(ProblemError, match="at most 256 tokens per rank"):
        layer.forward(cupy.zeros((257, SEED.hidden), np.uint16))
    huge = MoEProblem(7168, 2048, 8, 2, tokens_per_rank=2**22)
    from flashmoe_gen.runtime import FlashMoE
    cfg = dataclasses.replace(KernelConfig.default(huge), mode="graph")
    with pytest.raises(ConfigError, match=r"at most ~\d+ tokens per rank"):
        FlashMoE(huge, cfg)  # refused before any weight is drawn
