"""Token-count sweeps: one device code (one cubin) for every count of a problem family."""

from dataclasses import replace

import pytest

from flashmoe_gen.build import build
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

COUNTS = (0, 1, 8, 32, 128, 512, 2048, 8192)
FAMILIES = [
    MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2),
    MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=4, capacity_factor=1.25,
               normalize_topk=False),
    MoEProblem(256, 128, 16, 4, shared_experts=1, world_size=2, scoring="sigmoid",
               expert_bias=True, n_group=4, topk_group=2, routed_scaling=2.5),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda p: p.name)
def test_device_code_does_not_depend_on_the_token_count(family):
    """Guard of the sweep's shared compile: the kernels never see tokens_per_rank (in any
    mode, with or without a fixed capacity), so every count renders the same text."""
    default = KernelConfig.default(family.replace(tokens_per_rank=128))
    for cfg in (default, replace(default, mode="graph")):
        codes = {render(family.replace(tokens_per_rank=t), cfg).code for t in COUNTS}
        assert len(codes) == 1
        assert f"// problem: {family.replace(tokens_per_rank=0).name}" in codes.pop()


def test_a_sweep_compiles_once_for_all_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path))
    family = FAMILIES[0]
    cfg = KernelConfig.default(family.replace(tokens_per_rank=8), "sm_80")
    first = build(family.replace(tokens_per_rank=8), cfg, "sm_80").compiled
    again = [build(family.replace(tokens_per_rank=t), cfg, "sm_80").compiled
             for t in (1, 128, 8192)]
    assert not first.cache_hit and all(m.cache_hit for m in again)
    assert {m.cubin_path for m in again} == {first.cubin_path}
    assert len(list((tmp_path).rglob("*.cubin"))) == 1
