"""Check a live layer on every rank against the float64 reference (docs/semantics.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bf16
from .reference import moe_reference, relative_error, route
from .weights import MoEWeights

#: Above this many tokens, check a random subset of rows against the float64 reference.
FULL_CHECK_TOKENS = 1024
SUBSET_ROWS = 128
TOLERANCE = 1e-2
#: Routing is compared only where the k-th and (k+1)-th choice values (and, with groups, the
#: topk_group-th and next group scores) differ by more than this.
ROUTING_MARGIN = 1e-4
POISON = 0xFFFF  # a bf16 NaN: any element the layer fails to write stays NaN


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
    own = route(problem, x_bits, weights.gate, weights.expert_bias)
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
    cupy.cuda.get_current_stream().synchronize()
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
    max_err = err if finite else float("inf")
    if comm is not None:
        max_err = max(comm.mpi.allgather(max_err))
        mismatches_all = sum(comm.mpi.allgather(mismatches))
    else:
        mismatches_all = mismatches
    return CheckResult(err, max_err, mismatches_all, t if rows is None else len(rows), finite)
