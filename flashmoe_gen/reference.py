"""Float64 host reference of the MoE layer (the contract in docs/semantics.md).

Inputs are bf16 bits; every product and sum is float64, so the reference is the "true"
value a bf16/fp32 kernel is compared against with ``relative_error``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bf16
from .errors import ProblemError
from .problem import MoEProblem
from .weights import MoEWeights


@dataclass
class Routing:
    """One rank's routing decision (docs/semantics.md, Routing)."""

    topk_idx: np.ndarray  # [T, k] int64 global expert ids, descending choice, ties -> lower id
    topk_w: np.ndarray  # [T, k] float64 final weights (normalised, scaled as the rule says)
    probs: np.ndarray  # [T, E] float64 scores: softmax probabilities or sigmoids
    choice: np.ndarray | None = None  # [T, E] what top-k ranks: scores (+ bias), -inf outside
    #                                   the chosen groups; None: the scores themselves
    group_scores: np.ndarray | None = None  # [T, n_group] with group-limited top-k, else None

    def clear(self, problem: MoEProblem, margin: float = 1e-4) -> np.ndarray:
        """[T] bool: tokens whose choice is not a near-tie (the k-th and (k+1)-th choice
        values, and with groups the topk_group-th and next group scores, differ by more than
        ``margin``); only these are compared with a kernel's routing."""
        t = len(self.probs)
        ok = np.ones(t, dtype=bool)
        choice = self.probs if self.choice is None else self.choice
        if problem.top_k < problem.experts:
            c = -np.sort(-choice, axis=1)
            nxt = c[:, problem.top_k]
            # Past the eligible experts the next value is -inf: no tie possible.
            ok &= ~np.isfinite(nxt) | (c[:, problem.top_k - 1] - nxt > margin)
        if self.group_scores is not None and problem.topk_group < problem.n_group:
            g = -np.sort(-self.group_scores, axis=1)
            ok &= g[:, problem.topk_group - 1] - g[:, problem.topk_group] > margin
        return ok


@dataclass
class ReferenceResult:
    out: list[np.ndarray]  # per rank [T_r, H] (or [len(rows[r]), H]) float64
    routing: list[Routing]
    kept: list[np.ndarray]  # per rank [T_r, k] bool
    dropped: int  # dropped (token, expert) assignments over all ranks


def _f64(bits: np.ndarray) -> np.ndarray:
    return bf16.from_bits(bits).astype(np.float64)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    # exp(-softplus(-a)): no overflow warning for large |a|.
    return np.exp(-np.logaddexp(0.0, -a))


