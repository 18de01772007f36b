"""The persistent TMA GEMM's host-free logic, emulated on the CPU (templates/gemm_tma.cu.j2):
the tile scheduler (per-group prefix of tiles, the binary search, m fastest) and the
mbarrier ring between the producer thread and the 8 consumer warps, model-checked over
random interleavings: no deadlock, no stage refilled before every consumer released it, no
stage read before its bytes landed."""

from __future__ import annotations

import random

import pytest

CONSUMER_WARPS = 8


def tile_start(group_rows: list[int], bm: int, nt: int) -> list[int]:
    """The warp-scanned prefix: tile_start[g] = first tile of group g, [groups] = total."""
    out, total = [], 0
    for rows in group_rows:
        out.append(total)
        total += (rows + bm - 1) // bm * nt
    return out + [total]


def locate(t: int, starts: list[int], nt: int) -> tuple[int, int, int]:
    lo, hi = 0, len(starts) - 2
    while lo < hi:  # the last group whose first tile is <= t
        mid = (lo + hi + 1) // 2
        if starts[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    g = lo
    local = t - starts[g]
    mt = (starts[g + 1] - starts[g]) // nt
    return g, local % mt, local // mt


@pytest.mark.parametrize("seed", range(20))
def test_scheduler_covers_every_tile_once(seed):
    rng = random.Random(seed)
    groups = rng.randint(1, 40)
    rows = [rng.choice([0, 0, 1, 5, 127, 128, 129, 300, 1000]) for _ in range(groups)]
    bm, bn, n = 128, rng.choice([64, 128, 256]), rng.randint(1, 2000)
    nt = (n + bn - 1) // bn
    starts = tile_start(rows, bm, nt)
    grid = rng.randint(1, 132)
    seen = []
    for block in range(grid):
        for t in range(block, starts[-1], grid):
            seen.append(locate(t, starts, nt))
    want = [(g, m, j) for g, r in enumerate(rows) for j in range(nt)
            for m in range((r + bm - 1) // bm)]
    assert sorted(seen) == sorted(want)


def simulate_ring(stages: int, kt_per_tile: list[int], rng: random.Random) -> None:
    """One block: the producer and 8 consumer warps stepping in a random order, each blocked
    where the kernel waits (mbarrier parity semantics: a phase completes when its arrivals
    (and bytes) are in; try_wait(parity p) passes once the phase of parity p completed, and
    a fresh barrier counts its 'previous' phase, parity 1, as completed)."""
    full_done = [0] * stages    # completed phases of full[s] (producer arrive + TMA bytes)
    empty_done = [0] * stages   # completed phases of empty[s] (8 warp arrivals)
    empty_arrivals = [0] * stages
    holder = [None] * stages    # which iteration's data a stage holds
    readers = [set() for _ in range(stages)]  # consumer warps still reading a stage
    total = sum(kt_per_tile)

    def passed(done: int, parity: int) -> bool:
        # The phase with this parity completed: phases 0, 1, 2, ... complete in order; the
        # latest completed phase index is done - 1; "previous" of a fresh barrier is parity 1.
        return (done - 1) % 2 == parity if done > 0 else parity == 1

    prod_it = 0
    cons = [{"it": 0, "prev": None, "pending": []} for _ in range(CONSUMER_WARPS)]
    steps = 0
    while prod_it < total or any(c["it"] < total or c["prev"] is not None for c in cons):
        steps += 1
        assert steps < 200000, "deadlock"
        moved = False
        actors = ["p"] + list(range(CONSUMER_WARPS))
        rng.shuffle(actors)
        for who in actors:
            if who == "p":
                if prod_it >= total:
                    continue
                s = prod_it % stages
                if not passed(empty_done[s], ((prod_it // stages) & 1) ^ 1):
                    continue
                assert not readers[s], "producer refills a stage a consumer still reads"
                holder[s] = prod_it  # TMA lands the bytes, full[s] completes its phase
                full_done[s] += 1
                prod_it += 1
                moved = True
            else:
                c = cons[who]
                if c["it"] < total:
                    s = c["it"] % stages
                    if not passed(full_done[s], (c["it"] // stages) & 1):
                        continue
                    assert holder[s] == c["it"], "consumer reads a stage before its data"
                    readers[s].add(who)
                    # wgmma_wait<1>: the previous stage's MMAs are done -> release it
                    if c["prev"] is not None:
                        _release(c["prev"], who, readers, empty_arrivals, empty_done)
                    c["prev"] = s
                    c["it"] += 1
                    if _tile_end(c["it"], kt_per_tile):  # wgmma_retire, release the last
                        _release(c["prev"], who, readers, empty_arrivals, empty_done)
                        c["prev"] = None
                    moved = True
        assert moved or prod_it < total, "deadlock: nobody can move"


def _release(s, who, readers, empty_arrivals, empty_done) -> None:
    readers[s].discard(who)
    empty_arrivals[s] += 1
    if empty_arrivals[s] == CONSUMER_WARPS:
        empty_arrivals[s] = 0
        empty_done[s] += 1


def _tile_end(it: int, kt_per_tile: list[int]) -> bool:
    acc = 0
    for k in kt_per_tile:
        acc += k
        if it == acc:
            return True
    return False


@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", range(6))
def test_ring_never_deadlocks_or_races(stages, seed):
    rng = random.Random(seed * 10 + stages)
    tiles = [rng.choice([1, 2, 3, 7, 16]) for _ in range(rng.randint(1, 6))]
    simulate_ring(stages, tiles, rng)
