"""The own_split knob (CPU): this rank's tokens split around the fused launch (half the
local experts while the dispatch is in flight, half while the combine is): its name,
validation, plan order and place in the search space. Outputs: test_plan_emulated."""

from __future__ import annotations

from dataclasses import replace

import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.plan import (
    MAIN,
    SHARED,
    Gemms,
    Record,
    TransferGroup,
    Wait,
    build_plan,
    own_halves,
)
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tiles import GemmTile
from flashmoe_gen.tuner.space import FULL, SearchSpace

MIXTRAL = MoEProblem(4096, 14336, 8, 2, world_size=4, tokens_per_rank=4096)
TMA = GemmTile(128, 128, 64, 8, 1, 4, "tma")


def _split() -> KernelConfig:
    return KernelConfig(TMA, replace(TMA, bn=256, stages=3), fuse_sources=True,
                        packed_slots=True, own_split=True)


def test_name_round_trips():
    cfg = _split()
    cfg.validate(MIXTRAL, "sm_90")
    assert cfg.name.endswith("__fs__pk__os")
    assert KernelConfig.from_name(cfg.name) == cfg
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg
    assert "os" not in replace(cfg, own_split=False).name.split("__")


@pytest.mark.parametrize("change,problem,why", [
    (dict(fuse_sources=False), MIXTRAL, "only fused sources"),
    (dict(gate_up=GemmTile(32, 64, 64, 4, 1, 4, "ws"), down=GemmTile(32, 128, 64, 4, 1, 4, "ws")),
     MIXTRAL.replace(tokens_per_rank=8), "only fused sources"),
    (dict(overlap=False), MIXTRAL, "overlapped"),
    (dict(packed_slots=False), MIXTRAL.replace(world_size=1), "overlapped"),
    (dict(), MIXTRAL.replace(world_size=8), "1 local expert"),
])
def test_invalid_uses_say_what_to_change(change, problem, why):
    cfg = replace(_split(), **change)
    if problem.world_size == 1:
        cfg = replace(cfg, fuse_sources=True)
    with pytest.raises(ConfigError, match=why) as e:
        cfg.validate(problem, "sm_90")
    assert e.value.field == "own_split" and "leave own_split off" in str(e.value)


def test_the_second_half_runs_after_the_combine_is_enqueued():
    ops = build_plan(MIXTRAL, _split()).ops
    own = [i for i, op in enumerate(ops) if isinstance(op, Gemms) and op.step == 0]
    fused = next(i for i, op in enumerate(ops) if isinstance(op, Gemms) and op.step is None
                 and "fused" in op.what)
    combine = max(i for i, op in enumerate(ops) if isinstance(op, TransferGroup))
    assert len(own) == 2 and own[0] < fused < combine < own[1]
    assert "[0, 1)" in ops[own[0]].what and "[1, 2)" in ops[own[1]].what
    assert own_halves([(0, 4)]) == ([(0, 2)], [(2, 4)])
    assert own_halves([(0, 1), (1, 2), (2, 3)]) == ([(0, 1)], [(1, 2), (2, 3)])


def test_search_space_samples_it_only_where_it_applies():
    space = SearchSpace.for_problem(MIXTRAL, "sm_90", "full")
    assert space.choices["own_split"] == (False, True)
    params = space.params_from_config(_split())
    assert space.config_from_params(params).own_split and space.check(params) is None
    assert not space.canonical(params | {"fuse": False})["own_split"]  # moot: no fused launch
    for p in (MIXTRAL.replace(world_size=1), MIXTRAL.replace(world_size=8)):
        assert SearchSpace.for_problem(p, "sm_90", "full").choices["own_split"] == (False,)
    # one local expert on 8 ranks: still sends, so both slot layouts stay in the space
    one_local = SearchSpace.for_problem(MIXTRAL.replace(world_size=8), "sm_90", "full")
    assert one_local.choices["packed"] == FULL["packed"]
    assert SearchSpace.for_problem(MIXTRAL, "sm_90", "small").choices["own_split"] == (False,)


def test_own_stream_runs_both_halves_beside_the_fused_launches():
    """own_stream: the halves on the shared stream (the first once the rows are permuted, the
    second once the fused gate/up is done, beside the fused down), their activations in this
    rank's region of the per-source act (the fused launch skips it), joined before the end."""
    cfg = replace(_split(), own_stream=True)
    cfg.validate(MIXTRAL, "sm_90")
    assert cfg.name.endswith("__fs__pk__os__ost") and KernelConfig.from_name(cfg.name) == cfg
    ops = build_plan(MIXTRAL, cfg).ops
    own = [i for i, op in enumerate(ops) if isinstance(op, Gemms) and op.step == 0]
    fused = [i for i, op in enumerate(ops) if isinstance(op, Gemms) and "fused" in op.what]
    assert len(own) == 2 and all(ops[i].stream == SHARED for i in own)
    assert len(fused) == 2 and all(ops[i].stream == MAIN for i in fused)
    assert "gate/up" in ops[fused[0]].what and "down" in ops[fused[1]].what
    # the second half waits for the fused gate/up's event, on the shared stream
    gu_event = next(op.event for op in ops[fused[0]:] if isinstance(op, Record))
    assert any(isinstance(op, Wait) and op.stream == SHARED and op.event == gu_event
               for op in ops[fused[0]:own[1]])
    done = next(op.event for op in ops[own[1]:] if isinstance(op, Record))
    assert any(isinstance(op, Wait) and op.stream == MAIN and op.event == done
               for op in ops[own[1]:])
    act = [dict(la.args)["C"] for la in ops[own[0]].launches[:1]]
    assert "me" in str(act[0])  # this rank's region of act
    with pytest.raises(ConfigError, match="turn own_split on") as e:
        replace(cfg, own_split=False).validate(MIXTRAL, "sm_90")
    assert e.value.field == "own_stream"
    space = SearchSpace.for_problem(MIXTRAL, "sm_90", "full")
    params = space.params_from_config(cfg)
    assert space.config_from_params(params).own_stream
    assert not space.canonical(params | {"own_split": False})["own_stream"]
