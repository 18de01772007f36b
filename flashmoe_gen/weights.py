"""Host-side MoE weights (bf16 bits), deterministic per expert so any rank can rebuild any.

Shapes follow docs/semantics.md: ``gate [H, E]``, ``w1, w3 [n, H, I]``, ``w2 [n, I, H]`` for
the experts ``first_expert .. first_expert + n - 1``, shared experts ``[S, H, Is]`` /
``[S, Is, H]``. Values are bf16 bits (uint16); ``*_f32`` helpers give exact float32 views.
Routing rules that need them add ``expert_bias [E]`` (float32, DeepSeek-V3's score
correction bias) and ``shared_gate [H]`` (bf16 bits, Qwen2-MoE's shared-expert gate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bf16
from .errors import ArgumentError, ProblemError
from .problem import MoEProblem


def _normal(seed: int, tag: tuple[int, ...], shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    rng = np.random.default_rng([seed, *tag])
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(1.0 / np.sqrt(fan_in))
    return bf16.to_bits(a)


def expert_range(problem: MoEProblem, experts: range | None) -> range:
    """``experts`` checked as a contiguous range of the problem's experts (None: all)."""
    e = problem.experts
    experts = range(e) if experts is None else experts
    if not isinstance(experts, range) or experts.step != 1 or experts.start < 0 \
            or experts.stop > e:
        raise ProblemError("experts", experts, f"a contiguous range within 0..{e}")
    return experts


