"""Bad input through the GPU layer (one GPU): typed refusals, and NaN/Inf activations that
poison only their own tokens (no out-of-bounds row, no sticky CUDA error)."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.errors import ProblemError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error
from flashmoe_gen.weights import MoEWeights, random_tokens

pytestmark = pytest.mark.gpu
P = MoEProblem(512, 1024, 8, 2, shared_experts=1, tokens_per_rank=200)


@pytest.fixture(scope="module")
def layer_and_weights():
    from flashmoe_gen.runtime import FlashMoE
    w = MoEWeights.random(P, 3)
    return FlashMoE(P, weights=w), w


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_rows_stay_in_their_tokens(layer_and_weights, bad):
    import cupy

    layer, w = layer_and_weights
    x = bf16.from_bits(random_tokens(200, P.hidden, seed=4))
    rows = [0, 17, 199]
    x[rows, 5] = float(bad)
    bits = bf16.to_bits(x)
    out = layer.forward(cupy.asarray(bits))
    cupy.cuda.Device().synchronize()  # a bad row index would surface here as a CUDA error
    got = bf16.from_bits(out.get()).astype(np.float64)
    idx = layer.last_routing()[0].get().astype(np.int64)
    assert ((idx >= 0) & (idx < P.experts)).all()
    keep = np.setdiff1d(np.arange(200), rows)
    ref = moe_reference(P, [bits], w, topk_idx=[idx]).out[0]
    assert np.isfinite(got[keep]).all()
    assert relative_error(got[keep], ref[keep]) <= 1e-2
    assert not np.isfinite(got[rows]).any()  # the poisoned tokens show it, every column
    layer.forward(cupy.asarray(random_tokens(8, P.hidden, seed=5)))  # the context lives on
    cupy.cuda.Device().synchronize()


@pytest.mark.parametrize("case", ["dtype", "shape", "rank3", "out_shape", "out_dtype"])
def test_wrong_tensors_are_typed_errors(layer_and_weights, case):
    import cupy

    layer, _ = layer_and_weights
    x = cupy.zeros((4, P.hidden), np.uint16)
    out = None
    if case == "dtype":
        x = cupy.zeros((4, P.hidden), np.float32)
    elif case == "shape":
        x = cupy.zeros((4, P.hidden + 8), np.uint16)
    elif case == "rank3":
        x = cupy.zeros((1, 4, P.hidden), np.uint16)
    elif case == "out_shape":
        out = cupy.zeros((5, P.hidden), np.uint16)
    else:
        out = cupy.zeros((4, P.hidden), np.float32)
    with pytest.raises(ProblemError, match="expected uint16"):
        layer.forward(x, out=out)


def test_non_contiguous_input_is_made_contiguous(layer_and_weights):
    import cupy

    layer, w = layer_and_weights
    wide = random_tokens(64, 2 * P.hidden, seed=6)
    x = cupy.asarray(wide)[:, ::2]  # every other column: a strided view
    assert not x.flags.c_contiguous
    out = layer.forward(x)
    bits = np.ascontiguousarray(wide[:, ::2])
    idx = layer.last_routing()[0].get().astype(np.int64)
    ref = moe_reference(P, [bits], w, topk_idx=[idx]).out[0]
    assert relative_error(bf16.from_bits(out.get()).astype(np.float64), ref) <= 1e-2


def test_misaligned_tensors_copied_or_refused(layer_and_weights):
    """The kernels read x and store out as 16-byte vectors: an x that starts off that
    boundary (a view one row element in) is copied; such an out is a typed error that says
    what to pass, not a misaligned-address fault that kills the context."""
    import cupy

    layer, w = layer_and_weights
    bits = random_tokens(32, P.hidden, seed=8)
    flat = cupy.zeros(32 * P.hidden + 1, np.uint16)
    flat[1:] = cupy.asarray(bits).ravel()
    x = flat[1:].reshape(32, P.hidden)  # contiguous, 2 bytes past a 16-byte boundary
    assert x.flags.c_contiguous and x.data.ptr % 16
    out = layer.forward(x)
    idx = layer.last_routing()[0].get().astype(np.int64)
    ref = moe_reference(P, [bits], w, topk_idx=[idx]).out[0]
    assert relative_error(bf16.from_bits(out.get()).astype(np.float64), ref) <= 1e-2
    bad_out = cupy.zeros(32 * P.hidden + 1, np.uint16)[1:].reshape(32, P.hidden)
    with pytest.raises(ProblemError, match="16-byte"):
        layer.forward(cupy.asarray(bits), out=bad_out)
    layer.forward(cupy.asarray(bits))  # the context lives on
    cupy.cuda.Device().synchronize()
