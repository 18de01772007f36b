"""Model presets (--model): shapes from the published configs, flags override, `models`."""

import json
import shlex

import pytest

from flashmoe_gen.errors import ProblemError
from flashmoe_gen.presets import PRESET_FIELDS, PRESETS, get_preset
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.args import problem_from_args, tune_command
from flashmoe_gen.tuner.cli import build_parser, main

REQUIRED = ("deepseek-v3", "deepseek-v2-lite", "mixtral-8x7b", "mixtral-8x22b",
            "qwen3-30b-a3b", "qwen3-235b-a22b")


def _problem(*argv, world_size=None):
    return problem_from_args(build_parser().parse_args(["compile", *argv]), world_size)


def test_required_presets_exist_and_are_valid_problems():
    assert set(REQUIRED) <= set(PRESETS)
    for p in PRESETS.values():
        assert set(p.fields) <= set(PRESET_FIELDS)
        prob = p.problem(world_size=1, tokens_per_rank=128)
        assert isinstance(prob, MoEProblem) and prob.tokens_per_rank == 128


def test_presets_match_the_transformers_configs_of_the_same_model():
    """Where a transformers config class's defaults are a released model, the preset must
    read the same fields off it (the mapping of docs/semantics.md)."""
    tf = pytest.importorskip("transformers")
    v3 = tf.DeepseekV3Config()
    assert get_preset("deepseek-v3").problem() == MoEProblem(
        v3.hidden_size, v3.moe_intermediate_size, v3.n_routed_experts, v3.num_experts_per_tok,
        shared_experts=1, shared_intermediate=v3.n_shared_experts * v3.moe_intermediate_size,
        normalize_topk=v3.norm_topk_prob, scoring="sigmoid", expert_bias=True,
        n_group=v3.n_group, topk_group=v3.topk_group,
        routed_scaling=v3.routed_scaling_factor)
    mx = tf.MixtralConfig()
    assert get_preset("mixtral-8x7b").problem() == MoEProblem(
        mx.hidden_size, mx.intermediate_size, mx.num_local_experts, mx.num_experts_per_tok)
    q2 = tf.Qwen2MoeConfig()  # its defaults are Qwen1.5-MoE-A2.7B's
    assert get_preset("qwen1.5-moe-a2.7b").problem() == MoEProblem(
        q2.hidden_size, q2.moe_intermediate_size, q2.num_experts, q2.num_experts_per_tok,
        shared_experts=1, shared_intermediate=q2.shared_expert_intermediate_size,
        shared_gate=True, normalize_topk=q2.norm_topk_prob)
    q3 = tf.Qwen3MoeConfig()  # 30B-A3B's shapes; the released config sets norm_topk_prob
    q3p = get_preset("qwen3-30b-a3b").problem()
    assert (q3p.hidden, q3p.intermediate, q3p.experts, q3p.top_k) == (
        q3.hidden_size, q3.moe_intermediate_size, q3.num_experts, q3.num_experts_per_tok)
    assert q3p.normalize_topk and not q3p.shared_experts


def test_model_flag_sets_every_field_and_flags_override():
    p = _problem("--model", "DeepSeek-V3", "--tokens", "128", world_size=4)
    assert p == MoEProblem(7168, 2048, 256, 8, shared_experts=1, shared_intermediate=2048,
                           world_size=4, tokens_per_rank=128, scoring="sigmoid",
                           expert_bias=True, n_group=8, topk_group=4, routed_scaling=2.5)
    o = _problem("--model", "deepseek-v3", "--top-k", "4", "--no-expert-bias",
                 "--routed-scaling", "1.0", "--shared-experts", "0", "--n-group", "1",
                 "--topk-group", "1")
    assert (o.top_k, o.expert_bias, o.routed_scaling, o.shared_experts, o.n_group) == (
        4, False, 1.0, 0, 1)
    assert o.hidden == 7168 and o.scoring == "sigmoid"  # the rest stays the preset's
    lite = _problem("--model", "deepseek-v2-lite", "--normalize-topk")
    assert lite.normalize_topk and lite.shared_width == 2 * 1408
    assert _problem("--model", "mixtral-8x22b", "--world-size", "2").hidden == 6144


def test_flags_of_a_preset_problem_round_trip_through_the_printed_command():
    for name in PRESETS:
        p = get_preset(name).problem(world_size=2 if name != "qwen1.5-moe-a2.7b" else 3,
                                     tokens_per_rank=64)
        argv = shlex.split(tune_command(p))
        assert problem_from_args(build_parser().parse_args(argv[1:])) == p, name


def test_unknown_model_is_one_line_naming_the_known_ones(capsys):
    assert main(["compile", "--model", "gpt-moe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ProblemError" in err and "'gpt-moe'" in err
    assert all(name in err for name in REQUIRED)
    with pytest.raises(ProblemError, match="top_kk"):
        get_preset("mixtral-8x7b").problem(top_kk=2)


def test_models_lists_the_presets_and_says_which_are_approximate(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "no: group score differs" in out and "H=7168 I=2048 E=256 k=8 S=1x2048" in out
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(PRESETS)
    assert rows["deepseek-v2"]["exact"] is False and rows["deepseek-v2"]["note"]
    assert rows["deepseek-v3"]["exact"] is True and rows["deepseek-v3"]["note"] is None
    assert rows["mixtral-8x7b"]["family"] == "moe_h4096_i14336_e8_k2_p1_t0_bf16"
    # using an approximate preset says so on stderr, once
    assert main(["compile", "--model", "deepseek-v2", "--tokens", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.count("is approximate") == 1 and "one token count" in err
