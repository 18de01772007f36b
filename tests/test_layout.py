"""SymmetricLayout: the index arithmetic of L[P][2][2][E_local][C][H], in Python and in C++."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest

from flashmoe_gen.layout import COMBINE, DISPATCH, INCOMING, STAGING, SymmetricLayout

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
    # design/symmetric-layout.md: round 0 = dispatch, 1 = combine; buffer 0 = staging, 1 = incoming
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
def cpp_slot_offset_expression() -> str:
    text = (TEMPLATES / "common.cuh.j2").read_text()
    m = re.search(r"long long slot_offset\(int peer, int round, int buffer, int e, int row,"
                  r"\s*int capacity\)\s*\{\s*return (.*?);\s*\}", text, re.S)
    assert m, "fmoe::slot_offset not found in common.cuh.j2"
    return m.group(1)


def test_template_slot_offset_nesting_order():
    text = (TEMPLATES / "common.cuh.j2").read_text()
    assert ("((((static_cast<long long>(peer) * 2 + round) * 2 + buffer) * LOCAL_EXPERTS + e) *"
            in text)
    expr = " ".join(cpp_slot_offset_expression().split())
    assert expr.endswith("capacity + row) * HIDDEN")


def test_template_slot_offset_equals_python():
    """Evaluate the C++ expression (integer arithmetic only) and compare with Python."""
    expr = cpp_slot_offset_expression().replace("static_cast<long long>(peer)", "peer")
    assert re.fullmatch(r"[\sA-Za-z_()*+0-9]+", expr), expr  # plain integer arithmetic
    code = compile(expr, "slot_offset", "eval")
    for lay in LAYOUTS:
        for peer, rnd, buf, e, row in coords(lay):
            env = {"peer": peer, "round": rnd, "buffer": buf, "e": e, "row": row,
                   "capacity": lay.capacity, "LOCAL_EXPERTS": lay.local_experts,
                   "HIDDEN": lay.hidden}
            assert eval(code, {"__builtins__": {}}, env) == lay.offset(peer, rnd, buf, e, row)


def test_template_kernels_use_the_documented_slots():
    text = (TEMPLATES / "layout.cu.j2").read_text()
    # Dispatch (permute): round 0, incoming buffer for this rank's own experts, else staging.
    assert re.search(r"const int buffer = \(d == self_rank\) \? 1 : 0;", text)
    assert (INCOMING, STAGING) == (1, 0)
    assert re.search(r"slot_offset\(d, 0, buffer, e % LOCAL_EXPERTS, p, capacity\)", text)
    # Combine: results come back into round 1, incoming buffer, of the expert's rank slot.
    assert re.search(r"slot_offset\(e / LOCAL_EXPERTS, 1, 1, e % LOCAL_EXPERTS, p, capacity\)",
                     text)
