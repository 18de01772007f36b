"""One rank's weights on the GPU, in the layouts the kernels read.

Experts are stored N x K (K contiguous: ``w1t/w3t [E_local, I, H]``, ``w2t [E_local, H, I]``)
so both GEMM operands load alike; shared experts sum, so they fuse into one MLP of width
S * I_s. Several layers (e.g. tuning candidates) can share one ``DeviceWeights``. Routing
rules that need them add ``expert_bias [E]`` (float32) and ``shared_gate [H]`` (bf16 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ProblemError
from .problem import MoEProblem
from .weights import MoEWeights


def as_bits(a, name: str):
    """A device array of bf16 bits (uint16) from cupy/numpy uint16, or any DLPack bf16."""
    import cupy

    if isinstance(a, (np.ndarray, cupy.ndarray)):
        if a.dtype not in (np.uint16, np.int16):
            raise ProblemError(name, str(a.dtype), "expected bf16 bits (uint16) or a bf16 tensor")
        return cupy.asarray(a).view(np.uint16)
    if str(getattr(a, "dtype", "")) == "torch.bfloat16":
        import torch  # DLPack has no bf16 consumer in CuPy: reinterpret the bits first
        a = a.view(torch.int16)
    try:
        arr = cupy.from_dlpack(a)
    except Exception as e:
        raise ProblemError(name, type(a).__name__, f"not a DLPack array on this GPU: {e}") from e
    if arr.dtype.itemsize != 2:
        raise ProblemError(name, str(arr.dtype), "expected a 2-byte (bf16) dtype")
    return arr.view(np.uint16)


def as_f32(a, name: str):
    """A device float32 array from cupy/numpy float32 or any DLPack float32 (torch)."""
    import cupy

    if not isinstance(a, (np.ndarray, cupy.ndarray)):
        try:
            a = cupy.from_dlpack(a)
        except Exception as e:
            raise ProblemError(name, type(a).__name__,
                               f"not a DLPack array on this GPU: {e}") from e
    if a.dtype != np.float32:
        raise ProblemError(name, str(a.dtype), "expected float32")
    return cupy.ascontiguousarray(cupy.asarray(a))


def _routing_arrays(problem: MoEProblem, expert_bias, shared_gate) -> dict:
    """The rule's extra device arrays, checked: required when the rule needs them."""
    import cupy

    out = {"expert_bias": None, "shared_gate": None}
    for name, needed, a, shape, conv in (
            ("expert_bias", problem.expert_bias, expert_bias, (problem.experts,), as_f32),
            ("shared_gate", problem.shared_gate, shared_gate, (problem.hidden,), as_bits)):
        if not needed:
            continue
        if a is None:
            raise ProblemError(name, None, f"required by the problem's {name}=True, shape {shape}")
        b = conv(a, name)
        if tuple(b.shape) != shape:
            raise ProblemError(name, tuple(b.shape), f"expected shape {shape}")
        if name == "expert_bias" and not bool(cupy.isfinite(b).all()):
            raise ProblemError(name, "non-finite values", "every bias must be a finite float32")
        out[name] = cupy.ascontiguousarray(b)
    return out


