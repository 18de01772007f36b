"""Transport "nvlink" host side on the CPU: heap offsets and the kernel's arguments."""

from __future__ import annotations

import types

import numpy as np

from flashmoe_gen.layout import SymmetricLayout
from flashmoe_gen.persistent import ALIGN, HeapLayout, PersistentForward
from flashmoe_gen.signatures import PERSISTENT


def test_heap_sections_follow_the_layout_aligned():
    lay = SymmetricLayout(world_size=4, local_experts=3, capacity=100, hidden=520)
    h = HeapLayout(lay)
    assert h.counts_off >= lay.elements * 2 and h.counts_off % ALIGN == 0
    assert h.flags_off >= h.counts_off + 4 * 3 * 4 and h.flags_off % ALIGN == 0
    assert h.nbytes >= h.flags_off + 2 * 4 * 8 and h.nbytes % ALIGN == 0
    # The kernel indexes the flags as u64 [2][P] from flags_off: 8-byte aligned.
    assert h.flags_off % 8 == 0


def test_launch_arguments_name_every_parameter():
    """The launch passes each of the kernel's parameters once, packed in signature order."""
    arr = np.zeros(1)
    tok = types.SimpleNamespace(topk_idx=arr, topk_w=arr, pos=arr, shared_act=arr,
                                shared_out=arr)
    w = types.SimpleNamespace(expert_bias=None, w1=arr, w3=arr, w2=arr, sw1=arr, sw3=arr,
                              sw2=arr, shared_gate=None)
    layer = types.SimpleNamespace(_tok=tok, weights=w, w_gate=arr, rank=2)
    pf = object.__new__(PersistentForward)
    lay = HeapLayout(SymmetricLayout(4, 2, 16, 64))
    pf.layer, pf.counts, pf.act, pf.peers, pf.state = layer, arr, arr, arr, arr
    pf.heap = types.SimpleNamespace(base=4096)
    pf.heap_layout, pf.capacity, pf.spin_limit, pf.status_dev = lay, 16, 10**9, 8192
    args = pf.arguments(arr, 7, arr)
    assert set(args) == set(PERSISTENT.names)
    packed = PERSISTENT.pack(args)
    assert len(packed) == len(PERSISTENT.names)
    assert packed[PERSISTENT.names.index("self_rank")] == 2
    assert packed[PERSISTENT.names.index("flags_off")] == lay.flags_off
    assert packed[PERSISTENT.names.index("bias")] == 0  # no expert bias: a null pointer
