"""MoEProblem / KernelConfig / GemmTile: names, serialisation, validation, defaults, sizes."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, fields, replace
from fractions import Fraction

import pytest

from flashmoe_gen.arch import KNOWN_ARCHS, limits_for
from flashmoe_gen.config import COMM_STREAM_CHOICES, ROUTER_CHOICES, KernelConfig
from flashmoe_gen.defaults import WS_MAX_ROWS, expert_rows, local_weight_bytes, streams_weights
from flashmoe_gen.errors import ConfigError, FlashMoEError, ProblemError
from flashmoe_gen.problem import MoEProblem, round_up
from flashmoe_gen.tiles import BK_CHOICES, BM_CHOICES, BN_CHOICES, WARP_CHOICES, GemmTile

SEED = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
DSV2_LITE = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=2, tokens_per_rank=512)
GPT_OSS = MoEProblem(2880, 2880, 60, 4, tokens_per_rank=333)
MIXTRAL = MoEProblem(4096, 14336, 8, 2, tokens_per_rank=4096)
PROBLEMS = [SEED, DSV2_LITE, GPT_OSS, MIXTRAL]

GU = GemmTile(128, 64, 64, 4, 2, 3)
DN = GemmTile(128, 128, 64, 2, 4, 3)
CFG = KernelConfig(GU, DN)


# ---- names -------------------------------------------------------------------------------
def test_problem_name_exact():
    assert DSV2_LITE.name == "moe_h2048_i1408_e64_k6_s2x1408_p2_t512_bf16"
    assert SEED.name == "moe_h512_i2048_e8_k2_s1x2048_p1_t256_bf16"
    assert GPT_OSS.name == "moe_h2880_i2880_e60_k4_p1_t333_bf16"
    p = MoEProblem(4096, 14336, 8, 2, world_size=4, tokens_per_rank=0, capacity_factor=1.25,
                   normalize_topk=False)
    assert p.name == "moe_h4096_i14336_e8_k2_p4_t0_bf16_cf1.25_nonorm"
    # An explicit shared width different from the routed one shows up in the name.
    q = MoEProblem(2048, 1408, 64, 6, shared_experts=2, shared_intermediate=2816)
    assert q.name == "moe_h2048_i1408_e64_k6_s2x2816_p1_t256_bf16"


def test_problem_name_is_stable_across_equal_spellings():
    # shared_intermediate defaults to intermediate: spelling it out gives the same problem.
    a = MoEProblem(2048, 1408, 64, 6, shared_experts=2)
    b = MoEProblem(2048, 1408, 64, 6, shared_experts=2, shared_intermediate=1408)
    assert a == b and a.name == b.name
    # Without shared experts a shared_intermediate is meaningless and dropped.
    c = MoEProblem(2048, 1408, 64, 6, shared_intermediate=999)
    assert c.shared_intermediate is None
    assert c == MoEProblem(2048, 1408, 64, 6) and c.name == MoEProblem(2048, 1408, 64, 6).name


def test_tile_and_config_name_exact():
    assert GU.name == "bm128_bn64_bk64_w4x2_s3"
    assert CFG.name == ("gu_bm128_bn64_bk64_w4x2_s3__dn_bm128_bn128_bk64_w2x4_s3"
                        "__r8__c1__cs1__ss1")
    cfg = KernelConfig(GemmTile(64, 32, 32, 2, 1, 4), GemmTile(64, 64, 32, 2, 4, 2),
                       router_tokens_per_block=16, chunks_per_peer=4, comm_streams=2,
                       shared_stream=False, overlap=False)
    assert cfg.name == ("gu_bm64_bn32_bk32_w2x1_s4__dn_bm64_bn64_bk32_w2x4_s2"
                        "__r16__c4__cs2__ss0__serial")
    assert KernelConfig.default(SEED, "sm_80").name == (
        "gu_bm64_bn64_bk64_w2x2_s3__dn_bm64_bn128_bk64_w2x4_s3__r8__c1__cs1__ss1")
    assert KernelConfig.default(SEED, "sm_90") == KernelConfig.default(SEED, "sm_80")  # 64 blocks
    assert KernelConfig.default(DSV2_LITE, "sm_90").name == (  # 16 x 11 blocks
        "gu_bm128_bn128_bk64_w8x1_s4_tma__dn_bm128_bn256_bk64_w8x1_s3_tma__r8__c1__cs1__ss1__fs"
        "__pk__os")  # the tma kernel, fused sources, this rank's tokens around the launch
    # More groups than one tma launch takes (2048 local experts): wgmma tiles instead.
    many = MoEProblem(1024, 1024, 2048, 2, tokens_per_rank=1 << 17)
    assert KernelConfig.default(many, "sm_90").gate_up.mma == "wgmma"
    assert KernelConfig.default(SEED.replace(world_size=2)).name.endswith("__ss1__pk")


#: For each specialising problem field, a value different from the base problem's.
PROBLEM_CHANGES = {
    "hidden": 1024,
    "intermediate": 2816,
    "experts": 32,
    "top_k": 4,
    "shared_experts": 1,
    "shared_intermediate": 2816,
    "world_size": 4,
    "tokens_per_rank": 513,
    "capacity_factor": 1.5,
    "normalize_topk": False,
    "scoring": "sigmoid",
    "expert_bias": True,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling": 2.5,
    "shared_gate": True,
}
#: Fields whose change needs another field set first (topk_group means nothing without groups).
PROBLEM_CHANGE_BASE = {"topk_group": {"n_group": 8}}


def test_problem_change_table_covers_every_field():
    # dtype is the one field with a single legal value (bf16), so it cannot change.
    assert set(PROBLEM_CHANGES) | {"dtype"} == {f.name for f in fields(MoEProblem)}


@pytest.mark.parametrize("field", sorted(PROBLEM_CHANGES))
def test_every_problem_field_changes_the_name(field):
    base = DSV2_LITE.replace(**PROBLEM_CHANGE_BASE.get(field, {}))
    changed = base.replace(**{field: PROBLEM_CHANGES[field]})
    assert getattr(changed, field) != getattr(base, field)
    assert changed != base
    assert changed.name != base.name


def test_problem_names_distinct_over_grid():
    problems = set()
    for h, i, e, k, s, p, t, cf, norm in itertools.product(
            (512, 2048, 2880), (704, 1408), (8, 60, 64), (1, 2, 6), (0, 1, 2), (1, 2, 4),
            (0, 1, 256, 333), (None, 1.0, 1.25, 2.0), (True, False)):
        if e % p:
            continue
        problems.add(MoEProblem(h, i, e, k, shared_experts=s, world_size=p,
                                tokens_per_rank=t, capacity_factor=cf, normalize_topk=norm))
    names = {q.name for q in problems}
    assert len(problems) > 5000
    assert len(names) == len(problems)


def test_problem_name_keeps_capacity_factor_precision():
    a = MoEProblem(64, 64, 8, 2, tokens_per_rank=4096, capacity_factor=1.0)
    b = a.replace(capacity_factor=1.0000001)
    assert a != b
    assert a.fixed_capacity(16) != b.fixed_capacity(16)  # 1024 vs 1040: really different
    assert a.name != b.name


#: For each config knob, a value different from CFG's (tile fields are changed below).
CONFIG_CHANGES = {
    "router_tokens_per_block": 4,
    "chunks_per_peer": 2,
    "comm_streams": 2,
    "shared_stream": False,
    "overlap": False,
    "fuse_sources": True,
    "packed_slots": True,
    "mode": "graph",
    "transport": "nvlink",
    "blocks_per_sm": 1,
    "gu_splits": 2,
    "dn_splits": 4,
    "dispatch_blocks": 0,
    "ws_tma": True,
    "comm_sms": 8,
    "own_split": True,
    "own_stream": True,
    "gather_experts": True,
    "send_blocks": 16,
    "router_batches": 2,
    "task_tiles": 2,
    "defer_refill": True,
    "stage_epilogue": 2,
    "phased_tasks": True,
    "task_producer": True,
    "atomic_front": True,
    "split_gated_mma": True,
    "ws_wgmma": True,
    "tanh_silu": True,
    "interleave_sources": True,
    "own_first": True,
    "own_down_last": True,
    "stream_down": True,
    "early_down": True,
    "shared_front": True,
}
TILE_CHANGES = {"bm": 64, "bn": 32, "bk": 32, "warps_m": 1, "warps_n": 1, "stages": 4,
                "mma": "ws"}


def test_config_change_tables_cover_every_field():
    assert set(CONFIG_CHANGES) | {"gate_up", "down"} == {f.name for f in fields(KernelConfig)}
    # every knob past the name's fixed head has one suffix (dn_splits rides on gu_splits')
    from flashmoe_gen.config import _SUFFIXES
    head = {"gate_up", "down", "router_tokens_per_block", "chunks_per_peer", "comm_streams",
            "shared_stream", "dn_splits"}
    assert [f for f, _ in _SUFFIXES if f in head] == []
    assert {f for f, _ in _SUFFIXES} | head == {f.name for f in fields(KernelConfig)}
    assert set(TILE_CHANGES) == {f.name for f in fields(GemmTile)}


@pytest.mark.parametrize("field", sorted(CONFIG_CHANGES))
def test_every_knob_refuses_a_value_of_another_type(field):
    """Each knob of its default's type: a bool knob refuses 1, an integer one True, both say
    which knob (validate reads the types from the defaults: a new knob is covered)."""
    default = getattr(CFG, field)
    if not isinstance(default, int):  # the word knobs (mode, transport) check their words
        return
    bad, text = (1, "must be a bool") if isinstance(default, bool) else \
        (True, "must be an integer")
    with pytest.raises(ConfigError, match=text) as e:
        replace(CFG, **{field: bad}).validate(DSV2_LITE, "sm_90")
    assert e.value.field == field


@pytest.mark.parametrize("field", sorted(CONFIG_CHANGES))
def test_every_config_knob_changes_the_name(field):
    changed = replace(CFG, **{field: CONFIG_CHANGES[field]})
    assert changed != CFG and changed.name != CFG.name
    # the name and the dict give the knob back (a knob the name forgets is lost in the DB)
    assert KernelConfig.from_name(changed.name) == changed
    assert KernelConfig.from_dict(changed.to_dict()) == changed


@pytest.mark.parametrize("which", ["gate_up", "down"])
@pytest.mark.parametrize("field", sorted(TILE_CHANGES))
def test_every_tile_field_changes_the_name(which, field):
    tile = getattr(CFG, which)
    new_tile = replace(tile, **{field: TILE_CHANGES[field]})
    assert new_tile != tile and new_tile.name != tile.name
    changed = replace(CFG, **{which: new_tile})
    assert changed.name != CFG.name
    # gate_up and down tiles are told apart (swapping them is a different config).
    assert replace(CFG, gate_up=CFG.down, down=CFG.gate_up).name != CFG.name


def test_config_names_distinct_over_grid():
    configs = set()
    for bm, bn, bk, wm, wn, st in itertools.product(
            (64, 128), (32, 64, 128), BK_CHOICES, (1, 2), (1, 2), (2, 3, 4)):
        tile = GemmTile(bm, bn, bk, wm, wn, st)
        for r, c, cs, ss, ov in itertools.product((1, 8), (1, 3), (1, 4), (True, False),
                                                  (True, False)):
            configs.add(KernelConfig(tile, GU, r, c, cs, ss, ov))
            configs.add(KernelConfig(GU, tile, r, c, cs, ss, ov))
    assert len({c.name for c in configs}) == len(configs) > 1000


# ---- serialisation -------------------------------------------------------------------------
ROUND_TRIP_PROBLEMS = PROBLEMS + [
    MoEProblem(64, 32, 8, 2, capacity_factor=1.25, normalize_topk=False, tokens_per_rank=0),
    MoEProblem(2048, 1408, 64, 6, shared_experts=2, shared_intermediate=2816, world_size=8),
]


@pytest.mark.parametrize("p", ROUND_TRIP_PROBLEMS, ids=lambda p: p.name)
def test_problem_round_trips(p):
    assert MoEProblem.from_json(p.to_json()) == p
    assert MoEProblem.from_dict(p.to_dict()) == p
    assert MoEProblem.from_dict(json.loads(p.to_json())).name == p.name
    assert json.loads(p.to_json()) == p.to_dict()
    assert p.replace() == p


def round_trip_configs():
    cfgs = [KernelConfig.default(p) for p in PROBLEMS]
    cfgs.append(CFG)
    cfgs.append(KernelConfig(GemmTile(64, 32, 32, 2, 1, 4), GemmTile(16, 16, 32, 1, 1, 2),
                             router_tokens_per_block=32, chunks_per_peer=16, comm_streams=4,
                             shared_stream=False, overlap=False))
    return cfgs


@pytest.mark.parametrize("cfg", round_trip_configs(), ids=lambda c: c.name)
def test_config_round_trips(cfg):
    assert KernelConfig.from_json(cfg.to_json()) == cfg
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert KernelConfig.from_name(cfg.name) == cfg
    assert KernelConfig.parse(cfg.to_json()) == cfg
    assert KernelConfig.parse(cfg.name) == cfg
    assert KernelConfig.parse(f"  {cfg.name}\n") == cfg
    assert KernelConfig.parse("\n" + json.dumps(cfg.to_dict(), indent=2)) == cfg
    assert GemmTile.parse(cfg.gate_up.name) == cfg.gate_up
    assert GemmTile.parse(cfg.down.name) == cfg.down
    d = cfg.to_dict()
    assert d["gate_up"] == asdict(cfg.gate_up) and d["down"] == asdict(cfg.down)


def test_problem_unknown_field_raises():
    d = SEED.to_dict() | {"hiden": 512}
    with pytest.raises(ProblemError) as ei:
        MoEProblem.from_dict(d)
    assert ei.value.field == "hiden"
    assert "unknown field" in str(ei.value) and "'hidden'" in str(ei.value)
    with pytest.raises(ProblemError):
        MoEProblem.from_json(json.dumps(d))
    with pytest.raises(ProblemError):
        SEED.replace(experts_per_rank=4)


def test_config_unknown_field_raises():
    d = CFG.to_dict() | {"chunks": 2}
    with pytest.raises(ConfigError) as ei:
        KernelConfig.from_dict(d)
    assert ei.value.field == "chunks" and "chunks_per_peer" in str(ei.value)
    with pytest.raises(ConfigError):
        KernelConfig.parse(json.dumps(d))


def test_config_unknown_tile_field_raises_config_error():
    d = CFG.to_dict()
    d["gate_up"] = d["gate_up"] | {"warps_k": 2}
    with pytest.raises(ConfigError):
        KernelConfig.parse(json.dumps(d))


@pytest.mark.parametrize("bad", [
    "", "gu_bm128", "bm128_bn64_bk64_w4x2_s3",
    CFG.name + "__extra", CFG.name.replace("__r8", "__rx"), CFG.name.replace("ss1", "ss2"),
])
def test_config_bad_name_raises(bad):
    with pytest.raises(ConfigError) as ei:
        KernelConfig.parse(bad)
    assert ei.value.field in ("name", "tile")
    assert "e.g." in ei.value.expected


def test_tile_bad_name_raises():
    with pytest.raises(ConfigError) as ei:
        GemmTile.parse("bm128_bn64_bk64_w4_s3")
    assert ei.value.field == "tile" and "bm128_bn64_bk64_w4x2_s3" in str(ei.value)


# ---- problem validation ----------------------------------------------------------------------
def problem_error(**kw) -> ProblemError:
    args = dict(hidden=512, intermediate=2048, experts=8, top_k=2)
    args.update(kw)
    with pytest.raises(ProblemError) as ei:
        MoEProblem(**args)
    return ei.value


def test_error_classes():
    for cls in (ProblemError, ConfigError):
        assert issubclass(cls, FlashMoEError) and issubclass(cls, ValueError)


def test_experts_not_divisible_by_world_size_lists_valid_world_sizes():
    e = problem_error(experts=60, world_size=8)
    assert e.field == "experts" and e.value == 60
    msg = str(e)
    assert "problem.experts=60" in msg and "world_size=8" in msg
    assert "[1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60]" in msg
    e = problem_error(experts=8, world_size=3)
    assert e.field == "experts" and "[1, 2, 4, 8]" in str(e)


@pytest.mark.parametrize("top_k", [9, 64])
def test_top_k_above_experts(top_k):
    e = problem_error(experts=8, top_k=top_k)
    assert e.field == "top_k" and e.value == top_k
    assert "between 1 and experts=8" in str(e)


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one(top_k):
    e = problem_error(top_k=top_k)
    assert e.field == "top_k" and "positive integer" in str(e)


@pytest.mark.parametrize("field,value,hint", [
    ("hidden", 100, "e.g. 96 or 104"),
    ("hidden", 20, "e.g. 16 or 24"),
    ("intermediate", 1410, "e.g. 1408 or 1416"),
])
def test_sizes_must_be_vector_multiples(field, value, hint):
    e = problem_error(**{field: value})
    assert e.field == field and e.value == value
    assert "multiple of the vector width 8" in str(e) and hint in str(e)


@pytest.mark.parametrize("field", ["hidden", "intermediate"])
@pytest.mark.parametrize("value", [4, 8])
def test_sizes_below_one_tensor_core_tile(field, value):
    e = problem_error(**{field: value})
    assert e.field == field and "at least 16" in str(e)


def test_shared_intermediate_must_be_vector_multiple():
    e = problem_error(shared_experts=1, shared_intermediate=100)
    assert e.field == "shared_intermediate" and "multiple of 8" in str(e)
    e = problem_error(shared_experts=1, shared_intermediate=0)
    assert e.field == "shared_intermediate"


@pytest.mark.parametrize("field", ["hidden", "intermediate", "experts", "top_k", "world_size"])
@pytest.mark.parametrize("value", [0, -8])
def test_non_positive_sizes(field, value):
    e = problem_error(**{field: value})
    assert e.field == field and e.value == value
    assert f"problem.{field}={value}" in str(e) and "positive integer" in str(e)


@pytest.mark.parametrize("field", ["tokens_per_rank", "shared_experts"])
def test_negative_counts(field):
    e = problem_error(**{field: -1})
    assert e.field == field and "non-negative integer" in str(e)
    MoEProblem(512, 2048, 8, 2, **{field: 0})  # zero is fine


@pytest.mark.parametrize("field,value", [
    ("hidden", True), ("experts", True), ("top_k", True), ("world_size", True),
    ("tokens_per_rank", False), ("shared_experts", True), ("hidden", 512.0), ("top_k", "2"),
])
def test_bool_or_non_int_where_int_expected(field, value):
    e = problem_error(**{field: value})
    assert e.field == field and e.value is value
    assert "integer" in str(e)


@pytest.mark.parametrize("dtype", ["fp16", "bfloat16", "", None])
def test_bad_dtype(dtype):
    e = problem_error(dtype=dtype)
    assert e.field == "dtype" and "supported: bf16" in str(e)


@pytest.mark.parametrize("cf", [0, 0.0, -1.0, float("nan"), True, "1.5"])
def test_bad_capacity_factor(cf):
    e = problem_error(capacity_factor=cf)
    assert e.field == "capacity_factor" and "number > 0" in str(e)


def test_bad_normalize_topk():
    e = problem_error(normalize_topk=1)
    assert e.field == "normalize_topk" and "bool" in str(e)


def test_from_dict_validates():
    d = SEED.to_dict() | {"experts": 1}
    with pytest.raises(ProblemError) as ei:
        MoEProblem.from_dict(d)
    assert ei.value.field == "top_k"
    with pytest.raises(ProblemError):
        SEED.replace(world_size=3)


# ---- config validation -------------------------------------------------------------------
def config_error(cfg: KernelConfig, problem: MoEProblem = DSV2_LITE,
                 arch: str = "sm_90") -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        cfg.validate(problem, arch)
    assert ei.value.config_name == cfg.name
    assert f"config.{ei.value.field}=" in str(ei.value) and cfg.name in str(ei.value)
    return ei.value


def test_base_config_is_valid():
    CFG.validate(DSV2_LITE)
    CFG.validate(DSV2_LITE, limits_for("sm_80"))


@pytest.mark.parametrize("which", ["gate_up", "down"])
@pytest.mark.parametrize("field,value,choices", [
    ("bm", 96, BM_CHOICES), ("bm", 8, BM_CHOICES), ("bn", 48, BN_CHOICES),
    ("bk", 8, BK_CHOICES), ("bk", 128, BK_CHOICES), ("warps_m", 3, WARP_CHOICES),
    ("warps_n", 16, WARP_CHOICES),
])
def test_tile_field_not_in_choices(which, field, value, choices):
    cfg = replace(CFG, **{which: replace(getattr(CFG, which), **{field: value})})
    e = config_error(cfg)
    assert e.field == f"{which}.{field}" and e.value == value
    assert str(list(choices)) in str(e)


@pytest.mark.parametrize("stages", [0, 1, 7])
def test_stages_out_of_range(stages):
    e = config_error(replace(CFG, down=replace(DN, stages=stages)))
    assert e.field == "down.stages" and e.value == stages and "choose 2..6" in str(e)


def test_warps_must_split_the_tile():
    # bm=64 over 8 warps gives 8-row warp tiles: mma needs multiples of 16.
    e = config_error(replace(CFG, gate_up=GemmTile(64, 64, 64, 8, 1, 3)))
    assert e.field == "gate_up.warps_m" and "valid warps_m: [1, 2, 4]" in str(e)
    # bn=32 over 4 warps gives 8 columns: ldmatrix.x4 loads 16 at a time.
    e = config_error(replace(CFG, down=GemmTile(128, 32, 64, 2, 4, 3)))
    assert e.field == "down.warps_n" and "valid warps_n: [1, 2]" in str(e)


def test_too_many_threads():
    e = config_error(replace(CFG, gate_up=GemmTile(256, 256, 32, 8, 8, 2)))
    assert e.field == "gate_up.warps_m" and "2048 threads exceed 1024" in str(e)


def test_tile_exceeds_problem_n():
    p = MoEProblem(512, 32, 8, 2)
    e = config_error(replace(CFG, gate_up=GemmTile(64, 64, 32, 2, 2, 3)), p)
    assert e.field == "gate_up.bn" and e.value == 64 and "N=32" in str(e)
    assert "bn <= 32" in str(e)
    # The shared experts' width counts too (smaller than the routed intermediate here).
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, shared_intermediate=32)
    e = config_error(replace(CFG, gate_up=GemmTile(64, 64, 32, 2, 2, 3)), p)
    assert e.field == "gate_up.bn" and "bn <= 32" in str(e)
    # down's N is hidden.
    p = MoEProblem(64, 512, 8, 2)
    e = config_error(KernelConfig(GemmTile(64, 64, 64, 2, 2, 3), DN), p)
    assert e.field == "down.bn" and "bn <= 64" in str(e)


def test_tile_exceeds_problem_k():
    p = MoEProblem(32, 512, 8, 2)  # gate_up's K is hidden
    e = config_error(KernelConfig(GemmTile(64, 64, 64, 2, 2, 3), DN), p)
    assert e.field == "gate_up.bk" and e.value == 64 and "bk <= 32" in str(e)
    p = MoEProblem(512, 32, 8, 2)  # down's K is intermediate
    e = config_error(KernelConfig(GemmTile(64, 32, 32, 2, 2, 3), DN), p)
    assert e.field == "down.bk" and "K=32" in str(e)


def test_shared_memory_over_sm90_limit():
    tile = GemmTile(256, 256, 64, 4, 2, 6)
    e = config_error(replace(CFG, gate_up=tile))
    assert e.field == "gate_up.stages" and e.value == 6
    need = 6 * (256 * 64 + 2 * 256 * 64) * 2
    assert tile.smem_bytes(2) == need
    assert f"needs {need} B" in str(e) and f"allows {227 * 1024} B" in str(e)
    assert "sm_90" in str(e)


def test_shared_memory_limit_depends_on_arch():
    tile = GemmTile(128, 128, 64, 4, 2, 4)  # 4 * (8192 + 16384) * 2 = 196608 B
    cfg = replace(CFG, gate_up=tile)
    cfg.validate(DSV2_LITE, "sm_90")
    e = config_error(cfg, arch="sm_80")
    assert e.field == "gate_up.stages" and "sm_80 allows 166912 B" in str(e)
    cfg = replace(CFG, gate_up=GemmTile(128, 64, 64, 4, 2, 4))  # 131072 B
    cfg.validate(DSV2_LITE, "sm_80")
    e = config_error(cfg, arch="sm_86")
    assert "sm_86 allows 101376 B" in str(e)


def test_register_estimate_over_limit():
    e = config_error(replace(CFG, gate_up=GemmTile(128, 128, 64, 1, 1, 3)))
    assert e.field == "gate_up.bn" and "registers per thread (limit 255)" in str(e)
    assert "more warps or smaller tiles" in str(e)


def test_registers_per_block_over_limit():
    tile = GemmTile(256, 128, 64, 8, 4, 2)
    assert tile.threads == 1024 and tile.regs_estimate(2) * 1024 > 65536
    e = config_error(replace(CFG, gate_up=tile))
    assert e.field == "gate_up.warps_n" and "exceed 65536 per block" in str(e)


@pytest.mark.parametrize("value", [0, 3, 64])
def test_router_tokens_per_block_invalid(value):
    e = config_error(replace(CFG, router_tokens_per_block=value))
    assert e.field == "router_tokens_per_block" and str(list(ROUTER_CHOICES)) in str(e)


@pytest.mark.parametrize("value", [0, 17, -1, 2.5])
def test_chunks_per_peer_invalid(value):
    e = config_error(replace(CFG, chunks_per_peer=value))
    assert e.field == "chunks_per_peer"
    assert ("1..16" if isinstance(value, int) else "integer") in str(e)


@pytest.mark.parametrize("value", [0, 3, 8])
def test_comm_streams_invalid(value):
    e = config_error(replace(CFG, comm_streams=value))
    assert e.field == "comm_streams" and str(list(COMM_STREAM_CHOICES)) in str(e)


@pytest.mark.parametrize("change", [
    {"router_tokens_per_block": True},
    {"chunks_per_peer": True},
    {"comm_streams": True},
    {"gate_up": GemmTile(16, 64, 64, True, 2, 3)},
], ids=["router_tokens_per_block", "chunks_per_peer", "comm_streams", "gate_up.warps_m"])
def test_config_bool_where_int_expected(change):
    cfg = replace(CFG, **change)
    with pytest.raises(ConfigError):
        cfg.validate(DSV2_LITE)


def test_config_tile_not_a_gemm_tile():
    cfg = KernelConfig(asdict(GU), DN)
    with pytest.raises(ConfigError) as ei:
        cfg.validate(DSV2_LITE)
    assert ei.value.field == "gate_up"


# ---- weight-streaming tiles -------------------------------------------------------------------
DSV3_DECODE = MoEProblem(7168, 2048, 256, 8, shared_experts=1, world_size=4, tokens_per_rank=128)


def test_weight_streaming_tile_name_parse_and_grid():
    t = GemmTile(32, 64, 64, 4, 1, 4, "ws")
    assert t.name == "bm32_bn64_bk64_w4x1_s4_ws" and GemmTile.parse(t.name) == t
    assert GemmTile.parse("bm32_bn64_bk64_w4x1_s4").mma == "sync"
    cfg = KernelConfig(t, GemmTile(32, 128, 64, 4, 1, 4, "ws"), fuse_sources=True)
    assert KernelConfig.from_name(cfg.name) == cfg
    assert KernelConfig.from_json(cfg.to_json()) == cfg
    # One block row; the fused launch (inner groups > 0) takes one block per expert.
    assert t.grid(2048, 500, 4 * 64, 64) == (32, 1, 64)
    assert t.grid(2050, 500, 3, 0) == (33, 1, 3)
    assert GemmTile(64, 64, 64, 2, 2, 3).grid(2048, 500, 256, 64) == (32, 8, 256)


@pytest.mark.parametrize("tile,field,text", [
    (GemmTile(8, 64, 64, 4, 1, 4, "ws"), "bm", "tokens per pass"),
    (GemmTile(256, 64, 64, 4, 1, 4, "ws"), "bm", "tokens per pass"),
    (GemmTile(32, 64, 16, 4, 1, 4, "ws"), "bk", "ws: choose one of [32, 64]"),
    (GemmTile(32, 64, 64, 2, 2, 4, "ws"), "warps_n", "use 1"),
    (GemmTile(32, 32, 64, 4, 1, 4, "ws"), "bn", "multiple of 16 x warps_m = 64"),
    (GemmTile(32, 64, 64, 4, 1, 9, "ws"), "stages", "choose 2..8"),
    (GemmTile(64, 256, 64, 2, 1, 6, "ws"), "stages", "shared memory"),
], ids=["bm8", "bm256", "bk16", "warps_n2", "bn_split", "stages9", "smem"])
def test_weight_streaming_tile_refusals(tile, field, text):
    _refused(KernelConfig(tile, GemmTile(32, 128, 64, 4, 1, 4, "ws")), DSV3_DECODE, field, text)


def _refused(cfg: KernelConfig, problem: MoEProblem, field: str, text: str) -> None:
    """validate raises a ConfigError on the gate/up tile's ``field`` saying ``text``."""
    with pytest.raises(ConfigError) as ei:
        cfg.validate(problem)
    assert ei.value.field == f"gate_up.{field}" and text in str(ei.value), str(ei.value)


