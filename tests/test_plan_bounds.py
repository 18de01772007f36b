"""Every GEMM launch of every schedule stays inside the buffers the runtime allocates (and
the export, where it allocates them itself): each plan expression evaluated with every
buffer at its own far-apart base, ``locate_group`` walked for every group at the most rows
the launch may see, and the furthest element of A, B and C checked against the buffer's
size. (A fused export once held one activation slot where its launches wrote P.)"""

from __future__ import annotations

import dataclasses

import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.executor import SYMBOLS, python_launcher
from flashmoe_gen.export import export_cu
from flashmoe_gen.plan import Gemms, build_plan, fixed_slots
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.signatures import GEMM
from flashmoe_gen.tiles import GemmTile

P4 = MoEProblem(64, 96, 8, 2, shared_experts=1, shared_intermediate=64, world_size=4,
                tokens_per_rank=24)
SYNC = GemmTile(64, 64, 64, 2, 2, 3)
WS = GemmTile(32, 64, 64, 4, 1, 4, "ws")
BUFFERS = ("layout", "act", "gathered", "w1", "w3", "w2", "sw1", "sw3", "sw2", "x",
           "shared_act", "shared_out", "counts", "row_off", "gcounts")
SHIFT = 40  # buffer k starts at (k + 1) << SHIFT: an offset never reaches the next base
INT32 = ("counts", "row_off", "gcounts")


def sizes(p: MoEProblem, cfg: KernelConfig, cap: int, tokens: int) -> dict[str, int]:
    """Elements of each buffer as runtime.FlashMoE allocates it (slots at capacity ``cap``,
    per-token buffers for ``tokens``)."""
    P, el, h, i, w = p.world_size, p.local_experts, p.hidden, p.intermediate, p.shared_width
    return {"layout": 4 * P * el * cap * h,
            "act": (P if cfg.fuse_sources else 1) * el * cap * i,
            "gathered": el * P * cap * h if cfg.gather_experts else 0,
            "w1": el * i * h, "w3": el * i * h, "w2": el * h * i,
            "sw1": w * h, "sw3": w * h, "sw2": h * w,
            "x": tokens * h, "shared_act": tokens * w, "shared_out": tokens * h,
            "counts": P * p.experts, "row_off": P * p.experts, "gcounts": el}


def _where(addr: int) -> tuple[str, int]:
    """(buffer, element offset) of an address the evaluated expressions gave."""
    name = BUFFERS[(addr >> SHIFT) - 1]
    off = addr & ((1 << SHIFT) - 1)
    return name, off // (4 if name in INT32 else 2)


def check_launches(p: MoEProblem, cfg: KernelConfig, allocated=sizes) -> int:
    """Walk every group of every GEMM launch for every source against ``allocated``
    (``sizes``'s arguments, result); returns the launches checked."""
    P = p.world_size
    graph = cfg.mode == "graph"
    cap = fixed_slots(p, cfg).capacity if graph else 40
    tokens = p.tokens_per_rank
    size = allocated(p, cfg, cap, tokens)
    env = {n: (k + 1) << SHIFT for k, n in enumerate(BUFFERS)}
    env |= dict(cap=cap, tokens=tokens, max_rows=lambda *a: cap, max_remote_rows=lambda: cap,
                max_all_rows=lambda: cap, max_gathered_rows=lambda: (P - 1) * cap)
    assert set(SYMBOLS) <= set(env) | {"me", "src"}
    checked = 0
    for op in build_plan(p, cfg).ops:
        if not isinstance(op, Gemms):
            continue
        for me in range(P):
            for src in range(P):
                env |= dict(me=me, src=src)
                for g_launch in op.launches:
                    rows, n, args = python_launcher(g_launch)(env)
                    a = dict(zip(GEMM.names, (int(v) for v in args), strict=True))
                    _check_groups(p, g_launch.groups, rows, n, a, size, cap, op.what)
                    checked += 1
    return checked


def _check_groups(p, groups, rows, n, a, size, cap, what) -> None:
    k, inner = a["K"], a["inner_groups"]
    el = p.local_experts
    for z in range(groups):
        outer, g = (z // inner, z % inner) if inner > 0 else (0, z)
        if inner > 0 and outer == a["skip_outer"]:
            continue
        gi = outer * a["counts_outer_stride"] + g
        m = min(rows, a["count_cap"]) if a["counts"] else a["rows_fixed"]
        if a["counts"]:
            buf, off = _where(a["counts"])
            assert off + gi < size[buf], (what, "counts", gi)
        for ptr, row_off, stride, outer_stride, width in (
                ("A", a["a_row_off"], a["a_group_stride"], a["a_outer_stride"], k),
                ("C", a["c_row_off"], a["c_group_stride"], a["c_outer_stride"], n)):
            buf, base = _where(a[ptr])
            if row_off:  # a packed slot: its rows end by the slot's end (el * cap rows)
                end = base + outer * outer_stride + el * cap * width
            else:
                end = base + outer * outer_stride + g * stride + m * width
            assert end <= size[buf], (what, ptr, buf, z, end, size[buf])
        for b in ("B0", "B1"):
            if a[b]:
                buf, base = _where(a[b])
                assert base + g * a["b_group_stride"] + n * k <= size[buf], (what, b, z)


def _configs():
    fused = KernelConfig(SYNC, SYNC, fuse_sources=True, packed_slots=True)
    yield "per_source", KernelConfig(SYNC, SYNC, chunks_per_peer=2, packed_slots=True)
    yield "per_source_expert_slots", KernelConfig(SYNC, SYNC)
    yield "fused", fused
    yield "fused_graph", dataclasses.replace(fused, mode="graph")
    yield "fused_ws", KernelConfig(WS, WS, fuse_sources=True)
    yield "own_split", dataclasses.replace(fused, own_split=True)
    yield "own_stream", dataclasses.replace(fused, own_split=True, own_stream=True)
    yield "gather", dataclasses.replace(fused, gather_experts=True)
    yield "gather_own_split", dataclasses.replace(fused, own_split=True, gather_experts=True)


@pytest.mark.parametrize("name,cfg", list(_configs()), ids=[n for n, _ in _configs()])
def test_every_launch_stays_inside_its_buffers(name, cfg):
    cfg.validate(P4)
    assert check_launches(P4, cfg) > 0


def test_a_buffer_one_slot_short_is_caught():
    """Control: fused launches against the one act slot the export once allocated."""
    cfg = KernelConfig(SYNC, SYNC, fuse_sources=True, packed_slots=True)

    def short(p, c, cap, tokens):
        return sizes(p, c, cap, tokens) | {"act": p.local_experts * cap * p.intermediate}

    with pytest.raises(AssertionError, match="act"):
        check_launches(P4, cfg, short)


@pytest.mark.parametrize("name,cfg", [c for c in _configs() if c[0] in ("fused", "own_stream",
                                                                          "per_source")])
def test_the_export_allocates_what_the_runtime_does(name, cfg):
    text = export_cu(P4, cfg)
    act_sources = P4.world_size if cfg.fuse_sources else 1
    assert f"constexpr int ACT_SOURCES = {act_sources};" in text
    assert "cudaMalloc(&L->act, sizeof(elem) * ACT_SOURCES * LOCAL_EXPERTS * capacity" in text
    assert "const long long slots = 4LL * L->world * LOCAL_EXPERTS * capacity * HIDDEN;" in text
