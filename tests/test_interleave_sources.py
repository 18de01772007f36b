"""config interleave_sources (templates/persistent.cu.j2, ``learn_all`` and ``locate``): one
task list over every source, by expert, then n-tile, then ring source, parts fastest, every
gate/up task before any down task; with own_first this rank's own rows (ring source 0) in a
per-source list of their own ahead of the peers' one list, per GEMM (own gate/up, peers'
gate/up, own down, peers' down). A model of the lists and of locate's walk, tied to the
rendered kernel's text: every (source, expert, n-tile, part) task appears exactly once, the
sources' tasks of an (expert, n-tile) sit side by side, and experts without rows take none."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_stream_down import decode_n_major
from test_task_order import bracket

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

P2 = MoEProblem(2048, 2048, 32, 2, world_size=2, tokens_per_rank=2048)


def _cfg(problem: MoEProblem = P2) -> KernelConfig:
    cfg = KernelConfig.persistent_default(problem, "sm_90")
    assert not cfg.fuse_sources and cfg.phased_tasks
    return replace(cfg, interleave_sources=True)


def _own_list(own, gd, i, counts, parts, n_tiles):
    """source_list for the own rows: own[gd][e], their list of one GEMM from index i on."""
    el = len(counts[0])
    for e in range(el):
        own[gd][e] = i
        i += n_tiles[gd] * parts(counts[0][e])
    own[gd][el] = i
    return i


def _lists(counts, parts, n_tiles, own_first=False, last=False):
    """learn_own, then learn_all: own_first[gd][e] (own_first), il_first[gd][e] and
    il_cum[gd][e][q] for ring sources q (counts[q][e]), parts(rows) row tasks per n-tile,
    n_tiles[gd] n-tiles (gate/up, down); last (own_down_last): the own down list after the
    peers'."""
    sources, el = len(counts), len(counts[0])
    own = [[0] * (el + 1) for _ in range(2)]
    if own_first:
        _own_list(own, 0, 0, counts, parts, n_tiles)
    first = [[0] * (el + 1) for _ in range(2)]
    cum = [[[0] * (sources + 1) for _ in range(el)] for _ in range(2)]
    i = own[0][el] if own_first else 0
    for gd in range(2):
        if own_first and not last and gd == 1:
            i = _own_list(own, 1, i, counts, parts, n_tiles)
        for e in range(el):
            first[gd][e] = i
            c = 0
            for q in range(sources):
                cum[gd][e][q] = c
                if own_first and q == 0:
                    continue
                c += parts(counts[q][e])
            cum[gd][e][sources] = c
            i += n_tiles[gd] * c
        first[gd][el] = i
    if last:
        _own_list(own, 1, i, counts, parts, n_tiles)
    return first, cum, own


def _locate(r, first, cum, el, sources, own=None, counts=None, parts=None, last=False,
            ngu=0):
    """locate(r): (gate/up, ring source, expert, n-tile, part); ngu > 0 (stream_down): the
    gate/up tasks n-tile-major over ngu n-tiles (the own list's decoded by in_list's,
    ported in test_stream_down)."""
    if own is not None and (r < own[0][el] or
                            (own[1][0] if last else first[0][el]) <= r < own[1][el]):
        gate_up = r < own[0][el]
        f = own[0 if gate_up else 1]
        if ngu and gate_up:
            return (gate_up, 0, *decode_n_major(f, r, ngu))
        e = bracket(f, r, el)
        p = parts(counts[0][e])
        return gate_up, 0, e, (r - f[e]) // p, (r - f[e]) % p
    gate_up = r < first[0][el]
    gd = 0 if gate_up else 1
    f = first[gd]
    if ngu and gate_up:  # n_major; as expert-major: o = n-tile x e's tasks per n-tile + j
        e, n, j = decode_n_major(f, r, ngu)
        o = n * cum[0][e][sources] + j
    else:
        e = bracket(f, r, el)
        o = r - f[e]
    c = cum[gd][e]
    j = o % c[sources]
    q = 0
    while j >= c[q + 1]:
        q += 1
    return gate_up, q, e, o // c[sources], j - c[q]


