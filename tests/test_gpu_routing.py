"""The layer with each routing rule against the float64 reference (world size 1).

Run on a GPU machine: ``pytest -m gpu tests/test_gpu_routing.py``. Fresh random bf16
inputs and weights (expert bias and shared gate included), every internal buffer and the
output poisoned with a NaN pattern before the checked call, relative error <= 1e-2, the
kernel's experts equal to the reference's wherever the choice is clear, and its weights
equal to the rule's weights for the experts it chose.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.check import check_layer, routing_mismatches
from flashmoe_gen.errors import ProblemError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error, route
from flashmoe_gen.weights import MoEWeights, random_tokens

pytestmark = pytest.mark.gpu
TOL = 1e-2
POISON = 0xFFFF  # a bf16 NaN

#: One problem per rule at a size the kernels tile unevenly, and the full models' rules.
RULES = {
    "sigmoid": MoEProblem(512, 256, 16, 4, tokens_per_rank=200, scoring="sigmoid"),
    "sigmoid_nonorm": MoEProblem(512, 256, 16, 4, tokens_per_rank=200, scoring="sigmoid",
                                 normalize_topk=False),
    "softmax_bias": MoEProblem(512, 256, 16, 4, tokens_per_rank=200, expert_bias=True),
    "groups": MoEProblem(512, 256, 64, 6, tokens_per_rank=200, n_group=8, topk_group=3),
    "groups_one": MoEProblem(512, 256, 32, 2, tokens_per_rank=200, n_group=4, topk_group=1),
    "scaling": MoEProblem(512, 256, 16, 2, tokens_per_rank=200, routed_scaling=2.5),
    "shared_gate": MoEProblem(512, 256, 16, 2, shared_experts=2, shared_intermediate=128,
                              tokens_per_rank=200, shared_gate=True),
    # Qwen2-MoE: softmax, no renormalisation, one wide gated shared expert, 60 experts.
    "qwen2": MoEProblem(1024, 512, 60, 4, shared_experts=1, shared_intermediate=2048,
                        tokens_per_rank=333, normalize_topk=False, shared_gate=True),
    # DeepSeek-V3: sigmoid, bias, 4 of 8 groups, scaling 2.5, 256 experts (8 per lane).
    "dsv3": MoEProblem(1024, 512, 256, 8, shared_experts=1, tokens_per_rank=300,
                       scoring="sigmoid", expert_bias=True, n_group=8, topk_group=4,
                       routed_scaling=2.5),
    # 4 experts in 2 groups on a 4 x 8 lane grid: the lanes past the groups never win one.
    "few_experts": MoEProblem(256, 128, 4, 2, tokens_per_rank=77, scoring="sigmoid",
                              expert_bias=True, n_group=2, topk_group=1),
}


def _layer(problem, weights):
    from flashmoe_gen.runtime import FlashMoE
    return FlashMoE(problem, weights=weights)


def _run_checked(layer, x_bits: np.ndarray, weights: MoEWeights):
    """Forward twice (second time with every buffer poisoned) and compare with float64."""
    import cupy

    p = layer.problem
    x = cupy.asarray(x_bits)
    layer.forward(x)
    layer.poison()
    out = cupy.full((x_bits.shape[0], p.hidden), POISON, np.uint16)
    layer.forward(x, out=out)
    cupy.cuda.Device().synchronize()
    idx, w, _ = (a.get() for a in layer.last_routing())
    idx = idx.astype(np.int64)
    got = bf16.from_bits(out.get()).astype(np.float64)
    assert np.isfinite(got).all(), "NaN/Inf in the output (unwritten or overflow)"
    ref = moe_reference(p, [x_bits], weights, topk_idx=[idx])
    err = relative_error(got, ref.out[0])
    assert err <= TOL, f"{p.name}: relative error {err:.3e} > {TOL}"
    # The kernel's weights are the rule's weights of the experts it chose.
    np.testing.assert_allclose(w, ref.routing[0].topk_w, rtol=1e-4, atol=1e-6)
    own = route(p, x_bits, weights.gate, weights.expert_bias)
    clear = own.clear(p)
    assert clear.mean() > 0.5, "too few clear tokens: the routing check would prove little"
    assert routing_mismatches(p, x_bits, weights, idx) == 0
    return err


@pytest.mark.parametrize("key", sorted(RULES))
def test_rule_layer_matches_reference(key):
    p = RULES[key]
    w = MoEWeights.random(p, seed=len(key))
    layer = _layer(p, w)
    for t in (p.tokens_per_rank, 1):
        x = random_tokens(t, p.hidden, seed=t + len(key))
        err = _run_checked(layer, x, w)
        print(f"{p.name} T={t}: rel err {err:.2e}")


def test_rule_layer_with_capacity_drops():
    p = RULES["dsv3"].replace(capacity_factor=1.0)
    w = MoEWeights.random(p, seed=9)
    layer = _layer(p, w)
    x = random_tokens(300, p.hidden, seed=10)
    import cupy
    out = cupy.full((300, p.hidden), POISON, np.uint16)
    layer.forward(cupy.asarray(x), out=out)
    cupy.cuda.Device().synchronize()
    idx = layer.last_routing()[0].get().astype(np.int64)
    ref = moe_reference(p, [x], w, topk_idx=[idx], capacity=layer.capacity)
    assert ref.dropped == layer.dropped_tokens
    got = bf16.from_bits(out.get()).astype(np.float64)
    assert relative_error(got, ref.out[0]) <= TOL


@pytest.mark.parametrize("key", ["dsv3", "qwen2"])
def test_check_layer_passes_rule_layers(key):
    p = RULES[key]
    w = MoEWeights.random(p, seed=2)
    res = check_layer(_layer(p, w), random_tokens(p.tokens_per_rank, p.hidden, seed=3), w)
    assert res.ok, res


def test_check_layer_catches_a_wrong_bias():
    """The check can fail: a layer whose bias differs from the reference's routes
    differently and is reported."""
    p = RULES["dsv3"]
    w = MoEWeights.random(p, seed=4)
    wrong = MoEWeights.random(p, seed=4)
    wrong.expert_bias = -wrong.expert_bias
    res = check_layer(_layer(p, wrong), random_tokens(300, p.hidden, seed=5), w)
    assert res.routing_mismatches > 0 and not res.ok


def test_device_weights_from_arrays_take_the_rule_arrays():
    import cupy

    from flashmoe_gen.device_weights import DeviceWeights

    p = RULES["dsv3"].replace(shared_gate=True)
    w = MoEWeights.random(p, seed=6)
    args = dict(gate=w.gate, w1=w.w1, w3=w.w3, w2=w.w2, shared_w1=w.shared_w1,
                shared_w3=w.shared_w3, shared_w2=w.shared_w2)
    dw = DeviceWeights.from_arrays(p, **args, expert_bias=w.expert_bias,
                                   shared_gate=w.shared_gate)
    assert dw.expert_bias.dtype == np.float32 and dw.expert_bias.shape == (256,)
    np.testing.assert_array_equal(cupy.asnumpy(dw.expert_bias), w.expert_bias)
    np.testing.assert_array_equal(cupy.asnumpy(dw.shared_gate), w.shared_gate)
    with pytest.raises(ProblemError, match="expert_bias"):
        DeviceWeights.from_arrays(p, **args, shared_gate=w.shared_gate)
    with pytest.raises(ProblemError, match="float32"):
        DeviceWeights.from_arrays(p, **args, expert_bias=w.expert_bias.astype(np.float64),
                                  shared_gate=w.shared_gate)
    # The layer built on them computes the same as on host weights.
    x = random_tokens(64, p.hidden, seed=7)
    a = _layer(p, dw).forward(cupy.asarray(x)).get()
    b = _layer(p, w).forward(cupy.asarray(x)).get()
    np.testing.assert_array_equal(a, b)
