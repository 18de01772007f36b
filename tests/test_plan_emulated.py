"""Every schedule knob, end to end on the CPU: the runtime's own executor (``executor.Run``)
runs a plan on P simulated ranks whose "device memory" is NumPy memory (a pointer is its
real address), with NumPy stand-ins of the kernels (the GEMMs' group, row-offset and outer
arithmetic ported from ``locate_group``) and of NCCL (sends and receives paired per peer in
order). The outputs must match the float64 reference. This checks the plan's data flow —
slots, row offsets, transfers (grouped, to self), fused launches — not the kernels' math.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.executor import Run, python_launcher
from flashmoe_gen.layout import SymmetricLayout
from flashmoe_gen.plan import Gemms, build_plan, fixed_slots
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error, route
from flashmoe_gen.render import kernel_names
from flashmoe_gen.runtime import _SlotBuffers, _TokenBuffers
from flashmoe_gen.signatures import GEMM
from flashmoe_gen.tiles import GemmTile
from flashmoe_gen.weights import MoEWeights, random_tokens


class Arr:
    """A device array stand-in: NumPy memory; ``data.ptr`` is its address."""

    def __init__(self, a: np.ndarray):
        self.a = a
        self.data = type("Mem", (), {})()
        self.data.ptr = a.ctypes.data
        self.data.copy_from_host_async = self._from_host

    def _from_host(self, host_ptr: int, nbytes: int, stream=None) -> None:
        ctypes.memmove(self.a.ctypes.data, host_ptr, nbytes)

    shape = property(lambda self: self.a.shape)
    size = property(lambda self: self.a.size)
    dtype = property(lambda self: self.a.dtype)

    def get(self, stream=None, out=None):
        if out is None:
            return self.a.copy()
        out[...] = self.a
        return out

    def __getitem__(self, i):
        return Arr(self.a[i])

    def fill(self, v) -> None:
        self.a.fill(v)


def at(ptr: int, dtype, count: int) -> np.ndarray:
    """``count`` elements of ``dtype`` at device address ``ptr`` (writable)."""
    nbytes = count * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype)


def addr(v) -> int:
    if v is None:
        return 0
    return v.data.ptr if isinstance(v, Arr) else int(v)


class Event:
    done = True

    def synchronize(self) -> None:
        pass


class Stream:
    def record(self, stream=None) -> Event:
        return Event()

    def wait_event(self, ev) -> None:
        pass


class World:
    """NCCL stand-in for all ranks: sends copy their bytes when posted; a receive takes the
    next send of its (source, destination) pair when ``resolve`` runs (after every rank
    issued the operation)."""

    def __init__(self, layers):
        self.layers = layers
        self.sends: dict = defaultdict(list)
        self.recvs: dict = defaultdict(list)

    def resolve(self) -> None:
        for key, recvs in self.recvs.items():
            sends = self.sends[key]
            assert len(sends) == len(recvs), (key, len(sends), len(recvs))
            for data, (ptr, nbytes) in zip(sends, recvs, strict=True):
                assert len(data) == nbytes, (key, len(data), nbytes)
                ctypes.memmove(ptr, data, nbytes)
        self.sends.clear()
        self.recvs.clear()


class Comm:
    def __init__(self, world: World, rank: int, size: int):
        self.world, self.rank, self.world_size = world, rank, size
        self.streams = [Stream() for _ in range(4)]

    def allgather_bytes(self, send_ptr, recv_ptr, nbytes, stream, which=0) -> None:
        # Every rank routed before any exchanges counts (the ranks run in lock step).
        for q, layer in enumerate(self.world.layers):
            ctypes.memmove(recv_ptr + q * nbytes, layer.counts.a[q].ctypes.data, nbytes)

    def wait(self, ev, what) -> None:
        pass

    def group(self):
        return nullcontext()

    def send(self, ptr, nbytes, peer, stream, which=0) -> None:
        self.world.sends[(self.rank, peer)].append(bytes(at(ptr, np.uint8, nbytes)))

    def recv(self, ptr, nbytes, peer, stream, which=0) -> None:
        self.world.recvs[(peer, self.rank)].append((ptr, nbytes))


def _f64(bits: np.ndarray) -> np.ndarray:
    return bf16.from_bits(bits).astype(np.float64)


def _bits(v: np.ndarray) -> np.ndarray:
    return bf16.to_bits(v.astype(np.float32))


class Layer:
    """The attributes and launch methods ``executor.Run`` uses, over NumPy memory."""

    def __init__(self, p: MoEProblem, cfg: KernelConfig, rank: int, w: MoEWeights,
                 comm: Comm | None):
        self.problem, self.config, self.rank, self.comm = p, cfg, rank, comm
        self.plan = build_plan(p, cfg)
        self.kernels = kernel_names(cfg)
        self._launchers = {id(g): python_launcher(g) for op in self.plan.ops
                           if isinstance(op, Gemms) for g in op.launches}
        mine = w.for_rank(p, rank)
        t = np.ascontiguousarray
        self.keep = [  # device layouts: B[g] is [N][K] row-major
            Arr(t(mine.w1.transpose(0, 2, 1))), Arr(t(mine.w3.transpose(0, 2, 1))),
            Arr(t(mine.w2.transpose(0, 2, 1))),
            Arr(t(np.concatenate(list(mine.shared_w1), 1).T)) if p.shared_experts else None,
            Arr(t(np.concatenate(list(mine.shared_w3), 1).T)) if p.shared_experts else None,
            Arr(t(np.concatenate(list(mine.shared_w2), 0).T)) if p.shared_experts else None]
        self._weight_ptrs = {n: addr(a) for n, a in zip(("w1", "w3", "w2", "sw1", "sw3", "sw2"),
                                                          self.keep, strict=True)}
        self.w_gate, self.gate_bits = Arr(w.gate.copy()), w.gate
        self._router_part, self._router_done = Arr(np.zeros(1, np.float32)), \
            Arr(np.zeros(1, np.uint32))  # the split router's (the router is emulated whole)
        self.weights = type("W", (), {"expert_bias": None, "shared_gate": None})()
        self.stream, self.shared_stream = Stream(), Stream()
        self.counts = Arr(np.zeros((p.world_size, p.experts), np.int32))
        self.row_off = Arr(np.zeros((p.world_size, p.experts), np.int32))
        self._counts_host = np.zeros(self.counts.a.nbytes, np.uint8)
        self._row_off_host = np.zeros(self.row_off.a.nbytes, np.uint8)
        self.gcounts = Arr(np.zeros(p.local_experts, np.int32))
        self._gcounts_host = np.zeros(self.gcounts.a.nbytes, np.uint8)
        self._dropped_host, self.capacity, self._buf = 0, 0, None
        self.fixed = fixed_slots(p, cfg)
        self._region = Arr(np.array(self.fixed.region, np.int32))
        self._dropped = Arr(np.zeros(1, np.int32))
        if cfg.mode == "graph":
            self._slot_buffers(self.fixed.capacity)

    def _token_buffers(self, tokens: int) -> _TokenBuffers:
        p, t = self.problem, max(tokens, 1)
        poison = np.full((t, p.hidden), 0xFFFF, np.uint16)
        return _TokenBuffers(t, Arr(np.full((t, p.top_k), -1, np.int32)),
                             Arr(np.full((t, p.top_k), np.nan, np.float32)),
                             Arr(np.full((t, p.top_k), -1, np.int32)),
                             Arr(np.full((t, p.shared_width), 0xFFFF, np.uint16)),
                             Arr(poison))

    def _slot_buffers(self, capacity: int) -> _SlotBuffers:
        p = self.problem
        if self._buf is None or self._buf.capacity < capacity:
            lay = SymmetricLayout(p.world_size, p.local_experts, capacity, p.hidden)
            act = (p.world_size if self.config.fuse_sources else 1, p.local_experts, capacity,
                   p.intermediate)
            gathered = (p.local_experts, p.world_size * capacity, p.hidden)
            self._buf = _SlotBuffers(lay, Arr(np.full(lay.shape, 0xFFFF, np.uint16)),
                                     Arr(np.full(act, 0xFFFF, np.uint16)),
                                     Arr(np.full(gathered, 0xFFFF, np.uint16))
                                     if self.config.gather_experts else None)
        return self._buf

    def _copy(self, dst: int, src: int, nbytes: int, stream) -> None:
        ctypes.memmove(dst, src, nbytes)

    # -- kernels ---------------------------------------------------------------------------
    def _launch(self, kernel: str, signature, grid, threads, stream, **args) -> None:
        k = self.kernels
        fn = {k.router: self._router, k.positions: self._positions, k.permute: self._permute,
              k.combine: self._combine, k.slot_offsets: self._slot_offsets}[kernel]
        fn(**{n: (v if n in ("tokens", "capacity", "self_rank", "world", "packed") else addr(v))
              for n, v in args.items()})

    def _router(self, x, wg, bias, tokens, topk_idx, topk_w, part, done) -> None:
        p = self.problem
        rt = route(p, at(x, np.uint16, tokens * p.hidden).reshape(tokens, p.hidden),
                   self.gate_bits)
        at(topk_idx, np.int32, tokens * p.top_k)[:] = rt.topk_idx.ravel()
        at(topk_w, np.float32, tokens * p.top_k)[:] = rt.topk_w.ravel()

    def _positions(self, topk_idx, tokens, pos, counts) -> None:
        p = self.problem
        idx = at(topk_idx, np.int32, tokens * p.top_k)
        out, cnt = at(pos, np.int32, tokens * p.top_k), at(counts, np.int32, p.experts)
        cnt[:] = 0
        for a, e in enumerate(idx):  # token order, then choice: the kernel's rank
            out[a] = cnt[e]
            cnt[e] += 1

    def _row0(self, row_off: int, e: int, capacity: int) -> int:
        p = self.problem
        return int(at(row_off, np.int32, p.experts)[e]) if row_off else \
            (e % p.local_experts) * capacity

    def _slot_row(self, peer, rnd, buf, row, capacity) -> int:
        p = self.problem
        return (((peer * 2 + rnd) * 2 + buf) * p.local_experts * capacity + row) * p.hidden

    def _permute(self, x, topk_idx, pos, tokens, capacity, self_rank, row_off, layout) -> None:
        p = self.problem
        idx, ps = at(topk_idx, np.int32, tokens * p.top_k), at(pos, np.int32, tokens * p.top_k)
        xs = at(x, np.uint16, tokens * p.hidden)
        for a in range(tokens * p.top_k):
            if ps[a] >= capacity:
                continue
            e = int(idx[a])
            d = e // p.local_experts
            r = self._slot_row(d, 0, int(d == self_rank), self._row0(row_off, e, capacity)
                               + int(ps[a]), capacity)
            t = a // p.top_k
            at(layout + 2 * r, np.uint16, p.hidden)[:] = xs[t * p.hidden:(t + 1) * p.hidden]

    def _slot_offsets(self, counts, world, capacity, region, packed, self_rank, row_off,
                      dropped) -> None:
        p = self.problem
        c = at(counts, np.int32, world * p.experts)
        reg = at(region, np.int32, 2 * p.local_experts)
        out = at(row_off, np.int32, world * p.experts)
        for i in range(world * p.experts):
            j = (i % p.experts) % p.local_experts
            off = j * capacity
            if packed:
                off = int(reg[2 * j + 1]) + sum(min(int(c[i - j + q]), capacity)
                                                for q in range(int(reg[2 * j]), j))
            out[i] = off
        mine = c[self_rank * p.experts:(self_rank + 1) * p.experts]
        at(dropped, np.int32, 1)[0] = int(np.maximum(mine - capacity, 0).sum())

    def _combine(self, topk_idx, topk_w, pos, tokens, capacity, row_off, layout, shared_out,
                 x, sgate_w, out) -> None:
        p, h = self.problem, self.problem.hidden
        idx, ws = at(topk_idx, np.int32, tokens * p.top_k), at(topk_w, np.float32,
                                                                tokens * p.top_k)
        ps = at(pos, np.int32, tokens * p.top_k)
        y = at(out, np.uint16, tokens * h).reshape(tokens, h)
        for t in range(tokens):
            acc = _f64(at(shared_out + 2 * t * h, np.uint16, h)) if shared_out else np.zeros(h)
            for j in range(p.top_k):
                a = t * p.top_k + j
                if ps[a] >= capacity:
                    continue
                e = int(idx[a])
                r = self._slot_row(e // p.local_experts, 1, 1,
                                   self._row0(row_off, e, capacity) + int(ps[a]), capacity)
                acc = acc + float(ws[a]) * _f64(at(layout + 2 * r, np.uint16, h))
            y[t] = _bits(acc)

    def _launch_gemm(self, gated: bool, rows: int, groups: int, n: int, args: tuple,
                     stream) -> None:
        if rows <= 0 or groups <= 0:
            return
        a = dict(zip(GEMM.names, (addr(v) for v in args), strict=True))
        k, inner, skip = a["K"], a["inner_groups"], a["skip_outer"]
        for z in range(groups):  # locate_group, for every (outer, group) of the launch
            outer, g = (z // inner, z % inner) if inner > 0 else (0, z)
            if inner > 0 and outer == skip:
                continue
            gi = outer * a["counts_outer_stride"] + g
            aro, cro = a["a_row_off"], a["c_row_off"]
            A = a["A"] + 2 * (outer * a["a_outer_stride"] + (
                int(at(aro, np.int32, gi + 1)[gi]) * k if aro else g * a["a_group_stride"]))
            C = a["C"] + 2 * (outer * a["c_outer_stride"] + (
                int(at(cro, np.int32, gi + 1)[gi]) * n if cro else g * a["c_group_stride"]))
            m = min(int(at(a["counts"], np.int32, gi + 1)[gi]), a["count_cap"]) \
                if a["counts"] else a["rows_fixed"]
            if m <= 0:
                continue
            x = _f64(at(A, np.uint16, m * k)).reshape(m, k)

            b0, b1 = (a[b] + 2 * g * a["b_group_stride"] for b in ("B0", "B1"))
            h = x @ _f64(at(b0, np.uint16, n * k)).reshape(n, k).T  # B[g]: [N][K]
            if gated:
                h = h / (1 + np.exp(-h)) * (x @ _f64(at(b1, np.uint16, n * k)).reshape(n, k).T)
            at(C, np.uint16, m * n)[:] = _bits(h).ravel()


def emulate(p: MoEProblem, cfg: KernelConfig, w: MoEWeights, xs: list[np.ndarray]):
    """Every rank's output of one forward, the ranks' operations in lock step."""
    layers: list[Layer] = []
    world = World(layers)
    for r in range(p.world_size):
        layers.append(Layer(p, cfg, r, w, Comm(world, r, p.world_size)))
    outs = [Arr(np.full((max(len(x), 1), p.hidden), 0xFFFF, np.uint16)) for x in xs]
    xa = [Arr(x.copy()) for x in xs]
    runs = [Run(layer, xa[r], len(xs[r]), outs[r], "all") for r, layer in enumerate(layers)]
    for i in range(len(layers[0].plan.ops)):
        for run, layer in zip(runs, layers, strict=True):
            run.step(layer.plan.ops[i])
        world.resolve()
    return [o.a[:len(x)] for o, x in zip(outs, xs, strict=True)], layers


P4 = MoEProblem(64, 48, 8, 2, shared_experts=1, shared_intermediate=32, world_size=4,
                tokens_per_rank=24)
SYNC = (GemmTile(64, 64, 64, 2, 2, 3), GemmTile(64, 64, 64, 2, 2, 3))
WS = (GemmTile(32, 64, 64, 4, 1, 4, "ws"), GemmTile(32, 64, 64, 4, 1, 4, "ws"))
KNOBS = list(itertools.product(("host", "graph"), (False, True), (True, False), (1, 2), (1, 2),
                               (True, False)))


@pytest.mark.parametrize("tiles", [SYNC, WS], ids=["sync", "ws"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["exact", "capped"])
def test_every_schedule_matches_the_reference(tiles, capacity_factor):
    """All knob combinations (mode, fused sources — with weight-streaming tiles this rank's
    tokens join the launch and its results move to itself by copy or send/recv —, overlap,
    chunks, streams, packed slots) on ragged ranks, one with no tokens."""
    p = P4.replace(capacity_factor=capacity_factor)
    w = MoEWeights.random(p, 3)
    xs = [random_tokens(t, p.hidden, seed=40 + r) for r, t in enumerate((24, 7, 0, 13))]
    for mode, fuse, overlap, chunks, streams, packed in KNOBS:
        cfg = KernelConfig(*tiles, router_tokens_per_block=8, chunks_per_peer=chunks,
                           comm_streams=streams, overlap=overlap, fuse_sources=fuse,
                           packed_slots=packed, mode=mode)
        outs, layers = emulate(p, cfg, w, xs)
        cap = layers[0].capacity if capacity_factor else None
        if mode == "graph":
            cap = layers[0].fixed.capacity if capacity_factor else None
        ref = moe_reference(p, xs, w, capacity=cap)
        for r, (out, want) in enumerate(zip(outs, ref.out, strict=True)):
            if len(want):
                err = relative_error(_f64(out), want)
                assert err < 2e-2, (cfg.name, r, err)


def test_the_emulation_catches_a_wrong_schedule():
    """Control: the fused weight-streaming plan without its step-0 transfer leaves this
    rank's results in the staging slot, and the emulation sees the wrong output."""
    p = P4
    w = MoEWeights.random(p, 3)
    xs = [random_tokens(t, p.hidden, seed=40 + r) for r, t in enumerate((24, 7, 0, 13))]
    cfg = KernelConfig(*WS, router_tokens_per_block=8, fuse_sources=True, packed_slots=True)
    from flashmoe_gen.plan import TransferGroup

    original = Layer.__init__

    def init(self, *a, **k):
        original(self, *a, **k)
        ops = tuple(dataclasses.replace(op, transfers=tuple(t for t in op.transfers if t.step))
                    if isinstance(op, TransferGroup) else op for op in self.plan.ops)
        assert ops != self.plan.ops  # the step-0 transfer was there
        self.plan = dataclasses.replace(self.plan, ops=ops)

    Layer.__init__ = init
    try:
        outs, _ = emulate(p, cfg, w, xs)
    finally:
        Layer.__init__ = original
    ref = moe_reference(p, xs, w)
    assert relative_error(_f64(outs[0]), ref.out[0]) > 0.1