def test_weight_streaming_default_for_decode_only():
    ws = KernelConfig.default(DSV3_DECODE)
    assert ws.gate_up.mma == ws.down.mma == "ws" and ws.fuse_sources
    assert ws.block_m == 32  # 16 rows per expert, 32 with the shared expert's T rows
    big = KernelConfig.default(DSV3_DECODE.replace(tokens_per_rank=4096))
    assert big.gate_up.mma != "ws" and not big.fuses_own_tokens  # own tokens apart
    one = KernelConfig.default(DSV3_DECODE.replace(world_size=1, shared_experts=0,
                                                   tokens_per_rank=64))
    assert one.gate_up.bm == 16 and not one.fuse_sources  # 2 rows per expert, no peers


# ---- the persistent tma kernel's tiles ----------------------------------------------------------
def test_tma_tile_name_threads_smem_and_grid():
    t = GemmTile(128, 128, 64, 8, 1, 4, "tma")
    assert t.name == "bm128_bn128_bk64_w8x1_s4_tma" and GemmTile.parse(t.name) == t
    assert t.threads == 384  # a producer warpgroup and two consumer warpgroups
    assert t.smem_bytes(2) == 4 * (128 * 64 + 2 * 128 * 64) * 2 + 1024
    cfg = KernelConfig(t, GemmTile(128, 256, 64, 8, 1, 4, "tma"))
    cfg.validate(MIXTRAL)
    assert cfg.uses_tma and cfg.uses_wgmma  # built for sm_90a like wgmma
    # Persistent: at most one block per SM, fewer when the launch has fewer tiles.
    assert t.grid(14336, 4096, 4, 0, sms=132) == (132, 1, 1)
    assert t.grid(256, 100, 1, 0, sms=132) == (2, 1, 1)


