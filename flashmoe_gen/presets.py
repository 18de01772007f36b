"""Model presets: the MoE layer of published models, as ``MoEProblem`` fields.

Each preset holds the fields of one model's MoE layer, taken from its Hugging Face
``config.json`` (the field names in the comments): hidden size, the routed experts'
intermediate size, experts, top-k, shared experts, and the routing rule (docs/semantics.md).
World size and tokens per rank are not part of a model: the job gives them.

A preset that the layer's semantics cannot express exactly says so in ``note`` (``exact``
is False), and ``flashmoe-tune models`` prints it; nothing is approximated silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import ProblemError
from .problem import MoEProblem

#: The problem fields a preset sets (everything but the job's world size, tokens, dtype and
#: capacity factor).
PRESET_FIELDS = ("hidden", "intermediate", "experts", "top_k", "shared_experts",
                 "shared_intermediate", "normalize_topk", "scoring", "expert_bias", "n_group",
                 "topk_group", "routed_scaling", "shared_gate")


@dataclass(frozen=True)
class ModelPreset:
    """One model's MoE layer. ``fields`` are ``MoEProblem`` keyword arguments."""

    name: str
    hf_id: str                        # the Hugging Face repository the shapes come from
    fields: MappingProxyType = field(repr=False)
    note: str = ""                    # what the layer computes differently, if anything

    @property
    def exact(self) -> bool:
        return not self.note

    def problem(self, world_size: int = 1, tokens_per_rank: int = 256,
                **overrides) -> MoEProblem:
        """The preset's problem for a job; ``overrides`` replace preset fields."""
        unknown = sorted(set(overrides) - set(PRESET_FIELDS) - {"dtype", "capacity_factor"})
        if unknown:
            raise ProblemError(unknown[0], overrides[unknown[0]],
                               f"not a field a preset override may set; fields: "
                               f"{', '.join(PRESET_FIELDS)}, dtype, capacity_factor")
        return MoEProblem(**{**self.fields, **overrides}, world_size=world_size,
                          tokens_per_rank=tokens_per_rank)

    def summary(self) -> str:
        """The layer in a few words, e.g. ``H=7168 I=2048 E=256 k=8 S=1x2048 sigmoid ...``."""
        f = self.fields
        parts = [f"H={f['hidden']}", f"I={f['intermediate']}", f"E={f['experts']}",
                 f"k={f['top_k']}"]
        if f.get("shared_experts"):
            parts.append(f"S={f['shared_experts']}x{f['shared_intermediate']}")
        p = self.problem()
        parts.append(p.scoring)
        if not p.normalize_topk:
            parts.append("no-renorm")
        if p.expert_bias:
            parts.append("bias")
        if p.n_group > 1:
            parts.append(f"groups {p.topk_group}/{p.n_group}")
        if p.routed_scaling != 1.0:
            parts.append(f"scale {p.routed_scaling:g}")
        if p.shared_gate:
            parts.append("shared-gate")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {"name": self.name, "hf_id": self.hf_id, "exact": self.exact,
                "note": self.note or None, "fields": dict(self.fields),
                "family": self.problem().replace(tokens_per_rank=0).name}


def _preset(name: str, hf_id: str, note: str = "", **fields) -> ModelPreset:
    preset = ModelPreset(name, hf_id, MappingProxyType(fields), note)
    preset.problem()  # every preset is a valid problem (a test checks them all too)
    return preset


_DEEPSEEK_V3_ROUTER = dict(  # scoring_func, topk_method noaux_tc, n_group, topk_group
    scoring="sigmoid", expert_bias=True, n_group=8, topk_group=4, routed_scaling=2.5,
    normalize_topk=True)

#: Presets by name (lower case, the ``--model`` value).
PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    # hidden_size, moe_intermediate_size, n_routed_experts, num_experts_per_tok,
    # n_shared_experts x moe_intermediate_size, e_score_correction_bias (noaux_tc),
    # routed_scaling_factor, norm_topk_prob
    _preset("deepseek-v3", "deepseek-ai/DeepSeek-V3", hidden=7168, intermediate=2048,
            experts=256, top_k=8, shared_experts=1, shared_intermediate=2048,
            **_DEEPSEEK_V3_ROUTER),
    _preset("deepseek-r1", "deepseek-ai/DeepSeek-R1", hidden=7168, intermediate=2048,
            experts=256, top_k=8, shared_experts=1, shared_intermediate=2048,
            **_DEEPSEEK_V3_ROUTER),
    # softmax scores, topk_method greedy (no groups), norm_topk_prob false,
    # routed_scaling_factor 1.0; 2 shared experts of moe_intermediate_size (they sum, so
    # S=2 x 1408 is HF's one MLP of 2816)
    _preset("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", hidden=2048,
            intermediate=1408, experts=64, top_k=6, shared_experts=2, shared_intermediate=1408,
            normalize_topk=False),
    _preset("deepseek-v2", "deepseek-ai/DeepSeek-V2", hidden=5120, intermediate=1536,
            experts=160, top_k=6, shared_experts=2, shared_intermediate=1536,
            normalize_topk=False, n_group=8, topk_group=3, routed_scaling=16.0,
            note="group score differs: the model's topk_method group_limited_greedy scores a "
                 "group by its best expert, this layer by the sum of its two best "
                 "(DeepSeek-V3's rule), so some tokens pick other groups; shapes and timings "
                 "are the model's"),
    # hidden_size, intermediate_size, num_local_experts, num_experts_per_tok; softmax,
    # top-k, renormalised
    _preset("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", hidden=4096, intermediate=14336,
            experts=8, top_k=2),
    _preset("mixtral-8x22b", "mistralai/Mixtral-8x22B-v0.1", hidden=6144,
            intermediate=16384, experts=8, top_k=2),
    # hidden_size, moe_intermediate_size, num_experts, num_experts_per_tok, norm_topk_prob
    _preset("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", hidden=2048, intermediate=768,
            experts=128, top_k=8),
    _preset("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", hidden=4096, intermediate=1536,
            experts=128, top_k=8),
    # Qwen2-MoE: shared_expert_intermediate_size with a sigmoid shared_expert_gate,
    # norm_topk_prob false
    _preset("qwen2-57b-a14b", "Qwen/Qwen2-57B-A14B", hidden=3584, intermediate=2560,
            experts=64, top_k=8, shared_experts=1, shared_intermediate=20480,
            shared_gate=True, normalize_topk=False),
    _preset("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", hidden=2048, intermediate=1408,
            experts=60, top_k=4, shared_experts=1, shared_intermediate=5632,
            shared_gate=True, normalize_topk=False),
)}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name`` (case-insensitive); ``ProblemError`` lists the known ones."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in PRESETS:
        raise ProblemError("model", name, f"unknown model preset; known: {', '.join(PRESETS)} "
                           "(flashmoe-tune models lists them)")
    return PRESETS[key]
