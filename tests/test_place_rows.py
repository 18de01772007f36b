"""The persistent kernel's dispatch loop (templates/persistent.cu.j2, ``place_rows``): a warp
checks 32 of its choices at a time, a lane each, then copies the kept ones' rows PLACE_ROWS
at a time (their loads in flight together). A lane-by-lane model of that loop, tied to the
template's text: every kept (token, choice) row is copied exactly once, by the warp that
owns it, and nothing else is."""

from __future__ import annotations

import re

import numpy as np
import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

ALL, OWN, PEERS = 0, 1, 2


def _text() -> str:
    """The persistent default's source where senders place the peers' rows."""
    p = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=16384)
    cfg = KernelConfig.persistent_default(p, "sm_90")
    assert cfg.send_blocks > 0
    return render(p, cfg).code


def _place_rows_rows() -> int:
    m = re.search(r"constexpr int PLACE_ROWS = (\d+);", _text())
    assert m, "PLACE_ROWS not found in the persistent kernel"
    return int(m.group(1))


def _model(w0: int, dw: int, which: int, pos, topk_idx, capacity: int, local: int,
           rank: int, rows: int) -> list[list[int]]:
    """The choices warp w0 copies, in copy_rows calls (each a list of its rows' choices)."""
    total = len(pos)
    calls = []
    for a0 in range(w0, total, 32 * dw):
        a = [a0 + lane * dw for lane in range(32)]
        kept = []
        for lane in range(32):
            e, p = (topk_idx[a[lane]], pos[a[lane]]) if a[lane] < total else (0, capacity)
            mine = e // local == rank
            kept.append(p < capacity and (which == ALL or mine == (which == OWN)))
        m = sum(1 << lane for lane in range(32) if kept[lane])
        while m:
            n, call = 0, []
            for _ in range(rows):
                lane = (m & -m).bit_length() - 1 if m else 0
                n += m != 0
                m &= m - 1
                call.append(a[lane])
            calls.append(call[:n])
    return calls


def test_the_template_has_the_modelled_loop():
    text = _text()
    for line in ("for (int a0 = w0; a0 < tokens * TOPK; a0 += 32 * dw) {",
                 "const int a = a0 + lane * dw;",
                 "for (unsigned m = __ballot_sync(0xffffffffu, kept); m != 0;) {",
                 "const int l = m != 0 ? __ffs(m) - 1 : 0;",
                 "n += m != 0;",
                 "m &= m - 1;",
                 "copy_rows<PLACE_ROWS>(dst, src, n, lane);"):
        assert line in text, line
    assert _place_rows_rows() >= 1


@pytest.mark.parametrize("tokens", [0, 1, 31, 257, 1000])
@pytest.mark.parametrize("which", [ALL, OWN, PEERS])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_every_kept_row_is_copied_once(tokens, which, rows):
    rng = np.random.default_rng(tokens * 7 + which * 3 + rows)
    topk, experts, ranks, rank = 2, 16, 4, 1
    local = experts // ranks
    capacity = max(1, tokens // 3)
    topk_idx = rng.integers(0, experts, tokens * topk).tolist()
    pos = rng.integers(0, 2 * capacity, tokens * topk).tolist()  # half past the capacity
    warps, blocks = 8, 3
    dw = warps * blocks
    want = {a for a in range(tokens * topk) if pos[a] < capacity and (
        which == ALL or (topk_idx[a] // local == rank) == (which == OWN))}
    seen = []
    for w0 in range(dw):
        for call in _model(w0, dw, which, pos, topk_idx, capacity, local, rank, rows):
            assert 1 <= len(call) <= rows
            assert all((a - w0) % dw == 0 for a in call)  # the warp's own choices
            seen += call
    assert sorted(seen) == sorted(want)
    assert len(seen) == len(set(seen))


def test_the_template_rows_are_modelled():
    rows = _place_rows_rows()
    test_every_kept_row_is_copied_once(1000, PEERS, rows)


def test_mma_sync_row_tiles_copy_one_row_at_a_time():
    """Two rows in flight spilled 16 bytes beside the mma.sync row tiles: they take one."""
    from flashmoe_gen.render import place_rows
    from flashmoe_gen.tiles import GemmTile

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    cfg = KernelConfig(GemmTile(64, 128, 64, 2, 4, 4), GemmTile(128, 128, 32, 4, 2, 4),
                       transport="nvlink")
    assert place_rows(cfg) == 1
    assert "constexpr int PLACE_ROWS = 1;" in render(p, cfg).code
    assert place_rows(KernelConfig.persistent_default(p, "sm_90")) == 2
