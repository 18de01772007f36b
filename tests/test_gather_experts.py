"""The gather_experts knob (CPU): each local expert's rows from every peer land back to
back, so the fused launch has one group per expert. Name, validation, plan, transfers per
(peer, expert), search space, export. Outputs: test_plan_emulated (every schedule knob
beside it against the float64 reference)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.executor import Run
from flashmoe_gen.export import export_cu
from flashmoe_gen.plan import Gemms, build_plan
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tiles import GemmTile
from flashmoe_gen.tuner.space import SearchSpace

MIXTRAL = MoEProblem(4096, 14336, 8, 2, world_size=4, tokens_per_rank=4096)
TMA = GemmTile(128, 128, 64, 8, 1, 4, "tma")


def _gathered(**change) -> KernelConfig:
    return replace(KernelConfig(TMA, replace(TMA, bn=256, stages=3), fuse_sources=True,
                                packed_slots=True, own_split=True, gather_experts=True),
                   **change)


def test_the_name_ends_in_ge():
    cfg = _gathered()
    cfg.validate(MIXTRAL, "sm_90")
    assert cfg.name.endswith("__fs__pk__os__ge")  # round trips: test_problem_config


@pytest.mark.parametrize("change,problem,why", [
    (dict(fuse_sources=False, own_split=False), MIXTRAL, "only fused sources"),
    (dict(gate_up=GemmTile(32, 64, 64, 4, 1, 4, "ws"), down=GemmTile(32, 128, 64, 4, 1, 4, "ws"),
          own_split=False), MIXTRAL.replace(tokens_per_rank=8), "only fused sources"),
    (dict(own_split=False, packed_slots=False), MIXTRAL.replace(world_size=1),
     "several ranks"),
    (dict(mode="graph"), MIXTRAL, "use mode 'host'"),
    (dict(own_stream=True), MIXTRAL, "drop __ost"),
])
def test_invalid_uses_say_what_to_change(change, problem, why):
    cfg = _gathered(**change)
    with pytest.raises(ConfigError, match=why) as e:
        cfg.validate(problem, "sm_90")
    assert e.value.field == "gather_experts" and "leave gather_experts off" in str(e.value)


def test_the_default_gathers_with_few_local_experts_only():
    from flashmoe_gen.defaults import GATHER_MAX_LOCAL_EXPERTS

    assert MIXTRAL.local_experts <= GATHER_MAX_LOCAL_EXPERTS
    assert KernelConfig.default(MIXTRAL).gather_experts
    many = MoEProblem(2048, 1408, 64, 6, world_size=4, tokens_per_rank=4096)
    assert not KernelConfig.default(many).gather_experts  # 16 local experts: lost (4 x H200)
    assert not KernelConfig.default(MIXTRAL.replace(world_size=2)).gather_experts
    assert not KernelConfig.default(MIXTRAL.replace(tokens_per_rank=16)).gather_experts


def test_graph_mode_drops_gathering():
    graph = KernelConfig.default(MIXTRAL).graph_mode()
    assert graph.mode == "graph" and not graph.gather_experts
    graph.validate(MIXTRAL, "sm_90")
    with pytest.raises(ConfigError, match="mode 'graph'"):
        replace(KernelConfig.default(MIXTRAL), mode="graph").validate(MIXTRAL, "sm_90")


def test_the_fused_launch_has_one_group_per_expert():
    """Gate/up reads each expert's run of ``gathered`` (P x cap rows, ``gcounts`` of them)
    and writes ``act`` alike; down writes back over the run; the transfers in the plan are
    the same operations as without the knob (only where rows land moves)."""
    cfg = _gathered()
    plan = build_plan(MIXTRAL, cfg)
    plain = build_plan(MIXTRAL, replace(cfg, gather_experts=False))
    fused = [op for op in plan.ops if isinstance(op, Gemms) and op.step is None
             and "fused" in op.what]
    gu, dn = fused[0].launches
    el, P = MIXTRAL.local_experts, MIXTRAL.world_size
    assert gu.groups == dn.groups == el
    assert gu.rows.py() == "max_gathered_rows()"
    assert gu.arg("counts").buffer == "gcounts" and gu.arg("inner_groups").py() == "0"
    assert gu.arg("A").buffer == "gathered" and dn.arg("C").buffer == "gathered"
    assert gu.arg("count_cap").py() == f"({P} * cap)"
    assert gu.arg("a_group_stride").py() == f"(({P} * cap) * {MIXTRAL.hidden})"
    assert dn.arg("a_group_stride").py() == f"(({P} * cap) * {MIXTRAL.intermediate})"
    transfers = [op for op in plan.ops if type(op).__name__ == "TransferGroup"]
    assert transfers == [op for op in plain.ops if type(op).__name__ == "TransferGroup"]


class _Layer:
    """What ``Run.gathered_runs`` reads of a layer."""

    def __init__(self, rank: int):
        self.problem, self.rank = MIXTRAL, rank


def test_runs_per_expert_land_in_the_expert_run_and_match_the_peer():
    """One (address, bytes) per expert with rows, never merged: a peer's rows for this
    rank's expert j go to j's run after the lower-ranked peers' rows; rows for a peer's
    experts stay at their slot offsets, expert by expert, as the peer receives them."""
    P, el, h = MIXTRAL.world_size, MIXTRAL.local_experts, MIXTRAL.hidden
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 40, (P, MIXTRAL.experts))
    rows[2, 1 * el + 1] = 0  # rank 2 sends nothing to rank 1's expert 1
    run = Run.__new__(Run)
    run.layer = _Layer(rank=1)
    cap, gathered = 64, 1 << 30
    run.env = {"cap": cap, "gathered": gathered, "layout": 1 << 20}  # as bind_slots sets
    run.rows_list = rows.tolist()
    run.offs_list = (np.cumsum(rows.reshape(P, P, el), 2) - rows.reshape(P, P, el)).reshape(
        P, -1).tolist()
    mine = rows[:, el:2 * el].copy()
    mine[1] = 0
    goffs = np.cumsum(mine, 0) - mine
    run.goffs_list = goffs.tolist()
    got = run.gathered_runs(src=2, dst=1, slot=0, e0=0, e1=el)
    assert got == [(gathered + (0 * P * cap + int(goffs[2, 0])) * h * 2, int(rows[2, el]) * h * 2)]
    out = run.gathered_runs(src=1, dst=3, slot=5 * h, e0=0, e1=el)  # to rank 3's experts
    assert [n for _, n in out] == [int(rows[1, 3 * el + j]) * h * 2 for j in range(el)
                                   if rows[1, 3 * el + j]]
    assert out[0][0] == (1 << 20) + (5 * h + run.offs_list[1][3 * el] * h) * 2


def test_the_search_space_gathers_only_where_it_applies():
    space = SearchSpace.for_problem(MIXTRAL, "sm_90")
    assert space.choices["gather"] == (False, True)
    params = SearchSpace.params_from_config(_gathered())
    assert SearchSpace.config_from_params(params).gather_experts
    for moot in (dict(fuse=False), dict(mode="graph"), dict(own_stream=True),
                 dict(gu_mma="ws")):
        assert not space.canonical(params | moot)["gather"], moot
    one = SearchSpace.for_problem(MIXTRAL.replace(world_size=1), "sm_90")
    assert one.choices["gather"] == (False,)


def test_the_export_mirrors_the_gathered_runs():
    """The exported host code plans the same runs (C++ twin of Run.plan_gathered), splits
    its NCCL operations per expert and launches one group per expert."""
    text = export_cu(MIXTRAL, _gathered(), with_main=True)
    assert "constexpr bool GATHER_EXPERTS = true;" in text
    assert "gathered = L->gathered;" in text  # rebound after the capacity may have grown
    assert f"gemm_gate_up(max_gathered_rows(L), {MIXTRAL.local_experts}, s," in text
    assert "nsend = expert_runs(L, ssrc, sdst, e0, e1, send_slot, send_ptr, send_rows);" in text
    plain = export_cu(MIXTRAL, replace(_gathered(), gather_experts=False))
    assert "constexpr bool GATHER_EXPERTS = false;" in plain
    assert "max_gathered_rows(L)," not in plain and "gathered = L->gathered;" not in plain
