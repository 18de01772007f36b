"""The float64 reference of each routing rule against transformers' own MoE blocks (CPU).

Tiny random configs of Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3. The blocks run in
float32 on values rounded to bf16 once, so both sides see the same numbers; the block's
routing (experts and weights) and its whole output (shared experts and Qwen2's shared gate
included) are compared with ``moe_reference``. Skipped when transformers is not installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error, route
from flashmoe_gen.weights import MoEWeights

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

H, INTER, T = 64, 32, 96
#: Routing is compared where the reference's choice has this margin (the block is float32).
MARGIN = 1e-4
#: float32 block vs float64 reference on identical bf16 inputs.
OUT_TOL = 1e-5


def _bits(t) -> np.ndarray:
    return bf16.to_bits(t.detach().float().contiguous().numpy())


def make_block(kind: str, seed: int = 0, **over):
    """A tiny float32 block with random weights rounded to bf16 (router logits of a few
    units, so near-ties are rare); returns (block, our problem)."""
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
        cfg = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=8,
                            num_experts_per_tok=2, **over)
        problem = MoEProblem(H, INTER, 8, 2, tokens_per_rank=T)
    elif kind == "qwen3":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeSparseMoeBlock as B,
        )
        o = {"num_experts": 8, "num_experts_per_tok": 3, "norm_topk_prob": True} | over
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, **o)
        problem = MoEProblem(H, INTER, o["num_experts"], o["num_experts_per_tok"],
                             tokens_per_rank=T, normalize_topk=o["norm_topk_prob"])
    elif kind == "qwen2":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import (
            Qwen2MoeSparseMoeBlock as B,
        )
        o = {"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False} | over
        cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=INTER,
                             shared_expert_intermediate_size=48, **o)
        problem = MoEProblem(H, INTER, o["num_experts"], o["num_experts_per_tok"],
                             shared_experts=1, shared_intermediate=48, tokens_per_rank=T,
                             normalize_topk=o["norm_topk_prob"], shared_gate=True)
    elif kind == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as B
        o = {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
             "n_shared_experts": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True} | over
        cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=INTER, **o)
        problem = MoEProblem(H, INTER, o["n_routed_experts"], o["num_experts_per_tok"],
                             shared_experts=1, shared_intermediate=INTER * o["n_shared_experts"],
                             tokens_per_rank=T, normalize_topk=o["norm_topk_prob"],
                             scoring="sigmoid", expert_bias=True, n_group=o["n_group"],
                             topk_group=o["topk_group"],
                             routed_scaling=o["routed_scaling_factor"])
    else:
        raise ValueError(kind)
    block = B(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 4.0 if name.startswith("gate.") else 1.0
            v = torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1])
            p.copy_(v.to(torch.bfloat16).float())
        for _, b in block.named_buffers():  # DeepSeek-V3's e_score_correction_bias (float32)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    block.requires_grad_(False)
    return block, problem


def weights_of(block, problem: MoEProblem) -> MoEWeights:
    """Our layouts of the block's weights: gate [H, E], w1/w3 [E, H, I], w2 [E, I, H]."""
    ex = block.experts
    gu = ex.gate_up_proj.detach()                       # [E, 2I, H]: gate rows, then up rows
    i = problem.intermediate
    w1 = _bits(gu[:, :i, :].transpose(1, 2))
    w3 = _bits(gu[:, i:, :].transpose(1, 2))
    w2 = _bits(ex.down_proj.detach().transpose(1, 2))   # [E, H, I] -> [E, I, H]
    shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
    if shared is not None:
        sw1 = _bits(shared.gate_proj.weight.T)[None]
        sw3 = _bits(shared.up_proj.weight.T)[None]
        sw2 = _bits(shared.down_proj.weight.T)[None]
    else:
        si = problem.shared_intermediate or 0
        sw1 = sw3 = np.zeros((0, problem.hidden, si), np.uint16)
        sw2 = np.zeros((0, si, problem.hidden), np.uint16)
    bias = getattr(block.gate, "e_score_correction_bias", None)
    sgate = getattr(block, "shared_expert_gate", None)
    w = MoEWeights(gate=_bits(block.gate.weight.T), w1=w1, w3=w3, w2=w2, shared_w1=sw1,
                   shared_w3=sw3, shared_w2=sw2,
                   expert_bias=None if bias is None else bias.detach().float().numpy().copy(),
                   shared_gate=None if sgate is None else _bits(sgate.weight[0]))
    w.check(problem)
    return w


def tokens(seed: int) -> tuple[np.ndarray, object]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).float()
    return _bits(x), x


