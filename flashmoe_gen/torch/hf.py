"""Hugging Face transformers MoE blocks -> ``MoEProblem`` + one rank's kernel-layout tensors.

Supported blocks (transformers 5 layout: experts as 3-D ``gate_up_proj [E, 2I, H]`` /
``down_proj [E, H, I]``, or the older ``nn.ModuleList`` of per-expert MLPs):

| block | routing rule |
|---|---|
| ``MixtralSparseMoeBlock`` | softmax top-k, renormalised |
| ``Qwen3MoeSparseMoeBlock`` | softmax top-k, renormalised iff ``norm_topk_prob`` |
| ``Qwen2MoeSparseMoeBlock`` | as Qwen3, plus one shared expert gated by ``sigmoid(x . w)`` |
| ``DeepseekV3MoE`` | sigmoid scores; ``e_score_correction_bias`` for the choice only; |
| | group-limited top-k (``n_group``, ``topk_group``); renormalised iff ``norm_topk_prob``; |
| | times ``routed_scaling_factor``; ``n_shared_experts`` shared experts (one fused MLP) |

Nothing here imports transformers: blocks are recognised by class name and read through
their attributes, so a block of a subclass or a copy of the modelling code works too.
"""

from __future__ import annotations

import torch

from flashmoe_gen.errors import ArgumentError, ProblemError
from flashmoe_gen.problem import MoEProblem

KINDS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
         "DeepseekV3MoE")


def block_kind(block) -> str:
    """The supported class ``block`` is (or derives from), else ArgumentError."""
    for cls in type(block).__mro__:
        if cls.__name__ in KINDS:
            return cls.__name__
    raise ArgumentError("block", type(block).__name__,
                        f"a transformers MoE block: one of {', '.join(KINDS)}")


def _router(block):
    return block.gate


def _router_weight(block) -> torch.Tensor:
    w = _router(block).weight
    return w.detach()


def _attr(block, *names: str):
    """The first of ``names`` on the router, the block or its config (transformers
    versions keep these routing settings in different places)."""
    for owner in (_router(block), block, _config(block)):
        for n in names:
            v = getattr(owner, n, None)
            if v is not None:
                return v
    raise ArgumentError("block", type(block).__name__,
                        f"a block whose router, block or config has {' or '.join(names)}")


def _top_k(block) -> int:
    return int(_attr(block, "top_k", "num_experts_per_tok"))


def _config(block):
    return getattr(block, "config", None) or getattr(block.experts, "config", None)


def _check_act(block) -> None:
    cfg = _config(block)
    act = getattr(cfg, "hidden_act", "silu") if cfg is not None else "silu"
    if act not in ("silu", "swish"):
        raise ProblemError("hidden_act", act, "the layer's experts are SwiGLU: "
                           "hidden_act must be 'silu'")


def _shared_mlp(block):
    kind = block_kind(block)
    if kind == "Qwen2MoeSparseMoeBlock":
        return block.shared_expert
    if kind == "DeepseekV3MoE":
        return block.shared_experts
    return None


def hf_problem(block, world_size: int = 1, tokens_per_rank: int = 256) -> MoEProblem:
    """The ``MoEProblem`` (shapes and routing rule) of a transformers MoE block."""
    kind = block_kind(block)
    _check_act(block)
    for name, v in (("world_size", world_size), ("tokens_per_rank", tokens_per_rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (name == "world_size"):
            raise ArgumentError(name, v, "a positive integer" if name == "world_size"
                                else "a non-negative integer")
    e, h = _router_weight(block).shape
    w1, _, _ = _expert_views(block, 0, 1, int(e))
    d = dict(hidden=int(h), intermediate=int(w1.shape[1]), experts=int(e),
             top_k=_top_k(block), world_size=world_size, tokens_per_rank=tokens_per_rank)
    if kind != "MixtralSparseMoeBlock":  # Mixtral always renormalises
        d["normalize_topk"] = bool(_attr(block, "norm_topk_prob"))
    shared = _shared_mlp(block)
    if shared is not None:
        width = shared.gate_proj.weight.shape[0]
        s = 1
        if kind == "DeepseekV3MoE":  # one fused MLP of n_shared_experts x moe_intermediate
            s = int(getattr(_config(block), "n_shared_experts", 1) or 1)
            if width % s:
                s = 1
        d |= {"shared_experts": s, "shared_intermediate": width // s}
    if kind == "Qwen2MoeSparseMoeBlock":
        d["shared_gate"] = True
    if kind == "DeepseekV3MoE":
        d |= {"scoring": "sigmoid", "expert_bias": True,
              "n_group": int(_attr(block, "num_group", "n_group")),
              "topk_group": int(_attr(block, "topk_group")),
              "routed_scaling": float(_attr(block, "routed_scaling_factor"))}
    return MoEProblem(**d)


def _expert_views(block, e0: int, e1: int, experts: int):
    """(w1, w3, w2) of experts [e0, e1) as views in kernel layout (N x K), not necessarily
    contiguous; stacked copies for a ModuleList of experts."""
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):
        gu, down = ex.gate_up_proj.detach()[e0:e1], ex.down_proj.detach()[e0:e1]
        if getattr(ex, "is_transposed", False):  # [E, H, 2I] / [E, I, H]
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        i = gu.shape[1] // 2
        if getattr(ex, "is_concatenated", True):
            return gu[:, :i], gu[:, i:], down
        return gu[:, 0::2], gu[:, 1::2], down  # interleaved gate/up rows
    if isinstance(ex, torch.nn.ModuleList):  # transformers < 5: one MLP module per expert
        names = ("w1", "w3", "w2") if hasattr(ex[0], "w1") else ("gate_proj", "up_proj",
                                                                  "down_proj")
        return tuple(torch.stack([getattr(ex[j], n).weight.detach() for j in range(e0, e1)])
                     for n in names)
    raise ArgumentError("block.experts", type(ex).__name__,
                        "experts with gate_up_proj/down_proj, or a ModuleList of expert MLPs")


def _kernel(t: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """``t`` itself when it already is ``dtype`` and contiguous (shares storage), else one
    converted/contiguous copy."""
    return t.detach().to(dtype).contiguous()


def hf_tensors(block, problem: MoEProblem, rank: int = 0) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors in kernel layout (``tensors.kernel_shapes``), on the block's
    device: views of the block's parameters where layout and dtype allow, else one copy."""
    kind = block_kind(block)
    el = problem.local_experts
    e0 = rank * el
    w1, w3, w2 = _expert_views(block, e0, e0 + el, problem.experts)
    out = {"gate": _kernel(_router_weight(block).t()), "w1": _kernel(w1), "w3": _kernel(w3),
           "w2": _kernel(w2)}
    shared = _shared_mlp(block)
    if shared is not None:
        out |= {"shared_w1": _kernel(shared.gate_proj.weight),
                "shared_w3": _kernel(shared.up_proj.weight),
                "shared_w2": _kernel(shared.down_proj.weight)}
    if kind == "Qwen2MoeSparseMoeBlock":
        out["shared_gate"] = _kernel(block.shared_expert_gate.weight[0])
    if kind == "DeepseekV3MoE":
        out["expert_bias"] = _kernel(_router(block).e_score_correction_bias, torch.float32)
    return out
