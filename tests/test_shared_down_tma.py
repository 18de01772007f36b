"""The shared experts' down tiles as TMA row tasks (render.shared_down_tma) on the CPU:
which configs take them, the tensor map of their A operand (shared_act) in the kernel's
order, the call the template makes, and the cp.async path they replace elsewhere."""
from dataclasses import replace

import pytest

from flashmoe_gen import render as render_mod
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.persistent import tile_map_specs
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import persistent_tile_maps, render, shared_down_tma

SEED = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=4, tokens_per_rank=256)
TMA_CALL = ("n, part, tokens, SHARED_WIDTH, HIDDEN, wm(8), 0, wm(5), nullptr, 0, shared_out, "
            "1, task_clk + DN_CLK, &pend); });")


def _code(p, cfg):
    return " ".join(render(p, cfg).code.split())


def test_the_seed_defaults_shared_down_tiles_are_tma_row_tasks():
    cfg = KernelConfig.persistent_default(SEED, "sm_90")
    assert shared_down_tma(SEED, cfg) and persistent_tile_maps(SEED, cfg) == 9
    specs = tile_map_specs(SEED, cfg, 512)
    assert [s[0] for s in specs] == ["w1", "w3", "w2", "sw1", "sw3", "sw2", "heap", "act",
                                     "shared_act"]
    assert specs[8] == ("shared_act", 256, 2048, cfg.down.bm)  # the token bound's rows
    assert specs[5] == ("sw2", 512, 2048, cfg.down.bn)  # the B operand it reads
    code = _code(SEED, cfg)
    assert "constexpr int TILE_MAPS = 9;" in code and TMA_CALL in code
    assert "n, 0, shared_act, 0, sw2, nullptr" not in code


@pytest.mark.parametrize("case", ["no_shared", "fused", "producer", "mma_sync", "off"])
def test_elsewhere_the_shared_down_tiles_stay_on_cp_async(case, monkeypatch):
    p, cfg = SEED, KernelConfig.persistent_default(SEED, "sm_90")
    if case == "no_shared":
        p = SEED.replace(shared_experts=0)
        cfg = KernelConfig.persistent_default(p, "sm_90")
    elif case == "fused":  # weight-streaming tiles at decode
        p = SEED.replace(tokens_per_rank=1)
        cfg = KernelConfig.persistent_default(p, "sm_90")
    elif case == "producer":  # its ring feeds the routed tasks alone
        cfg = replace(cfg, task_producer=True, interleave_sources=False)
    elif case == "mma_sync":  # mma.sync row tiles (48 rows per expert on one rank)
        p = SEED.replace(world_size=1, tokens_per_rank=192)
        cfg = KernelConfig.persistent_default(p, "sm_90")
        assert cfg.gate_up.mma == "sync" and not cfg.fuse_sources, cfg.name
    else:  # the A/B switch (bench/nvlink_sweep.py --no-shared-tma)
        monkeypatch.setattr(render_mod, "SHARED_DOWN_TMA", False)
    cfg.validate(p, "sm_90")
    assert not shared_down_tma(p, cfg)
    assert "shared_act" not in [s[0] for s in tile_map_specs(p, cfg, 64)]
    code = _code(p, cfg)
    assert TMA_CALL not in code
    if p.shared_experts:
        assert "n, 0, shared_act, 0, sw2, nullptr" in code