def test_the_kernel_has_the_modelled_list():
    code = " ".join(render(P2, _cfg()).code.split())
    for line in ("il_cum[gd][e][q] = c;",
                 "c += gd == 0 ? gu_parts(rows) : dn_parts(rows);",
                 "il_cum[gd][e][SOURCES] = c; i += (gd == 0 ? NGU : NDN) * c;",
                 "il_first[gd][el] = i;",
                 "const NTask k = n_major(first, r); e = k.e, o = k.n * "
                 "il_cum[0][k.e][SOURCES] + k.j; } else { e = bracket(first, r, el); o = r - "
                 "first[e]; } const int* cum = il_cum[gd][e]; const int j = o % cum[SOURCES];",
                 "while (j >= cum[q + 1]) ++q;",
                 "d.n = o / cum[SOURCES], d.part = j - cum[q];",
                 "if (known == 0) { if (OWN_FIRST) learn_own(); else learn_all(); }",
                 "if (OWN_FIRST && known < SOURCES && t - shared_tasks >= own_first[0][el]) "
                 "learn_all();",
                 "auto routed_end = [&] { return OWN_DOWN_LAST ? own_first[1][el] : "
                 "il_first[1][el]; };",
                 # own_first
                 "int i = OWN_FIRST ? own_first[0][el] : 0;",
                 "source_list(own_first[0], self_rank, 0, 0);",
                 "if (OWN_FIRST && !OWN_DOWN_LAST && gd == 1) i = source_list(own_first[1], "
                 "self_rank, 1, i);",
                 "first down task) } if (OWN_DOWN_LAST) source_list(own_first[1], "
                 "self_rank, 1, i); }",
                 "if (OWN_FIRST && q == 0) continue;",
                 "i += gd == 0 ? NGU * gu_parts(rows) : NDN * dn_parts(rows);",
                 "(r < own_first[0][el] || (r >= (OWN_DOWN_LAST ? own_first[1][0] : "
                 "il_first[0][el]) && r < own_first[1][el]))",
                 "d.s = self_rank; in_list(d, own_first[d.gate_up ? 0 : 1], r); return d;",
                 "constexpr bool OWN_FIRST = false;", "constexpr bool OWN_DOWN_LAST = false;"):
        assert line in code, line
    p4 = P2.replace(world_size=4)
    own = " ".join(render(p4, replace(_cfg(p4), own_first=True)).code.split())
    assert "constexpr bool OWN_FIRST = true;" in own
    last = render(p4, replace(_cfg(p4), own_first=True, own_down_last=True)).code
    assert "constexpr bool OWN_DOWN_LAST = true;" in last


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("own_first,last", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("sources", [2, 4])
@pytest.mark.parametrize("seed", range(4))
def test_every_task_once_and_sources_side_by_side(sources, seed, own_first, last, streamed):
    rng = np.random.default_rng(seed)
    el, bm, n_tiles = 8, 128, (16, 8)
    counts = rng.integers(0, 400, (sources, el))
    counts[:, rng.integers(0, el)] = 0  # an expert no source sent rows to
    counts[rng.integers(0, sources)] = 0  # a source that sent nothing
    parts = lambda rows: -(-int(rows) // bm)  # noqa: E731  (one row tile per task)
    first, cum, own = _lists(counts.tolist(), parts, n_tiles, own_first, last)
    want = {(gd == 0, q, e, n, p) for gd in range(2) for q in range(sources)
            for e in range(el) for n in range(n_tiles[gd]) for p in range(parts(counts[q][e]))}
    end = own[1][el] if last else first[1][el]  # routed_end
    got = [_locate(r, first, cum, el, sources, own if own_first else None, counts, parts,
                   last, n_tiles[0] if streamed else 0) for r in range(end)]
    assert len(got) == len(set(got)) and set(got) == want
    if streamed:  # stream_down: the peers' gate/up tasks n-tile-major (and the own ones)
        for lo, hi in ((own[0][0], own[0][el]), (first[0][0], first[0][el])):
            ns = [n for g, q, e, n, _ in got[lo:hi]]  # (no own list: own[0] is all 0)
            assert ns == sorted(ns)
    # every gate/up task before any down task
    flags = [g for g, *_ in got]
    assert flags == sorted(flags, reverse=True)
    # the peers' tasks of an (expert, n-tile) adjacent (own_first: the own rows' too, in
    # their own list)
    keys = [(g, q == 0 and own_first, e, n) for g, q, e, n, _ in got]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs))
    if own_first:  # the own gate/up tasks first: the first located before any peer's flag
        n_own = own[0][el]
        assert all(q == 0 and g for g, q, *_ in got[:n_own])
        assert all(q != 0 for g, q, *_ in got[n_own:first[0][el]])
        if last:  # the peers' down tasks, then the own ones
            assert all(q != 0 and not g for g, q, *_ in got[first[0][el]:first[1][el]])
            assert all(q == 0 and not g for g, q, *_ in got[first[1][el]:])
        else:  # own down tasks between the peers' gate/up and down tasks
            assert all(q == 0 and not g for g, q, *_ in got[first[0][el]:own[1][el]])