CASES = {
    "mixtral": ("mixtral", {}),
    "qwen3_norm": ("qwen3", {}),
    "qwen3_nonorm": ("qwen3", {"norm_topk_prob": False}),
    "qwen2_shared_gate": ("qwen2", {}),
    "qwen2_norm": ("qwen2", {"norm_topk_prob": True, "num_experts_per_tok": 4}),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3_one_group": ("deepseek_v3", {"n_group": 8, "topk_group": 1,
                                              "num_experts_per_tok": 2}),
    "deepseek_v3_no_groups_nonorm": ("deepseek_v3", {"n_group": 1, "topk_group": 1,
                                                     "norm_topk_prob": False,
                                                     "routed_scaling_factor": 1.0}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    kind, over = CASES[request.param]
    block, problem = make_block(kind, seed=len(request.param), **over)
    w = weights_of(block, problem)
    x_bits, x = tokens(len(request.param))
    with torch.no_grad():
        _, hf_w, hf_idx = block.gate(x)
        hf_out = block(x[None]).reshape(T, H)
    return problem, w, x_bits, hf_idx.numpy().astype(np.int64), hf_w.float().numpy(), \
        hf_out.numpy().astype(np.float64)


def test_problem_names_the_rule(case):
    problem = case[0]
    assert MoEProblem.from_name(problem.name) == problem


def test_chosen_experts_match(case):
    problem, w, x_bits, hf_idx, _, _ = case
    rt = route(problem, x_bits, w.gate, w.expert_bias)
    clear = rt.clear(problem, MARGIN)
    assert clear.mean() > 0.8, "too many near-ties: the test would prove little"
    ours = np.sort(rt.topk_idx[clear], 1)
    theirs = np.sort(hf_idx[clear], 1)
    np.testing.assert_array_equal(ours, theirs)


def test_routing_weights_match(case):
    problem, w, x_bits, hf_idx, hf_w, _ = case
    rt = route(problem, x_bits, w.gate, w.expert_bias)
    clear = rt.clear(problem, MARGIN)
    # Compare per expert id (the two sides may order the k choices differently).
    ours = np.zeros((T, problem.experts))
    theirs = np.zeros((T, problem.experts))
    np.put_along_axis(ours, rt.topk_idx, rt.topk_w, 1)
    np.put_along_axis(theirs, hf_idx, hf_w, 1)
    np.testing.assert_allclose(ours[clear], theirs[clear], rtol=2e-5, atol=1e-6)
    if problem.routed_scaling != 1.0 and problem.normalize_topk:
        np.testing.assert_allclose(hf_w.sum(1), problem.routed_scaling, rtol=1e-5)


def test_block_output_matches_reference(case):
    problem, w, x_bits, hf_idx, _, hf_out = case
    ref = moe_reference(problem, [x_bits], w)
    clear = ref.routing[0].clear(problem, MARGIN)
    err = relative_error(hf_out[clear], ref.out[0][clear])
    assert err <= OUT_TOL, f"block vs reference: relative error {err:.2e}"
    # With the block's own choices every token matches, near-ties included.
    forced = moe_reference(problem, [x_bits], w, topk_idx=[hf_idx]).out[0]
    assert relative_error(hf_out, forced) <= OUT_TOL


def test_dropping_a_rule_part_breaks_the_match():
    """The comparison can fail: the DeepSeek-V3 block against softmax routing, and the
    Qwen2 block without its shared gate, are far off."""
    block, problem = make_block("deepseek_v3", seed=3)
    w = weights_of(block, problem)
    x_bits, x = tokens(3)
    with torch.no_grad():
        hf_out = block(x[None]).reshape(T, H).numpy()
    wrong = problem.replace(scoring="softmax")
    assert relative_error(hf_out, moe_reference(wrong, [x_bits], w).out[0]) > 1e-2
    no_bias = problem.replace(expert_bias=False)
    w_nb = MoEWeights(w.gate, w.w1, w.w3, w.w2, w.shared_w1, w.shared_w3, w.shared_w2)
    assert relative_error(hf_out, moe_reference(no_bias, [x_bits], w_nb).out[0]) > 1e-3

    block, problem = make_block("qwen2", seed=4)
    w = weights_of(block, problem)
    x_bits, x = tokens(4)
    with torch.no_grad():
        hf_out = block(x[None]).reshape(T, H).numpy()
    ungated = problem.replace(shared_gate=False)
    w_ng = MoEWeights(w.gate, w.w1, w.w3, w.w2, w.shared_w1, w.shared_w3, w.shared_w2)
    assert relative_error(hf_out, moe_reference(ungated, [x_bits], w_ng).out[0]) > 1e-2
