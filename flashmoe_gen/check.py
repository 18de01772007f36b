"""Check a live layer on every rank against the float64 reference (docs/semantics.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bf16
from .comm import wait_gpu
from .reference import Routing, drop_mask, moe_reference, relative_error, route, routing_weights
from .weights import MoEWeights

#: Above this many tokens, check a random subset of rows against the float64 reference.
FULL_CHECK_TOKENS = 1024
SUBSET_ROWS = 128
TOLERANCE = 1e-2
#: Routing is compared only where the k-th and (k+1)-th choice values (and, with groups, the
#: topk_group-th and next group scores) differ by more than this.
ROUTING_MARGIN = 1e-4
POISON = 0xFFFF  # a bf16 NaN: any element the layer fails to write stays NaN
#: Rows per rank the sampled check (``check_layer_sampled``) compares; fewer tokens: all.
SAMPLE_ROWS = 64


@dataclass(frozen=True)
class CheckResult:
    rel_error: float          # this rank
    max_rel_error: float      # over all ranks
    routing_mismatches: int   # tokens whose clear-margin top-k differs from the reference
    rows_checked: int
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.max_rel_error <= TOLERANCE and self.routing_mismatches == 0


def routing_mismatches(problem, x_bits: np.ndarray, weights: MoEWeights,
                       topk_idx: np.ndarray, margin: float = ROUTING_MARGIN) -> int:
    """Tokens whose expert set ``topk_idx`` differs from the reference's, among those whose
    choice is clear (no near-tie within ``margin``: ``Routing.clear``)."""
    if problem.top_k == problem.experts:
        return 0
    return _mismatches(problem, route(problem, x_bits, weights.gate, weights.expert_bias),
                       topk_idx, margin)


def _mismatches(problem, own: Routing, topk_idx: np.ndarray, margin: float) -> int:
    if problem.top_k == problem.experts:
        return 0
    clear = own.clear(problem, margin)
    return int((np.sort(topk_idx[clear], 1) != np.sort(own.topk_idx[clear], 1))
               .any(axis=1).sum())


def check_layer(layer, x_bits: np.ndarray, weights: MoEWeights, comm=None,
                seed: int = 0, cache: dict | None = None) -> CheckResult:
    """Run ``layer`` once on ``x_bits`` (poisoned output) and compare on this rank.

    ``weights`` holds all experts (the reference needs every expert this rank's tokens
    visit). Collective when ``comm`` is given: every rank must call it. ``cache`` (a dict
    kept by the caller) reuses the float64 reference when the routing is the same, as it is
    for every config of one problem and input.
    """
    import cupy

    p = layer.problem
    x = cupy.asarray(x_bits)
    out = cupy.full((x_bits.shape[0], p.hidden), POISON, np.uint16)
    layer.forward(x, out=out)
    wait_gpu(getattr(layer, "comm", None), "the checked forward")
    got = bf16.from_bits(out.get()).astype(np.float64)
    idx = layer.last_routing()[0].get().astype(np.int64)

    t = x_bits.shape[0]
    rows = None
    if t > FULL_CHECK_TOKENS:
        rows = np.sort(np.random.default_rng(seed).choice(t, SUBSET_ROWS, replace=False))
    xs = [np.zeros((0, p.hidden), np.uint16)] * p.world_size
    xs[layer.rank] = x_bits
    idxs = [np.zeros((0, p.top_k), np.int64)] * p.world_size
    idxs[layer.rank] = idx
    sel = [None] * p.world_size
    sel[layer.rank] = rows
    cap = layer.capacity if p.capacity_factor is not None else None
    key = (hash(idx.tobytes()), cap, None if rows is None else rows.tobytes())
    if cache is not None and key in cache:
        ref_out = cache[key]
    else:
        ref_out = moe_reference(p, xs, weights, topk_idx=idxs, capacity=cap,
                                rows=sel).out[layer.rank]
        if cache is not None:
            cache[key] = ref_out
    finite = bool(np.isfinite(got).all())
    err = relative_error(got if rows is None else got[rows], ref_out) if t else 0.0

    mismatches = routing_mismatches(p, x_bits, weights, idx) if t else 0
    return _result(comm, err, mismatches, t if rows is None else len(rows), finite)


def _result(comm, err: float, mismatches: int, rows_checked: int, finite: bool) -> CheckResult:
    """This rank's figures, with the maximum error and the mismatches over every rank
    (collective when ``comm`` is given)."""
    max_err = err if finite else float("inf")
    if comm is not None:
        max_err = max(comm.mpi.allgather(max_err))
        mismatches = sum(comm.mpi.allgather(mismatches))
    return CheckResult(err, max_err, mismatches, rows_checked, finite)


# -- the sampled check: a few rows on the GPU, only the experts they use -----------------
def sample_rows(tokens: int, seed: int, rank: int, n: int = SAMPLE_ROWS) -> np.ndarray:
    """Sorted row indices to check: all ``tokens`` when at most ``n``, else ``n`` distinct
    rows drawn from (seed, rank) (deterministic, different per rank)."""
    if tokens <= n:
        return np.arange(tokens, dtype=np.int64)
    rng = np.random.default_rng([seed, rank, 0xC4EC])
    return np.sort(rng.choice(tokens, n, replace=False)).astype(np.int64)


def sampled_errors(problem, x_rows_bits: np.ndarray, got_rows: np.ndarray,
                   topk_idx: np.ndarray, rows: np.ndarray, seed: int, capacity: int | None,
                   xp=np, cache: dict | None = None, margin: float = ROUTING_MARGIN):
    """(relative error, routing mismatches) of the output rows ``got_rows [n, H]`` (host
    float) of the sample ``rows`` against the float64 reference of the counter-based weights
    of ``seed`` (``gen_weights``), computed on ``xp`` from the experts these rows use.

    ``topk_idx [T, k]``: the layer's routing of all this rank's tokens (drops under a
    capacity depend on token order); the output reference follows it, as ``check_layer``
    does, and mismatches count clear-margin rows where it differs from the reference's.
    An id outside ``0..E-1`` counts as a mismatch. ``cache`` (a dict kept by the caller)
    holds the gate and the reference by routing, as the configs of one problem share them.
    """
    from . import gen_weights as g
    from .sampled_reference import rows_reference

    p = problem
    cache = {} if cache is None else cache
    if ("gate", seed) not in cache:
        cache["gate", seed] = (g.generated_gate(p, seed), g.generated_expert_bias(p, seed))
    gate, bias = cache["gate", seed]
    idx_all = np.asarray(topk_idx, np.int64)
    idx = idx_all[rows]
    if not len(rows):
        return 0.0, 0
    own = route(p, x_rows_bits, gate, bias)
    bad = ((idx < 0) | (idx >= p.experts)).any(axis=1)
    mismatches = int(bad.sum()) + _mismatches(p, _subset(own, ~bad), idx[~bad], margin)
    safe = np.where(bad[:, None], 0, idx)
    kept = drop_mask(p, [np.clip(idx_all, 0, p.experts - 1)], capacity)[0][rows]
    coef = routing_weights(p, own.probs, safe) * kept * ~bad[:, None]
    key = ("ref", seed, capacity, idx.tobytes(), kept.tobytes(), rows.tobytes())
    if key not in cache:
        ref = rows_reference(p, xp.asarray(x_rows_bits), idx, coef, seed, xp)
        cache[key] = ref if xp is np else ref.get()
    return relative_error(got_rows, cache[key]), mismatches


def _subset(r: Routing, keep: np.ndarray) -> Routing:
    return Routing(r.topk_idx[keep], r.topk_w[keep], r.probs[keep],
                   None if r.choice is None else r.choice[keep],
                   None if r.group_scores is None else r.group_scores[keep])


def check_layer_sampled(layer, x, x_bits: np.ndarray, seed: int, comm=None,
                        n_rows: int = SAMPLE_ROWS, cache: dict | None = None) -> CheckResult:
    """Run ``layer`` once on ``x`` (device copy of ``x_bits``, output poisoned) and compare
    ``n_rows`` sampled rows on the GPU against the float64 reference of the counter-based
    weights of ``seed`` (``DeviceWeights.generate``), touching only the experts those rows
    use: host and device work scale with rows x used experts, not with E. Every output
    element is checked finite (on the GPU); tolerance and routing margin as ``check_layer``.
    Collective when ``comm`` is given (the error and mismatches are gathered)."""
    import cupy

    p = layer.problem
    t = x_bits.shape[0]
    out = cupy.full((t, p.hidden), POISON, np.uint16)
    layer.forward(x, out=out)
    wait_gpu(getattr(layer, "comm", None), "the checked forward")
    finite = not bool(((out & 0x7F80) == 0x7F80).any())  # exponent all ones: NaN or Inf
    rows = sample_rows(t, seed, layer.rank, n_rows)
    err, mismatches = 0.0, 0
    if t:
        idx = layer.last_routing()[0].get().astype(np.int64)
        got = bf16.from_bits(out[cupy.asarray(rows)].get()).astype(np.float64)
        cap = layer.capacity if p.capacity_factor is not None else None
        err, mismatches = sampled_errors(p, x_bits[rows], got, idx, rows, seed, cap, cupy,
                                         cache)
    return _result(comm, err, mismatches, len(rows), finite)