def test_it_needs_the_phased_lists_and_no_producer():
    cfg = _cfg()
    cfg.validate(P2)
    for bad in (dict(phased_tasks=False), dict(task_producer=True)):
        with pytest.raises(ConfigError, match="interleave_sources"):
            replace(cfg, **bad).validate(P2)


def test_own_first_splits_the_one_list_from_three_ranks():
    p4 = P2.replace(world_size=4)
    cfg = replace(_cfg(p4), own_first=True)
    cfg.validate(p4)
    assert cfg.name.endswith("__il__of")
    assert KernelConfig.parse(cfg.name) == cfg
    with pytest.raises(ConfigError, match="own_first.*set interleave_sources"):
        replace(cfg, interleave_sources=False).validate(p4)
    with pytest.raises(ConfigError, match="own_first.*2 ranks"):
        replace(_cfg(), own_first=True).validate(P2)


@pytest.mark.parametrize("experts,tokens,world,want", [
    (64, 2048, 4, "il"),  # 64 rows per source: the one list alone (own first 0.408 vs 0.386)
    (64, 4096, 4, "il+of"), (64, 16384, 4, "il+of"), (32, 2048, 4, "il+of"),
    (32, 16384, 4, "il+of"),  # 1024 rows per source: the last that won (-2% / -7%)
    (8, 16384, 4, ""),  # 4096 rows per source: per-source lists (own first +8%)
    (64, 16384, 2, ""),  # 2 ranks: the peers are one source
    (32, 1024, 2, "il"),
])
def test_the_default_takes_own_first_by_rows_per_source(experts, tokens, world, want):
    from flashmoe_gen.defaults import own_first_pays
    p = MoEProblem(2048, 2048, experts, 2, world_size=world, tokens_per_rank=tokens)
    cfg = KernelConfig.persistent_default(p, "sm_90")
    got = "+".join(k for k, on in (("il", cfg.interleave_sources), ("of", cfg.own_first)) if on)
    assert got == want
    assert own_first_pays(p) == cfg.own_first


def test_shared_experts_keep_the_one_list_alone():
    """Their tasks fill the one list's wait already (DeepSeek-V2-Lite on 4 x H200: own rows
    first lost 8-10% at T=1024 / 4096)."""
    from flashmoe_gen.presets import get_preset
    for t in (1024, 4096):
        cfg = KernelConfig.persistent_default(
            get_preset("deepseek-v2-lite").problem(world_size=4, tokens_per_rank=t), "sm_90")
        assert cfg.interleave_sources and not cfg.own_first


def test_the_seeds_flip_own_first_with_the_one_list():
    """A tune tries the default with own_first flipped early: on, it takes the one list with
    it; off, the one list stays."""
    from flashmoe_gen.tuner.space import SearchSpace
    for tokens, flipped in ((2048, dict(own_first=True)), (4096, dict(own_first=False))):
        p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=tokens)
        pd = KernelConfig.persistent_default(p, "sm_90")
        seeds = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink")).seeds()
        want = replace(pd, interleave_sources=True, **flipped)
        assert want != pd and want in seeds[:12]
