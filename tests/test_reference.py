"""The float64 reference against a plain per-token loop written from docs/semantics.md."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.errors import ProblemError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import (
    drop_mask,
    moe_reference,
    relative_error,
    route,
    routing_weights,
)
from flashmoe_gen.weights import MoEWeights, random_tokens

SMALL = {"hidden": 64, "intermediate": 32, "experts": 8, "top_k": 2}


def f64(bits: np.ndarray) -> np.ndarray:
    return bf16.from_bits(bits).astype(np.float64)


def loop_reference(problem: MoEProblem, xs, weights: MoEWeights, capacity=None,
                   topk_idx=None):
    """Token by token: route, count arrivals per (rank, expert), add kept expert outputs."""
    gate = f64(weights.gate)
    k, n_exp = problem.top_k, problem.experts

    def mlp(v, w1, w3, w2):
        h = v @ f64(w1)
        return ((h / (1.0 + np.exp(-h))) * (v @ f64(w3))) @ f64(w2)

    outs, idxs, dropped = [], [], 0
    for r, x_bits in enumerate(xs):
        x = f64(x_bits)
        out = np.zeros((len(x), problem.hidden))
        idx_r = np.zeros((len(x), k), np.int64)
        arrivals = [0] * n_exp
        for t in range(len(x)):
            logits = x[t] @ gate
            p = np.exp(logits - logits.max())
            p /= p.sum()
            if topk_idx is None:
                chosen = sorted(range(n_exp), key=lambda e: (-p[e], e))[:k]
            else:
                chosen = [int(e) for e in topk_idx[r][t]]
            idx_r[t] = chosen
            w = np.array([p[e] for e in chosen])
            if problem.normalize_topk:
                w = w / w.sum()
            for j, e in enumerate(chosen):
                arrivals[e] += 1
                if capacity is not None and arrivals[e] > capacity:
                    dropped += 1
                    continue
                out[t] += w[j] * mlp(x[t], weights.w1[e], weights.w3[e], weights.w2[e])
            for s in range(problem.shared_experts):
                out[t] += mlp(x[t], weights.shared_w1[s], weights.shared_w3[s],
                              weights.shared_w2[s])
        outs.append(out)
        idxs.append(idx_r)
    return outs, idxs, dropped


def make(problem: MoEProblem, tokens: list[int], seed: int):
    weights = MoEWeights.random(problem, seed=seed)
    xs = [random_tokens(t, problem.hidden, seed=seed * 100 + r + 1) for r, t in enumerate(tokens)]
    return weights, xs


def assert_matches(res, loop_outs, loop_idx) -> None:
    for r, (o, lo) in enumerate(zip(res.out, loop_outs, strict=True)):
        assert o.shape == lo.shape
        if lo.size:
            assert relative_error(o, lo) < 1e-12, r
        np.testing.assert_array_equal(res.routing[r].topk_idx, loop_idx[r])


@pytest.mark.parametrize("kw, tokens", [
    ({"shared_experts": 1}, [29]),
    ({"shared_experts": 2, "shared_intermediate": 16, "normalize_topk": False}, [31]),
    ({"world_size": 2}, [37, 0]),
    ({"world_size": 4, "shared_experts": 1, "top_k": 3}, [5, 17, 1, 33]),
])
def test_matches_loop(kw, tokens):
    problem = MoEProblem(**{**SMALL, **kw})
    weights, xs = make(problem, tokens, seed=len(tokens) + 7 * len(kw))
    res = moe_reference(problem, xs, weights)
    assert_matches(res, *loop_reference(problem, xs, weights)[:2])
    assert res.dropped == 0
    for m, rt, t in zip(res.kept, res.routing, tokens, strict=True):
        assert m.all() and m.shape == (t, problem.top_k)
        assert rt.probs.shape == (t, problem.experts) and rt.topk_w.shape == (t, problem.top_k)
        if t:
            np.testing.assert_allclose(rt.probs.sum(axis=1), 1.0, rtol=1e-14)
            # Descending probabilities along j.
            assert np.all(np.diff(np.take_along_axis(rt.probs, rt.topk_idx, 1), axis=1) <= 0)
            if problem.normalize_topk:
                np.testing.assert_allclose(rt.topk_w.sum(axis=1), 1.0, rtol=1e-14)


def test_tie_goes_to_lower_index():
    problem = MoEProblem(**{**SMALL, "top_k": 3})
    weights, (x,) = make(problem, [300], seed=3)
    weights.gate[:, 5] = weights.gate[:, 2]
    rt = route(problem, x, weights.gate)
    # bf16 products are exact in float64 and H=64 sums of them stay exact, so the tie is exact.
    np.testing.assert_array_equal(rt.probs[:, 2], rt.probs[:, 5])
    pos = {e: [list(row).index(e) if e in row else None for row in rt.topk_idx] for e in (2, 5)}
    both = 0
    for p2, p5 in zip(pos[2], pos[5], strict=True):
        if p5 is not None:
            assert p2 is not None and p2 + 1 == p5
            both += 1
    assert both > 0 and np.any(rt.topk_idx[:, 0] == 2)


def per_pair_counts(idx: np.ndarray, experts: int) -> np.ndarray:
    return np.bincount(idx.ravel(), minlength=experts)


def test_capacity_keeps_first_tokens():
    problem = MoEProblem(**{**SMALL, "world_size": 2, "shared_experts": 1})
    weights, xs = make(problem, [40, 23], seed=11)
    cap = 3
    res = moe_reference(problem, xs, weights, capacity=cap)
    loop_outs, loop_idx, loop_dropped = loop_reference(problem, xs, weights, capacity=cap)
    assert_matches(res, loop_outs, loop_idx)
    expected = 0
    for rt, m in zip(res.routing, res.kept, strict=True):
        for e in range(problem.experts):
            hits = np.argwhere(rt.topk_idx == e)  # row-major = token order
            flags = m[hits[:, 0], hits[:, 1]]
            np.testing.assert_array_equal(flags, np.arange(len(hits)) < cap)
            expected += max(len(hits) - cap, 0)
    assert res.dropped == expected == loop_dropped > 0
    # drop_mask alone agrees, and capacity None keeps all.
    idx = [rt.topk_idx for rt in res.routing]
    for a, b in zip(drop_mask(problem, idx, cap), res.kept, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(m.all() for m in drop_mask(problem, idx, None))


def test_skewed_routing_drops_and_does_not_renormalise():
    problem = MoEProblem(**{**SMALL, "world_size": 2})
    weights, xs = make(problem, [50, 45], seed=21)
    # Bias expert 0: a large gate entry on dim 0 plus a large x[:, 0] on most tokens.
    weights.gate[0, 0] = bf16.to_bits(np.array([4.0], np.float32))[0]
    rng = np.random.default_rng(5)
    for x in xs:
        x[rng.random(len(x)) < 0.8, 0] = bf16.to_bits(np.array([8.0], np.float32))[0]
    cap = 4
    res = moe_reference(problem, xs, weights, capacity=cap)
    loop_outs, loop_idx, loop_dropped = loop_reference(problem, xs, weights, capacity=cap)
    assert_matches(res, loop_outs, loop_idx)
    expected = 0
    for rt in res.routing:
        counts = per_pair_counts(rt.topk_idx, problem.experts)
        assert counts[0] > 0.6 * len(rt.topk_idx)
        expected += int(np.maximum(counts - cap, 0).sum())
    assert res.dropped == loop_dropped == expected > 0
    # A dropped assignment's weight is not moved onto the kept ones.
    for rt, m in zip(res.routing, res.kept, strict=True):
        partial = ~m.all(axis=1)
        assert partial.any()
        np.testing.assert_allclose(rt.topk_w.sum(axis=1), 1.0, rtol=1e-14)


@pytest.mark.parametrize("capacity", [None, 2])
def test_rows_subset(capacity):
    problem = MoEProblem(**{**SMALL, "world_size": 2, "shared_experts": 1})
    weights, xs = make(problem, [41, 19], seed=31 + (capacity or 0))
    full = moe_reference(problem, xs, weights, capacity=capacity)
    rows = [np.array([40, 0, 7, 7, 13]), None]
    part = moe_reference(problem, xs, weights, capacity=capacity, rows=rows)
    assert part.out[0].shape == (5, problem.hidden)
    assert relative_error(part.out[0], full.out[0][rows[0]]) < 1e-12
    assert relative_error(part.out[1], full.out[1]) < 1e-12
    assert part.dropped == full.dropped
    empty = moe_reference(problem, xs, weights, rows=[np.array([], np.int64), None])
    assert empty.out[0].shape == (0, problem.hidden)


def test_topk_override():
    problem = MoEProblem(**{**SMALL, "world_size": 2, "top_k": 3})
    weights, xs = make(problem, [23, 9], seed=41)
    rng = np.random.default_rng(9)
    given = [np.stack([rng.permutation(problem.experts)[:3] for _ in range(len(x))])
             for x in xs]
    res = moe_reference(problem, xs, weights, topk_idx=given)
    assert_matches(res, *loop_reference(problem, xs, weights, topk_idx=given)[:2])
    own = moe_reference(problem, xs, weights)
    for rt, g, o in zip(res.routing, given, own.routing, strict=True):
        np.testing.assert_array_equal(rt.topk_idx, g)
        np.testing.assert_array_equal(rt.probs, o.probs)
        np.testing.assert_allclose(rt.topk_w, routing_weights(problem, o.probs, g), rtol=0)


def test_errors():
    problem = MoEProblem(**{**SMALL, "world_size": 2})
    weights, xs = make(problem, [4, 4], seed=51)
    with pytest.raises(ProblemError):
        moe_reference(problem, xs[:1], weights)
    with pytest.raises(ProblemError):
        moe_reference(problem, xs, weights.experts_slice(range(4, 8)))
    with pytest.raises(ProblemError):
        moe_reference(problem, [xs[0], xs[1][:, :32]], weights)
    with pytest.raises(ProblemError):
        moe_reference(problem, xs, weights, topk_idx=[np.full((4, 2), 8), np.zeros((4, 2))])
    with pytest.raises(ProblemError):
        moe_reference(problem, xs, weights, capacity=-1)


def test_relative_error():
    rng = np.random.default_rng(61)
    ref = rng.standard_normal((5, 8))
    assert relative_error(ref, ref) == 0.0
    assert relative_error(2 * ref, ref) == pytest.approx(1.0)
    bad = ref.copy()
    bad[1, 2] = np.nan
    assert relative_error(bad, ref) == float("inf")
    bad[1, 2] = np.inf
    assert relative_error(bad, ref) == float("inf")
    assert relative_error(ref, np.zeros_like(ref)) == pytest.approx(np.linalg.norm(ref))
