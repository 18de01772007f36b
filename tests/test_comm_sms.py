"""The comm_sms knob (CPU): SMs the tma kernel's persistent grid leaves to NCCL's kernels, its
name, validation, launch grid, export spelling and place in the search space."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flashmoe_gen.config import COMM_SMS_CHOICES, KernelConfig
from flashmoe_gen.defaults import DEFAULT_COMM_SMS
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.export import grid_cpp
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.runtime import gemm_sms
from flashmoe_gen.tiles import GemmTile
from flashmoe_gen.tuner.space import SearchSpace

MIXTRAL = MoEProblem(4096, 14336, 8, 2, world_size=4, tokens_per_rank=4096)


def _tma() -> KernelConfig:
    cfg = replace(KernelConfig.default(MIXTRAL), comm_sms=0, fuse_sources=False,
                  own_split=False, gather_experts=False)
    assert cfg.uses_tma
    return cfg


def test_the_default_leaves_sms_to_nccl_on_several_ranks_only():
    # per source (one local expert: no own_split), NCCL moves the next source meanwhile
    one_local = MIXTRAL.replace(world_size=8)
    cfg = KernelConfig.default(one_local)
    assert cfg.uses_tma and not cfg.fuse_sources and cfg.comm_sms == DEFAULT_COMM_SMS == 8
    cfg.validate(one_local)
    # two local experts: fused sources with own_split, nothing in flight during the launch
    fused = KernelConfig.default(MIXTRAL)
    assert fused.uses_tma and fused.fuse_sources and fused.own_split and fused.comm_sms == 0
    fused.validate(MIXTRAL)
    one = KernelConfig.default(MIXTRAL.replace(world_size=1))
    assert one.uses_tma and one.comm_sms == 0
    one.validate(MIXTRAL.replace(world_size=1))
    assert KernelConfig.default(MIXTRAL.replace(tokens_per_rank=16)).comm_sms == 0  # ws tiles


def test_name_round_trips():
    cfg = replace(_tma(), comm_sms=8)
    cfg.validate(MIXTRAL)
    assert cfg.name.endswith("__pk__cm8") and "cm" not in _tma().name
    assert KernelConfig.from_name(cfg.name) == cfg
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("change,problem,why", [
    (dict(comm_sms=5), MIXTRAL, "choose one of"),
    (dict(comm_sms=8), MIXTRAL.replace(world_size=1), "world_size > 1"),
    (dict(comm_sms=8, gate_up=GemmTile(128, 128, 64, 4, 2, 3),
          down=GemmTile(128, 128, 64, 2, 4, 3)), MIXTRAL, "only the tma kernel"),
])
def test_invalid_values_say_what_to_change(change, problem, why):
    cfg = replace(_tma(), **change)
    if problem.world_size == 1:
        cfg = replace(cfg, packed_slots=False)
    with pytest.raises(ConfigError, match=why) as e:
        cfg.validate(problem)
    assert e.value.field == "comm_sms"


def test_the_tma_grid_leaves_the_sms_and_refuses_more_than_half():
    cfg = replace(_tma(), comm_sms=16)
    assert gemm_sms(132, cfg) == 116 and gemm_sms(132, _tma()) == 132
    tile = cfg.gate_up
    assert tile.grid(14336, 4096, 2, 0, gemm_sms(132, cfg)) == (116, 1, 1)
    with pytest.raises(ConfigError, match="at most half"):
        gemm_sms(24, cfg)
    assert "tma_grid(N, rows, groups, GU_BM, GU_BN, 16)" in grid_cpp(tile, "GU", 16)


def test_search_space_samples_it_only_where_it_applies():
    space = SearchSpace.for_problem(MIXTRAL, "sm_90", "full")
    assert space.choices["comm_sms"] == (0, 8, 16)
    assert set(space.choices["comm_sms"]) <= set(COMM_SMS_CHOICES)
    tma = space.params_from_config(replace(_tma(), comm_sms=16))
    assert space.config_from_params(tma).comm_sms == 16 and space.check(tma) is None
    sync = tma | {"gu_mma": "sync", "dn_mma": "sync", "gu_w": "4x2", "dn_w": "2x4"}
    assert space.canonical(sync)["comm_sms"] == 0  # no tma tile: the knob is moot
    assert space.config_from_params(sync).comm_sms == 0
    assert SearchSpace.for_problem(MIXTRAL.replace(world_size=1), "sm_90",
                                   "full").choices["comm_sms"] == (0,)
    assert SearchSpace.for_problem(MIXTRAL, "sm_90", "small").choices["comm_sms"] == (0,)
