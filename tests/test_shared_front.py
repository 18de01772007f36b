"""The shared experts' gate/up tiles beside the persistent kernel's front (config
``shared_front``, templates/persistent.cu.j2): which configs take it, its tuner rule, and
the rendered kernel's front on the blocks the shared tiles leave (its loops' stride, its
barriers' and its last block's counts), the others straight to the task loop."""
from dataclasses import replace

import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

SEED1 = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=1, tokens_per_rank=256)
SEED4 = SEED1.replace(world_size=4)


@pytest.mark.parametrize("problem", [SEED1, SEED4], ids=["one_rank", "four_ranks"])
def test_the_front_runs_on_the_blocks_the_shared_tiles_leave(problem):
    cfg = replace(KernelConfig.persistent_default(problem, "sm_90"), shared_front=True)
    cfg.validate(problem, "sm_90")
    assert cfg.name.endswith("__sf") and KernelConfig.from_name(cfg.name) == cfg
    code = " ".join(render(problem, cfg).code.split())
    for text in ("constexpr bool SHARED_FRONT = true;",
                 "const int front = SHARED_FRONT && SHARED_WIDTH > 0 ? grid - "
                 "min(NGU_SHARED * (GU_ROWS ? row_tiles<GU_BM>(tokens) : GU_S), grid / 2) "
                 ": grid;",
                 "} else if (blockIdx.x >= front) { // SHARED_FRONT: to the shared experts' "
                 "tiles mark(0); mark(1); mark(2); } else {",
                 "== static_cast<unsigned long long>(members) - 1) {",
                 "last_front = atomicAdd(state + ST_OWN_SENT, 1ull) == static_cast<unsigned "
                 "long long>(front) - 1;"):
        assert text in code, text
    front = code[code.index("// 1. route: topk_idx"):code.index("// 4. tasks")]
    assert "grid_sync(state, front," in front and "grid_sync(state, grid" not in code
    assert "+= grid)" not in front and "* grid)" not in front  # every loop strides front
    base = " ".join(render(problem, replace(cfg, shared_front=False)).code.split())
    assert "constexpr bool SHARED_FRONT = false;" in base


def test_configs_refused_and_the_tuners_rule():
    from flashmoe_gen.tuner.space import SearchSpace

    cfg = replace(KernelConfig.persistent_default(SEED1, "sm_90"), shared_front=True)
    none = SEED1.replace(shared_experts=0)
    for bad, p, text in ((cfg, none, "no shared experts"),
                         (replace(cfg, stream_down=False, early_down=False,
                                  task_producer=True), SEED1, "task_producer False"),
                         (replace(KernelConfig.default(SEED1), shared_front=True), SEED1,
                          "transport 'nvlink'")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(p, "sm_90")
        assert e.value.field == "shared_front"
    space = SearchSpace.for_problem(SEED4, "sm_90", "full", ("nccl", "nvlink"))
    params = space.params_from_config(
        replace(KernelConfig.persistent_default(SEED4, "sm_90"), shared_front=True))
    assert space.canonical(params)["shared_front"] is True
    for moot in ({"task_producer": True}, {"transport": "nccl"}):
        assert space.canonical(params | moot)["shared_front"] is False, moot
    assert SearchSpace.for_problem(none, "sm_90", "full", ("nccl", "nvlink")).choices[
        "shared_front"] == (False,)


def test_the_default_takes_it_on_one_rank_with_shared_experts():
    """1 x H200, the seed example: T=512 -7%, T=1000 -5 to -8%, T=256 +-2%; several ranks'
    send blocks beside the shared tiles have not run on a GPU (SHARED_FRONT_MAX_RANKS)."""
    from flashmoe_gen.defaults import SHARED_FRONT_MAX_RANKS

    assert SHARED_FRONT_MAX_RANKS == 1
    for t in (256, 1000):
        assert KernelConfig.persistent_default(SEED1.replace(tokens_per_rank=t)).shared_front
        assert not KernelConfig.persistent_default(SEED4.replace(tokens_per_rank=t)).shared_front
    assert not KernelConfig.persistent_default(SEED1.replace(shared_experts=0)).shared_front