def scores_f64(problem: MoEProblem, logits: np.ndarray) -> np.ndarray:
    """Routing scores from the gate logits: softmax over experts or a sigmoid each."""
    if problem.scoring == "sigmoid":
        return _sigmoid(logits)
    # Subtracting the row max keeps exp finite; softmax is invariant to it.
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _route_f64(problem: MoEProblem, x: np.ndarray, gate: np.ndarray,
               bias: np.ndarray | None) -> Routing:
    probs = scores_f64(problem, x @ gate)
    choice = probs + bias[None, :] if problem.expert_bias else probs
    group_scores = None
    if problem.n_group > 1:
        t, ng = len(choice), problem.n_group
        grouped = choice.reshape(t, ng, problem.experts // ng)
        # A group's score: the sum of its two largest choice values (DeepSeek-V3).
        group_scores = -np.sort(-grouped, axis=2)[:, :, :2].sum(axis=2)
        # The topk_group best groups, ties to the lower group index (stable sort).
        keep = np.argsort(-group_scores, axis=1, kind="stable")[:, : problem.topk_group]
        mask = np.zeros((t, ng), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        choice = np.where(np.repeat(mask, problem.experts // ng, axis=1), choice, -np.inf)
    # A stable sort of -choice puts equal values in increasing expert order.
    idx = np.argsort(-choice, axis=1, kind="stable")[:, : problem.top_k].astype(np.int64)
    return Routing(idx, routing_weights(problem, probs, idx), probs,
                   None if choice is probs else choice, group_scores)


def _bias_f64(problem: MoEProblem, weights: MoEWeights) -> np.ndarray | None:
    return np.asarray(weights.expert_bias, np.float64) if problem.expert_bias else None


def route(problem: MoEProblem, x_bits: np.ndarray, gate_bits: np.ndarray,
          expert_bias: np.ndarray | None = None) -> Routing:
    """Routing of the tokens ``x_bits [T, H]`` with ``gate_bits [H, E]`` under the
    problem's rule; ``expert_bias [E]`` (float32) is required when ``problem.expert_bias``."""
    bias = None
    if problem.expert_bias:
        if expert_bias is None or np.shape(expert_bias) != (problem.experts,):
            raise ProblemError("expert_bias", None if expert_bias is None
                               else np.shape(expert_bias),
                               f"this problem's rule needs an expert bias of shape "
                               f"({problem.experts},) (MoEWeights.expert_bias)")
        bias = np.asarray(expert_bias, np.float64)
    return _route_f64(problem, _f64(x_bits), _f64(gate_bits), bias)


def routing_weights(problem: MoEProblem, probs: np.ndarray, topk_idx: np.ndarray) -> np.ndarray:
    """The weights of a given index set (e.g. the kernel's own routing): the unbiased
    scores, divided by their sum if ``normalize_topk``, times ``routed_scaling``."""
    w = np.take_along_axis(probs, np.asarray(topk_idx, dtype=np.int64), axis=1)
    if problem.normalize_topk:
        w = w / w.sum(axis=1, keepdims=True)
    if problem.routed_scaling != 1.0:
        w = w * float(problem.routed_scaling)
    return w


def shared_gate_f64(x: np.ndarray, shared_gate_bits: np.ndarray) -> np.ndarray:
    """[T] float64 ``sigmoid(x @ w_shared_gate)`` (Qwen2-MoE's shared-expert gate)."""
    return _sigmoid(x @ _f64(shared_gate_bits))


def _silu(h: np.ndarray) -> np.ndarray:
    return h * _sigmoid(h)


def expert_mlp(x: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """SwiGLU expert ``(silu(x @ w1) * (x @ w3)) @ w2`` in float64."""
    return (_silu(x @ w1) * (x @ w3)) @ w2


def drop_mask(problem: MoEProblem, topk_idx_per_rank: list[np.ndarray],
              capacity: int | None) -> list[np.ndarray]:
    """Per rank ``[T_r, k]`` bool: True where the assignment fits the capacity.

    Each (source rank, expert) pair keeps its first ``capacity`` assignments in token order
    (row-major over ``[T, k]``); ``capacity=None`` keeps everything.
    """
    kept = []
    for idx in topk_idx_per_rank:
        idx = np.asarray(idx, dtype=np.int64)
        if capacity is None:
            kept.append(np.ones(idx.shape, dtype=bool))
            continue
        flat = idx.ravel()
        # Stable sort groups by expert while keeping token order inside each group, so an
        # assignment's position within its group is its arrival order at that expert.
        order = np.argsort(flat, kind="stable")
        sorted_e = flat[order]
        counts = np.bincount(sorted_e, minlength=problem.experts)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        pos = np.arange(len(flat)) - starts[sorted_e]
        k = np.empty(len(flat), dtype=bool)
        k[order] = pos < capacity
        kept.append(k.reshape(idx.shape))
    return kept


def _check_inputs(problem: MoEProblem, xs: list[np.ndarray], weights: MoEWeights,
                  topk_idx: list[np.ndarray] | None, capacity: int | None,
                  rows: list[np.ndarray | None] | None) -> None:
    p, e = problem.world_size, problem.experts
    if len(xs) != p:
        raise ProblemError("xs", f"{len(xs)} arrays", f"one [T_r, H] array per rank ({p})")
    if weights.first_expert != 0 or weights.num_experts_held != e:
        raise ProblemError("weights", f"experts {weights.first_expert}.."
                           f"{weights.first_expert + weights.num_experts_held - 1}",
                           f"the reference needs all {e} experts (first_expert 0)")
    weights.check(problem)
    for r, x in enumerate(xs):
        if x.ndim != 2 or x.shape[1] != problem.hidden or x.dtype != np.uint16:
            raise ProblemError(f"xs[{r}]", f"{x.shape} {x.dtype}",
                               f"uint16 bf16 bits of shape [T_r, {problem.hidden}]")
    if topk_idx is not None:
        if len(topk_idx) != p:
            raise ProblemError("topk_idx", f"{len(topk_idx)} arrays", f"one per rank ({p})")
        for r, (x, idx) in enumerate(zip(xs, topk_idx, strict=True)):
            idx = np.asarray(idx)
            if idx.shape != (len(x), problem.top_k):
                raise ProblemError(f"topk_idx[{r}]", idx.shape,
                                   f"shape ({len(x)}, {problem.top_k})")
            if idx.size and (idx.min() < 0 or idx.max() >= e):
                raise ProblemError(f"topk_idx[{r}]", (int(idx.min()), int(idx.max())),
                                   f"expert ids in 0..{e - 1}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(
            capacity, (int, np.integer)) or capacity < 0):
        raise ProblemError("capacity", capacity, "None (exact) or an integer >= 0")
    if rows is not None:
        if len(rows) != p:
            raise ProblemError("rows", f"{len(rows)} entries", f"one per rank ({p})")
        for r, (x, sel) in enumerate(zip(xs, rows, strict=True)):
            if sel is not None and np.size(sel) and (np.min(sel) < 0 or np.max(sel) >= len(x)):
                raise ProblemError(f"rows[{r}]", (int(np.min(sel)), int(np.max(sel))),
                                   f"token indices in 0..{len(x) - 1}")


def moe_reference(problem: MoEProblem, xs: list[np.ndarray], weights: MoEWeights, *,
                  topk_idx: list[np.ndarray] | None = None,
                  capacity: int | None = None,
                  rows: list[np.ndarray | None] | None = None) -> ReferenceResult:
    """The layer's output on every rank in float64.

    ``topk_idx`` replaces the reference's routing (weights still come from its probs);
    ``capacity`` drops per (source rank, expert) beyond the first ``capacity`` tokens;
    ``rows[r]`` limits the evaluated output rows of rank r (routing and drops still see
    all tokens, since drops depend on token order).
    """
    _check_inputs(problem, xs, weights, topk_idx, capacity, rows)
    gate = _f64(weights.gate)
    bias = _bias_f64(problem, weights)
    xf = [_f64(x) for x in xs]
    routing = []
    for r, x in enumerate(xf):
        rt = _route_f64(problem, x, gate, bias)
        if topk_idx is not None:
            idx = np.asarray(topk_idx[r], dtype=np.int64)
            rt = Routing(idx, routing_weights(problem, rt.probs, idx), rt.probs, rt.choice,
                         rt.group_scores)
        routing.append(rt)
    kept = drop_mask(problem, [rt.topk_idx for rt in routing], capacity)
    dropped = int(sum((~m).sum() for m in kept))

    # Gather (token, slot) assignments by expert across ranks so that each expert's weights
    # are converted once and applied in one matmul over all its rows.
    sel_rows = [np.arange(len(x)) if rows is None or rows[r] is None
                else np.asarray(rows[r], dtype=np.int64) for r, x in enumerate(xf)]
    outs = [np.zeros((len(s), problem.hidden)) for s in sel_rows]
    by_expert: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[] for _ in range(
        problem.experts)]
    for r, (rt, m, s) in enumerate(zip(routing, kept, sel_rows, strict=True)):
        idx = rt.topk_idx[s].ravel()
        w = (rt.topk_w[s] * m[s]).ravel()
        out_row = np.repeat(np.arange(len(s)), problem.top_k)
        live = m[s].ravel()
        order = np.argsort(idx[live], kind="stable")
        idx_l, w_l, row_l = idx[live][order], w[live][order], out_row[live][order]
        bounds = np.searchsorted(idx_l, np.arange(problem.experts + 1))
        for e in range(problem.experts):
            a, b = bounds[e], bounds[e + 1]
            if b > a:
                by_expert[e].append((r, row_l[a:b], w_l[a:b]))

    for e, parts in enumerate(by_expert):
        if not parts:
            continue
        w1, w3, w2 = _f64(weights.w1[e]), _f64(weights.w3[e]), _f64(weights.w2[e])
        for r, out_row, w in parts:
            y = expert_mlp(xf[r][sel_rows[r][out_row]], w1, w3, w2) * w[:, None]
            # An override may route a token to the same expert twice; add.at sums repeats.
            if np.any(np.diff(out_row) == 0):
                np.add.at(outs[r], out_row, y)
            else:
                outs[r][out_row] += y

    if problem.shared_experts:
        for r, s_rows in enumerate(sel_rows):
            if not len(s_rows):
                continue
            xr = xf[r][s_rows]
            shared = np.zeros_like(outs[r])
            for s in range(problem.shared_experts):
                shared += expert_mlp(xr, _f64(weights.shared_w1[s]), _f64(weights.shared_w3[s]),
                                     _f64(weights.shared_w2[s]))
            if problem.shared_gate:  # one gate on the sum of the shared experts
                shared *= shared_gate_f64(xr, weights.shared_gate)[:, None]
            outs[r] += shared
    return ReferenceResult(outs, routing, kept, dropped)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """``||out - ref||_F / ||ref||_F``; inf if ``out`` has NaN/Inf; ``||out||`` if ref is 0."""
    o = np.asarray(out, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(o)):
        return float("inf")
    nref = float(np.linalg.norm(r))
    if nref == 0.0:
        return float(np.linalg.norm(o))
    return float(np.linalg.norm(o - r) / nref)