@dataclass
class DeviceWeights:
    gate: object          # [H, E]
    w1: object            # [E_local, I, H]
    w3: object            # [E_local, I, H]
    w2: object            # [E_local, H, I]
    sw1: object = None    # [S*Is, H]
    sw3: object = None    # [S*Is, H]
    sw2: object = None    # [H, S*Is]
    expert_bias: object = None  # [E] float32 (problem.expert_bias)
    shared_gate: object = None  # [H] bf16 bits (problem.shared_gate)

    def check_routing(self, problem: MoEProblem) -> None:
        """Raise ProblemError unless the arrays the problem's routing rule reads are here with
        the right shape and dtype (the kernels would read a null or short pointer)."""
        for name, needed, shape, dtype in (
                ("expert_bias", problem.expert_bias, (problem.experts,), np.float32),
                ("shared_gate", problem.shared_gate, (problem.hidden,), np.uint16)):
            a = getattr(self, name)
            if not needed:
                continue
            if a is None:
                raise ProblemError(f"weights.{name}", None,
                                   f"required by the problem's {name}=True, shape {shape}")
            if tuple(a.shape) != shape or a.dtype != dtype:
                raise ProblemError(f"weights.{name}", f"{a.dtype}{tuple(a.shape)}",
                                   f"expected {np.dtype(dtype).name}{shape}")

    @classmethod
    def from_host(cls, problem: MoEProblem, w: MoEWeights, rank: int) -> DeviceWeights:
        """Upload host weights holding all experts or exactly this rank's."""
        import cupy

        w = w.for_rank(problem, rank)

        def nk(a: np.ndarray):
            return cupy.ascontiguousarray(cupy.asarray(a).transpose(0, 2, 1))

        dw = cls(cupy.asarray(w.gate), nk(w.w1), nk(w.w3), nk(w.w2))
        if problem.shared_experts:
            dw.sw1 = cupy.asarray(np.concatenate(list(w.shared_w1), axis=1).T.copy())
            dw.sw3 = cupy.asarray(np.concatenate(list(w.shared_w3), axis=1).T.copy())
            dw.sw2 = cupy.asarray(np.concatenate(list(w.shared_w2), axis=0).T.copy())
        for name, a in _routing_arrays(problem, w.expert_bias, w.shared_gate).items():
            setattr(dw, name, a)
        return dw

    @classmethod
    def generate(cls, problem: MoEProblem, rank: int, seed: int = 0) -> DeviceWeights:
        """This rank's weights of the counter-based scheme (``flashmoe_gen.gen_weights``, not
        ``MoEWeights.random``'s) generated on the GPU in the kernels' layouts: no host array
        of model size (only the gate, [H, E], and the rule's small vectors come from the
        host). Equal to ``from_host(problem, gen_weights.generated_weights(problem, seed),
        rank)`` bit for bit."""
        if not isinstance(problem, MoEProblem):
            raise ProblemError("problem", type(problem).__name__, "a flashmoe_gen.MoEProblem")
        if isinstance(rank, bool) or not isinstance(rank, int) or \
                not 0 <= rank < problem.world_size:
            raise ProblemError("rank", rank, f"a rank in 0..{problem.world_size - 1}")
        import cupy

        from . import gen_weights as g

        el, h, i = problem.local_experts, problem.hidden, problem.intermediate
        first = rank * el
        dw = cls(cupy.asarray(g.generated_gate(problem, seed)),
                 g.device_tensor(seed, g.W1, first, el, i, h, h, True),
                 g.device_tensor(seed, g.W3, first, el, i, h, h, True),
                 g.device_tensor(seed, g.W2, first, el, h, i, i, True))
        s, si = problem.shared_experts, problem.shared_intermediate or 0
        if s:
            dw.sw1 = g.device_tensor(seed, g.SHARED_W1, 0, s, si, h, h, True).reshape(s * si, h)
            dw.sw3 = g.device_tensor(seed, g.SHARED_W3, 0, s, si, h, h, True).reshape(s * si, h)
            # [S, H, Is] -> [H, S*Is]: the fused down projection's K runs over all experts
            w2 = g.device_tensor(seed, g.SHARED_W2, 0, s, h, si, si, True)
            dw.sw2 = cupy.ascontiguousarray(w2.transpose(1, 0, 2).reshape(h, s * si))
            del w2
        for name, a in _routing_arrays(problem, g.generated_expert_bias(problem, seed),
                                       g.generated_shared_gate(problem, seed)).items():
            setattr(dw, name, a)
        return dw

    @property
    def nbytes(self) -> int:
        """Device bytes of these weights (every array held)."""
        return sum(a.nbytes for a in (self.gate, self.w1, self.w3, self.w2, self.sw1, self.sw3,
                                      self.sw2, self.expert_bias, self.shared_gate)
                   if a is not None)

    @classmethod
    def from_arrays(cls, problem: MoEProblem, gate, w1, w3, w2, shared_w1=None, shared_w3=None,
                    shared_w2=None, expert_bias=None, shared_gate=None) -> DeviceWeights:
        """User arrays in the semantic layouts of docs/semantics.md (this rank's experts):
        ``gate [H, E]``, ``w1, w3 [E_local, H, I]``, ``w2 [E_local, I, H]``, shared
        ``[S, H, Is]`` / ``[S, Is, H]``; cupy/numpy uint16 bits or DLPack bf16 (torch).
        ``expert_bias [E]`` (float32) and ``shared_gate [H]`` (bf16) when the problem's
        routing rule needs them."""
        import cupy

        h, i, e, el = problem.hidden, problem.intermediate, problem.experts, problem.local_experts
        s, si = problem.shared_experts, problem.shared_intermediate or 0
        want = {"gate": (gate, (h, e)), "w1": (w1, (el, h, i)), "w3": (w3, (el, h, i)),
                "w2": (w2, (el, i, h))}
        if s:
            want |= {"shared_w1": (shared_w1, (s, h, si)), "shared_w3": (shared_w3, (s, h, si)),
                     "shared_w2": (shared_w2, (s, si, h))}
        arrs = {}
        for name, (a, shape) in want.items():
            if a is None:
                raise ProblemError(name, None, f"required, shape {shape}")
            b = as_bits(a, name)
            if tuple(b.shape) != shape:
                raise ProblemError(name, tuple(b.shape), f"expected shape {shape}")
            arrs[name] = b

        def nk(a):
            return cupy.ascontiguousarray(a.transpose(0, 2, 1))

        dw = cls(cupy.ascontiguousarray(arrs["gate"]), nk(arrs["w1"]), nk(arrs["w3"]),
                 nk(arrs["w2"]))
        if s:
            dw.sw1 = cupy.ascontiguousarray(cupy.concatenate(list(arrs["shared_w1"]), 1).T)
            dw.sw3 = cupy.ascontiguousarray(cupy.concatenate(list(arrs["shared_w3"]), 1).T)
            dw.sw2 = cupy.ascontiguousarray(cupy.concatenate(list(arrs["shared_w2"]), 0).T)
        for name, a in _routing_arrays(problem, expert_bias, shared_gate).items():
            setattr(dw, name, a)
        return dw