@pytest.mark.parametrize("tile,field,text", [
    (GemmTile(64, 128, 64, 4, 1, 4, "tma"), "bm", "bm=128 over two consumer warpgroups"),
    (GemmTile(128, 128, 32, 8, 1, 4, "tma"), "bk", "bk=64"),
    (GemmTile(128, 32, 64, 8, 1, 4, "tma"), "bn", "choose 64, 128 or 256"),
    (GemmTile(128, 256, 64, 8, 1, 2, "tma"), "bn", "gated: bn <= 128"),
    (GemmTile(128, 128, 64, 8, 1, 9, "tma"), "stages", "choose 2..8"),
    (GemmTile(128, 128, 64, 8, 1, 5, "tma"), "stages", "shared memory"),
], ids=["bm64", "bk32", "bn32", "gated_bn256", "stages9", "smem"])
def test_tma_tile_refusals(tile, field, text):
    _refused(KernelConfig(tile, GemmTile(128, 128, 64, 8, 1, 4, "tma")), MIXTRAL, field, text)


def test_tma_needs_hopper_and_few_enough_groups():
    t = GemmTile(128, 128, 64, 8, 1, 4, "tma")
    with pytest.raises(ConfigError, match="tma needs sm_90"):
        KernelConfig(t, t).validate(MIXTRAL, "sm_80")
    many = MoEProblem(2048, 1408, 2048, 6, world_size=1, tokens_per_rank=64)
    with pytest.raises(ConfigError, match="at most 1024"):
        KernelConfig(t, t).validate(many)


