"""The distributed layer with the DeepSeek-V3 and Qwen2-MoE routing rules, under mpirun.

Run on a machine with P GPUs (P divides 64)::

    mpirun -np P python -m pytest -m multigpu tests/test_multigpu_routing.py

Every test is collective (all ranks, same order); assertions come after the collectives.
"""

from __future__ import annotations

import pytest

from flashmoe_gen.check import check_layer
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.weights import MoEWeights, random_tokens

pytestmark = pytest.mark.multigpu

DSV3 = MoEProblem(1024, 512, 64, 8, shared_experts=1, tokens_per_rank=300, scoring="sigmoid",
                  expert_bias=True, n_group=8, topk_group=4, routed_scaling=2.5)
QWEN2 = MoEProblem(1024, 512, 64, 4, shared_experts=1, shared_intermediate=2048,
                   tokens_per_rank=333, normalize_topk=False, shared_gate=True)


@pytest.mark.parametrize("problem,ragged", [
    (DSV3, False), (QWEN2, True), (DSV3.replace(capacity_factor=1.0), True)],
    ids=["dsv3", "qwen2_ragged", "dsv3_capacity"])
def test_rule_layer_on_every_rank(comm, problem, ragged):
    import cupy

    from flashmoe_gen.runtime import FlashMoE

    p = problem.replace(world_size=comm.world_size)
    w = MoEWeights.random(p, seed=5)  # all experts: each rank's reference needs them
    t = p.tokens_per_rank - 37 * comm.rank if ragged else p.tokens_per_rank
    x = random_tokens(max(t, 0), p.hidden, seed=500 + comm.rank)
    layer = FlashMoE(p, weights=w, comm=comm)
    layer.forward(cupy.asarray(x))  # allocate, then poison every buffer
    layer.poison()
    res = check_layer(layer, x, w, comm, seed=5)
    assert res.finite, f"rank {comm.rank}: NaN/Inf in the output"
    assert res.max_rel_error <= 1e-2, f"rank {comm.rank}: rel err {res.rel_error:.3e}"
    assert res.routing_mismatches == 0