def test_split_groups_give_the_same_outputs(monkeypatch):
    """``$FLASHMOE_MAX_GROUP_OPS`` = 1 (every NCCL operation its own group, split alike on
    every rank): fused sources with expert slots still match the reference."""
    monkeypatch.setenv("FLASHMOE_MAX_GROUP_OPS", "1")
    w = MoEWeights.random(P4, 3)
    xs = [random_tokens(t, P4.hidden, seed=40 + r) for r, t in enumerate((24, 7, 0, 13))]
    cfg = KernelConfig(*WS, router_tokens_per_block=8, fuse_sources=True, packed_slots=False)
    outs, _ = emulate(P4, cfg, w, xs)
    ref = moe_reference(P4, xs, w)
    for out, want in zip(outs, ref.out, strict=True):
        if len(want):
            assert relative_error(_f64(out), want) < 2e-2


@pytest.mark.parametrize("own_stream", [False, True], ids=["main_stream", "own_stream"])
@pytest.mark.parametrize("mode", ["host", "graph"])
def test_own_split_matches_the_reference(mode, own_stream):
    """own_split: this rank's tokens for half the local experts before the fused launch,
    half after it (while the combine is in flight); same outputs, chunked or not."""
    p = P4
    w = MoEWeights.random(p, 5)
    xs = [random_tokens(t, p.hidden, seed=60 + r) for r, t in enumerate((24, 7, 0, 13))]
    ref = moe_reference(p, xs, w)
    for chunks, streams, packed in itertools.product((1, 2), (1, 2), (True, False)):
        cfg = KernelConfig(*SYNC, router_tokens_per_block=8, chunks_per_peer=chunks,
                           comm_streams=streams, fuse_sources=True, packed_slots=packed,
                           mode=mode, own_split=True, own_stream=own_stream)
        outs, layers = emulate(p, cfg, w, xs)
        own = [op for op in layers[0].plan.ops if isinstance(op, Gemms) and op.step == 0]
        assert len(own) == 2 and "[0, 1)" in own[0].what and "[1, 2)" in own[1].what
        for r, (out, want) in enumerate(zip(outs, ref.out, strict=True)):
            if len(want):
                err = relative_error(_f64(out), want)
                assert err < 2e-2, (cfg.name, r, err)


