"""One forward call: the plan's operations issued on the layer's streams.

``Run`` binds the plan's symbols (``plan``/``expr``) to one call's buffers, counts and
events and executes each operation: kernels, events across the streams, the count exchange
(on the host in mode "host", on the device in mode "graph") and the NCCL transfers (the
routed rows, or fixed-size regions in mode "graph"). ``runtime.FlashMoE`` owns the buffers
and streams; ``graphs.GraphCache`` captures a ``Run`` of mode "graph" as a CUDA graph.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import numpy as np

from .errors import ArgumentError
from .layout import (
    COMBINE as COMBINE_ROUND,
)
from .layout import (
    DISPATCH,
    INCOMING,
    STAGING,
    contiguous_runs,
    row_offsets,
)
from .plan import (
    Combine,
    ExchangeCounts,
    GemmLaunch,
    Gemms,
    Permute,
    Record,
    Route,
    Transfer,
    TransferGroup,
    Wait,
    gathered_shape,
)
from .problem import ELEM_BYTES, round_up
from .render import MOVE_WARPS, POS_THREADS
from .router_layout import router_grid
from .signatures import COMBINE, GEMM, KINDS, PERMUTE, POSITIONS, ROUTER, SLOT_OFFSETS

#: The forward's symbols a plan expression may name (``plan`` module docstring).
SYMBOLS = ("me", "src", "cap", "tokens", "layout", "act", "w1", "w3", "w2", "sw1", "sw3", "sw2",
           "x", "shared_act", "shared_out", "counts", "row_off", "max_rows", "max_remote_rows",
           "max_all_rows", "gathered", "gcounts", "max_gathered_rows")


def python_launcher(launch: GemmLaunch):
    """Compile one plan GEMM launch to ``f(env) -> (rows, N, packed arguments)``: it runs on
    every call, so it reads only the symbols its expressions use and walks no tree."""
    args = ", ".join(f"_i32({a.py()})" if KINDS[p.kind][1] is np.int32 else a.py()
                     for p, (_, a) in zip(GEMM.params, launch.args, strict=True))
    body = f"({launch.rows.py()}, {launch.arg('N').py()}, ({args},))"
    used = [n for n in SYMBOLS if re.search(rf"\b{n}\b", body)]
    bind = "".join(f"    {n} = e[{n!r}]\n" for n in used)
    code = f"def f(e):\n{bind}    return {body}\n"
    scope = {"_i32": np.int32}
    exec(compile(code, "<plan launch>", "exec"), scope)  # noqa: S102 (our own expressions)
    return scope["f"]


class Run:
    """One forward call: the plan's symbols bound to this call's buffers, counts and
    events; ``step`` executes one operation of the plan."""

    def __init__(self, layer, x, tokens: int, out, parts: str):
        self.layer, self.x, self.tokens, self.out = layer, x, tokens, out
        self.compute, self.communicate = parts != "comm", parts != "compute"
        self.events: list = [None] * len(layer.plan.events)
        self.tok = b = layer._token_buffers(tokens)
        p = layer.problem
        el, me = p.local_experts, layer.rank
        self.mine = slice(me * el, (me + 1) * el)
        self.rows = self.offs = None
        self.goffs_list: list[list[int]] | None = None  # gather_experts: [source][expert]
        self.gcounts_list: list[int] = []

        def ptr(a) -> int:
            return 0 if a is None else a.data.ptr

        self.env = dict(layer._weight_ptrs, me=me, src=me, cap=0, tokens=tokens, layout=0,
                        act=0, x=ptr(x), shared_act=ptr(b.shared_act),
                        shared_out=ptr(b.shared_out), counts=layer.counts.data.ptr,
                        row_off=layer.row_off.data.ptr, max_rows=self.max_rows,
                        max_remote_rows=self.max_remote_rows, max_all_rows=self.max_all_rows,
                        gathered=0, gcounts=ptr(getattr(layer, "gcounts", None)),
                        max_gathered_rows=self.max_gathered_rows)

    # -- the count-table helpers the plan's expressions call ----------------------------------
    def max_rows(self, src: int, e0: int, e1: int) -> int:
        mine = self.mine
        return max(self.rows_list[src][mine.start + e0:mine.start + e1], default=0)

    def max_remote_rows(self) -> int:
        return self._max_over_sources(skip=self.layer.rank)

    def max_all_rows(self) -> int:
        return self._max_over_sources(skip=None)

    def max_gathered_rows(self) -> int:
        return max(self.gcounts_list, default=0)

    def _max_over_sources(self, skip: int | None) -> int:
        """The most rows any of this rank's experts gets from one source (but ``skip``)."""
        mine = self.mine
        return max((max(r[mine], default=0) for s, r in enumerate(self.rows_list)
                    if s != skip), default=0)

    def stream(self, s):
        if s.kind == "main":
            return self.layer.stream
        if s.kind == "shared":
            return self.layer.shared_stream
        return self.layer.comm.streams[s.index]

    # -- operations -----------------------------------------------------------------------------
    def step(self, op) -> None:
        """Execute one operation of the plan."""
        handler = _HANDLERS.get(type(op))
        if handler is None:
            raise TypeError(f"unknown plan operation {op!r}")
        handler(self, op)

    def record(self, op: Record) -> None:
        self.events[op.event] = self.stream(op.stream).record()

    def wait(self, op: Wait) -> None:
        self.stream(op.stream).wait_event(self.events[op.event])

    def gemms(self, op: Gemms) -> None:
        if not self.compute:
            return
        layer = self.layer
        me = layer.rank
        self.env["src"] = me if op.step is None else (me - op.step) % layer.problem.world_size
        stream = self.stream(op.stream)
        for g in op.launches:
            rows, n, args = layer._launchers[id(g)](self.env)
            layer._launch_gemm(g.gated, rows, g.groups, n, args, stream)

    def route(self, op: Route) -> None:
        layer, b, t = self.layer, self.tok, self.tokens
        k, main = layer.kernels, layer.stream
        if t:
            rw = layer.config.router_tokens_per_block
            layer._launch(k.router, ROUTER, router_grid(layer.problem, layer.config, t),
                          32 * rw, main, x=self.x, wg=layer.w_gate,
                          bias=layer.weights.expert_bias, tokens=t, topk_idx=b.topk_idx,
                          topk_w=b.topk_w, part=layer._router_part, done=layer._router_done)
        layer._launch(k.positions, POSITIONS, layer.problem.experts, POS_THREADS, main,
                      topk_idx=b.topk_idx, tokens=t, pos=b.pos,
                      counts=layer.counts[layer.rank])

    def counts(self, op: ExchangeCounts) -> None:
        if op.device:
            self.exchange_counts_on_device()
        else:
            self.exchange_counts()

    def permute(self, op: Permute) -> None:
        layer, b, t = self.layer, self.tok, self.tokens
        if t:
            layer._launch(layer.kernels.permute, PERMUTE,
                          -(-t * layer.problem.top_k // MOVE_WARPS), 32 * MOVE_WARPS,
                          layer.stream, x=self.x, topk_idx=b.topk_idx, pos=b.pos, tokens=t,
                          capacity=self.env["cap"], self_rank=layer.rank,
                          row_off=self.my_row_off, layout=layer._buf.tensor)

    def combine(self, op: Combine) -> None:
        layer, b, t = self.layer, self.tok, self.tokens
        if t:
            shared = b.shared_out if layer.problem.shared_experts and self.compute else 0
            layer._launch(layer.kernels.combine, COMBINE, -(-t // MOVE_WARPS),
                          32 * MOVE_WARPS, layer.stream, topk_idx=b.topk_idx,
                          topk_w=b.topk_w, pos=b.pos, tokens=t, capacity=self.env["cap"],
                          row_off=self.my_row_off, layout=layer._buf.tensor,
                          shared_out=shared, x=self.x, sgate_w=layer.weights.shared_gate,
                          out=self.out)

    def transfer_op(self, op: Transfer) -> None:
        if self.communicate:
            self.transfer(op)

    def transfer_group(self, op: TransferGroup) -> None:
        """One NCCL group around all the transfers' operations."""
        if self.communicate:
            self.issue([o for t in op.transfers for o in self.transfer_ops(t)])

    def issue(self, ops: list[tuple]) -> None:
        """``(fn, ptr, nbytes, peer, stream, which)`` NCCL operations as groups of at most
        n per (peer, direction) (``max_group_ops``; 0: one group): the i-th operation of a
        (peer, direction) goes to group i // n. Every rank splits alike, so a send and the
        receive it matches land in groups of the same index."""
        if not ops:
            return
        comm, limit = self.layer.comm, max_group_ops()
        if not limit:
            groups = [ops]
        else:
            seen: dict = defaultdict(int)
            split: dict = defaultdict(list)
            for o in ops:
                key = (o[0], o[3])
                split[seen[key] // limit].append(o)
                seen[key] += 1
            groups = [split[g] for g in sorted(split)]
        for group in groups:
            with comm.group():
                for fn, *args in group:
                    fn(*args)

    def exchange_counts(self) -> None:
        """Count exchange: every rank learns counts[source][expert], so the capacity C and
        the row offsets; the forward's one host synchronisation."""
        layer, s = self.layer, self.layer.stream
        p, cfg = layer.problem, layer.config
        self.allgather_counts()
        host = np.frombuffer(layer._counts_host, np.int32, layer.counts.size).reshape(
            layer.counts.shape)
        layer.counts.get(stream=s, out=host)
        ev = s.record()
        if layer.comm is not None:
            layer.comm.wait(ev, "count exchange")
        else:
            ev.synchronize()
        counts = host.copy()
        fixed = p.fixed_capacity(cfg.block_m)
        need = fixed if fixed is not None else max(round_up(int(counts.max()), cfg.block_m),
                                                   cfg.block_m)
        # Exact mode: the allocated C >= every count, so nothing drops.
        layer._dropped_host = int(np.maximum(counts[layer.rank] - need, 0).sum())
        slots = layer._slot_buffers(need)
        cap = layer.capacity = slots.capacity
        self.rows = np.minimum(counts, cap)  # rows[src][global expert] actually sent
        self.offs = row_offsets(self.rows, cap, p.local_experts, cfg.packed_slots)
        off_host = np.frombuffer(layer._row_off_host, np.int32, self.offs.size)
        off_host[:] = self.offs.ravel()  # the previous call's copy ran before the sync above
        # Python lists for the transfers' run arithmetic (NumPy scalars cost ~10x per item).
        self.rows_list, self.offs_list = self.rows.tolist(), self.offs.tolist()
        layer.row_off.data.copy_from_host_async(off_host.ctypes.data, self.offs.nbytes,
                                                stream=s)
        if cfg.gather_experts:
            self.plan_gathered(layer, s)
        self.bind_slots(cap, slots)

    def plan_gathered(self, layer, s) -> None:
        """``gather_experts``: where each peer's rows for each local expert land in that
        expert's run of ``gathered`` (peers in rank order), and the runs' lengths, which
        go to the device for the fused launch (``gcounts``)."""
        me, el = layer.rank, layer.problem.local_experts
        mine = self.rows[:, me * el:(me + 1) * el].copy()
        mine[me] = 0  # this rank's own rows are computed apart (not in the fused launch)
        goffs = np.cumsum(mine, axis=0) - mine
        self.goffs_list = goffs.tolist()
        self.gcounts_list = mine.sum(axis=0).tolist()
        g_host = np.frombuffer(layer._gcounts_host, np.int32, el)
        g_host[:] = self.gcounts_list
        layer.gcounts.data.copy_from_host_async(g_host.ctypes.data, g_host.nbytes, stream=s)

    def exchange_counts_on_device(self) -> None:
        """Mode "graph": all ranks' counts into device memory, then the row offsets and this
        rank's drops by a kernel; capacity and slot regions were fixed at build."""
        layer, s = self.layer, self.layer.stream
        p, cfg = layer.problem, layer.config
        self.allgather_counts()
        cap = layer.fixed.capacity
        layer._launch(layer.kernels.slot_offsets, SLOT_OFFSETS, 1, POS_THREADS, s,
                      counts=layer.counts, world=p.world_size, capacity=cap,
                      region=layer._region, packed=int(cfg.packed_slots),
                      self_rank=layer.rank, row_off=layer.row_off, dropped=layer._dropped)
        self.bind_slots(cap, layer._buf)

    def allgather_counts(self) -> None:
        """Every rank's counts row into ``counts[P][E]`` on the main stream (P > 1)."""
        layer = self.layer
        if layer.comm is not None and layer.problem.world_size > 1:
            nb = layer.problem.experts * 4
            layer.comm.allgather_bytes(layer.counts.data.ptr + layer.rank * nb,
                                       layer.counts.data.ptr, nb, layer.stream)

    def bind_slots(self, cap: int, slots) -> None:
        """The capacity and the slot buffers this call's operations address."""
        layer = self.layer
        self.my_row_off = layer.row_off.data.ptr + layer.rank * layer.problem.experts * 4
        self.env.update(cap=cap, layout=slots.tensor.data.ptr, act=slots.act.data.ptr,
                        gathered=0 if slots.gathered is None else slots.gathered.data.ptr)

    def transfer(self, op: Transfer) -> None:
        self.issue(self.transfer_ops(op))

    def transfer_ops(self, op: Transfer) -> list[tuple]:
        """The NCCL operations of one send/recv of local experts [e0, e1) with the peers at
        ``op.step``; every rank holds the same row tables (or the same fixed regions), so
        sends and receives match. Step 0's own rows are copied here and give none."""
        layer = self.layer
        p, comm, me = layer.problem, layer.comm, layer.rank
        P, el, lay = p.world_size, p.local_experts, layer._buf.lay
        base, row_bytes = layer._buf.tensor.data.ptr, p.hidden * ELEM_BYTES
        to, frm = (me + op.step) % P, (me - op.step) % P
        if op.rows is not None:  # mode "graph": the chunk's whole fixed region, padding too
            if op.round == DISPATCH:
                slots = ((comm.send, lay.slot_offset(to, DISPATCH, STAGING), to),
                         (comm.recv, lay.slot_offset(frm, DISPATCH, INCOMING), frm))
            else:
                slots = ((comm.send, lay.slot_offset(frm, COMBINE_ROUND, STAGING), frm),
                         (comm.recv, lay.slot_offset(to, COMBINE_ROUND, INCOMING), to))
            cs, which = self.stream(op.stream), op.stream.index
            return [(fn, base + (slot + op.base * p.hidden) * ELEM_BYTES, op.rows * row_bytes,
                     peer, cs, which) for fn, slot, peer in slots]
        if op.round == DISPATCH:  # my tokens to `to`; `frm`'s tokens to me
            ops = ((comm.send, me, to, lay.slot_offset(to, DISPATCH, STAGING), to),
                   (comm.recv, frm, me, lay.slot_offset(frm, DISPATCH, INCOMING), frm))
        else:  # results for `frm`'s tokens back to it; mine back from `to`
            ops = ((comm.send, frm, me, lay.slot_offset(frm, COMBINE_ROUND, STAGING), frm),
                   (comm.recv, me, to, lay.slot_offset(to, COMBINE_ROUND, INCOMING), to))
        cs, which = self.stream(op.stream), op.stream.index
        # Step 0, this rank's own rows: slot to slot by a device copy (copy engine), not an
        # NCCL send/recv to self per run (with expert slots, one per expert in the fused
        # combine's group). Tried as the fix of a hung DeepSeek-V3 candidate on 4 ranks; it
        # was not the cause (bench/results/2026-11-26_gpu_checks_4xH200_session10.md).
        if to == me:
            (_, src, dst, s_slot, _), (_, _, _, d_slot, _) = ops
            cols = slice(dst * el + op.e0, dst * el + op.e1)
            for r0, n in contiguous_runs(self.offs_list[src][cols], self.rows_list[src][cols]):
                layer._copy(base + (d_slot + r0 * p.hidden) * ELEM_BYTES,
                            base + (s_slot + r0 * p.hidden) * ELEM_BYTES, n * row_bytes, cs)
            return []
        if self.goffs_list is not None:
            return [(fn, ptr, nbytes, peer, cs, which) for fn, src, dst, slot, peer in ops
                    for ptr, nbytes in self.gathered_runs(src, dst, slot, op.e0, op.e1)]
        out = []
        for fn, src, dst, slot, peer in ops:  # (source, destination) rows of the slot
            cols = slice(dst * el + op.e0, dst * el + op.e1)
            for r0, n in contiguous_runs(self.offs_list[src][cols], self.rows_list[src][cols]):
                out.append((fn, base + (slot + r0 * p.hidden) * ELEM_BYTES, n * row_bytes, peer,
                            cs, which))
        return out

    def gathered_runs(self, src: int, dst: int, slot: int, e0: int, e1: int) -> list[tuple]:
        """``gather_experts``: one (address, bytes) per local expert of [e0, e1) with rows
        from ``src`` to ``dst`` -- never merged, since the other side keeps them apart too:
        rows on this rank's experts (dispatch received, results sent back) sit in the
        expert's run of ``gathered``; rows on a peer's experts in the layout's slot."""
        layer = self.layer
        p = layer.problem
        el, row_bytes = p.local_experts, p.hidden * ELEM_BYTES
        run, rows = gathered_shape(p, self.env["cap"])[1], self.rows_list[src]
        out = []
        for j in range(e0, e1):
            n = rows[dst * el + j]
            if n <= 0:
                continue
            if dst == layer.rank:
                row = j * run + self.goffs_list[src][j]
                out.append((self.env["gathered"] + row * row_bytes, n * row_bytes))
            else:
                row = slot + self.offs_list[src][dst * el + j] * p.hidden
                out.append((self.env["layout"] + row * ELEM_BYTES, n * row_bytes))
        return out


#: At most this many NCCL operations per (peer, direction) in one group; 0: no limit.
#: Groups of ~60 operations per peer and direction (expert slots, fused sources) never
#: finished on 4 x H200 at H=7168 (NCCL 2.28.9; H=2048 and 2 ranks passed), split to 8 they
#: did (bench/results/2026-11-26_gpu_checks_4xH200_session11.md). Packed slots give one
#: operation per peer, so the split only touches expert-slot configs.
MAX_GROUP_OPS_ENV = "FLASHMOE_MAX_GROUP_OPS"
DEFAULT_MAX_GROUP_OPS = 8


def max_group_ops() -> int:
    """``$FLASHMOE_MAX_GROUP_OPS`` (read per call; 0: no limit), else
    DEFAULT_MAX_GROUP_OPS; ArgumentError if invalid."""
    raw = os.environ.get(MAX_GROUP_OPS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_GROUP_OPS
    if not raw.isdigit():
        raise ArgumentError(MAX_GROUP_OPS_ENV, raw, "a non-negative integer (0: no limit)")
    return int(raw)


#: Operation type -> the Run method that executes it (one lookup per operation).
_HANDLERS = {Record: Run.record, Wait: Run.wait, Gemms: Run.gemms, Transfer: Run.transfer_op,
             TransferGroup: Run.transfer_group,
             Route: Run.route, ExchangeCounts: Run.counts, Permute: Run.permute,
             Combine: Run.combine}
