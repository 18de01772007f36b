"""Tiny transformers MoE blocks with random weights, for the PyTorch front end's tests.

Weights are drawn so that routing is decided (router logits of a few units, so top-k
near-ties are rare), and rounded to bf16 so the same values reach the block and the layer.
"""

from __future__ import annotations

import math

import torch

HIDDEN, INTER = 64, 32
KINDS = ("mixtral", "qwen2", "qwen3", "deepseek_v3")


def make_block(kind: str, *, hidden: int = HIDDEN, intermediate: int = INTER, seed: int = 0,
               dtype=torch.bfloat16, device="cpu", **overrides):
    """A ``kind`` block (``KINDS``) in ``dtype`` on ``device``, eval mode, no grad."""
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate,
                            **({"num_local_experts": 8, "num_experts_per_tok": 2} | overrides))
    elif kind == "qwen3":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
        cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate,
                             **({"num_experts": 8, "num_experts_per_tok": 2,
                                 "norm_topk_prob": True} | overrides))
    elif kind == "qwen2":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as B
        cfg = Qwen2MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate,
                             **({"shared_expert_intermediate_size": 48, "num_experts": 8,
                                 "num_experts_per_tok": 2, "norm_topk_prob": False}
                                | overrides))
    elif kind == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as B
        cfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=intermediate,
                               **({"n_routed_experts": 16, "num_experts_per_tok": 4,
                                   "n_group": 4, "topk_group": 2, "n_shared_experts": 2,
                                   "routed_scaling_factor": 2.5, "norm_topk_prob": True}
                                  | overrides))
    else:
        raise ValueError(kind)
    cfg._experts_implementation = "eager"  # as a model sets it (no warning per call)
    block = B(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            # Router: logits of a few units; experts: N(0, 1/fan_in).
            scale = 4.0 if name.startswith("gate.") else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1]))
        for _, b in block.named_buffers():  # DeepSeek-V3's e_score_correction_bias
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    # Round every value to bf16 once, so a float32 block computes with the layer's values.
    block = block.to(torch.bfloat16).to(dtype).to(device).eval()
    block.requires_grad_(False)
    return block