def test_gathered_experts_match_the_reference():
    """gather_experts: each local expert's peer rows land back to back (one group per
    expert; NCCL operations per (peer, expert) on both sides), the down results leave from
    there; with own_split or not, chunked or not, one or two streams, packed or expert
    slots, capped or exact, on ragged ranks, one with no tokens."""
    w = MoEWeights.random(P4, 7)
    xs = [random_tokens(t, P4.hidden, seed=80 + r) for r, t in enumerate((24, 7, 0, 13))]
    for own_split, chunks, streams, packed, factor in itertools.product(
            (False, True), (1, 2), (1, 2), (True, False), (None, 1.0)):
        p = P4.replace(capacity_factor=factor)
        cfg = KernelConfig(*SYNC, router_tokens_per_block=8, chunks_per_peer=chunks,
                           comm_streams=streams, fuse_sources=True, packed_slots=packed,
                           own_split=own_split, gather_experts=True)
        outs, layers = emulate(p, cfg, w, xs)
        fused = [g for op in layers[0].plan.ops if isinstance(op, Gemms) and op.step is None
                 and "fused" in op.what for g in op.launches]
        assert [g.groups for g in fused] == [P4.local_experts] * 2
        ref = moe_reference(p, xs, w, capacity=layers[0].capacity if factor else None)
        for r, (out, want) in enumerate(zip(outs, ref.out, strict=True)):
            if len(want):
                err = relative_error(_f64(out), want)
                assert err < 2e-2, (cfg.name, r, err)


