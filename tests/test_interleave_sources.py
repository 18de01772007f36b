"""config interleave_sources (templates/persistent.cu.j2, ``learn_all`` and ``locate``): one
task list over every source, by expert, then n-tile, then ring source, parts fastest, every
gate/up task before any down task. A model of the list and of locate's walk, tied to the
rendered kernel's text: every (source, expert, n-tile, part) task appears exactly once, the
sources' tasks of an (expert, n-tile) sit side by side, and experts without rows take none."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
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


def _lists(counts, parts, n_tiles):
    """learn_all: il_first[gd][e] and il_cum[gd][e][q] for ring sources q (counts[q][e]),
    parts(rows) row tasks per n-tile, n_tiles[gd] n-tiles (gate/up, down)."""
    sources, el = len(counts), len(counts[0])
    first = [[0] * (el + 1) for _ in range(2)]
    cum = [[[0] * (sources + 1) for _ in range(el)] for _ in range(2)]
    i = 0
    for gd in range(2):
        for e in range(el):
            first[gd][e] = i
            c = 0
            for q in range(sources):
                cum[gd][e][q] = c
                c += parts(counts[q][e])
            cum[gd][e][sources] = c
            i += n_tiles[gd] * c
        first[gd][el] = i
    return first, cum


def _locate(r, first, cum, el, sources):
    gate_up = r < first[0][el]
    gd = 0 if gate_up else 1
    f = first[gd]
    e = bracket(f, r, el)
    c = cum[gd][e]
    o = r - f[e]
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
                 "const int o = r - first[e], j = o % cum[SOURCES];",
                 "while (j >= cum[q + 1]) ++q;",
                 "d.n = o / cum[SOURCES], d.part = j - cum[q];",
                 "if (known == 0) learn_all();",
                 "auto routed_end = [&] { return il_first[1][el]; };"):
        assert line in code, line


@pytest.mark.parametrize("sources", [2, 4])
@pytest.mark.parametrize("seed", range(4))
def test_every_task_once_and_sources_side_by_side(sources, seed):
    rng = np.random.default_rng(seed)
    el, bm, n_tiles = 8, 128, (16, 8)
    counts = rng.integers(0, 400, (sources, el))
    counts[:, rng.integers(0, el)] = 0  # an expert no source sent rows to
    counts[rng.integers(0, sources)] = 0  # a source that sent nothing
    parts = lambda rows: -(-int(rows) // bm)  # noqa: E731  (one row tile per task)
    first, cum = _lists(counts.tolist(), parts, n_tiles)
    want = {(gd == 0, q, e, n, p) for gd in range(2) for q in range(sources)
            for e in range(el) for n in range(n_tiles[gd]) for p in range(parts(counts[q][e]))}
    got = [_locate(r, first, cum, el, sources) for r in range(first[1][el])]
    assert len(got) == len(set(got)) and set(got) == want
    # every gate/up task before any down task, and an (expert, n-tile)'s tasks adjacent
    flags = [g for g, *_ in got]
    assert flags == sorted(flags, reverse=True)
    keys = [(g, e, n) for g, _, e, n, _ in got]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs))


def test_it_needs_the_phased_lists_and_no_producer():
    cfg = _cfg()
    cfg.validate(P2)
    for bad in (dict(phased_tasks=False), dict(task_producer=True)):
        with pytest.raises(ConfigError, match="interleave_sources"):
            replace(cfg, **bad).validate(P2)
