"""config atomic_front on the CPU: the knob's name and check, the state words it adds (the
Python layout and the template's ST_WORDS agree), where the template places rows as they
are routed, and the tuner's moot rule. GPU: tests/test_gpu_kernels.py and
tests/test_multigpu.py (`atomic` cases)."""
from dataclasses import replace

import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import persistent_counter_words, render

P = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=1024)


def test_name_and_check():
    cfg = replace(KernelConfig.persistent_default(P, "sm_90"), atomic_front=True)
    cfg.validate(P, "sm_90")
    assert "af" in cfg.name.split("__") and KernelConfig.from_name(cfg.name) == cfg
    with pytest.raises(ConfigError) as e:
        replace(KernelConfig.default(P, "sm_90"), atomic_front=True).validate(P, "sm_90")
    assert e.value.field == "atomic_front" and "nvlink" in str(e.value)


def test_state_words_hold_a_slot_counter_per_expert():
    base = KernelConfig.persistent_default(P, "sm_90")
    on = replace(base, atomic_front=True)
    assert persistent_counter_words(P, on) - persistent_counter_words(P, base) == P.experts
    code = " ".join(render(P, on).code.split())
    assert "constexpr bool ATOMIC_FRONT = true;" in code
    assert "constexpr int ST_NDEP = ST_SLOTS + (ATOMIC_FRONT ? EXPERTS : 0);" in code
    assert ("constexpr int ST_WORDS = ST_NDEP + (STREAM_DOWN ? SOURCES * LOCAL_EXPERTS * NGU "
            ": 0);") in code
    assert "constexpr bool ATOMIC_FRONT = false;" in render(P, base).code


def test_rows_are_placed_as_they_are_routed():
    for tokens in (1024, 16384):  # one batch per call, and R_BATCHES per call
        p = P.replace(tokens_per_rank=tokens)
        cfg = replace(KernelConfig.persistent_default(p, "sm_90"), atomic_front=True)
        code = " ".join(render(p, cfg).code.split())
        for text in ("const bool atomic = ATOMIC_FRONT && tokens <= capacity && slices == 1;",
                     "if (atomic) place_atomic(b * ROUTER_WARPS, min((b + R_BATCHES) * "
                     "ROUTER_WARPS, tokens));",
                     "if (atomic) front_done(); else grid_sync(",
                     "if (!atomic) { for (int e = blockIdx.x; e < EXPERTS; e += front) "
                     "positions_block(",
                     "if (lane == 0) p = static_cast<int>(atomicAdd(state + ST_SLOTS + e, "
                     "1ull)); p = __shfl_sync(0xffffffffu, p, 0); if (lane == 0) pos[a] = p;"):
            assert text in code, text


def test_the_search_space_keeps_it_for_nvlink():
    from flashmoe_gen.tuner.space import SearchSpace

    space = SearchSpace.for_problem(P, "sm_90", "full", ("nccl", "nvlink"))
    assert space.choices["atomic_front"] == (False, True)
    cfg = replace(KernelConfig.persistent_default(P, "sm_90"), atomic_front=True)
    params = space.params_from_config(cfg)
    assert space.config_from_params(params) == cfg
    assert space.canonical(params | {"transport": "nccl"})["atomic_front"] is False