def test_gathered_runs_stay_apart_from_the_slots():
    """Control: landing the peers' rows at their slot offsets instead of their expert's run
    (what gather_experts replaces) leaves the fused launch reading poison."""
    from flashmoe_gen import executor

    w = MoEWeights.random(P4, 7)
    xs = [random_tokens(t, P4.hidden, seed=80 + r) for r, t in enumerate((24, 7, 0, 13))]
    cfg = KernelConfig(*SYNC, router_tokens_per_block=8, fuse_sources=True, packed_slots=True,
                       gather_experts=True)
    original = executor.Run.gathered_runs

    def slots_only(self, src, dst, slot, e0, e1):
        rank = self.layer.rank
        self.layer.rank = -1  # no rank's experts: every run at its slot offset
        try:
            return original(self, src, dst, slot, e0, e1)
        finally:
            self.layer.rank = rank

    executor.Run.gathered_runs = slots_only
    try:
        outs, _ = emulate(P4, cfg, w, xs)
    finally:
        executor.Run.gathered_runs = original
    ref = moe_reference(P4, xs, w)
    assert not relative_error(_f64(outs[0]), ref.out[0]) < 2e-2


def test_gathered_runs_split_into_groups_alike(monkeypatch):
    """gather_experts with 4 local experts and every NCCL operation its own group
    (``$FLASHMOE_MAX_GROUP_OPS`` = 1): the per-(peer, expert) operations still pair up."""
    monkeypatch.setenv("FLASHMOE_MAX_GROUP_OPS", "1")
    p = P4.replace(experts=16)
    w = MoEWeights.random(p, 9)
    xs = [random_tokens(t, p.hidden, seed=90 + r) for r, t in enumerate((24, 9, 0, 17))]
    cfg = KernelConfig(*SYNC, router_tokens_per_block=8, fuse_sources=True, packed_slots=True,
                       own_split=True, gather_experts=True, comm_streams=2)
    outs, _ = emulate(p, cfg, w, xs)
    ref = moe_reference(p, xs, w)
    for r, (out, want) in enumerate(zip(outs, ref.out, strict=True)):
        if len(want):
            assert relative_error(_f64(out), want) < 2e-2, r
