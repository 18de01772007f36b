"""Lane-exact emulation, on the CPU, of the positions scan (templates/layout.cu.j2,
positions_block): POS_TPT consecutive tokens per thread and chunk, a warp's inclusive scan by
__shfl_up_sync, the warps' totals through shared memory, then each thread's stores. Compared
with the rule it implements: pos[t][j] is the rank of (t, j) among the tokens routed to
expert topk_idx[t][j], in token order; counts[e] their number."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import POS_THREADS, POS_TOKENS_PER_THREAD, render


def positions_block(e: int, topk_idx: np.ndarray, tokens: int, pos: np.ndarray,
                    counts: np.ndarray, threads: int = POS_THREADS,
                    tpt: int = POS_TOKENS_PER_THREAD) -> None:
    """One block (expert e), statement by statement over its threads."""
    top_k = topk_idx.shape[1]
    warps, chunk = threads // 32, threads * tpt
    base = 0
    for c0 in range(0, tokens, chunk):
        slot = np.full((threads, tpt), -1)
        mine = np.zeros(threads, np.int64)
        for th in range(threads):
            t0 = c0 + th * tpt
            for i in range(tpt):
                if t0 + i < tokens:
                    for j in range(top_k):
                        if topk_idx[t0 + i, j] == e:
                            slot[th, i] = j
                mine[th] += slot[th, i] >= 0
        incl = mine.copy()
        for off in (1, 2, 4, 8, 16):  # __shfl_up_sync: lane l reads lane l - off's value
            prev = incl.copy()
            for th in range(threads):
                if th % 32 >= off:
                    incl[th] += prev[th - off]
        warp_total = [incl[w * 32 + 31] for w in range(warps)]
        chunk_total = sum(warp_total)
        for th in range(threads):
            warp = th // 32
            p = base + sum(warp_total[:warp]) + incl[th] - mine[th]
            for i in range(tpt):
                if slot[th, i] >= 0:
                    pos[c0 + th * tpt + i, slot[th, i]] = p
                    p += 1
        base += chunk_total
    counts[e] = base


@pytest.mark.parametrize("experts,top_k,tokens,threads,tpt", [
    (8, 2, 5000, 256, 8), (64, 6, 700, 256, 8), (4, 2, 2048, 256, 8), (8, 2, 1, 256, 8),
    (3, 2, 300, 64, 3), (16, 8, 131, 64, 4)])
def test_positions_scan_ranks_tokens_in_order(experts, top_k, tokens, threads, tpt):
    """Ragged chunks (5000 = 2 x 2048 + 904), a whole chunk, one token, and several block
    shapes; every (token, choice) gets its token-order rank once."""
    rng = np.random.default_rng(experts * tokens + top_k)
    idx = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    pos = np.full((tokens, top_k), -1)
    counts = np.zeros(experts, np.int64)
    for e in range(experts):
        positions_block(e, idx, tokens, pos, counts, threads, tpt)
    seen = np.zeros(experts, np.int64)
    for t in range(tokens):
        for j in range(top_k):
            assert pos[t, j] == seen[idx[t, j]], (t, j)
            seen[idx[t, j]] += 1
    np.testing.assert_array_equal(counts, seen)


def test_the_scan_takes_its_constants_from_render():
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, tokens_per_rank=256)
    from flashmoe_gen.config import KernelConfig

    code = render(p, KernelConfig.default(p)).code
    assert f"constexpr int POS_THREADS = {POS_THREADS};" in code
    assert f"constexpr int POS_TPT = {POS_TOKENS_PER_THREAD};" in code
