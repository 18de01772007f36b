"""Down TMA row tasks that stream their K range (config ``stream_down``) on the CPU: which
configs take it, its tuner rule, the counters it adds, and a port of the per-source lists'
n-tile-major gate/up decode (templates/persistent.cu.j2 ``in_list``), tied to the
template's text: every index decodes to one (expert, n-tile, part) and every task has one
index, the first ``per`` indices are n-tile 0 of every expert."""
from dataclasses import replace

import pytest
from test_task_order import bracket  # the kernel's binary search, ported there

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import persistent_counter_words, render

SEED1 = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=1, tokens_per_rank=256)
SEED4 = SEED1.replace(world_size=4)


def decode_n_major(first, r, ngu):
    """in_list's STREAM_DOWN gate/up branch: (expert, n-tile, part) of index r."""
    el = len(first) - 1
    o, per = r - first[0], (first[el] - first[0]) // ngu
    w = o % per
    e = bracket(first, first[0] + w * ngu, el)
    return e, o // per, w - (first[e] - first[0]) // ngu


@pytest.mark.parametrize("parts", [[1, 2, 0, 3, 1], [0, 0, 4], [2], [1, 0, 0, 0, 1, 1]])
@pytest.mark.parametrize("start", [0, 37])
def test_the_n_major_decode_is_a_bijection(parts, start):
    ngu = 5
    first, i = [], start
    for p in parts:
        first.append(i)
        i += ngu * p
    first.append(i)
    got = [decode_n_major(first, r, ngu) for r in range(first[0], first[-1])]
    want = {(e, n, q) for e, p in enumerate(parts) for n in range(ngu) for q in range(p)}
    assert sorted(got) == sorted(want) and len(set(got)) == len(got)
    per = sum(parts)
    assert {g[1] for g in got[:per]} == {0}  # the first `per` tasks: n-tile 0 of every expert
    assert [g[1] for g in got] == sorted(g[1] for g in got)  # n-tile-major


def test_the_template_decodes_and_waits_as_the_port():
    cfg = replace(KernelConfig.persistent_default(SEED1, "sm_90"), stream_down=True)
    cfg.validate(SEED1, "sm_90")
    code = " ".join(render(SEED1, cfg).code.split())
    for text in (
            "constexpr bool STREAM_DOWN = true;",
            "constexpr int ST_WORDS = ST_NDEP + (STREAM_DOWN ? SOURCES * LOCAL_EXPERTS * NGU : 0);",
            "if (STREAM_DOWN && d.gate_up) { const int o = r - first[0], per = (first[el] - "
            "first[0]) / NGU, w = o % per; const int e = bracket(first, first[0] + w * NGU, el);",
            "d.n = o / per, d.part = w - (first[e] - first[0]) / NGU; return; }",
            "atomicAdd(STREAM_DOWN ? state + ST_NDEP + (s * el + e) * NGU + n : dep + s * el "
            "+ e, static_cast<unsigned long long>(m_tiles));",
            "if (!STREAM_DOWN && threadIdx.x == 0) timed_wait(task_clk + DEP_WAIT,",
            "if (kt < stream_ready) return;",
            "const bool done = ld_relaxed_gpu(n_done + j) >= row_need; // (every load issued) "
            "whole = whole && done; prefix += whole; } stream_ready = prefix * GU_BN / 64; "
            "return kt < stream_ready;",
            "__threadfence(); // (acquire: the counts seen above, then the rows they count) "
            "fence_proxy_async_all();",
            "load_b(f); k_ready(f % KT); load_a(f);"):
        assert text in code, text
    assert cfg.name.endswith("__sd") and KernelConfig.from_name(cfg.name) == cfg
    base = KernelConfig.persistent_default(SEED1, "sm_90")
    ngu = -(-SEED1.intermediate // cfg.gate_up.bn)
    assert persistent_counter_words(SEED1, cfg) == persistent_counter_words(SEED1, base) + 8 * ngu


def test_configs_refused_and_the_tuners_rule():
    from flashmoe_gen.tuner.space import SearchSpace

    rows = replace(KernelConfig.persistent_default(SEED4, "sm_90"), interleave_sources=False)
    replace(rows, stream_down=True).validate(SEED4, "sm_90")
    fused = KernelConfig.persistent_default(SEED4.replace(tokens_per_rank=1), "sm_90")
    for bad, text in ((replace(fused, stream_down=True), "TMA row tasks"),
                      (replace(rows, stage_epilogue=3, stream_down=True), "stage_epilogue 3"),
                      (replace(rows, task_producer=True, stream_down=True),
                       "task_producer False")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(SEED4, "sm_90")
        assert e.value.field == "stream_down"
    space = SearchSpace.for_problem(SEED4, "sm_90", "full", ("nccl", "nvlink"))
    params = space.params_from_config(replace(rows, stream_down=True))
    assert space.canonical(params)["stream_down"] is True
    assert space.canonical(params | {"interleave": True})["stream_down"] is True
    replace(rows, interleave_sources=True, own_first=True, stream_down=True).validate(
        SEED4, "sm_90")  # (the one list over every source, its own rows first)
    for moot in ({"task_producer": True}, {"fuse": True},
                 {"stage_epilogue": 3}, {"transport": "nccl"}):
        assert space.canonical(params | moot)["stream_down"] is False, moot


def test_the_tuner_seeds_the_persistent_default_streamed():
    """A tune with nvlink tries the persistent default with stream_down early (a seed
    flip), over the default's lists (at 4 ranks the one list over every source)."""
    from flashmoe_gen.tuner.space import SearchSpace

    for p in (SEED1, SEED4):
        space = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink"))
        streamed = [c for c in space.seeds() if c.transport == "nvlink" and c.stream_down]
        assert len(streamed) == 1, p.name
        pd = KernelConfig.persistent_default(p, "sm_90")
        assert streamed[0] == replace(pd, stream_down=True)
        streamed[0].validate(p, "sm_90")