# ---- transport "nvlink": the persistent kernel ---------------------------------------------------
NVL_TILE = GemmTile(32, 128, 64, 8, 1, 4, "ws")


def test_nvlink_transport_name_and_parse():
    cfg = KernelConfig(NVL_TILE, NVL_TILE, transport="nvlink")
    cfg.validate(DSV3_DECODE)
    assert cfg.name.endswith("__r8__c1__cs1__ss1__nvlink")
    assert KernelConfig.from_name(cfg.name) == cfg
    graph = replace(cfg, mode="graph")
    assert graph.name.endswith("__graph__nvlink") and KernelConfig.from_name(graph.name) == graph
    assert KernelConfig.from_json(cfg.to_json()) == cfg
    old = json.loads(cfg.to_json())
    del old["transport"]  # a config stored before the knob existed reads as nccl
    assert KernelConfig.from_dict(old).transport == "nccl"
    assert cfg.persistent_smem() == max(NVL_TILE.smem_bytes(2), NVL_TILE.smem_bytes(1))
    # Many rows per expert: mma.sync row tiles of 8 warps serve the same tasks.
    big = KernelConfig(GemmTile(64, 128, 64, 2, 4, 4), GemmTile(128, 128, 32, 4, 2, 4),
                       transport="nvlink")
    big.validate(DSV3_DECODE.replace(tokens_per_rank=4096))


def test_blocks_per_sm_names_parses_and_bounds_the_grid():
    from flashmoe_gen.persistent import persistent_grid

    cfg = replace(KernelConfig(NVL_TILE, NVL_TILE, transport="nvlink"), blocks_per_sm=2)
    assert cfg.name.endswith("__nvlink__b2") and KernelConfig.from_name(cfg.name) == cfg
    cfg.validate(DSV3_DECODE)
    assert KernelConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                   if k != "blocks_per_sm"}).blocks_per_sm == 0  # older JSON
    assert persistent_grid(3, 132, 0) == 3 * 132 and persistent_grid(3, 132, 2) == 2 * 132
    assert persistent_grid(1, 132, 4) == 132  # never more than fit: all resident
    for bad, text in ((3, "choose one of"), (True, "must be an integer")):
        with pytest.raises(ConfigError, match=text):
            replace(cfg, blocks_per_sm=bad).validate(DSV3_DECODE)
    with pytest.raises(ConfigError, match="only transport 'nvlink'"):
        replace(KernelConfig.default(DSV3_DECODE), blocks_per_sm=1).validate(DSV3_DECODE)


def test_send_blocks_needs_peers_and_per_source_tasks():
    """send_blocks: a subset of the persistent kernel's blocks sends the peers' rows; only
    with peers, per-source tasks and one of SEND_BLOCK_CHOICES, each refusal says why."""
    from flashmoe_gen.config import SEND_BLOCK_CHOICES

    p = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=4096)
    base = KernelConfig.persistent_default(p, "sm_90")
    for n in SEND_BLOCK_CHOICES:
        cfg = replace(base, send_blocks=n)
        cfg.validate(p, "sm_90")
        assert KernelConfig.from_name(cfg.name) == cfg and ("__sb" in cfg.name) == (n > 0)
    for cfg, q, text in (
            (replace(base, send_blocks=12), p, "choose one of"),
            (replace(KernelConfig.default(p, "sm_90"), send_blocks=8), p, "only transport"),
            (replace(base, send_blocks=8), p.replace(world_size=1), "no peers"),
            (replace(KernelConfig.persistent_default(DSV3_DECODE), send_blocks=8),
             DSV3_DECODE, "fused tasks wait")):
        with pytest.raises(ConfigError, match=text) as e:
            cfg.validate(q, "sm_90")
        assert e.value.field == "send_blocks"


def test_task_tiles_only_for_tma_row_tasks():
    """task_tiles 2: two row tiles per task through one ring, only for the TMA row tasks
    (and without the default's staged epilogue, which takes the ring at the row's end)."""
    p = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=4096)
    base = replace(KernelConfig.persistent_default(p, "sm_90"), stage_epilogue=0)
    cfg = replace(base, task_tiles=2)
    cfg.validate(p, "sm_90")
    assert cfg.name.endswith("__tt2__ph__ts__il") and KernelConfig.from_name(cfg.name) == cfg
    for bad, text in ((replace(base, task_tiles=3), "choose one of"),
                      (replace(base, task_tiles=2, ws_tma=False), "only the persistent"),
                      (replace(KernelConfig.default(p, "sm_90"), task_tiles=2),
                       "only the persistent")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(p, "sm_90")
        assert e.value.field == "task_tiles"


def test_defer_refill_only_for_tma_row_tasks():
    """defer_refill: thread 0 refills the TMA row tasks' ring without waiting where it can;
    other tiles have no such ring. The name round-trips after every other knob."""
    p = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=4096)
    base = replace(KernelConfig.persistent_default(p, "sm_90"), stage_epilogue=0)
    cfg = replace(base, defer_refill=True, task_tiles=2)
    cfg.validate(p, "sm_90")
    assert cfg.name.endswith("__tt2__dr__ph__ts__il")
    assert KernelConfig.from_name(cfg.name) == cfg
    for bad in (replace(base, defer_refill=True, ws_tma=False),
                replace(KernelConfig.default(p, "sm_90"), defer_refill=True),
                replace(KernelConfig.persistent_default(p.replace(tokens_per_rank=64)),
                        defer_refill=True)):  # fused weight-streaming tiles
        with pytest.raises(ConfigError, match="only the persistent kernel's TMA row") as e:
            bad.validate(p, "sm_90")
        assert e.value.field == "defer_refill"


