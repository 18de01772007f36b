"""The FlashMoE layer on one rank: weights, symmetric buffers, streams, forward.

Forward, per call (design/symmetric-layout.md, "Overlap"):
route -> positions/counts -> count exchange (capacity C, row offsets) -> permute into slots ->
dispatch (grouped NCCL send/recv per peer step and chunk, on communication streams) while
the local experts and the shared experts compute -> each peer's chunk computes as it lands
and its combine send is posted at once -> weighted un-permute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arch import current_device_limits
from .compile import LoadedModule, compile_source
from .config import KernelConfig, expert_chunks
from .device_weights import DeviceWeights
from .errors import CommError, ConfigError, ProblemError
from .layout import (
    COMBINE,
    DISPATCH,
    INCOMING,
    STAGING,
    SymmetricLayout,
    contiguous_runs,
    row_offsets,
)
from .problem import MoEProblem, round_up
from .render import MOVE_WARPS, POS_THREADS, render
from .weights import MoEWeights

ELEM_BYTES = 2


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


@dataclass
class _TokenBuffers:
    """Per-token buffers, sized by the largest call so far."""

    tokens: int
    topk_idx: object
    topk_w: object
    pos: object
    shared_act: object
    shared_out: object


@dataclass
class _SlotBuffers:
    """The symmetric tensor and the expert activations, sized by capacity C.

    C only grows, and every rank grows it the same way (all see the same counts), so the
    layout's shape stays identical on every rank; a call uses the first rows of each slot.
    """

    lay: SymmetricLayout  # index arithmetic of ``tensor`` (built once per capacity)
    tensor: object  # L[P][2][2][E_local][C][H], bf16 bits
    act: object

    @property
    def capacity(self) -> int:
        return self.lay.capacity


class FlashMoE:
    """One rank's share of a distributed MoE layer (expert parallel, symmetric layout).

    ``weights``: host ``MoEWeights`` holding all experts or exactly this rank's, or
    ``DeviceWeights`` (e.g. ``DeviceWeights.from_arrays`` on user/torch tensors, or another
    layer's ``.weights`` to share them); ``None`` draws random ones from ``seed`` (each expert
    from (seed, expert id), so every rank agrees with a host reference built from the same
    seed). ``comm`` is required when ``problem.world_size > 1``. ``agree=False`` skips the
    ranks' agreement check on problem and config (the tuner agrees by broadcasting them).
    """

    def __init__(self, problem: MoEProblem, config: KernelConfig | None = None,
                 weights: MoEWeights | DeviceWeights | None = None, comm=None, seed: int = 0,
                 agree: bool = True):
        import cupy

        self.problem = problem
        self.comm = comm
        self.rank = comm.rank if comm is not None else 0
        if problem.world_size > 1 or comm is not None:
            if comm is None:
                raise CommError(f"world_size={problem.world_size} needs a Communicator "
                                "(flashmoe_gen.comm.Communicator under mpirun)")
            if comm.world_size != problem.world_size:
                raise ProblemError("world_size", problem.world_size,
                                   f"must equal the number of MPI ranks ({comm.world_size})")
            if agree:
                comm.agree("problem", problem.name)
        self.limits = current_device_limits()
        self.config = config or KernelConfig.default(problem, self.limits.arch)
        self.config.validate(problem, self.limits)
        if comm is not None:
            if agree:
                comm.agree("config", self.config.name)
            if len(comm.streams) < self.config.comm_streams:
                raise CommError(f"config wants {self.config.comm_streams} communication "
                                f"streams, the Communicator has {len(comm.streams)}")
        self.source = render(problem, self.config, arch=self.limits.arch)
        self.compiled = compile_source(self.source, self.limits.arch)
        self.kernels = self.source.kernels
        self._check_resources()
        self.module = LoadedModule(self.compiled)

        el = problem.local_experts
        self.local_range = range(self.rank * el, (self.rank + 1) * el)
        if weights is None:
            weights = MoEWeights.random(problem, seed, self.local_range)
        if not isinstance(weights, DeviceWeights):
            weights = DeviceWeights.from_host(problem, weights, self.rank)
        self.weights = weights
        w = weights
        self.w_gate, self.w1, self.w3, self.w2 = w.gate, w.w1, w.w3, w.w2
        self.sw1, self.sw3, self.sw2 = w.sw1, w.sw3, w.sw2

        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.shared_stream = cupy.cuda.Stream(non_blocking=True)
        self.counts = cupy.zeros((problem.world_size, problem.experts), np.int32)
        self._counts_host = cupy.cuda.alloc_pinned_memory(self.counts.nbytes)
        # row_off[s][e]: first row of global expert e in source s's slot (layout.row_offsets)
        self.row_off = cupy.zeros((problem.world_size, problem.experts), np.int32)
        self._row_off_host = cupy.cuda.alloc_pinned_memory(self.row_off.nbytes)
        self._tok: _TokenBuffers | None = None
        self._buf: _SlotBuffers | None = None
        self.dropped_tokens = 0
        self.capacity = 0
        self._last: tuple | None = None

    def _check_resources(self) -> None:
        """A launch that cannot fit fails on every rank alike, before any collective."""
        for which, name, tile in (("gate_up", self.kernels.gate_up, self.config.gate_up),
                                  ("down", self.kernels.down, self.config.down)):
            res = self.compiled.resources.get(name)
            if res is not None and res.registers * tile.threads > self.limits.regs_per_block:
                raise ConfigError(f"{which}.warps_n", tile.warps_n,
                                  f"{tile.threads} threads x {res.registers} registers exceed "
                                  f"{self.limits.regs_per_block} per block", self.config.name)

    # -- buffers --------------------------------------------------------------------------
    def _token_buffers(self, tokens: int) -> _TokenBuffers:
        import cupy

        b, p = self._tok, self.problem
        if b is not None and b.tokens >= tokens:
            return b
        t = max(tokens, 1)
        self._tok = _TokenBuffers(
            tokens=t,
            topk_idx=cupy.empty((t, p.top_k), np.int32),
            topk_w=cupy.empty((t, p.top_k), np.float32),
            pos=cupy.empty((t, p.top_k), np.int32),
            shared_act=cupy.empty((t, p.shared_width), np.uint16) if p.shared_experts else None,
            shared_out=cupy.empty((t, p.hidden), np.uint16) if p.shared_experts else None,
        )
        return self._tok

    def _slot_buffers(self, capacity: int) -> _SlotBuffers:
        import cupy

        b, p = self._buf, self.problem
        if b is not None and b.capacity >= capacity:
            return b
        self._buf = None  # free the old slots before taking the larger ones
        lay = SymmetricLayout(p.world_size, p.local_experts, capacity, p.hidden)
        self._buf = _SlotBuffers(
            lay=lay,
            tensor=cupy.empty(lay.shape, np.uint16),
            # Fused sources compute every peer's tokens in one launch: one act slot each.
            act=cupy.empty((p.world_size if self.config.fuse_sources else 1,
                            p.local_experts, capacity, p.intermediate), np.uint16),
        )
        return self._buf

    # -- kernels --------------------------------------------------------------------------
    def _gemm(self, gated: bool, a, a_stride: int, b0, b1, b_stride: int, c, c_stride: int,
              counts_ptr: int, cap: int, rows_fixed: int, max_rows: int, groups: int,
              n: int, k: int, stream, outer: tuple[int, int, int, int, int] | None = None,
              a_row_off: int = 0, c_row_off: int = 0) -> None:
        """One grouped GEMM launch. ``outer`` = (inner_groups, a_outer_stride,
        c_outer_stride, counts_outer_stride, skip_outer) spans several sources at once;
        ``a_row_off``/``c_row_off``: device pointers to per-group first rows (indexed like
        counts) that replace the group strides of A / C (0: use the strides)."""
        tile = self.config.gate_up if gated else self.config.down
        name = self.kernels.gate_up if gated else self.kernels.down
        if max_rows <= 0 or groups <= 0:
            return
        grid = (-(-n // tile.bn), -(-max_rows // tile.bm), groups)
        smem = self.compiled.dynamic_smem[name]
        inner, a_outer, c_outer, counts_outer, skip = outer or (0, 0, 0, 0, -1)
        with stream:
            self.module[name](grid, (tile.threads,), (
                a, _i64(a_stride), b0, b1 if b1 is not None else _i64(0), _i64(b_stride),
                c, _i64(c_stride), _i64(counts_ptr), _i32(cap), _i32(rows_fixed),
                _i32(n), _i32(k), _i32(inner), _i64(a_outer), _i64(c_outer),
                _i32(counts_outer), _i32(skip), _i64(a_row_off), _i64(c_row_off)),
                shared_mem=smem)

    def _expert_block(self, src: int, e0: int, e1: int, max_rows: int, stream) -> None:
        """Gate/up then down GEMMs of local experts [e0, e1) on the tokens from ``src``."""
        p, b = self.problem, self._buf
        lay = b.lay
        el, cap, h, i = p.local_experts, b.capacity, p.hidden, p.intermediate
        base = b.tensor.data.ptr
        # Slot bases; each expert's first row comes from the row-offset table.
        a_ptr = base + lay.slot_offset(src, DISPATCH, INCOMING) * ELEM_BYTES
        out_buf = INCOMING if src == self.rank else STAGING
        c_ptr = base + lay.slot_offset(src, COMBINE, out_buf) * ELEM_BYTES
        idx = (src * p.experts + self.rank * el + e0) * 4
        counts_ptr, off_ptr = self.counts.data.ptr + idx, self.row_off.data.ptr + idx
        act_ptr = b.act.data.ptr + e0 * cap * i * ELEM_BYTES
        self._gemm(True, _i64(a_ptr), 0, self.w1[e0:e1], self.w3[e0:e1], i * h,
                   _i64(act_ptr), cap * i, counts_ptr, cap, 0, max_rows, e1 - e0, i, h, stream,
                   a_row_off=off_ptr)
        self._gemm(False, _i64(act_ptr), cap * i, self.w2[e0:e1], None, h * i,
                   _i64(c_ptr), 0, counts_ptr, cap, 0, max_rows, e1 - e0, h, i, stream,
                   c_row_off=off_ptr)

    def _fused_remote_block(self, rows: np.ndarray, stream) -> None:
        """All remote sources' tokens for all local experts in one launch per GEMM."""
        p, b, me = self.problem, self._buf, self.rank
        el, cap, h, i, P = p.local_experts, b.capacity, p.hidden, p.intermediate, p.world_size
        lay = b.lay
        mine = rows[:, me * el:(me + 1) * el]
        max_rows = int(np.delete(mine, me, axis=0).max(initial=0))
        base = b.tensor.data.ptr
        slot_stride = lay.slot_offset(1, DISPATCH, STAGING) if P > 1 else 0  # per source
        a_ptr = base + lay.slot_offset(0, DISPATCH, INCOMING) * ELEM_BYTES
        c_ptr = base + lay.slot_offset(0, COMBINE, STAGING) * ELEM_BYTES
        counts_ptr = self.counts.data.ptr + me * el * 4
        off_ptr = self.row_off.data.ptr + me * el * 4
        act = b.act.data.ptr
        self._gemm(True, _i64(a_ptr), 0, self.w1, self.w3, i * h, _i64(act), cap * i,
                   counts_ptr, cap, 0, max_rows, P * el, i, h, stream,
                   outer=(el, slot_stride, el * cap * i, p.experts, me), a_row_off=off_ptr)
        self._gemm(False, _i64(act), cap * i, self.w2, None, h * i, _i64(c_ptr), 0,
                   counts_ptr, cap, 0, max_rows, P * el, h, i, stream,
                   outer=(el, el * cap * i, slot_stride, p.experts, me), c_row_off=off_ptr)

    def _shared(self, x, tokens: int, stream) -> None:
        p, b = self.problem, self._tok
        w = p.shared_width
        self._gemm(True, x, 0, self.sw1, self.sw3, 0, b.shared_act, 0, 0, 0, tokens, tokens,
                   1, w, p.hidden, stream)
        self._gemm(False, b.shared_act, 0, self.sw2, None, 0, b.shared_out, 0, 0, 0, tokens,
                   tokens, 1, p.hidden, w, stream)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x, out=None, *, parts: str = "all"):
        """``x``: uint16 (bf16 bits) cupy array ``[T_r, H]``; returns ``out``, same shape.

        ``out`` may be given (e.g. poisoned by a test to prove every element is written).
        ``parts`` is for benchmarks that split the layer's time: ``"comm"`` skips the expert
        and shared GEMMs, ``"compute"`` skips the token exchange; both give wrong outputs.
        """
        if parts not in ("all", "comm", "compute"):
            raise ValueError(f"parts={parts!r}: choose 'all', 'comm' or 'compute'")
        compute, communicate = parts != "comm", parts != "compute"
        import cupy

        p, cfg = self.problem, self.config
        if x.dtype != np.uint16 or x.ndim != 2 or x.shape[1] != p.hidden:
            raise ProblemError("x", f"{x.dtype}{tuple(x.shape)}",
                               f"expected uint16 (bf16 bits) [tokens, {p.hidden}]")
        x = cupy.ascontiguousarray(x)
        tokens = x.shape[0]
        s = self.stream
        s.wait_event(cupy.cuda.get_current_stream().record())
        b = self._token_buffers(tokens)
        k = p.top_k
        with s:
            if tokens:
                rw = cfg.router_tokens_per_block
                self.module[self.kernels.router]((-(-tokens // rw),), (32 * rw,), (
                    x, self.w_gate, _i32(tokens), b.topk_idx, b.topk_w))
            local_counts = self.counts[self.rank]
            self.module[self.kernels.positions]((p.experts,), (POS_THREADS,), (
                b.topk_idx, _i32(tokens), b.pos, local_counts))
        # Count exchange: every rank learns counts[source][expert] and so the capacity.
        if self.comm is not None and p.world_size > 1:
            nb = p.experts * 4
            self.comm.allgather_bytes(self.counts.data.ptr + self.rank * nb, self.counts.data.ptr,
                                      nb, s)
        host = np.frombuffer(self._counts_host, np.int32, self.counts.size).reshape(
            self.counts.shape)
        self.counts.get(stream=s, out=host)
        ev = s.record()
        if self.comm is not None:
            self.comm.wait(ev, "count exchange")
        else:
            ev.synchronize()
        counts = host.copy()
        fixed = p.fixed_capacity(cfg.block_m)
        need = fixed if fixed is not None else max(round_up(int(counts.max()), cfg.block_m),
                                                   cfg.block_m)
        # Exact mode: the allocated C >= every count, so nothing drops.
        self.dropped_tokens = int(np.maximum(counts[self.rank] - need, 0).sum())
        slots = self._slot_buffers(need)
        cap = self.capacity = slots.capacity
        rows = np.minimum(counts, cap)  # rows[src][global expert] actually sent
        offs = row_offsets(rows, cap, p.local_experts, cfg.packed_slots)
        off_host = np.frombuffer(self._row_off_host, np.int32, offs.size)
        off_host[:] = offs.ravel()  # the previous call's copy ran before the sync above
        self.row_off.data.copy_from_host_async(off_host.ctypes.data, offs.nbytes, stream=s)
        my_off = _i64(self.row_off.data.ptr + self.rank * p.experts * 4)
        if out is None:
            out = cupy.empty((tokens, p.hidden), np.uint16)
        elif out.dtype != np.uint16 or tuple(out.shape) != (tokens, p.hidden):
            raise ProblemError("out", f"{out.dtype}{tuple(out.shape)}",
                               f"expected uint16 [{tokens}, {p.hidden}]")

        with s:
            if tokens:
                self.module[self.kernels.permute]((-(-tokens * k // MOVE_WARPS),),
                                                  (32 * MOVE_WARPS,), (
                    x, b.topk_idx, b.pos, _i32(tokens), _i32(cap), _i32(self.rank), my_off,
                    slots.tensor))
        shared_ev = None
        if p.shared_experts and tokens and compute:
            ss = self.shared_stream if cfg.shared_stream and cfg.overlap else s
            ss.wait_event(s.record())
            self._shared(x, tokens, ss)
            shared_ev = ss.record()

        self._experts_and_exchange(rows, offs, s, compute, communicate)

        with s:
            if shared_ev is not None:
                s.wait_event(shared_ev)
            if tokens:
                shared = b.shared_out if p.shared_experts and compute else _i64(0)
                self.module[self.kernels.combine]((-(-tokens // MOVE_WARPS),),
                                                  (32 * MOVE_WARPS,), (
                    b.topk_idx, b.topk_w, b.pos, _i32(tokens), _i32(cap), my_off, slots.tensor,
                    shared, out))
        self._last = (b.topk_idx[:tokens], b.topk_w[:tokens], b.pos[:tokens])
        cupy.cuda.get_current_stream().wait_event(s.record())
        return out

    __call__ = forward

    def _experts_and_exchange(self, rows: np.ndarray, offs: np.ndarray, s, compute: bool = True,
                              communicate: bool = True) -> None:
        """Local experts, then each peer's chunks as they arrive; combine sends at once.

        ``rows``/``offs``: ``[P][E]`` rows sent per (source, global expert) and their first
        row in the slot; every rank holds the same tables, so sends and receives match.
        """
        p, cfg, me = self.problem, self.config, self.rank
        run_block = self._expert_block if compute else (lambda *args: None)
        el, P = p.local_experts, p.world_size
        mine = slice(me * el, (me + 1) * el)
        chunks = expert_chunks(p, cfg)
        if P == 1:
            for e0, e1 in chunks:
                run_block(me, e0, e1, int(rows[me, mine][e0:e1].max(initial=0)), s)
            return
        comm, b = self.comm, self._buf
        lay = b.lay
        base, row_bytes = b.tensor.data.ptr, p.hidden * ELEM_BYTES
        nstreams = cfg.comm_streams
        start = s.record()
        for cs in comm.streams[:nstreams]:
            cs.wait_event(start)

        def exchange(round_: int, step: int, e0: int, e1: int, which: int) -> None:
            """One grouped send/recv of experts [e0, e1) with the peers at distance step."""
            if not communicate:
                return
            to, frm = (me + step) % P, (me - step) % P
            if round_ == DISPATCH:  # my tokens to `to`; `frm`'s tokens to me
                ops = ((comm.send, me, to, lay.slot_offset(to, DISPATCH, STAGING), to),
                       (comm.recv, frm, me, lay.slot_offset(frm, DISPATCH, INCOMING), frm))
            else:  # results for `frm`'s tokens back to it; mine back from `to`
                ops = ((comm.send, frm, me, lay.slot_offset(frm, COMBINE, STAGING), frm),
                       (comm.recv, me, to, lay.slot_offset(to, COMBINE, INCOMING), to))
            cs = comm.streams[which]
            with comm.group():
                for op, src, dst, slot, peer in ops:  # (source, destination) rows of the slot
                    cols = slice(dst * el + e0, dst * el + e1)
                    for r0, n in contiguous_runs(offs[src, cols], rows[src, cols]):
                        op(base + (slot + r0 * p.hidden) * ELEM_BYTES, n * row_bytes, peer, cs,
                           which)

        plan = [(step, e0, e1) for step in range(1, P) for (e0, e1) in chunks]
        arrived = []
        for j, (step, e0, e1) in enumerate(plan):
            exchange(DISPATCH, step, e0, e1, j % nstreams)
            arrived.append(comm.streams[j % nstreams].record())
        if not cfg.overlap:  # serialized baseline: all traffic lands before any compute
            for ev in arrived:
                s.wait_event(ev)
        for e0, e1 in chunks:
            run_block(me, e0, e1, int(rows[me, mine][e0:e1].max(initial=0)), s)
        if cfg.fuse_sources:  # everything landed, then one launch for all peers
            for ev in arrived:
                s.wait_event(ev)
            if compute:
                self._fused_remote_block(rows, s)
            computed = [s.record()] * len(plan)
        else:  # each peer's chunk as soon as it lands
            computed = []
            for j, (step, e0, e1) in enumerate(plan):
                frm = (me - step) % P
                s.wait_event(arrived[j])
                run_block(frm, e0, e1, int(rows[frm, mine][e0:e1].max(initial=0)), s)
                computed.append(s.record())
        if not cfg.overlap:  # serialized: results go back only after all compute
            for cs in comm.streams[:nstreams]:
                cs.wait_event(computed[-1])
        for j, (step, e0, e1) in enumerate(plan):
            cs = comm.streams[j % nstreams]
            cs.wait_event(computed[j])
            exchange(COMBINE, step, e0, e1, j % nstreams)
        for cs in comm.streams[:nstreams]:
            s.wait_event(cs.record())

    # -- inspection -----------------------------------------------------------------------
    def poison(self, bits: int = 0xFFFF) -> None:
        """Fill every internal buffer with a NaN pattern (tests: stale data cannot pass)."""
        for bufs in (self._tok, self._buf):
            if bufs is None:
                continue
            for v in vars(bufs).values():
                if not hasattr(v, "dtype"):  # sizes, absent shared-expert buffers
                    continue
                if v.dtype.itemsize == 2:
                    v.fill(bits)
                else:  # indices and weights: -1 is never a valid value here
                    v.fill(-1)

    def last_routing(self):
        """(topk_idx [T, k] int32, topk_w [T, k] float32, pos [T, k] int32) of the last call."""
        if self._last is None:
            raise RuntimeError("forward() has not run yet")
        return self._last
