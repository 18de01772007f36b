"""The persistent kernel's per-source task lists on the CPU (templates/persistent.cu.j2
`learn` and the task decode): a port of their index arithmetic, tied to the template's
text, checks that every task index decodes to one (source, expert, n-tile, part, GEMM) and
every such task has one index, for the ring-source order (each source's gate/up then down
tasks) and the phased one (config phased_tasks: every source's gate/up tasks, then every
source's down tasks); that a block decodes an index knowing only the sources the kernel
made it wait for; and, phased, that no down task precedes a gate/up task (own_down_last:
the peers' down lists, then this rank's own, ring source 0)."""
from dataclasses import replace

import numpy as np
import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render


def down_q(j, P, last):
    """The j-th down list's ring source (own_down_last: 1, ..., P - 1, then 0)."""
    return (j + 1) % P if last else j


def learn_all(rows, ngu, ndn, bm, phased, last=False):
    """learn(q) for q = 0, 1, ...: list_end, gu_first, dn_first as the kernel fills them;
    rows[q][e]: ring source q's rows of local expert e; a group's tasks: n-tiles x row
    tiles (gu_parts / dn_parts with one row tile per task)."""
    P, el = len(rows), len(rows[0])
    parts = [[-(-r // bm) if r > 0 else 0 for r in rq] for rq in rows]
    list_end = [0] * P
    gu_first = [[0] * (el + 1) for _ in range(P)]
    dn_first = [[0] * (el + 1) for _ in range(P)]
    for q in range(P):
        i = list_end[q - 1] if q > 0 else 0
        for e in range(el):
            gu_first[q][e] = i
            i += ngu * parts[q][e]
        gu_first[q][el] = i  # the end of its gate/up tasks
        if phased:
            list_end[q] = i
            if q == P - 1:
                for j in range(P):
                    qd = down_q(j, P, last)
                    for e in range(el + 1):
                        dn_first[qd][e] = i
                        if e < el:
                            i += ndn * parts[qd][e]
        else:
            for e in range(el + 1):
                dn_first[q][e] = i
                if e < el:
                    i += ndn * parts[q][e]
            list_end[q] = i
    end = dn_first[down_q(P - 1, P, last)][el] if phased else list_end[P - 1]
    return list_end, gu_first, dn_first, parts, end


def known_for(r, list_end, P):
    """The sources a block has learned when it decodes index r: the kernel's
    `while (known < SOURCES && r >= (known > 0 ? list_end[known - 1] : 0)) learn(known++)`."""
    known = 0
    while known < P and r >= (list_end[known - 1] if known > 0 else 0):
        known += 1
    return known


def bracket(first, r, el):
    """locate's binary search: the expert e with first[e] <= r < first[e + 1] (experts
    without tasks, first[e] == first[e + 1], are skipped)."""
    e, hi = 0, el
    while hi - e > 1:
        mid = (e + hi) // 2
        if first[mid] <= r:
            e = mid
        else:
            hi = mid
    return e


def decode(r, known, lists, el, ngu, ndn, phased, last=False):
    list_end, gu_first, dn_first, parts, _ = lists
    P, q = len(list_end), 0
    if phased and r >= list_end[known - 1]:
        j = 0
        while r >= dn_first[down_q(j, P, last)][el]:
            j += 1
        q = down_q(j, P, last)
    else:
        while r >= list_end[q]:
            q += 1
    gate_up = r < gu_first[q][el]
    first = gu_first[q] if gate_up else dn_first[q]
    e = bracket(first, r, el)
    p = parts[q][e]
    return q, gate_up, e, (r - first[e]) // p, (r - first[e]) % p


@pytest.mark.parametrize("phased,last", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("P,el", [(2, 1), (2, 5), (4, 2), (4, 8)])
def test_every_task_has_one_index(P, el, phased, last):
    rng = np.random.default_rng(P * 100 + el + phased + 2 * last)
    ngu, ndn, bm = 3, 2, 128
    for trial in range(20):
        rows = rng.integers(0, 400, size=(P, el))
        rows[rng.random((P, el)) < 0.3] = 0  # experts without rows
        if trial % 5 == 0:
            rows[rng.integers(P)] = 0  # a source that sends nothing
        rows = rows.tolist()
        lists = learn_all(rows, ngu, ndn, bm, phased, last)
        list_end, _, _, parts, end = lists
        want = {(q, g, e, n, part) for q in range(P) for e in range(el)
                for g, nt in ((True, ngu), (False, ndn))
                for n in range(nt) for part in range(parts[q][e])}
        got = []
        for r in range(end):
            known = known_for(r, list_end, P)
            task = decode(r, known, lists, el, ngu, ndn, phased, last)
            q, gate_up = task[0], task[1]
            assert q < known  # its source's flag was waited for (learn) before
            if phased and gate_up:
                assert known == known_for(list_end[q] - 1, list_end, P)  # no later source
            got.append(task)
        assert len(got) == len(set(got)) and set(got) == want
        kinds = [g for _, g, *_ in got]
        if phased:  # every gate/up task before any down task
            assert kinds == sorted(kinds, reverse=True)
            downs = [q for q, g, *_ in got if not g]  # ring sources in down-list order
            assert downs == sorted(downs, key=lambda q: (last and q == 0, q))
        else:  # per source: its gate/up tasks, then its down tasks
            for q in range(P):
                mine = [g for (qq, g, *_) in got if qq == q]
                assert mine == sorted(mine, reverse=True)


def test_template_matches_the_port():
    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    cfg = replace(KernelConfig.persistent_default(p, "sm_90"), phased_tasks=True,
                  interleave_sources=False, own_first=False)  # the per-source lists
    code = " ".join(render(p, cfg).code.split())
    for line in (
            "constexpr bool PHASED = true;",
            # source_list, the gate/up list's layout
            "auto source_list = [&](int* first, int s, int gd, int i) { for (int e = 0; "
            "e < el; ++e) { first[e] = i; const int rows = min(my_counts[s * el + e], "
            "capacity); i += gd == 0 ? NGU * gu_parts(rows) : NDN * dn_parts(rows); } "
            "first[el] = i; return i; };",
            "int i = source_list(gu_first[q], s, 0, q > 0 ? list_end[q - 1] : 0); "
            "if constexpr (PHASED) { list_end[q] = i; if (q == SOURCES - 1)",
            "for (int j = 0; j < SOURCES; ++j) down_list(down_q(j), i); } else { "
            "down_list(q, i); list_end[q] = i; }",
            # down_q, ported above
            "auto down_q = [](int j) { return OWN_DOWN_LAST ? (j + 1) % SOURCES : j; };",
            "const int s = (self_rank + q) % SOURCES; for (int e = 0; e <= el; ++e) { "
            "dn_first[q][e] = i; if (e < el) i += NDN * dn_parts(min(my_counts[s * el + e], "
            "capacity)); } };",
            "return PHASED ? dn_first[down_q(SOURCES - 1)][el] : list_end[SOURCES - 1];",
            "while (known < SOURCES && t - shared_tasks >= (known > 0 ? list_end[known - 1] : "
            "0)) learn(known++); if (known == SOURCES && t - shared_tasks >= routed_end())",
            "int q = 0; if (PHASED && r >= list_end[known - 1]) {",
            "int j = 0; while (r >= dn_first[down_q(j)][el]) ++j; q = down_q(j); } else { "
            "while (r >= list_end[q]) ++q; } TaskDesc d; d.s = (self_rank + q) % SOURCES; "
            "d.gate_up = r < gu_first[q][el];",
            "in_list(d, d.gate_up ? gu_first[q] : dn_first[q], r); return d;",
            # in_list: expert, n-tile and part in one source's list
            "auto in_list = [&](TaskDesc& d, const int* first, int r) { if (STREAM_DOWN && "
            "d.gate_up) {",  # (the n-tile-major gate/up lists: tests/test_stream_down.py)
            "return; } const int e = "
            "bracket(first, r, el); d.e = e; d.n_rows = min(my_counts[d.s * el + e], "
            "capacity); const int parts = d.gate_up ? gu_parts(d.n_rows) : "
            "dn_parts(d.n_rows); d.n = (r - first[e]) / parts, d.part = (r - first[e]) % "
            "parts; };",
            # bracket, ported above
            "int bracket(const int* first, int r, int n) { int e = 0; while (n - e > 1) { "
            "const int mid = (e + n) / 2; if (first[mid] <= r) e = mid; else n = mid; } "
            "return e; }"):
        assert line in code, line
    assert "constexpr bool PHASED = false;" in render(p, replace(cfg, phased_tasks=False)).code
    assert "constexpr bool OWN_DOWN_LAST = false;" in code
    last = render(p, replace(cfg, own_down_last=True)).code
    assert "constexpr bool OWN_DOWN_LAST = true;" in last


def test_the_search_space_keeps_phased_lists_where_they_mean_something():
    """The tuner draws phased_tasks only where there are per-source lists: transport nvlink,
    sources not fused, several ranks (one rank's one source is already phased)."""
    from flashmoe_gen.tuner.space import SearchSpace

    p = MoEProblem(2048, 2048, 32, 2, world_size=4, tokens_per_rank=1024)
    space = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink"))
    assert space.choices["phased_tasks"] == (False, True)
    one = SearchSpace.for_problem(p.replace(world_size=1), "sm_90", "full", ("nccl", "nvlink"))
    assert one.choices["phased_tasks"] == (False,)
    params = space.params_from_config(replace(KernelConfig.persistent_default(p, "sm_90"),
                                              phased_tasks=True))
    assert space.canonical(params)["phased_tasks"] is True
    for moot in ({"fuse": True}, {"transport": "nccl"}):
        assert space.canonical(params | moot)["phased_tasks"] is False


def test_the_search_space_carries_ws_wgmma_and_one_gated_mma():
    """ws_wgmma (fused weight-streaming tasks on warpgroup MMAs) is an nvlink knob on Hopper,
    moot but for ws tiles with TMA weights; split_gated_mma is not searched but survives a
    seeded config's round trip through the tuner's parameters."""
    from flashmoe_gen.tuner.space import SearchSpace

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=1024)
    space = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink"))
    assert space.choices["ws_wgmma"] == (False, True)
    assert space.choices["split_gated"] == (False,)
    default = KernelConfig.persistent_default(p, "sm_90")
    assert default.ws_wgmma and space.contains(default)
    params = space.params_from_config(default)
    assert space.config_from_params(params) == default
    for moot in ({"ws_tma": False}, {"transport": "nccl"}, {"gu_mma": "sync"}):
        assert space.canonical(params | moot)["ws_wgmma"] is False
    big = p.replace(tokens_per_rank=16384)
    split = replace(KernelConfig.persistent_default(big, "sm_90"), split_gated_mma=True)
    assert space.config_from_params(space.params_from_config(split)) == split
    assert space.canonical(space.params_from_config(split) | {"gu_mma": "sync"})[
        "split_gated"] is False
    ampere = SearchSpace.for_problem(p, "sm_80", "full", ("nccl", "nvlink"))
    assert ampere.choices["ws_wgmma"] == ampere.choices["split_gated"] == (False,)


def test_own_down_last_reorders_the_phased_down_lists_only():
    """own_down_last: the phased per-source lists' down phase (or own_first's) with this
    rank's own list last; refused where there is no such phase, or where the one list
    mixes the sources' down tasks; moot for the tuner likewise."""
    from flashmoe_gen.errors import ConfigError
    from flashmoe_gen.tuner.space import SearchSpace

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    base = KernelConfig.persistent_default(p, "sm_90")
    assert base.interleave_sources and base.own_first
    per_source = replace(base, interleave_sources=False, own_first=False)
    for cfg in (replace(base, own_down_last=True), replace(per_source, own_down_last=True),
                replace(per_source, own_down_last=True, task_producer=True)):
        cfg.validate(p, "sm_90")
        assert cfg.name.endswith("__odl") and KernelConfig.from_name(cfg.name) == cfg
    for bad, text in ((replace(per_source, phased_tasks=False), "set phased_tasks"),
                      (replace(base, own_first=False), "set own_first")):
        with pytest.raises(ConfigError, match=text) as e:
            replace(bad, own_down_last=True).validate(p, "sm_90")
        assert e.value.field == "own_down_last"
    space = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink"))
    params = space.params_from_config(replace(per_source, own_down_last=True))
    assert space.canonical(params)["own_down_last"] is True
    for moot in ({"phased_tasks": False}, {"interleave": True, "own_first": False},
                 {"fuse": True}, {"transport": "nccl"}):
        assert space.canonical(params | moot)["own_down_last"] is False, moot
    assert space.canonical(params | {"interleave": True, "own_first": True})["own_down_last"]