def test_stage_epilogue_only_for_single_tma_row_tiles():
    """stage_epilogue: the TMA row tasks' results (1: the down GEMM's, 2: both GEMMs')
    through the ring's shared memory, free only with one row tile per task. The name
    round-trips after every other knob."""
    p = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=4096)
    base = KernelConfig.persistent_default(p, "sm_90")
    for v in (1, 2):
        cfg = replace(base, defer_refill=True, stage_epilogue=v)
        cfg.validate(p, "sm_90")
        assert cfg.name.endswith(f"__dr__se{v}__ph__ts__il")
        assert KernelConfig.from_name(cfg.name) == cfg
    for bad, text in ((replace(base, stage_epilogue=1, ws_tma=False), "only the persistent"),
                      (replace(KernelConfig.default(p, "sm_90"), stage_epilogue=2),
                       "only the persistent"),
                      (replace(base, stage_epilogue=1, task_tiles=2), "task_tiles 2"),
                      (replace(base, stage_epilogue=5), "choose one of"),
                      (replace(base, stage_epilogue=True), "must be an integer")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(p, "sm_90")
        assert e.value.field == "stage_epilogue"


def test_phased_tasks_only_for_per_source_lists():
    """phased_tasks: every source's gate/up tasks before any down task, for the persistent
    kernel's per-source lists on several ranks. The name round-trips after every other
    knob."""
    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=4096)
    base = KernelConfig.persistent_default(p, "sm_90")
    cfg = replace(base, phased_tasks=True)
    cfg.validate(p, "sm_90")
    assert cfg.name.endswith("__se2__ph__ts__il__of") and KernelConfig.from_name(cfg.name) == cfg
    fused_p = p.replace(tokens_per_rank=256)
    for bad, prob, text in (
            (replace(KernelConfig.default(p, "sm_90"), phased_tasks=True), p, "task queue"),
            (replace(KernelConfig.persistent_default(fused_p, "sm_90"), phased_tasks=True),
             fused_p, "fused sources"),
            (replace(cfg, send_blocks=0), p.replace(world_size=1), "one rank"),
            (replace(base, phased_tasks=1), p, "must be a bool")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(prob, "sm_90")
        assert e.value.field == "phased_tasks"


def test_split_gated_mma_only_for_wgmma_gate_up_tiles():
    """split_gated_mma: gate and up in two MMAs of BN (the default is one of 2 BN), only
    where one would be issued: a wgmma or tma gate/up tile (bn <= 128: wider gated tiles
    need more registers than a thread has), on any path."""
    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=4096)
    cfg = replace(KernelConfig.persistent_default(p, "sm_90"), split_gated_mma=True)
    cfg.validate(p, "sm_90")
    assert cfg.name.endswith("__se2__ph__g2__ts__il__of")
    assert KernelConfig.from_name(cfg.name) == cfg
    tma = GemmTile(128, 128, 64, 8, 1, 4, "tma")
    replace(KernelConfig(tma, replace(tma, bn=256)), split_gated_mma=True).validate(p, "sm_90")
    for bad, text in ((replace(KernelConfig.default(p.replace(world_size=1), "sm_80"),
                               split_gated_mma=True), "wgmma or tma"),
                      (replace(cfg, split_gated_mma=1), "must be a bool")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(p, "sm_90")
        assert e.value.field == "split_gated_mma"


def test_ws_wgmma_only_for_128_token_ws_tiles_with_tma_weights():
    """ws_wgmma: weight-streaming tasks on warpgroup MMAs, tokens on the 64-row side (two
    warpgroups: 128-token tiles of 8 warps), weights by TMA boxes, one K range per task;
    the config then builds for sm_90a."""
    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=1024)
    ws = GemmTile(128, 128, 64, 8, 1, 4, "ws")
    cfg = KernelConfig(ws, replace(ws, bn=256), transport="nvlink", fuse_sources=True,
                       ws_tma=True, ws_wgmma=True)
    cfg.validate(p, "sm_90")
    assert cfg.name.endswith("__fs__nvlink__wt__wsg") and KernelConfig.from_name(cfg.name) == cfg
    assert cfg.uses_wgmma and not replace(cfg, ws_wgmma=False).uses_wgmma
    half = replace(ws, bm=64, warps_m=8)
    for bad, arch, text in (
            (replace(cfg, ws_tma=False), "sm_90", "ws_tma=True"),
            (replace(cfg, gate_up=half, down=half), "sm_90", "bm128 tiles"),
            (replace(cfg, dn_splits=2), "sm_90", "no K splits"),
            (replace(cfg, transport="nccl", ws_tma=False), "sm_90", "transport 'nvlink'"),
            (replace(cfg, ws_wgmma=1), "sm_90", "must be a bool")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(p, arch)
        assert e.value.field == "ws_wgmma", e.value
    small = replace(ws, stages=2)  # (fits sm_80's shared memory)
    with pytest.raises(ConfigError, match="sm_90"):
        replace(cfg, gate_up=small, down=small).validate(p, "sm_80")


def test_persistent_default_picks_tiles_by_rows_per_expert():
    from flashmoe_gen.defaults import (
        FEW_TASKS_MIN_ROWS,
        FUSED_MIN_TASKS,
        fused_tasks,
    )

    decode = KernelConfig.persistent_default(DSV3_DECODE)
    assert decode.transport == "nvlink" and decode.gate_up.mma == "ws"
    assert decode.fuse_sources == (DSV3_DECODE.world_size > 1)  # weights read once
    four = KernelConfig.persistent_default(DSV3_DECODE.replace(world_size=4))
    assert four.fuse_sources and KernelConfig.from_name(four.name) == four
    big_p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    # Hopper, 512 rows per source: 128-row wgmma tiles (two warpgroups), 256-wide down
    big = KernelConfig.persistent_default(big_p, "sm_90")
    assert big.gate_up.mma == big.down.mma == "wgmma" and not big.fuse_sources
    assert (big.gate_up.bm, big.down.bn) == (128, 256)
    assert big.gate_up.threads == big.down.threads == 256
    # ... both operands of a routed task by TMA boxes into a 4-stage ring
    assert big.ws_tma and big.gate_up.stages == big.down.stages == 4
    # ... the router's batch eights (64 experts fit one pass, 8192 tokens or more), both
    # GEMMs' results staged (16-byte stores, the down's to the source rank), every
    # source's gate/up tasks before any down task, silu by tanh, one list over every source
    # with this rank's own rows in a list ahead of it (own_first_pays)
    assert big.name.endswith("__nvlink__wt__sb32__rb8__se2__ph__ts__il__of")
    assert KernelConfig.from_name(big.name) == big
    # ... 32 blocks send the peers' rows on several ranks; one rank has none to send, and
    # one source's list is already phased
    one_rank = KernelConfig.persistent_default(big_p.replace(world_size=1), "sm_90")
    assert one_rank.send_blocks == 0 and not one_rank.phased_tasks
    # Ampere has no wgmma; on Hopper below WGMMA_PERSISTENT_MIN_ROWS rows per source (and
    # past PERSISTENT_WS_MAX_ROWS from all sources) mma.sync row tiles in both
    from flashmoe_gen.defaults import (
        PERSISTENT_WS_MAX_ROWS,
        ROUTER_PAIRS_MIN_TOKENS,
        WGMMA_PERSISTENT_MIN_ROWS,
        WS_WGMMA_MIN_ROWS,
    )
    fewer = big_p.replace(experts=128, tokens_per_rank=WGMMA_PERSISTENT_MIN_ROWS * 128 // 2 - 64)
    assert expert_rows(fewer) > PERSISTENT_WS_MAX_ROWS
    for p, arch in ((big_p, "sm_80"), (fewer, "sm_90")):
        cfg = KernelConfig.persistent_default(p, arch)
        assert cfg.gate_up.mma == cfg.down.mma == "sync" and not cfg.fuse_sources
        assert cfg.gate_up.threads == cfg.down.threads == 256 and not cfg.ws_tma
    # 64 rows per source: wgmma rows already (4 x H200 T=2048: 0.774 -> 0.524 ms)
    at_min = big_p.replace(tokens_per_rank=WGMMA_PERSISTENT_MIN_ROWS * 64 // 2)
    assert KernelConfig.persistent_default(at_min, "sm_90").gate_up.mma == "wgmma"
    # Up to PERSISTENT_WS_MAX_ROWS from all sources on several ranks: every source fused
    # into weight-streaming tasks with TMA weights; below the router's pair bound one batch
    # per logit tile. From WS_WGMMA_MIN_ROWS on Hopper: 128-token tiles on warpgroup MMAs
    # (E=64 T=1024 on 4 x H200: 0.393 -> 0.282 ms), a 256-wide down tile
    small = big_p.replace(tokens_per_rank=PERSISTENT_WS_MAX_ROWS * 64 // (2 * 4))
    assert expert_rows(small) == PERSISTENT_WS_MAX_ROWS < ROUTER_PAIRS_MIN_TOKENS
    cfg = KernelConfig.persistent_default(small, "sm_90")
    assert cfg.gate_up.mma == "ws" and cfg.fuse_sources and cfg.ws_wgmma
    assert (cfg.gate_up.bm, cfg.down.bm, cfg.down.bn) == (128, 128, 256)
    assert cfg.ws_tma and cfg.router_batches == 1
    assert cfg.name.endswith("__fs__nvlink__wt__wsg") and KernelConfig.from_name(cfg.name) == cfg
    # ... down to WS_WGMMA_MIN_ROWS (the second warpgroup idle where its tokens hold no
    # rows: 2 x H200 E=64 T=1024, 64 rows, 0.430 -> 0.289 ms), below it (and on sm_80,
    # where a 64-token tile streams the weights by cp.async) narrower mma.sync tiles
    at_64 = big_p.replace(tokens_per_rank=64 * 64 // (2 * 4))
    assert expert_rows(at_64) == 64 >= WS_WGMMA_MIN_ROWS
    assert KernelConfig.persistent_default(at_64, "sm_90").ws_wgmma
    below = big_p.replace(tokens_per_rank=(WS_WGMMA_MIN_ROWS - 8) * 64 // (2 * 4))
    cfg = KernelConfig.persistent_default(below, "sm_90")
    assert cfg.fuse_sources and cfg.gate_up.bm < 128 and not cfg.ws_wgmma
    ampere = KernelConfig.persistent_default(small, "sm_80")
    assert ampere.fuse_sources and ampere.gate_up.bm == 64 and not ampere.ws_wgmma
    # ... nor where the fused tiles' K is split (fewer tiles than SMs: seed T=96 on 4
    # ranks, 96 rows per expert), since 128-token tiles halve the tasks
    seed = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=4, tokens_per_rank=96)
    assert expert_rows(seed) >= WS_WGMMA_MIN_ROWS
    cfg = KernelConfig.persistent_default(seed, "sm_90")
    assert cfg.fuse_sources and not cfg.ws_wgmma and cfg.dn_splits > 1
    # From FEW_TASKS_MIN_ROWS rows per expert, fewer fused tasks than FUSED_MIN_TASKS (2
    # local experts x 16 column tiles): the TMA row tiles in one list over every source
    # (seed T=128 on 4 x H200: 0.132-0.145 -> 0.065 ms); 16 local experts keep the fused
    # tasks (256 of them)
    few = seed.replace(tokens_per_rank=128)
    assert expert_rows(few) == FEW_TASKS_MIN_ROWS and fused_tasks(few) < FUSED_MIN_TASKS
    cfg = KernelConfig.persistent_default(few, "sm_90")
    assert not cfg.fuse_sources and cfg.interleave_sources and cfg.ws_tma
    assert (cfg.gate_up.mma, cfg.down.mma, cfg.down.bn) == ("wgmma", "wgmma", 256)
    assert fused_tasks(small) >= FUSED_MIN_TASKS and KernelConfig.persistent_default(
        small, "sm_90").fuse_sources
    assert KernelConfig.persistent_default(few, "sm_80").fuse_sources  # no wgmma there

    # ... one rank keeps the decode rule (streams_weights) and cp.async weights
    one = KernelConfig.persistent_default(small.replace(world_size=1), "sm_90")
    assert not one.fuse_sources and not one.ws_tma
    # Experts the router's tensor cores cannot take in one pass (16: the FMA path): no
    # pairs at any T; Mixtral's 8 take one n tile, and quads from 2048 tokens
    e16 = MoEProblem(4096, 14336, 16, 2, world_size=4, tokens_per_rank=4096)
    assert KernelConfig.persistent_default(e16, "sm_90").router_batches == 1
    mixtral = e16.replace(experts=8)
    assert KernelConfig.persistent_default(mixtral, "sm_90").router_batches == 4


def test_persistent_default_deepens_the_ring_for_gigabytes_of_weights():
    """>= DEEP_RING_MIN_BYTES of local experts: 6 stages fed by TMA boxes on Hopper (the
    sweep's winner on DeepSeek-V3-like T=128); 4 stages of cp.async elsewhere."""
    from flashmoe_gen.defaults import DEEP_RING_MIN_BYTES

    assert local_weight_bytes(DSV3_DECODE) >= DEEP_RING_MIN_BYTES
    deep = KernelConfig.persistent_default(DSV3_DECODE, "sm_90")
    assert deep.ws_tma and deep.gate_up.stages == deep.down.stages == 6
    assert deep.name.endswith("_s6_ws__r8__c1__cs1__ss1__fs__nvlink__wt")
    assert deep.persistent_smem() <= 227 * 1024
    # sm_80 has no TMA: the 4-stage cp.async ring
    plain = KernelConfig.persistent_default(DSV3_DECODE, "sm_80")
    assert not plain.ws_tma and plain.gate_up.stages == 4
    # 128-token tiles on warpgroup MMAs (64 rows per expert: WS_WGMMA_MIN_ROWS): 6 stages
    # do not fit shared memory, so 4 stay (TMA boxes)
    wide = KernelConfig.persistent_default(DSV3_DECODE.replace(tokens_per_rank=512), "sm_90")
    assert wide.gate_up.bm == 128 and wide.gate_up.stages == 4 and wide.ws_tma
    assert wide.ws_wgmma
    # small weights (DeepSeek-V2-Lite, 277 MB per rank): unchanged
    lite = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=4, tokens_per_rank=8)
    assert local_weight_bytes(lite) < DEEP_RING_MIN_BYTES
    small = KernelConfig.persistent_default(lite, "sm_90")
    assert not small.ws_tma and small.gate_up.stages == 4


@pytest.mark.parametrize("changes,field,text", [
    (dict(transport="ib"), "transport", "choose one of ['nccl', 'nvlink']"),
    (dict(gate_up=GemmTile(64, 64, 64, 2, 2, 3)), "gate_up.mma", "tiles of 8 warps"),
    (dict(gate_up=GemmTile(64, 128, 64, 4, 1, 4, "wgmma")), "gate_up.mma",
     "128-row wgmma tiles of 8 warps"),
    (dict(down=GemmTile(32, 128, 64, 4, 1, 4, "ws")), "down.mma", "of 8 warps"),
    (dict(router_tokens_per_block=4), "router_tokens_per_block", "transport 'nvlink': 8"),
    (dict(chunks_per_peer=2), "chunks_per_peer", "no such schedule"),
    (dict(packed_slots=True), "packed_slots", "no such schedule"),
    (dict(fuse_sources=True, gate_up=GemmTile(64, 128, 64, 2, 4, 4)), "fuse_sources",
     "weight-streaming tiles only"),
    (dict(fuse_sources=True, gate_up=GemmTile(128, 128, 64, 8, 1, 4, "wgmma")), "fuse_sources",
     "weight-streaming tiles only"),
], ids=["unknown", "sync_4_warps", "wgmma_64_rows", "warps", "router", "chunks", "packed",
        "fused", "fused_wgmma"])
def test_nvlink_transport_refusals(changes, field, text):
    cfg = replace(KernelConfig(NVL_TILE, NVL_TILE, transport="nvlink"), **changes)
    with pytest.raises(ConfigError) as ei:
        cfg.validate(DSV3_DECODE)
    assert ei.value.field == field and text in str(ei.value), str(ei.value)


def test_nvlink_takes_128_row_wgmma_tiles_on_hopper_only():
    """Two warpgroups of a 128-row wgmma tile are the persistent block's 8 warps: row tasks
    per source on sm_90; elsewhere the tile itself is refused."""
    wg = GemmTile(128, 128, 64, 8, 1, 4, "wgmma")
    cfg = KernelConfig(wg, wg, transport="nvlink")
    cfg.validate(DSV3_DECODE, "sm_90")
    assert cfg.uses_wgmma and KernelConfig.from_name(cfg.name) == cfg
    with pytest.raises(ConfigError, match="wgmma"):
        cfg.validate(DSV3_DECODE, "sm_80")


# ---- defaults ---------------------------------------------------------------------------------
def test_default_config_validates_over_grid():
    n = 0
    seen_bm, seen_mma, seen_kind = set(), set(), set()
    for h, i, e, k, s, w, t in itertools.product(
            (512, 2048, 2880, 4096, 7168), (704, 1408, 2048, 2880, 14336), (8, 60, 64, 256),
            (1, 2, 4, 6, 8), (0, 1, 2), (1, 2, 4), (1, 256, 4096)):
        if e % w:
            continue
        p = MoEProblem(h, i, e, k, shared_experts=s, world_size=w, tokens_per_rank=t)
        cfg = KernelConfig.default(p, "sm_80")
        cfg.validate(p, "sm_80")
        hopper = KernelConfig.default(p, "sm_90")
        hopper.validate(p, "sm_90")
        seen_mma.add(hopper.uses_wgmma)
        assert cfg.gate_up.bm == cfg.down.bm == cfg.block_m
        rows = w * t * k / e  # an expert's rows from all sources, on average
        kind = cfg.gate_up.mma
        seen_kind.add(kind)
        assert (kind == "ws") == streams_weights(p), (p.name, cfg.name)
        if rows <= WS_MAX_ROWS:
            assert kind == "ws", (p.name, cfg.name)
        assert cfg.fuse_sources == (kind == "ws" and w > 1)  # weights read once
        assert cfg.gate_up.bn <= i and cfg.down.bn <= h
        seen_bm.add(cfg.block_m)
        n += 1
    assert n == 5 * 5 * 4 * 5 * 3 * 3 * 3
    assert seen_bm == {16, 32, 64, 128}  # every row regime was exercised
    assert seen_kind == {"ws", "sync"}  # weight streaming for decode, mma.sync elsewhere
    assert seen_mma == {True, False}  # wgmma where a launch fills the GPU, mma.sync elsewhere


@pytest.mark.parametrize("model,gpus,tokens,streams", [
    ("deepseek-v3", 4, 512, True),   # 64 rows/expert: 4 reads of 5.6 GB per source-wise pass
    ("deepseek-v2-lite", 4, 128, True),   # 48 rows, 0.28 GB of weights per rank
    ("qwen3-30b-a3b", 4, 256, True),
    ("deepseek-v2-lite", 4, 512, False),  # 192 rows: past WS_MAX_ROWS_FUSED
    ("mixtral-8x7b", 1, 256, False),  # 64 rows from one source: nothing read twice
])
def test_defaults_stream_weights_where_per_source_tiles_reread_them(model, gpus, tokens,
                                                                    streams):
    """Past WS_MAX_ROWS the defaults still stream weights (every source fused) where the
    per-source tiles would read each expert's weights once per source and that costs more
    than WS_MIN_SAVING_S (4 x H200: DeepSeek-V3-like T=512 at 0.53x PyTorch EP that way)."""
    from flashmoe_gen.presets import get_preset

    p = get_preset(model).problem(world_size=gpus, tokens_per_rank=tokens)
    assert streams_weights(p) == streams
    for cfg in (KernelConfig.default(p, "sm_90"), KernelConfig.persistent_default(p, "sm_90")):
        assert (cfg.gate_up.mma == "ws") == streams, cfg.name
        if streams:
            assert cfg.fuse_sources == (gpus > 1), cfg.name
        else:  # own tokens apart from any fused launch (the tma default's own_split)
            assert not cfg.fuses_own_tokens, cfg.name


def test_tiny_weights_keep_per_source_tiles_past_ws_max_rows():
    """The seed shape at 64 rows per expert on 2 ranks: its 25 MB of weights per rank cost
    ~2 us to read twice, below WS_MIN_SAVING_S: no change from per-source tiles."""
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=128)
    assert not streams_weights(p)
    assert KernelConfig.default(p, "sm_90").gate_up.mma != "ws"


@pytest.mark.parametrize("arch", sorted(KNOWN_ARCHS))
def test_default_config_validates_on_every_known_arch(arch):
    for p in PROBLEMS + [MoEProblem(32, 32, 1, 1), MoEProblem(40, 48, 2, 1)]:
        KernelConfig.default(p, arch).validate(p, arch)


@pytest.mark.parametrize("args", [(64, 16, 4, 1), (16, 64, 4, 1), (24, 24, 2, 1)])
def test_default_config_exists_for_every_valid_problem(args):
    p = MoEProblem(*args)
    KernelConfig.default(p).validate(p)


def test_default_tiles_follow_rows_per_expert():
    decode = MoEProblem(2048, 1408, 64, 6, tokens_per_rank=256)  # 24 rows per expert
    few = MoEProblem(2048, 1408, 64, 6, tokens_per_rank=640)     # 60 rows per expert
    many = MoEProblem(2048, 1408, 8, 2, tokens_per_rank=4096)    # 1024 rows per expert
    assert KernelConfig.default(decode, "sm_80").gate_up == GemmTile(32, 64, 64, 4, 1, 4, "ws")
    assert KernelConfig.default(few, "sm_80").block_m == 64
    assert KernelConfig.default(many, "sm_80").block_m == 128


# ---- derived sizes ------------------------------------------------------------------------------
@pytest.mark.parametrize("cf", [0.5, 0.75, 1.0, 1.25, 1.5, 2.0])
@pytest.mark.parametrize("tokens,top_k,experts", [
    (0, 2, 8), (1, 1, 256), (256, 2, 8), (333, 4, 60), (512, 6, 64), (4096, 8, 256)])
@pytest.mark.parametrize("tile_m", [16, 64, 128])
def test_fixed_capacity(cf, tokens, top_k, experts, tile_m):
    p = MoEProblem(64, 64, experts, top_k, tokens_per_rank=tokens, capacity_factor=cf)
    raw = math.ceil(Fraction(cf) * tokens * top_k / experts)  # exact: these cf are binary
    expected = -(-max(raw, 1) // tile_m) * tile_m
    c = p.fixed_capacity(tile_m)
    assert c == expected
    assert c % tile_m == 0 and c >= cf * tokens * top_k / experts and c - tile_m < max(raw, 1)


def test_fixed_capacity_examples():
    p = MoEProblem(512, 2048, 8, 2, tokens_per_rank=256, capacity_factor=1.25)
    assert p.fixed_capacity(16) == 80      # ceil(1.25 * 256 * 2 / 8) = 80
    assert p.fixed_capacity(64) == 128
    assert p.replace(tokens_per_rank=0).fixed_capacity(64) == 64  # never zero rows
    assert p.replace(capacity_factor=None).fixed_capacity(64) is None
    assert MoEProblem(2880, 2880, 60, 4, tokens_per_rank=333,
                      capacity_factor=1.0).fixed_capacity(16) == 32  # ceil(22.2) = 23 -> 32


def test_round_up():
    assert [round_up(x, 16) for x in (0, 1, 15, 16, 17, 32)] == [0, 16, 16, 16, 32, 32]


def test_local_experts_and_shared_width():
    assert DSV2_LITE.local_experts == 32
    assert DSV2_LITE.shared_width == 2 * 1408
    assert MIXTRAL.local_experts == 8 and MIXTRAL.shared_width == 0
    assert MoEProblem(2048, 1408, 64, 6, shared_experts=2,
                      shared_intermediate=2816).shared_width == 5632
    for e, w in itertools.product((8, 60, 64, 256), (1, 2, 4)):
        assert MoEProblem(64, 64, e, 1, world_size=w).local_experts * w == e


def test_flops():
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
    t, h = 256, 512
    expected = 2 * t * h * 8 + t * 2 * 6 * h * 2048 + t * 6 * h * 2048
    assert p.flops() == expected
    assert p.flops(0) == 0


# ---- wgmma tiles -----------------------------------------------------------------------------
def test_wgmma_tile_name_round_trip_and_old_json():
    t = GemmTile(128, 128, 64, 8, 1, 4, "wgmma")
    assert t.name == "bm128_bn128_bk64_w8x1_s4_wg"
    assert GemmTile.parse(t.name) == t
    assert GemmTile.parse("bm128_bn128_bk64_w2x4_s4").mma == "sync"
    cfg = KernelConfig(t, GemmTile(64, 128, 64, 2, 4, 3))
    assert KernelConfig.from_name(cfg.name) == cfg and cfg.uses_wgmma
    old = json.loads(cfg.to_json())
    del old["gate_up"]["mma"], old["down"]["mma"]  # JSON written before the field existed
    assert KernelConfig.from_dict(old).gate_up.mma == "sync"


@pytest.mark.parametrize("tile,field", [
    (GemmTile(128, 128, 32, 8, 1, 4, "wgmma"), "bk"),
    (GemmTile(128, 128, 64, 4, 2, 4, "wgmma"), "warps_m"),
    (GemmTile(64, 128, 64, 2, 2, 4, "wgmma"), "warps_m"),
    (GemmTile(128, 64, 64, 4, 1, 4, "wgmma"), "warps_m"),
    (GemmTile(128, 128, 64, 8, 1, 4, "tcgen05"), "mma"),
    (GemmTile(128, 128, 64, 8, 1, 2, "wgmma"), "stages"),
])
def test_wgmma_constraints_name_the_field(tile, field):
    with pytest.raises(ConfigError) as e:
        KernelConfig(tile, GemmTile(64, 128, 64, 2, 4, 3)).validate(DSV2_LITE)
    assert e.value.field == f"gate_up.{field}"


def test_wgmma_needs_hopper():
    cfg = KernelConfig(GemmTile(128, 128, 64, 8, 1, 4, "wgmma"), GemmTile(64, 128, 64, 2, 4, 3))
    cfg.validate(DSV2_LITE, "sm_90")
    cfg.validate(DSV2_LITE, "sm_90a")
    with pytest.raises(ConfigError, match="sm_90"):
        cfg.validate(DSV2_LITE, "sm_80")


# -- knob values declared once; sizes that fit the kernels' ints ---------------------------
def test_search_spaces_take_their_values_from_config():
    from flashmoe_gen import config as cfg
    from flashmoe_gen import tiles as c
    from flashmoe_gen.tuner import space

    valid = {"bm": c.BM_CHOICES, "bn": c.BN_CHOICES, "bk": c.BK_CHOICES, "s": c.STAGE_RANGE,
             "mma": c.MMA_CHOICES, "router": cfg.ROUTER_CHOICES, "chunks": cfg.CHUNK_RANGE,
             "streams": cfg.COMM_STREAM_CHOICES, "mode": cfg.MODE_CHOICES,
             "transport": cfg.TRANSPORT_CHOICES, "blocks": cfg.BLOCKS_PER_SM_CHOICES,
             "ksplit_gu": cfg.K_SPLIT_CHOICES, "ksplit_dn": cfg.K_SPLIT_CHOICES,
             "dispatch": cfg.DISPATCH_BLOCK_CHOICES, "comm_sms": cfg.COMM_SMS_CHOICES}
    for choices in space.SPACES.values():
        for knob, values in choices.items():
            kind = knob.split("_", 1)[-1] if knob.startswith(("gu_", "dn_")) else knob
            if kind == "w":
                assert all(int(w) in c.WARP_CHOICES for g in values for w in g.split("x"))
            elif kind in valid:
                assert set(values) <= set(valid[kind]), knob
            else:
                assert set(values) <= {True, False}, knob
    with pytest.raises(ConfigError, match="warp grid"):
        space._grids("3x1")


@pytest.mark.parametrize("field,limit", [("hidden", "MAX_WIDTH"), ("intermediate", "MAX_WIDTH"),
                                         ("experts", "MAX_EXPERTS"),
                                         ("tokens_per_rank", "MAX_TOKENS")])
def test_sizes_have_upper_bounds_that_fit_int32(field, limit):
    import flashmoe_gen.problem as pm
    bound = getattr(pm, limit)
    ok = SEED.replace(**{field: bound}) if field != "experts" else \
        MoEProblem(512, 2048, bound, 2)
    assert getattr(ok, field) == bound
    with pytest.raises(ProblemError, match=limit) as e:
        SEED.replace(**{field: bound + 8})
    assert e.value.field == field
    # at the bounds every C++ int constant fits 32 bits and buffers fit int64
    big = MoEProblem(pm.MAX_WIDTH, pm.MAX_WIDTH, pm.MAX_EXPERTS, 8, shared_experts=1,
                     tokens_per_rank=pm.MAX_TOKENS, capacity_factor=1.0)
    ints = (big.hidden, big.intermediate, big.experts, big.local_experts, big.shared_width,
            big.tokens_per_rank, big.fixed_capacity(256))
    assert max(ints) < 2**31
    assert big.experts * big.fixed_capacity(256) * big.hidden * 2 < 2**63
    assert big.experts * big.hidden * big.intermediate * 3 < 2**63


def test_weight_streaming_token_tile_covers_the_spread_of_routed_rows():
    # 2 x H200, DeepSeek-V3-like T=512: 32 rows per expert on average with the 32-token tile,
    # so about half the experts took a second pass over their weights (expert tasks at 62% of
    # the copy bandwidth). The tile now weighs the expected passes against its speed.
    from flashmoe_gen.tiles import WS_TOKEN_CHOICES, ws_token_tile

    tiles = [ws_token_tile(m) for m in (0.5, 2, 4, 8, 12, 16, 24, 28, 32, 48, 64)]
    assert tiles == sorted(tiles) and set(tiles) <= set(WS_TOKEN_CHOICES)
    assert ws_token_tile(1) == 16 and ws_token_tile(8) == 16 and ws_token_tile(32) == 64
    assert ws_token_tile(1, smallest=32) == 32 and ws_token_tile(24, smallest=32) == 32
    # the 128-token tile is a tuner choice until a GPU run gives its speed: never a default
    from flashmoe_gen.tiles import WS_TILE_SPEED
    assert 128 in WS_TOKEN_CHOICES and 128 not in WS_TILE_SPEED
    assert ws_token_tile(128) == ws_token_tile(500) == 64
    from flashmoe_gen.arch import limits_for
    GemmTile(128, 128, 64, 8, 1, 4, "ws").validate("gate_up", 2048, 2048, 2,
                                                   limits_for("sm_90"), None)
    p = MoEProblem(7168, 2048, 256, 8, shared_experts=1, world_size=2, tokens_per_rank=512)
    cfg = KernelConfig.default(p)
    assert cfg.gate_up.mma == cfg.down.mma == "ws" and cfg.gate_up.bm == cfg.down.bm == 64
    # (the persistent default's fused tasks take 128 tokens on warpgroup MMAs there:
    # WS_WGMMA_MIN_ROWS)
    assert KernelConfig.persistent_default(p).ws_wgmma
    small = p.replace(tokens_per_rank=128)  # 8 rows per expert: as measured before
    assert KernelConfig.persistent_default(small).gate_up.bm == 32
    assert KernelConfig.default(small).gate_up.bm == 32  # shared experts: T rows per pass


# -- split K of the persistent kernel's fused weight-streaming tiles -----------------------
def test_k_splits_need_fused_ws_tiles_on_nvlink_and_bounded_scratch():
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=1)
    base = KernelConfig.persistent_default(p)
    assert base.gu_splits == 1 and base.dn_splits == 8  # decode: fewer down tiles than SMs
    assert KernelConfig.from_name(base.name) == base
    with pytest.raises(ConfigError, match="choose one of") as e:
        replace(base, dn_splits=3).validate(p)
    assert e.value.field == "dn_splits"
    for other in (replace(base, fuse_sources=False), replace(base, transport="nccl"),
                  KernelConfig.default(p)):
        with pytest.raises(ConfigError, match="fused weight-streaming"):
            replace(other, gu_splits=2).validate(p)
    big = MoEProblem(7168, 2048, 256, 8, shared_experts=1, world_size=2, tokens_per_rank=8)
    with pytest.raises(ConfigError, match="MiB of scratch"):
        replace(KernelConfig.persistent_default(big), dn_splits=4).validate(big)
    # The default never exceeds the scratch bound, and splits only where tiles are few.
    assert KernelConfig.persistent_default(big).dn_splits == 1
    assert KernelConfig.persistent_default(p.replace(tokens_per_rank=512)).dn_splits == 1


def test_split_scratch_fits_the_state_and_is_token_independent_in_the_code():
    from flashmoe_gen.persistent import state_words
    from flashmoe_gen.render import (
        persistent_split_base,
        render,
    )
    from flashmoe_gen.router_layout import router_part_floats, router_scratch_words
    from flashmoe_gen.splitk import SplitK

    p = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=2, tokens_per_rank=4)
    cfg = replace(KernelConfig.persistent_default(p), gu_splits=2, dn_splits=4)
    cfg.validate(p)
    sk = SplitK.of(p, cfg)
    assert sk.slots == min(p.local_experts, 2 * 4 * 6)
    # the router's partials at any token count end before the split region
    for t in (1, 8, 4096):
        q = p.replace(tokens_per_rank=t)
        assert 5 + 2 * 32 + router_scratch_words(q, 8) <= persistent_split_base(q, cfg)
    big = MoEProblem(7168, 2048, 256, 8, world_size=2)  # a router that splits H
    assert router_part_floats(big, 8)[0] > 0
    assert 5 + 2 * 128 + router_scratch_words(big.replace(tokens_per_rank=4096), 8) <= \
        persistent_split_base(big, cfg)
    assert state_words(p, cfg) == persistent_split_base(p, cfg) + sk.shared_words + \
        sk.slots * sk.slot_words
    # one slot: counters for every n-tile, then every tile's parts x B operands x bn x tokens
    assert sk.slot_words == 11 + 16 + -(-(11 * 2 * 2 * 128 * 32 + 16 * 4 * 128 * 32) // 2)
    # the generated code is the same at every token bound (one compile serves them all)
    assert render(p, cfg).code == render(p.replace(tokens_per_rank=64), cfg).code


def test_dispatch_blocks_is_a_persistent_kernel_knob():
    from flashmoe_gen.render import render

    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=1)
    nvl = KernelConfig.persistent_default(p)
    assert nvl.dispatch_blocks == 1
    grid = replace(nvl, dispatch_blocks=0)
    grid.validate(p)
    assert grid.name.endswith("__d0") and KernelConfig.from_name(grid.name) == grid
    for bad, why in ((replace(nvl, dispatch_blocks=2), "choose one of"),
                     (replace(KernelConfig.default(p), dispatch_blocks=0), "only transport")):
        with pytest.raises(ConfigError, match=why):
            bad.validate(p)
    code = {c.dispatch_blocks: " ".join(render(p, c).code.split()) for c in (nvl, grid)}
    assert "constexpr bool SOLO_FRONT = true && 1 == 1;" in code[1]
    assert "constexpr bool SOLO_FRONT = false && 1 == 1;" in code[0]


def test_ws_tma_needs_nvlink_ws_tiles_of_bk64_on_hopper():
    from flashmoe_gen.export import _nvlink_vars

    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=1)
    nvl = replace(KernelConfig.persistent_default(p), ws_tma=True)
    nvl.validate(p, "sm_90")
    assert nvl.name.endswith("__wt") and KernelConfig.from_name(nvl.name) == nvl
    assert nvl.persistent_smem() == replace(nvl, ws_tma=False).persistent_smem() + 1024
    ws32 = GemmTile(32, 128, 32, 8, 1, 4, "ws")
    for bad, why in ((replace(KernelConfig.default(p), ws_tma=True), "transport 'nvlink'"),
                     (replace(nvl, gate_up=ws32, down=ws32), "BK 64")):
        with pytest.raises(ConfigError, match=why):
            bad.validate(p, "sm_90")
    with pytest.raises(ConfigError, match="sm_90"):
        nvl.validate(p, "sm_80")
    from flashmoe_gen.build import build

    nv = _nvlink_vars(build(p, nvl))  # the export encodes the six weight maps at attach
    assert [m["ptr"] for m in nv["wmaps"]] == ["L->w1t", "L->w3t", "L->w2t", "L->sw1t",
                                               "L->sw3t", "L->sw2t"]
    assert nv["args"].rstrip().endswith("L->wmaps")
    assert _nvlink_vars(build(p, replace(nvl, ws_tma=False)))["wmaps"] == []
