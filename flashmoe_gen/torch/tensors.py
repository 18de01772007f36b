"""The layer's weights as torch tensors in the layouts the kernels read (N x K).

Kernel layout (that of ``DeviceWeights`` and of ``nn.Linear.weight``, ``[out, in]``):
``gate [H, E]``, ``w1, w3 [E_local, I, H]``, ``w2 [E_local, H, I]``, shared experts fused
``shared_w1, shared_w3 [S*Is, H]``, ``shared_w2 [H, S*Is]``; routing rules add
``expert_bias [E]`` (float32) and ``shared_gate [H]``. Everything but ``expert_bias`` is
bf16. Converting from/to the host ``MoEWeights`` (semantic layout, bf16 bits) is for
random initialisation and the float64 reference; it runs on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from flashmoe_gen.errors import ProblemError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.weights import MoEWeights

#: Order in which the custom op receives the layer's tensors (absent ones are skipped).
NAMES = ("gate", "w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2", "expert_bias",
         "shared_gate")


def kernel_shapes(problem: MoEProblem) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor this problem's layer holds on one rank."""
    h, i, e, el = problem.hidden, problem.intermediate, problem.experts, problem.local_experts
    shapes = {"gate": (h, e), "w1": (el, i, h), "w3": (el, i, h), "w2": (el, h, i)}
    if problem.shared_experts:
        sw = problem.shared_width
        shapes |= {"shared_w1": (sw, h), "shared_w3": (sw, h), "shared_w2": (h, sw)}
    if problem.expert_bias:
        shapes["expert_bias"] = (e,)
    if problem.shared_gate:
        shapes["shared_gate"] = (h,)
    return shapes


def dtype_of(name: str) -> torch.dtype:
    return torch.float32 if name == "expert_bias" else torch.bfloat16


def check_tensors(problem: MoEProblem, tensors: dict) -> None:
    """ProblemError naming the first tensor that is missing or of the wrong shape/dtype."""
    want = kernel_shapes(problem)
    for name in sorted(set(tensors) - set(want)):
        raise ProblemError(name, "a tensor", f"not used by problem {problem.name} "
                           f"(expected tensors: {', '.join(want)})")
    for name, shape in want.items():
        t = tensors.get(name)
        if not isinstance(t, torch.Tensor):
            raise ProblemError(name, type(t).__name__, f"required: a torch tensor {shape}")
        if tuple(t.shape) != shape or t.dtype != dtype_of(name):
            raise ProblemError(name, f"{t.dtype}{tuple(t.shape)}",
                               f"expected {dtype_of(name)}{shape} (kernel layout, N x K)")


def _bits_to_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


def _torch_to_bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().view(torch.int16).numpy().view(np.uint16)


def from_moe_weights(problem: MoEProblem, w: MoEWeights, rank: int = 0) -> dict:
    """CPU torch tensors in kernel layout for ``rank``'s experts from host weights that hold
    all experts or exactly this rank's (one transposing copy, done once)."""
    w = w.for_rank(problem, rank)

    def nk(a):
        return _bits_to_torch(np.swapaxes(a, 1, 2))

    out = {"gate": _bits_to_torch(w.gate), "w1": nk(w.w1), "w3": nk(w.w3), "w2": nk(w.w2)}
    if problem.shared_experts:
        out["shared_w1"] = _bits_to_torch(np.concatenate(list(w.shared_w1), axis=1).T)
        out["shared_w3"] = _bits_to_torch(np.concatenate(list(w.shared_w3), axis=1).T)
        out["shared_w2"] = _bits_to_torch(np.concatenate(list(w.shared_w2), axis=0).T)
    if problem.expert_bias:
        out["expert_bias"] = torch.from_numpy(np.array(w.expert_bias, np.float32))
    if problem.shared_gate:
        out["shared_gate"] = _bits_to_torch(w.shared_gate)
    return out


def to_moe_weights(problem: MoEProblem, tensors: dict, first_expert: int = 0) -> MoEWeights:
    """Host ``MoEWeights`` (semantic layout, bf16 bits) from kernel-layout tensors, e.g. to
    run the float64 reference (``flashmoe_gen.reference``) on a converted HF block."""
    s, si, h = problem.shared_experts, problem.shared_intermediate or 0, problem.hidden

    def kn(t):
        return np.ascontiguousarray(np.swapaxes(_torch_to_bits(t), 1, 2))

    if s:
        sw1 = _torch_to_bits(tensors["shared_w1"]).reshape(s, si, h).transpose(0, 2, 1)
        sw3 = _torch_to_bits(tensors["shared_w3"]).reshape(s, si, h).transpose(0, 2, 1)
        sw2 = _torch_to_bits(tensors["shared_w2"]).T.reshape(s, si, h)
    else:
        sw1 = sw3 = np.zeros((0, h, 0), np.uint16)
        sw2 = np.zeros((0, 0, h), np.uint16)
    w = MoEWeights(
        gate=_torch_to_bits(tensors["gate"]), w1=kn(tensors["w1"]), w3=kn(tensors["w3"]),
        w2=kn(tensors["w2"]), shared_w1=np.ascontiguousarray(sw1),
        shared_w3=np.ascontiguousarray(sw3), shared_w2=np.ascontiguousarray(sw2),
        first_expert=first_expert,
        expert_bias=(tensors["expert_bias"].detach().cpu().numpy().astype(np.float32)
                     if problem.expert_bias else None),
        shared_gate=_torch_to_bits(tensors["shared_gate"]) if problem.shared_gate else None)
    w.check(problem)
    return w