@dataclass
class MoEWeights:
    gate: np.ndarray
    w1: np.ndarray
    w3: np.ndarray
    w2: np.ndarray
    shared_w1: np.ndarray
    shared_w3: np.ndarray
    shared_w2: np.ndarray
    first_expert: int = 0
    expert_bias: np.ndarray | None = None  # [E] float32 when problem.expert_bias
    shared_gate: np.ndarray | None = None  # [H] bf16 bits when problem.shared_gate

    @property
    def num_experts_held(self) -> int:
        return self.w1.shape[0]

    @classmethod
    def random(cls, problem: MoEProblem, seed: int = 0,
               experts: range | None = None) -> MoEWeights:
        """Weights ~ N(0,1)/sqrt(fan_in); expert e's values depend only on (seed, e)."""
        _check_problem(problem)
        _check_seed(seed)
        h, i = problem.hidden, problem.intermediate
        experts = expert_range(problem, experts)
        n = len(experts)
        w1 = np.empty((n, h, i), np.uint16)
        w3 = np.empty((n, h, i), np.uint16)
        w2 = np.empty((n, i, h), np.uint16)
        for j, ge in enumerate(experts):
            w1[j] = _normal(seed, (1, ge), (h, i), h)
            w3[j] = _normal(seed, (3, ge), (h, i), h)
            w2[j] = _normal(seed, (2, ge), (i, h), i)
        s, si = problem.shared_experts, problem.shared_intermediate or 0
        return cls(
            gate=_normal(seed, (0,), (h, problem.experts), h),
            w1=w1, w3=w3, w2=w2,
            shared_w1=np.stack([_normal(seed, (11, k), (h, si), h) for k in range(s)])
            if s else np.zeros((0, h, si), np.uint16),
            shared_w3=np.stack([_normal(seed, (13, k), (h, si), h) for k in range(s)])
            if s else np.zeros((0, h, si), np.uint16),
            shared_w2=np.stack([_normal(seed, (12, k), (si, h), si) for k in range(s)])
            if s else np.zeros((0, si, h), np.uint16),
            first_expert=experts.start,
            expert_bias=random_expert_bias(problem, seed) if problem.expert_bias else None,
            shared_gate=_normal(seed, (22,), (h,), h) if problem.shared_gate else None,
        )

    def check(self, problem: MoEProblem) -> None:
        """Raise ProblemError naming the first array whose shape does not fit ``problem``."""
        if not isinstance(self, MoEWeights):
            raise ArgumentError("weights", self, "a flashmoe_gen.weights.MoEWeights "
                                "(e.g. MoEWeights.random(problem))")
        _check_problem(problem)
        for name in ("gate", "w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray):
                raise ProblemError(f"weights.{name}", type(arr).__name__,
                                   "expected a numpy array of bf16 bits (uint16)")
        h, i, e = problem.hidden, problem.intermediate, problem.experts
        n = self.num_experts_held
        fe = self.first_expert
        if not isinstance(fe, int) or isinstance(fe, bool) or not 0 <= fe <= e - n:
            raise ProblemError("weights.first_expert", fe,
                               f"an integer in 0..{e - n} (these weights hold {n} experts)")
        s, si = problem.shared_experts, problem.shared_intermediate or 0
        want = {"gate": (h, e), "w1": (n, h, i), "w3": (n, h, i), "w2": (n, i, h),
                "shared_w1": (s, h, si), "shared_w3": (s, h, si), "shared_w2": (s, si, h)}
        for name, shape in want.items():
            arr = getattr(self, name)
            if tuple(arr.shape) != shape:
                raise ProblemError(f"weights.{name}", tuple(arr.shape), f"expected shape {shape}")
            if arr.dtype != np.uint16:
                raise ProblemError(f"weights.{name}", str(arr.dtype),
                                   "expected bf16 bits as uint16 (see flashmoe_gen.bf16)")
        self._check_routing(problem)

    def _check_routing(self, problem: MoEProblem) -> None:
        """The routing rule's extra arrays: present, shaped and typed when the rule needs
        them, absent (None) when it does not."""
        for name, needed, shape, dtype, what in (
                ("expert_bias", problem.expert_bias, (problem.experts,), np.float32,
                 "float32 (DeepSeek-V3 e_score_correction_bias)"),
                ("shared_gate", problem.shared_gate, (problem.hidden,), np.uint16,
                 "bf16 bits as uint16 (Qwen2-MoE shared_expert_gate weight)")):
            arr = getattr(self, name)
            if not needed:
                if arr is not None:
                    raise ProblemError(f"weights.{name}", "an array",
                                       f"must be None: the problem has {name}=False")
                continue
            if not isinstance(arr, np.ndarray):
                raise ProblemError(f"weights.{name}", type(arr).__name__,
                                   f"required by the problem's {name}=True: a numpy array "
                                   f"of shape {shape}, {what}")
            if tuple(arr.shape) != shape:
                raise ProblemError(f"weights.{name}", tuple(arr.shape), f"expected shape {shape}")
            if arr.dtype != dtype:
                raise ProblemError(f"weights.{name}", str(arr.dtype), f"expected {what}")
        if problem.expert_bias and not np.all(np.isfinite(self.expert_bias)):
            raise ProblemError("weights.expert_bias", "non-finite values",
                               "every bias must be a finite float32")

    def for_rank(self, problem: MoEProblem, rank: int) -> MoEWeights:
        """This rank's experts from weights holding all experts or exactly this rank's,
        checked against the problem; ProblemError names the experts the rank needs."""
        el = problem.local_experts
        local = range(rank * el, (rank + 1) * el)
        w = self
        if w.num_experts_held == problem.experts and w.first_expert == 0:
            w = w.experts_slice(local)
        if w.first_expert != local.start or w.num_experts_held != el:
            raise ProblemError("weights", f"experts {w.first_expert}..+{w.num_experts_held}",
                               f"rank {rank} needs experts {local.start}..{local.stop - 1} "
                               f"(or all {problem.experts})")
        w.check(problem)
        return w

    def experts_slice(self, experts: range) -> MoEWeights:
        """The weights of a contiguous range of global experts (e.g. one rank's)."""
        a, b = experts.start - self.first_expert, experts.stop - self.first_expert
        if a < 0 or b > self.num_experts_held:
            raise ProblemError("experts", experts, "not held by these weights")
        return MoEWeights(self.gate, self.w1[a:b], self.w3[a:b], self.w2[a:b], self.shared_w1,
                          self.shared_w3, self.shared_w2, experts.start, self.expert_bias,
                          self.shared_gate)


def random_expert_bias(problem: MoEProblem, seed: int) -> np.ndarray:
    """[E] float32 ~ N(0, 1) x scale from (seed, 21): the scale (0.1 for sigmoid scores,
    1/E for softmax probabilities) is that of the scores, so the bias changes some choices
    without deciding them all."""
    rng = np.random.default_rng([seed, 21])
    scale = 0.1 if problem.scoring == "sigmoid" else 1.0 / problem.experts
    return (rng.standard_normal(problem.experts) * scale).astype(np.float32)


def _check_problem(problem) -> None:
    if not isinstance(problem, MoEProblem):
        raise ArgumentError("problem", problem, "a flashmoe_gen.MoEProblem")


def _check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ArgumentError("seed", seed, "a non-negative integer")


def random_tokens(tokens: int, hidden: int, seed: int) -> np.ndarray:
    """Fresh N(0,1) activations as bf16 bits, ``[tokens, hidden]``."""
    for name, v in (("tokens", tokens), ("hidden", hidden)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ArgumentError(name, v, "a non-negative integer")
    _check_seed(seed)
    rng = np.random.default_rng([seed, 0xA11])
    return bf16.to_bits(rng.standard_normal((tokens, hidden), dtype=np.float32))
