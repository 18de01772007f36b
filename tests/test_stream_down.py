"""Down TMA row tasks that stream their K range (config ``stream_down``) on the CPU: which
configs take it, its tuner rule, the counters it adds, and a port of the per-source lists'
n-tile-major gate/up decode (templates/persistent.cu.j2 ``n_major``), tied to the
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
    """The kernel's n_major (in_list's and locate's STREAM_DOWN gate/up decode): (expert,
    n-tile, j: the offset among the expert's tasks of that n-tile) of index r."""
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
    cfg = replace(KernelConfig.persistent_default(SEED1, "sm_90"), stream_down=True,
                  early_down=False, shared_front=False)
    cfg.validate(SEED1, "sm_90")
    code = " ".join(render(SEED1, cfg).code.split())
    for text in (
            "constexpr bool STREAM_DOWN = true;",
            "constexpr int ST_WORDS = ST_NDEP + (STREAM_DOWN ? SOURCES * LOCAL_EXPERTS * NGU : 0);",
            "auto n_major = [&](const int* first, int r) { const int per = (first[el] - "
            "first[0]) / NGU, w = (r - first[0]) % per; const int e = bracket(first, first[0] "
            "+ w * NGU, el); return NTask{e, (r - first[0]) / per, w - (first[e] - first[0]) "
            "/ NGU}; };",
            "if (STREAM_DOWN && d.gate_up) { const NTask k = n_major(first, r); d.e = k.e;",
            "d.n = k.n, d.part = k.j; return; }",
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
    base = replace(cfg, stream_down=False)
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
    """A tune with nvlink tries the persistent default with stream_down flipped early (a
    seed flip: on one rank the default streams, on 4 not yet), over the default's lists
    (at 4 ranks the one list over every source)."""
    from flashmoe_gen.tuner.space import SearchSpace

    for p, on in ((SEED1, True), (SEED4, False)):
        pd = KernelConfig.persistent_default(p, "sm_90")
        assert pd.stream_down == on
        space = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink"))
        seeds = space.seeds()
        flipped = replace(pd, stream_down=not on, early_down=False)  # (ed: sd's, moot)
        assert pd in seeds and flipped in seeds[:16], p.name
        flipped.validate(p, "sm_90")
        if on:  # ... and the down tasks in list order
            assert replace(pd, early_down=False) in seeds[:16]


@pytest.mark.parametrize("shape,tokens,world,want", [
    ("seed", 256, 1, True),  # 160 gate/up tasks (two waves), 20 down: -5.7 / -6.6%
    ("seed", 1000, 1, True),  # 384 and 48: -4.3 / -5.0%
    ("seed_ns", 1000, 1, True),  # 256 and 32: -6.6%
    ("seed_ns", 256, 1, False),  # 128 gate/up tasks, one wave: +2.3%
    ("seed", 2048, 1, False),  # 96 down tasks: +0.9 / +2.8%
    ("e8", 1024, 1, False),  # 128 down tasks: +4.3%
    ("e16", 1024, 1, False),  # likewise: +8.3%
    ("seed", 256, 4, False),  # several ranks: not yet run on a GPU (STREAM_DOWN_MAX_RANKS)
])
def test_the_default_streams_where_the_down_tasks_close_the_forward(shape, tokens, world,
                                                                    want):
    from flashmoe_gen.defaults import STREAM_DOWN_SMS, row_tasks, stream_down_pays

    dims = {"seed": dict(hidden=512, experts=8, shared_experts=1),
            "seed_ns": dict(hidden=512, experts=8, shared_experts=0),
            "e8": dict(hidden=2048, experts=8, shared_experts=0),
            "e16": dict(hidden=2048, experts=16, shared_experts=0)}[shape]
    p = MoEProblem(intermediate=2048, top_k=2, world_size=world, tokens_per_rank=tokens,
                   **dims)
    cfg = KernelConfig.persistent_default(p, "sm_90")
    assert cfg.stream_down == want == stream_down_pays(p, cfg), cfg.name
    gu, dn = row_tasks(p, cfg)
    if world == 1:
        assert want == (gu > STREAM_DOWN_SMS and 2 * dn <= STREAM_DOWN_SMS)
    if shape == "seed" and tokens == 256 and want:  # the counts the trace showed, the
        # down tasks first in the queue
        assert (gu, dn) == (160, 20) and cfg.down.bn == 256 and cfg.early_down


def queue_order(r, g, d, grid):
    """The kernel's queue_order (EARLY_DOWN): list index of routed task r, g gate/up and d
    down tasks."""
    return r if 2 * d > grid else g + r if r < d else r - d


@pytest.mark.parametrize("g,d,grid", [(160, 16, 132), (128, 66, 132), (128, 67, 132),
                                      (0, 0, 132), (5, 3, 8)])
def test_early_down_puts_the_down_tasks_first_where_they_leave_half_the_grid(g, d, grid):
    order = [queue_order(r, g, d, grid) for r in range(g + d)]
    assert sorted(order) == list(range(g + d))  # a permutation of the list
    if 2 * d <= grid:
        assert all(i >= g for i in order[:d]) and order[d:] == list(range(g))
    else:
        assert order == list(range(g + d))


def test_early_down_in_the_template_and_its_refusals():
    from flashmoe_gen.tuner.space import SearchSpace

    cfg = replace(KernelConfig.persistent_default(SEED1, "sm_90"), early_down=True,
                  shared_front=False)
    cfg.validate(SEED1, "sm_90")
    assert cfg.name.endswith("__sd__ed") and KernelConfig.from_name(cfg.name) == cfg
    code = " ".join(render(SEED1, cfg).code.split())
    for text in ("constexpr bool EARLY_DOWN = true;",
                 "if (!EARLY_DOWN) return r; const int g = gate_up_end(), d = routed_end() - "
                 "g; return 2 * d > static_cast<int>(gridDim.x) ? r : r < d ? g + r : r - d;",
                 "auto gate_up_end = [&] { return gu_first[0][el]; };",
                 "const TaskDesc loc = locate(queue_order(r));"):
        assert text in code, text
    rows4 = replace(KernelConfig.persistent_default(SEED4, "sm_90"), stream_down=True)
    assert rows4.interleave_sources
    il = replace(rows4, early_down=True)
    il.validate(SEED4, "sm_90")
    assert ("auto gate_up_end = [&] { return il_first[0][el]; };"
            in " ".join(render(SEED4, il).code.split()))
    for bad, p, text in ((replace(cfg, stream_down=False), SEED1, "set it True"),
                         (replace(il, own_first=True), SEED4, "set own_first False"),
                         (replace(il, interleave_sources=False), SEED4,
                          "interleave_sources True")):
        with pytest.raises(ConfigError, match=text) as e:
            bad.validate(p, "sm_90")
        assert e.value.field == "early_down"
    space = SearchSpace.for_problem(SEED4, "sm_90", "full", ("nccl", "nvlink"))
    params = space.params_from_config(il)
    assert space.canonical(params)["early_down"] is True
    for moot in ({"stream_down": False}, {"own_first": True}, {"task_producer": True}):
        assert space.canonical(params | moot)["early_down"] is False, moot
