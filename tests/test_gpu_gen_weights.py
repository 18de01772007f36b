"""The counter-based weights on the GPU and the sampled check (one GPU: ``pytest -m gpu``).

The CUDA generator must equal the NumPy one bit for bit, ``DeviceWeights.generate`` must
equal ``from_host`` of the NumPy weights, and the sampled check must pass a correct layer
and catch a wrong row, an unwritten row and a wrong weight.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gen import gen_weights as g
from flashmoe_gen.check import TOLERANCE, check_layer, check_layer_sampled, sample_rows
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.weights import random_tokens

pytestmark = pytest.mark.gpu

RULES = MoEProblem(256, 128, 16, 4, shared_experts=2, shared_intermediate=96, world_size=2,
                   tokens_per_rank=100, scoring="sigmoid", expert_bias=True, n_group=4,
                   topk_group=2, shared_gate=True)
PLAIN = MoEProblem(512, 1024, 16, 2, shared_experts=1, tokens_per_rank=300)


@pytest.mark.parametrize("tensor,expert,shape,fan_in", [
    (g.W1, 0, (64, 96), 64), (g.W3, 5, (512, 1408), 512), (g.W2, 255, (2048, 7168), 2048),
    (g.SHARED_W2, 1, (96, 256), 96), (g.GATE, 0, (1024, 64), 1024)])
def test_cuda_generator_equals_numpy_bit_for_bit(tensor, expert, shape, fan_in):
    host = g.host_tensor(9, tensor, expert, shape, fan_in)
    rows, cols = shape
    same = g.device_tensor(9, tensor, expert, 1, rows, cols, fan_in, False)[0].get()
    nk = g.device_tensor(9, tensor, expert, 1, cols, rows, fan_in, True)[0].get()
    assert np.array_equal(same, host)
    assert np.array_equal(nk, host.T)


def test_cuda_generator_covers_several_experts_in_one_launch():
    out = g.device_tensor(3, g.W1, 4, 3, 32, 64, 64, True).get()  # experts 4, 5, 6
    for j in range(3):
        assert np.array_equal(out[j], g.host_tensor(3, g.W1, 4 + j, (64, 32), 64).T)


@pytest.mark.parametrize("rank", [0, 1])
def test_generate_equals_from_host_of_the_numpy_weights(rank):
    from flashmoe_gen.device_weights import DeviceWeights
    from flashmoe_gen.memory import weight_bytes

    p = RULES
    dev = DeviceWeights.generate(p, rank, seed=4)
    ref = DeviceWeights.from_host(p, g.generated_weights(p, 4), rank)
    for name in ("gate", "w1", "w3", "w2", "sw1", "sw3", "sw2", "expert_bias", "shared_gate"):
        a, b = getattr(dev, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert bool((a == b).all()), name
    assert dev.nbytes == weight_bytes(p)


def _layer(p, seed=0, config=None):
    from flashmoe_gen.device_weights import DeviceWeights
    from flashmoe_gen.runtime import FlashMoE

    return FlashMoE(p, config, weights=DeviceWeights.generate(p, 0, seed))


class Corrupt:
    """A layer whose forward spoils its output after the real one ran."""

    def __init__(self, layer, spoil):
        self._layer, self._spoil = layer, spoil

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def forward(self, x, out=None):
        out = self._layer.forward(x, out=out)
        self._spoil(out)
        return out


@pytest.mark.parametrize("p", [PLAIN, RULES.replace(world_size=1),
                               PLAIN.replace(capacity_factor=1.0)], ids=lambda p: p.name)
def test_sampled_check_passes_a_correct_layer_and_agrees_with_the_full_check(p):
    import cupy

    layer = _layer(p, seed=2)
    x_bits = random_tokens(p.tokens_per_rank, p.hidden, seed=5)
    res = check_layer_sampled(layer, cupy.asarray(x_bits), x_bits, 2, n_rows=48)
    assert res.ok and res.rows_checked == 48 and res.finite, res
    full = check_layer(layer, x_bits, g.generated_weights(p, 2))
    assert full.ok
    assert res.rel_error == pytest.approx(full.rel_error, rel=0.5)


def test_sampled_check_catches_a_wrong_row_an_unwritten_row_and_wrong_weights():
    import cupy

    p = PLAIN
    x_bits = random_tokens(p.tokens_per_rank, p.hidden, seed=5)
    x = cupy.asarray(x_bits)
    row = int(sample_rows(p.tokens_per_rank, 2, 0, 32)[7])

    def scale_row(out):
        f = (out[row].astype(cupy.uint32) << 16).view(cupy.float32) * 1.5
        out[row] = (f.view(cupy.uint32) >> 16).astype(cupy.uint16)

    layer = _layer(p, seed=2)
    bad = check_layer_sampled(Corrupt(layer, scale_row), x, x_bits, 2, n_rows=32)
    assert not bad.ok and bad.rel_error > TOLERANCE and bad.finite
    # a row outside the sample left unwritten (poison): the finiteness scan sees every row
    others = sorted(set(range(p.tokens_per_rank)) - set(sample_rows(300, 2, 0, 32).tolist()))

    def unwritten(out):
        out[others[0]] = 0xFFFF

    hole = check_layer_sampled(Corrupt(layer, unwritten), x, x_bits, 2, n_rows=32)
    assert not hole.finite and not hole.ok
    # a layer built from other weights (seed 3) checked against seed 2's reference
    wrong = check_layer_sampled(_layer(p, seed=3), x, x_bits, 2, n_rows=32)
    assert not wrong.ok


def test_evaluator_generates_on_the_gpu_and_reports_memory():
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.memory import weight_bytes
    from flashmoe_gen.tuner.objective import LayerEvaluator

    stages = []
    ev = LayerEvaluator(PLAIN, None, seed=1, warmup=1, iters=3, check_rows=32,
                        stage=lambda text, trial=True: stages.append(text))
    assert ev.host_weights is None and "on the GPU" in stages[0]
    assert ev.memory.weights == weight_bytes(PLAIN) and 0 < ev.memory.free < ev.memory.total
    out = ev(KernelConfig.default(PLAIN))
    assert out.ok and out.rel_error < TOLERANCE
    assert [s.split(" ")[0] for s in stages[1:]] == ["compiling/loading", "checking", "timing"]
    full = LayerEvaluator(PLAIN, None, seed=1, warmup=1, iters=3, check_mode="full")
    assert full.host_weights is not None and full(KernelConfig.default(PLAIN)).ok
