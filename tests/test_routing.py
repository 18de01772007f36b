"""Routing rules (docs/semantics.md, Routing): problem fields, names, validation, weights,
the float64 reference against a plain per-token loop, and the generated router (rendered
and compiled with NVRTC, no GPU)."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.errors import ProblemError
from flashmoe_gen.export import export_cu
from flashmoe_gen.problem import MAX_GROUPS, MoEProblem
from flashmoe_gen.reference import moe_reference, route, routing_weights
from flashmoe_gen.render import render, to_template_vars
from flashmoe_gen.weights import MoEWeights, random_tokens

BASE = MoEProblem(64, 32, 16, 4, shared_experts=1, tokens_per_rank=64)
#: One problem per rule, and DeepSeek-V3's full rule (every non-default field at once).
RULES = {
    "softmax": BASE,
    "nonorm": BASE.replace(normalize_topk=False),
    "sigmoid": BASE.replace(scoring="sigmoid"),
    "bias": BASE.replace(expert_bias=True),
    "groups": BASE.replace(n_group=4, topk_group=2),
    "scaling": BASE.replace(routed_scaling=2.5),
    "sgate": BASE.replace(shared_gate=True),
    "dsv3": BASE.replace(scoring="sigmoid", expert_bias=True, n_group=4, topk_group=2,
                         routed_scaling=2.5),
    "qwen2": BASE.replace(normalize_topk=False, shared_gate=True),
}


# ---- problem: names, round trips, validation ----------------------------------------------
def test_default_names_are_unchanged():
    # Names are database keys: the default rule adds nothing to them.
    assert BASE.name == "moe_h64_i32_e16_k4_s1x32_p1_t64_bf16"
    assert MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=2,
                      tokens_per_rank=512).name == "moe_h2048_i1408_e64_k6_s2x1408_p2_t512_bf16"
    assert BASE.default_routing and not RULES["dsv3"].default_routing


def test_rule_name_parts():
    assert RULES["dsv3"].name == "moe_h64_i32_e16_k4_s1x32_p1_t64_bf16_sig_bias_grp2of4_rs2.5"
    assert RULES["qwen2"].name == "moe_h64_i32_e16_k4_s1x32_p1_t64_bf16_nonorm_sgate"
    assert BASE.replace(routed_scaling=1.0000001).name.endswith("_rs1.0000001")
    # n_group > 1 is named even when every group is kept (a distinct problem).
    assert BASE.replace(n_group=4, topk_group=4).name.endswith("_grp4of4")


@pytest.mark.parametrize("key", sorted(RULES))
def test_name_and_json_round_trip(key):
    p = RULES[key].replace(capacity_factor=1.25, world_size=2)
    assert MoEProblem.from_name(p.name) == p
    assert MoEProblem.from_json(p.to_json()) == p
    assert MoEProblem.from_dict(p.to_dict()) == p


def test_names_distinct_over_rules():
    seen = {}
    for scoring in ("softmax", "sigmoid"):
        for bias in (False, True):
            for ng, tg in ((1, 1), (4, 1), (4, 2), (8, 3)):
                for rs in (1.0, 2.5, 16.0):
                    for sg in (False, True):
                        for norm in (False, True):
                            p = BASE.replace(scoring=scoring, expert_bias=bias, n_group=ng,
                                             topk_group=tg, routed_scaling=rs, shared_gate=sg,
                                             normalize_topk=norm, top_k=2)
                            assert p.name not in seen, (p, seen.get(p.name))
                            seen[p.name] = p
                            assert MoEProblem.from_name(p.name) == p
    assert len(seen) == 2 * 2 * 4 * 3 * 2 * 2


def test_old_json_without_rule_fields_reads_as_default():
    d = BASE.to_dict()
    for f in ("scoring", "expert_bias", "n_group", "topk_group", "routed_scaling",
              "shared_gate"):
        del d[f]
    assert MoEProblem.from_dict(d) == BASE


@pytest.mark.parametrize("name,why", [
    ("moe_h64_i32_e16_k4_p1_t64_bf16_bogus", "not a problem name"),
    ("moe_h64_i32_e16_k4_p1_t64_bf16_sgate_sig", "not a problem name"),  # order is fixed
    ("moe_h64_i32_e16_k4_p1_t64_bf16_rs1", "canonical"),  # rs1.0 is the spelling
    ("moe_h64_i32_e16_k4_p1_t64_bf16_rs1.0", "canonical"),  # 1.0 is the default: no part
    ("moe_h64_i32_e16_k4_p1_t64_bf16_grp5of4", "topk_group"),
])
def test_from_name_rejects(name, why):
    with pytest.raises(ProblemError, match=why):
        MoEProblem.from_name(name)


def _error(**changes) -> ProblemError:
    with pytest.raises(ProblemError) as ei:
        BASE.replace(**changes)
    return ei.value


@pytest.mark.parametrize("changes,field,says", [
    ({"scoring": "relu"}, "scoring", "softmax, sigmoid"),
    ({"expert_bias": 1}, "expert_bias", "bool"),
    ({"shared_gate": "yes"}, "shared_gate", "bool"),
    ({"n_group": 0}, "n_group", "positive"),
    ({"n_group": 3}, "n_group", "must divide experts=16"),
    ({"n_group": 16}, "n_group", "at least 2 experts"),
    ({"n_group": 64, "experts": 128}, "n_group", f"at most {MAX_GROUPS}"),
    ({"n_group": 4, "topk_group": 5}, "topk_group", "between 1 and n_group=4"),
    ({"topk_group": 2}, "topk_group", "between 1 and n_group=1"),
    ({"n_group": 4, "topk_group": 1, "top_k": 5}, "top_k", "1 x 4 = 4"),
    ({"routed_scaling": 0.0}, "routed_scaling", "finite number > 0"),
    ({"routed_scaling": -1.0}, "routed_scaling", "finite number > 0"),
    ({"routed_scaling": math.inf}, "routed_scaling", "finite"),
    ({"routed_scaling": math.nan}, "routed_scaling", "finite"),
    ({"routed_scaling": True}, "routed_scaling", "finite"),
    ({"routed_scaling": "2"}, "routed_scaling", "finite"),
    ({"shared_gate": True, "shared_experts": 0}, "shared_gate", "shared_experts >= 1"),
])
def test_rule_validation(changes, field, says):
    e = _error(**changes)
    assert e.field == field and says in str(e), str(e)


def test_n_group_error_lists_valid_group_counts():
    e = _error(n_group=5)
    assert "[2, 4, 8]" in str(e)


# ---- weights ---------------------------------------------------------------------------------
def test_weights_carry_the_rule_arrays():
    p = RULES["dsv3"].replace(shared_gate=True)
    w = MoEWeights.random(p, seed=3)
    assert w.expert_bias.shape == (16,) and w.expert_bias.dtype == np.float32
    assert w.shared_gate.shape == (64,) and w.shared_gate.dtype == np.uint16
    assert np.all(w.expert_bias != 0) and 0.01 < np.std(w.expert_bias) < 1  # scale 0.1
    again = MoEWeights.random(p, seed=3)
    np.testing.assert_array_equal(w.expert_bias, again.expert_bias)
    np.testing.assert_array_equal(w.shared_gate, again.shared_gate)
    assert not np.array_equal(w.expert_bias, MoEWeights.random(p, seed=4).expert_bias)
    # A rank's slice keeps the rule arrays (they belong to every rank).
    part = w.experts_slice(range(4, 8))
    assert part.expert_bias is w.expert_bias and part.shared_gate is w.shared_gate
    # Other fields do not move with the rule: the same gate and experts as the default.
    plain = MoEWeights.random(BASE, seed=3)
    np.testing.assert_array_equal(plain.gate, w.gate)
    np.testing.assert_array_equal(plain.w1, w.w1)
    assert plain.expert_bias is None and plain.shared_gate is None


def test_weights_check_names_the_rule_arrays():
    p = RULES["bias"]
    w = MoEWeights.random(p)
    w.check(p)
    for bad, says in ((None, "required by the problem's expert_bias=True"),
                      (np.zeros(15, np.float32), "expected shape (16,)"),
                      (np.zeros(16, np.float64), "float32"),
                      (np.full(16, np.nan, np.float32), "finite")):
        w.expert_bias = bad
        with pytest.raises(ProblemError, match=r"weights\.expert_bias") as ei:
            w.check(p)
        assert says in str(ei.value)
    # An array the rule does not use is refused rather than silently ignored.
    w = MoEWeights.random(BASE)
    w.shared_gate = np.zeros(64, np.uint16)
    with pytest.raises(ProblemError, match="shared_gate=False"):
        w.check(BASE)
    w = MoEWeights.random(RULES["sgate"])
    w.shared_gate = np.zeros((1, 64), np.uint16)
    with pytest.raises(ProblemError, match=r"expected shape \(64,\)"):
        w.check(RULES["sgate"])


# ---- reference against a plain per-token loop ---------------------------------------------
def _loop_route(p: MoEProblem, x: np.ndarray, gate: np.ndarray, bias: np.ndarray | None):
    """The rule written out token by token, straight from docs/semantics.md."""
    idx_all, w_all = [], []
    for row in x:
        logits = [sum(row[h] * gate[h, e] for h in range(p.hidden)) for e in range(p.experts)]
        if p.scoring == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            m = max(logits)
            z = [math.exp(v - m) for v in logits]
            s = [v / sum(z) for v in z]
        c = [s[e] + (bias[e] if p.expert_bias else 0.0) for e in range(p.experts)]
        eligible = set(range(p.experts))
        if p.n_group > 1:
            size = p.experts // p.n_group
            gs = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2])
                  for g in range(p.n_group)]
            groups = sorted(range(p.n_group), key=lambda g: (-gs[g], g))[: p.topk_group]
            eligible = {e for e in eligible if e // size in groups}
        chosen = sorted(eligible, key=lambda e: (-c[e], e))[: p.top_k]
        w = [s[e] for e in chosen]
        if p.normalize_topk:
            w = [v / sum(w) for v in w]
        idx_all.append(chosen)
        w_all.append([v * p.routed_scaling for v in w])
    return np.array(idx_all), np.array(w_all)


@pytest.mark.parametrize("key", sorted(RULES))
def test_reference_routing_matches_per_token_loop(key):
    p = RULES[key]
    w = MoEWeights.random(p, seed=11)
    x = random_tokens(40, p.hidden, seed=12)
    rt = route(p, x, w.gate, w.expert_bias)
    xf = bf16.from_bits(x).astype(np.float64)
    gf = bf16.from_bits(w.gate).astype(np.float64)
    idx, wt = _loop_route(p, xf, gf, None if w.expert_bias is None else
                          w.expert_bias.astype(np.float64))
    np.testing.assert_array_equal(rt.topk_idx, idx)
    np.testing.assert_allclose(rt.topk_w, wt, rtol=1e-12)
    np.testing.assert_allclose(rt.topk_w, routing_weights(p, rt.probs, rt.topk_idx), rtol=0)


def test_bias_changes_choices_not_weights():
    p = RULES["bias"].replace(scoring="sigmoid")
    w = MoEWeights.random(p, seed=5)
    x = random_tokens(200, p.hidden, seed=6)
    biased = route(p, x, w.gate, w.expert_bias)
    plain = route(p.replace(expert_bias=False), x, w.gate)
    assert (biased.topk_idx != plain.topk_idx).any()  # the bias decides some choices
    np.testing.assert_array_equal(biased.probs, plain.probs)
    # Weights are the unbiased scores of the chosen experts, normalised.
    s = np.take_along_axis(biased.probs, biased.topk_idx, 1)
    np.testing.assert_allclose(biased.topk_w, s / s.sum(1, keepdims=True), rtol=1e-14)
    # A huge bias on one expert makes it everyone's first choice.
    w.expert_bias[9] = 10.0
    assert (route(p, x, w.gate, w.expert_bias).topk_idx[:, 0] == 9).all()
    with pytest.raises(ProblemError, match="expert_bias"):
        route(p, x, w.gate)


def test_groups_limit_the_choice():
    p = RULES["groups"].replace(top_k=2, n_group=4, topk_group=1)
    w = MoEWeights.random(p, seed=8)
    x = random_tokens(300, p.hidden, seed=9)
    rt = route(p, x, w.gate)
    # Every token's experts lie in one group of 4 experts, the group with the best top-2 sum.
    groups = rt.topk_idx // 4
    assert (groups[:, 0] == groups[:, 1]).all()
    top2 = -np.sort(-rt.probs.reshape(-1, 4, 4), axis=2)[:, :, :2].sum(2)
    np.testing.assert_array_equal(groups[:, 0], np.argmax(top2, axis=1))
    np.testing.assert_allclose(rt.group_scores, top2, rtol=1e-14)
    assert np.isneginf(rt.choice).sum(axis=1).tolist() == [12] * 300
    # Without the limit some tokens pick experts of two groups.
    free = route(p.replace(n_group=1, topk_group=1), x, w.gate)
    assert ((free.topk_idx[:, 0] // 4) != (free.topk_idx[:, 1] // 4)).any()


def test_group_ties_go_to_the_lower_group():
    p = MoEProblem(16, 16, 8, 2, n_group=4, topk_group=1)
    w = MoEWeights.random(p)
    w.gate[:] = 0  # all logits 0: every score, every group score equal
    rt = route(p, random_tokens(3, 16, seed=1), w.gate)
    assert rt.topk_idx.tolist() == [[0, 1]] * 3
    assert not rt.clear(p).any()  # ties are never compared with a kernel


def test_scaling_and_normalisation_order():
    p = RULES["scaling"]
    w = MoEWeights.random(p, seed=2)
    rt = route(p, random_tokens(20, p.hidden, seed=3), w.gate, None)
    np.testing.assert_allclose(rt.topk_w.sum(1), 2.5, rtol=1e-14)  # normalised, then scaled
    q = p.replace(normalize_topk=False)
    rq = route(q, random_tokens(20, p.hidden, seed=3), w.gate)
    np.testing.assert_allclose(rq.topk_w, 2.5 * np.take_along_axis(rq.probs, rq.topk_idx, 1),
                               rtol=1e-14)


@pytest.mark.parametrize("key", ["sgate", "qwen2"])
def test_shared_gate_scales_the_shared_output(key):
    p = RULES[key]
    w = MoEWeights.random(p, seed=4)
    x = random_tokens(30, p.hidden, seed=5)
    gated = moe_reference(p, [x], w).out[0]
    plain_w = MoEWeights(w.gate, w.w1, w.w3, w.w2, w.shared_w1, w.shared_w3, w.shared_w2)
    plain_p = p.replace(shared_gate=False)
    plain = moe_reference(plain_p, [x], plain_w).out[0]
    no_shared = moe_reference(plain_p.replace(shared_experts=0), [x], MoEWeights(
        w.gate, w.w1, w.w3, w.w2, np.zeros((0, 64, 0), np.uint16),
        np.zeros((0, 64, 0), np.uint16), np.zeros((0, 0, 64), np.uint16))).out[0]
    xf = bf16.from_bits(x).astype(np.float64)
    g = 1 / (1 + np.exp(-(xf @ bf16.from_bits(w.shared_gate).astype(np.float64))))
    assert 0.05 < g.min() and g.max() < 0.95  # the gate really scales
    np.testing.assert_allclose(gated, no_shared + g[:, None] * (plain - no_shared),
                               rtol=1e-10, atol=1e-12)


def test_reference_with_kernel_indices_keeps_rule_weights():
    p = RULES["dsv3"]
    w = MoEWeights.random(p, seed=1)
    x = random_tokens(16, p.hidden, seed=2)
    own = route(p, x, w.gate, w.expert_bias)
    other = np.roll(own.topk_idx, 1, axis=1)  # same sets, another order
    ref = moe_reference(p, [x], w, topk_idx=[other])
    np.testing.assert_allclose(ref.routing[0].topk_w,
                               np.roll(own.topk_w, 1, axis=1), rtol=1e-14)
    np.testing.assert_allclose(ref.out[0], moe_reference(p, [x], w).out[0], rtol=1e-12)


# ---- generated router: template variables, rendering, NVRTC -----------------------------------
def test_template_vars_spell_the_rule():
    cfg = KernelConfig.default(BASE, "sm_80")
    tv = to_template_vars(BASE, cfg)
    assert (tv["router_sigmoid"], tv["router_expert_bias"], tv["shared_gate"]) == (
        "false", "false", "false")
    assert (tv["router_n_group"], tv["router_topk_group"], tv["router_group_size"]) == (1, 1, 16)
    assert tv["routed_scaling"] == "1.0f"
    tv = to_template_vars(RULES["dsv3"].replace(shared_gate=True), cfg)
    assert (tv["router_sigmoid"], tv["router_expert_bias"], tv["shared_gate"]) == (
        "true", "true", "true")
    assert (tv["router_n_group"], tv["router_topk_group"], tv["router_group_size"]) == (4, 2, 4)
    assert tv["routed_scaling"] == "2.5f"
    assert to_template_vars(BASE.replace(routed_scaling=1e-5), cfg)["routed_scaling"] == "1e-05f"


RULE_CONSTANTS = {
    "sigmoid": "constexpr bool SIGMOID_SCORES = true;",
    "bias": "constexpr bool EXPERT_BIAS = true;",
    "groups": "constexpr int N_GROUP = 4;",
    "scaling": "constexpr float ROUTED_SCALING = 2.5f;",
    "sgate": "constexpr bool SHARED_GATE = true;",
}


@pytest.mark.parametrize("key", sorted(RULE_CONSTANTS))
def test_render_compiles_the_rule_in(key):
    cfg = KernelConfig.default(RULES[key], "sm_80")
    code, base = render(RULES[key], cfg).code, render(BASE, cfg).code
    assert RULE_CONSTANTS[key] in code and RULE_CONSTANTS[key] not in base
    body = "\n".join(code.splitlines()[3:])
    assert body != "\n".join(base.splitlines()[3:])


#: Problems whose generated module must compile: every rule at small and DeepSeek-V3 sizes
#: (256 experts: 8 per lane, 8 groups), mma.sync tiles so sm_90 stays the target.
COMPILE_RULES = {
    "dsv3_full": MoEProblem(7168, 2048, 256, 8, shared_experts=1, scoring="sigmoid",
                            expert_bias=True, n_group=8, topk_group=4, routed_scaling=2.5),
    "qwen2": MoEProblem(2048, 1408, 60, 4, shared_experts=1, shared_intermediate=5632,
                        normalize_topk=False, shared_gate=True),
    "softmax_bias_groups": MoEProblem(512, 256, 8, 2, expert_bias=True, n_group=2,
                                      topk_group=1, routed_scaling=0.5),
    "sigmoid_few_experts": MoEProblem(256, 128, 3, 2, scoring="sigmoid", normalize_topk=False),
}


@pytest.mark.parametrize("key", sorted(COMPILE_RULES))
def test_rule_compiles_with_nvrtc(key, tmp_path, monkeypatch):
    from flashmoe_gen.compile import compile_source

    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path))
    p = COMPILE_RULES[key]
    cfg = KernelConfig(GemmTile(64, 64, 32, 2, 2, 3), GemmTile(64, 64, 32, 2, 2, 3))
    gen = render(p, cfg)
    mod = compile_source(gen, "sm_90", use_cache=False)
    for k in ("moe_router", "moe_combine"):
        r = mod.resources[k]
        assert r.spills == 0 and r.stack_bytes == 0 and 0 < r.registers <= 255, (k, r)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_a_rule_export(tmp_path):
    """The exported host launcher of the full rule (bias fill, shared gate, x for the
    combine) compiles."""
    p = RULES["dsv3"].replace(shared_gate=True, hidden=512, intermediate=256,
                              shared_intermediate=256)
    src = tmp_path / "rule.cu"
    export_cu(p, KernelConfig(GemmTile(64, 64, 32, 2, 2, 3), GemmTile(64, 64, 32, 2, 2, 3)),
              src)
    res = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-std=c++17", "-c", str(src), "-o",
                          str(tmp_path / "rule.o")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.parametrize("key", ["dsv3", "qwen2"])
def test_export_fills_and_passes_the_rule_arrays(key):
    p = RULES[key]
    text = export_cu(p, KernelConfig.default(p, "sm_80"))
    has_bias, has_gate = p.expert_bias, p.shared_gate
    assert f"constexpr bool HAS_EXPERT_BIAS = {str(has_bias).lower()};" in text
    assert f"constexpr bool HAS_SHARED_GATE = {str(has_gate).lower()};" in text
    assert "L->x = x;" in text
    router_call = text[text.index("moe_router<<<"):]
    assert "L->gate, L->expert_bias, tokens" in router_call[:300]
    combine_call = text[text.index("moe_combine<<<"):]
    assert "L->x, L->shared_gate, out" in combine_call[:400]


def test_reference_ranks_route_alike():
    """With several ranks each rank routes its own tokens by the same rule: rank r's output
    equals a one-rank reference on its tokens (the rule arrays belong to every rank)."""
    p = RULES["dsv3"].replace(shared_gate=True, world_size=2)
    w = MoEWeights.random(p, seed=21)
    xs = [random_tokens(t, p.hidden, seed=30 + t) for t in (17, 0)]
    two = moe_reference(p, xs, w)
    one = moe_reference(p.replace(world_size=1), [xs[0]], w)
    np.testing.assert_array_equal(two.out[0], one.out[0])
    assert two.out[1].shape == (0, p.hidden)


def test_device_weights_check_routing():
    """DeviceWeights built by hand (e.g. around torch tensors) are checked for the rule's
    arrays; numpy arrays stand in for device arrays (only shape and dtype are read)."""
    from flashmoe_gen.device_weights import DeviceWeights

    p = RULES["dsv3"].replace(shared_gate=True)
    dw = DeviceWeights(None, None, None, None)
    with pytest.raises(ProblemError, match=r"weights\.expert_bias.*required"):
        dw.check_routing(p)
    dw.expert_bias = np.zeros(16, np.float64)
    with pytest.raises(ProblemError, match=r"expected float32\(16,\)"):
        dw.check_routing(p)
    dw.expert_bias = np.zeros(16, np.float32)
    with pytest.raises(ProblemError, match=r"weights\.shared_gate"):
        dw.check_routing(p)
    dw.shared_gate = np.zeros(64, np.uint16)
    dw.check_routing(p)
    DeviceWeights(None, None, None, None).check_routing(BASE)  # the default rule needs none
