"""SymmetricLayout: the index arithmetic of L[P][2][2][E_local][C][H], in Python and in C++."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest

from flashmoe_gen.layout import (
    COMBINE,
    DISPATCH,
    INCOMING,
    STAGING,
    SymmetricLayout,
    contiguous_runs,
    row_offsets,
)

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

LAYOUTS = [
    SymmetricLayout(1, 1, 1, 8),
    SymmetricLayout(2, 3, 4, 8),
    SymmetricLayout(3, 2, 5, 16),
    SymmetricLayout(4, 1, 16, 24),
    SymmetricLayout(8, 4, 2, 8),
]


def coords(lay: SymmetricLayout):
    return itertools.product(range(lay.world_size), range(2), range(2),
                             range(lay.local_experts), range(lay.capacity))


def test_constants_follow_design():
    # docs/symmetric-layout.md: round 0 = dispatch, 1 = combine; buffer 0 = staging, 1 = incoming
    assert (DISPATCH, COMBINE, STAGING, INCOMING) == (0, 1, 0, 1)


@pytest.mark.parametrize("lay", LAYOUTS, ids=str)
def test_offsets_are_distinct_dense_and_row_aligned(lay):
    offsets = [lay.offset(*c) for c in coords(lay)]
    h = lay.hidden
    assert len(set(offsets)) == len(offsets)
    assert all(o % h == 0 for o in offsets)
    assert min(offsets) == 0
    assert max(offsets) + h == lay.elements
    assert lay.elements == 4 * lay.world_size * lay.local_experts * lay.capacity * h
    assert math.prod(lay.shape) == lay.elements
    assert lay.shape == (lay.world_size, 2, 2, lay.local_experts, lay.capacity, h)
    # Every row of the tensor is addressed exactly once: the rows tile it with no gap.
    assert sorted(offsets) == list(range(0, lay.elements, h))


@pytest.mark.parametrize("lay", LAYOUTS, ids=str)
def test_offsets_are_row_major_over_shape(lay):
    for c in coords(lay):
        assert lay.offset(*c) == np.ravel_multi_index((*c, 0), lay.shape)


def test_offset_examples():
    lay = SymmetricLayout(world_size=2, local_experts=3, capacity=4, hidden=8)
    assert lay.offset(0, 0, 0, 0, 0) == 0
    assert lay.offset(0, 0, 0, 0, 1) == 8
    assert lay.offset(0, 0, 0, 1, 0) == 4 * 8
    assert lay.offset(0, 0, 1, 0, 0) == 3 * 4 * 8
    assert lay.offset(0, 1, 0, 0, 0) == 2 * 3 * 4 * 8
    assert lay.offset(1, 0, 0, 0, 0) == 2 * 2 * 3 * 4 * 8
    assert lay.offset(1, 1, 1, 2, 3) == lay.elements - 8


def test_slot_offset():
    lay = SymmetricLayout(3, 2, 5, 16)
    for p, r, b, e in itertools.product(range(3), range(2), range(2), range(2)):
        assert lay.slot_offset(p, r, b, e) == lay.offset(p, r, b, e, 0)
        assert lay.slot_offset(p, r, b) == lay.offset(p, r, b, 0, 0)
    # Consecutive slots are E_local * C rows apart.
    assert lay.slot_offset(0, 0, 1) - lay.slot_offset(0, 0, 0) == 2 * 5 * 16


@pytest.mark.parametrize("index,bad,name", [
    (0, -1, "peer"), (0, 3, "peer"), (1, 2, "round"), (1, -1, "round"), (2, 2, "buffer"),
    (3, 2, "expert"), (3, -1, "expert"), (4, 5, "row"), (4, -1, "row"),
])
def test_out_of_range_raises(index, bad, name):
    lay = SymmetricLayout(3, 2, 5, 16)
    args = [0, 0, 0, 0, 0]
    args[index] = bad
    with pytest.raises(IndexError, match=rf"{name}={bad} outside"):
        lay.offset(*args)
    if index < 4:
        with pytest.raises(IndexError):
            lay.slot_offset(*args[:4])


def test_dispatch_buffer():
    for dest, me in itertools.product(range(4), range(4)):
        expected = INCOMING if dest == me else STAGING
        assert SymmetricLayout.dispatch_buffer(dest, me) == expected


# ---- the C++ side (templates) -----------------------------------------------------------------
def cpp_function_body(signature: str) -> str:
    text = (TEMPLATES / "common.cuh.j2").read_text()
    m = re.search(re.escape(signature).replace(r"\ ", r"\s*") + r"\s*\{\s*return (.*?);\s*\}",
                  text, re.S)
    assert m, f"{signature} not found in common.cuh.j2"
    return m.group(1)


def cpp_slot_row_expression() -> str:
    return cpp_function_body("long long slot_row(int peer, int round, int buffer, long long row, "
                             "int capacity)")


def test_template_slot_offset_goes_through_slot_row():
    body = " ".join(cpp_function_body("long long slot_offset(int peer, int round, int buffer, "
                                      "int e, int row, int capacity)").split())
    assert body == ("slot_row(peer, round, buffer, static_cast<long long>(e) * capacity + row, "
                    "capacity)")
    expr = " ".join(cpp_slot_row_expression().split())
    assert expr.endswith("capacity + row) * HIDDEN")


def test_template_slot_row_equals_python():
    """Evaluate the C++ expression (integer arithmetic only) and compare with Python."""
    expr = cpp_slot_row_expression().replace("static_cast<long long>(peer)", "peer")
    assert re.fullmatch(r"[\sA-Za-z_()*+0-9]+", expr), expr  # plain integer arithmetic
    code = compile(expr, "slot_row", "eval")
    for lay in LAYOUTS:
        for peer, rnd, buf, e, row in coords(lay):
            env = {"peer": peer, "round": rnd, "buffer": buf, "row": e * lay.capacity + row,
                   "capacity": lay.capacity, "LOCAL_EXPERTS": lay.local_experts,
                   "HIDDEN": lay.hidden}
            assert eval(code, {"__builtins__": {}}, env) == lay.offset(peer, rnd, buf, e, row)


def test_template_kernels_use_the_documented_slots():
    text = (TEMPLATES / "layout.cu.j2").read_text()
    # Dispatch (permute): round 0, incoming buffer for this rank's own experts, else staging.
    assert re.search(r"const int buffer = \(d == self_rank\) \? 1 : 0;", text)
    assert (INCOMING, STAGING) == (1, 0)
    assert re.search(r"slot_row\(d, 0, buffer, expert_row0\(row_off, e, capacity\) \+ p, "
                     r"capacity\)", text)
    # Combine: results come back into round 1, incoming buffer, of the expert's rank slot.
    assert re.search(r"slot_row\(e / LOCAL_EXPERTS, 1, 1, expert_row0\(row_off, e, capacity\) \+ p,"
                     r"\s*capacity\)", text)
    # Without a table an expert's rows start at e_local * C (the expert-slot layout).
    common = (TEMPLATES / "common.cuh.j2").read_text()
    assert "row_off != nullptr ? row_off[e] : (e % LOCAL_EXPERTS) * capacity" in common


# ---- row offsets and runs (packed vs expert slots) -----------------------------------------
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("P,el,cap", [(1, 4, 16), (2, 4, 32), (4, 2, 64), (2, 32, 128)])
def test_row_offsets_place_rows_disjointly_inside_the_slot(packed, P, el, cap):
    rng = np.random.default_rng(P * 100 + el)
    rows = rng.integers(0, cap + 1, size=(P, P * el))
    rows[0, 0] = cap  # a full expert and an empty one
    rows[-1, -1] = 0
    offs = row_offsets(rows, cap, el, packed)
    assert offs.shape == rows.shape and offs.dtype == np.int32
    for s, d in itertools.product(range(P), range(P)):
        taken = np.zeros(el * cap, bool)
        for j in range(el):
            r0, n = offs[s, d * el + j], rows[s, d * el + j]
            assert 0 <= r0 and r0 + n <= el * cap
            assert not taken[r0:r0 + n].any()
            taken[r0:r0 + n] = True
            if not packed:
                assert r0 == j * cap


@pytest.mark.parametrize("chunks", [[(0, 8)], [(0, 3), (3, 8)]])
def test_packed_slots_give_one_run_per_peer_and_chunk(chunks):
    rng = np.random.default_rng(7)
    P, el, cap = 2, 8, 64
    rows = rng.integers(1, cap, size=(P, P * el))
    packed, expert = row_offsets(rows, cap, el, True), row_offsets(rows, cap, el, False)
    for s, d in itertools.product(range(P), range(P)):
        for e0, e1 in chunks:
            cols = slice(d * el + e0, d * el + e1)
            runs = contiguous_runs(packed[s, cols], rows[s, cols])
            assert runs == [(int(packed[s, d * el + e0]), int(rows[s, cols].sum()))]
            assert len(contiguous_runs(expert[s, cols], rows[s, cols])) == e1 - e0


def test_contiguous_runs_merge_only_touching_rows():
    assert contiguous_runs([0, 5, 9, 20], [5, 4, 0, 3]) == [(0, 9), (20, 3)]
    assert contiguous_runs([0, 64, 128], [64, 64, 10]) == [(0, 138)]  # full expert slots touch
    assert contiguous_runs([0, 64], [10, 10]) == [(0, 10), (64, 10)]
    assert contiguous_runs([], []) == []


def test_row_offsets_reject_rows_beyond_capacity():
    with pytest.raises(ValueError, match="capacity"):
        row_offsets(np.array([[3, 70]]), 64, 2, True)
