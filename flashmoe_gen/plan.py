"""The forward schedule as data: one ``ForwardPlan`` per (problem, config).

A plan is the ordered list of operations of one forward on one rank — route, count exchange,
permute, shared experts, the dispatch transfers per (peer step, chunk) on the communication
streams, the expert GEMMs per source and chunk (or one fused launch for all peers), the
combine transfers, the weighted combine — with the events that order the streams and every
GEMM launch's argument list. It is the same on every rank: peers are named by their step
(``src = (me - step) % P``) and sizes by symbols (``cap``, ``tokens``) bound when the forward
runs. ``runtime.FlashMoE`` executes it; ``export`` prints it as C++ (``plan_cpp``), so the
exported host code follows the same schedule by construction (see docs/architecture.md).

Symbols an expression may use: ``me`` (this rank), ``src`` (the operation's source rank),
``cap`` (capacity C of this call), ``tokens`` (T of this call); functions ``max_rows(src,
e0, e1)`` (rows ``src`` sends to local experts [e0, e1), clipped to C) and
``max_remote_rows()`` (the same over every other source and all local experts),
``max_all_rows()`` (over every source, this rank included), ``max_gathered_rows()`` (the
most peer rows one local expert gets, ``gather_experts``). Buffers: ``gathered`` (with
``gather_experts``: [local expert][P x cap][H], each expert's peer rows back to back, source
order; its down results in place of its inputs) and ``gcounts`` (those rows per expert).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .config import KernelConfig, expert_chunks
from .expr import NULL, Call, Expr, Lit, Ptr, Var, lift
from .layout import COMBINE, DISPATCH, INCOMING, STAGING
from .problem import MoEProblem, round_up
from .signatures import GEMM

# -- operations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """``main`` (the layer's stream), ``shared`` (shared experts) or ``comm`` ``index``."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return f"comm{self.index}" if self.kind == "comm" else self.kind


MAIN, SHARED = Stream("main"), Stream("shared")


def comm(i: int) -> Stream:
    return Stream("comm", i)


@dataclass(frozen=True)
class GemmLaunch:
    """One grouped GEMM launch: grid (ceil(N / BN), ceil(rows / BM), groups)."""

    gated: bool
    rows: Expr
    groups: int
    args: tuple[tuple[str, Expr | Ptr], ...]

    def arg(self, name: str) -> Expr | Ptr:
        return dict(self.args)[name]


@dataclass(frozen=True)
class Route:
    """Router and positions kernels on the main stream; this rank's counts on the device."""


@dataclass(frozen=True)
class ExchangeCounts:
    """All ranks' counts to every rank (P > 1), then the capacity, drops and row offsets:
    on the host (mode "host": the forward's one host synchronisation), or by a kernel into
    device memory (mode "graph": fixed capacity and fixed slot regions, no host read)."""

    device: bool = False


@dataclass(frozen=True)
class Permute:
    """Tokens into their slots of the symmetric layout (main stream)."""


@dataclass(frozen=True)
class Record:
    event: int
    stream: Stream


@dataclass(frozen=True)
class Wait:
    stream: Stream
    event: int


@dataclass(frozen=True)
class Transfer:
    """One grouped NCCL send/recv of local experts [e0, e1) with the peers at ``step``:
    dispatch sends to ``me + step`` and receives from ``me - step``; combine the reverse."""

    round: int
    step: int
    e0: int
    e1: int
    stream: Stream
    base: int | None = None  # mode "graph": the fixed region [base, base + rows) of the slot
    rows: int | None = None


@dataclass(frozen=True)
class TransferGroup:
    """Transfers of one communication stream issued as one NCCL group (one launch for all
    their peers): with fused sources nothing computes before every dispatch landed, so the
    steps need not be separate operations."""

    transfers: tuple[Transfer, ...]

    @property
    def stream(self) -> Stream:
        return self.transfers[0].stream


@dataclass(frozen=True)
class Gemms:
    """GEMM launches on one stream; ``step`` names the source (0: this rank, None: none)."""

    what: str
    step: int | None
    stream: Stream
    launches: tuple[GemmLaunch, ...]


@dataclass(frozen=True)
class Combine:
    """Weighted un-permute plus the shared experts' output (main stream)."""


Op = Route | ExchangeCounts | Permute | Record | Wait | Transfer | TransferGroup | Gemms | Combine


def describe(op: Op, events: tuple[str, ...]) -> str:
    """One line per operation (test ids, comments in the exported C++)."""
    if isinstance(op, Record):
        return f"record {events[op.event]} on {op.stream}"
    if isinstance(op, Wait):
        return f"{op.stream} waits {events[op.event]}"
    if isinstance(op, Transfer):
        what = "dispatch" if op.round == DISPATCH else "combine"
        fixed = f" rows [{op.base}, {op.base + op.rows})" if op.rows is not None else ""
        return f"{what} step {op.step} experts [{op.e0}, {op.e1}){fixed} on {op.stream}"
    if isinstance(op, TransferGroup):
        return "one NCCL group: " + "; ".join(describe(t, events) for t in op.transfers)
    if isinstance(op, Gemms):
        return f"{op.what} on {op.stream}"
    if isinstance(op, ExchangeCounts):
        return "exchange counts, row offsets on the device" if op.device else \
            "exchange counts, plan capacity"
    return {Route: "route", Permute: "permute", Combine: "combine"}[type(op)]


@dataclass(frozen=True)
class ForwardPlan:
    problem: MoEProblem
    config: KernelConfig
    ops: tuple[Op, ...]
    events: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        return [describe(op, self.events) for op in self.ops]

    def transfers(self) -> list[Transfer]:
        """Every transfer in order, those of groups included."""
        out: list[Transfer] = []
        for op in self.ops:
            if isinstance(op, TransferGroup):
                out += op.transfers
            elif isinstance(op, Transfer):
                out.append(op)
        return out

    def to_dict(self) -> dict:
        """Plain data: every operation with its fields and its GEMM argument lists."""
        def enc(op) -> dict:
            d = {"op": type(op).__name__}
            for k, v in vars(op).items():
                if k == "launches":
                    d[k] = [{"gated": g.gated, "rows": str(g.rows), "groups": g.groups,
                             "args": {n: str(a) for n, a in g.args}} for g in v]
                elif k == "transfers":
                    d[k] = [enc(t) for t in v]
                else:
                    d[k] = str(v) if isinstance(v, Stream) else v
            return d
        return {"problem": self.problem.name, "config": self.config.name,
                "events": list(self.events), "ops": [enc(op) for op in self.ops]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


# -- building -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedSlots:
    """Mode "graph": sizes fixed when the layer is built, so no call reads counts on the host.

    ``capacity``: rows per (source, expert) — the capacity factor's C, or in exact mode the
    true worst case (a source sends an expert at most one row per token: T rounded up to
    the tile M), so no token can drop. Each (source, destination) slot holds one region per
    chunk of local experts: ``chunk_base[c]`` its first row, ``chunk_rows[c]`` its rows, the
    most a source can send those experts (each token at most one row per expert); a
    transfer moves exactly one region.
    """

    capacity: int
    chunk_base: tuple[int, ...]
    chunk_rows: tuple[int, ...]
    #: Per local expert: (first expert of its chunk, its chunk's first row) — the table the
    #: ``slot_offsets`` kernel reads.
    region: tuple[tuple[int, int], ...]


def fixed_slots(problem: MoEProblem, config: KernelConfig) -> FixedSlots:
    """The fixed capacity and slot regions of mode "graph" (see ``FixedSlots``)."""
    bm, t, k = config.block_m, problem.tokens_per_rank, problem.top_k
    cap = problem.fixed_capacity(bm)
    if cap is None:
        cap = max(round_up(t, bm), bm)
    base, rows, region = [], [], []
    for e0, e1 in expert_chunks(problem, config):
        n = e1 - e0
        if config.packed_slots:
            base.append(sum(rows))
            rows.append(min(t * min(k, n), n * cap))
        else:
            base.append(e0 * cap)
            rows.append(n * cap)
        region += [(e0, base[-1])] * n
    return FixedSlots(cap, tuple(base), tuple(rows), tuple(region))


def act_slots(p: MoEProblem, config: KernelConfig) -> int:
    """Source slots of the expert activations ``act`` ([slots][E_local][C][I]) the launches
    address: one per source where fused sources compute every source's rows in one launch
    (``own_stream``'s own rows take this rank's), else one. The runtime, the memory table
    and the export allocate this many."""
    return p.world_size if config.fuse_sources else 1


def gathered_shape(p: MoEProblem, cap: int) -> tuple[int, int, int]:
    """``gather_experts``' buffer ``gathered``: per local expert a run of P x C rows of H
    (its peers' rows back to back; at most P - 1 peers' capacity). The runtime, the memory
    table and the gathered launches' strides use this run length."""
    return p.local_experts, p.world_size * cap, p.hidden


def _expert_launches(p: MoEProblem, e0: int, e1: int, self_source: bool,
                     rows: Expr | None = None, own_region: bool = False
                     ) -> tuple[GemmLaunch, ...]:
    """Gate/up then down of local experts [e0, e1) on the rows from ``src``; ``rows``: the
    grid's row bound (default: the counted rows, read on the host); ``own_region``: the
    activations in this rank's region of the fused launch's per-source ``act`` (which that
    launch skips), so both may run at once (``own_stream``)."""
    h, i, el, e = p.hidden, p.intermediate, p.local_experts, p.experts
    src, cap, me = Var("src"), Var("cap"), Var("me")

    def slot(round_: int, buf: int) -> Expr:  # layout.slot_offset(src, round_, buf)
        return ((src * 2 + round_) * 2 + buf) * el * cap * h

    idx = src * e + me * el + e0
    counts, row_off = Ptr("counts", idx), Ptr("row_off", idx)
    act = Ptr("act", (me * el + e0) * cap * i) if own_region else Ptr("act", e0 * cap * i)
    rows = rows if rows is not None else Call("max_rows", (src, Lit(e0), Lit(e1)))
    common = dict(counts=counts, count_cap=cap, rows_fixed=0, inner_groups=0,
                  a_outer_stride=0, c_outer_stride=0, counts_outer_stride=0, skip_outer=-1)
    gate_up = dict(common, A=Ptr("layout", slot(DISPATCH, INCOMING)), a_group_stride=0,
                   B0=Ptr("w1", Lit(e0 * i * h)), B1=Ptr("w3", Lit(e0 * i * h)),
                   b_group_stride=i * h, C=act, c_group_stride=cap * i, N=i, K=h,
                   a_row_off=row_off, c_row_off=NULL)
    out_buf = INCOMING if self_source else STAGING  # own results skip the combine transfer
    down = dict(common, A=act, a_group_stride=cap * i, B0=Ptr("w2", Lit(e0 * h * i)), B1=NULL,
                b_group_stride=h * i, C=Ptr("layout", slot(COMBINE, out_buf)),
                c_group_stride=0, N=h, K=i, a_row_off=NULL, c_row_off=row_off)
    return (_launch(True, rows, e1 - e0, gate_up), _launch(False, rows, e1 - e0, down))


def _fused_launches(p: MoEProblem, rows: Expr | None = None, with_self: bool = False
                    ) -> tuple[GemmLaunch, ...]:
    """Every other source's rows (``with_self``: every source's) for all local experts: one
    launch per GEMM, the source as the outer group index. Results go to the staging slots;
    this rank's own ones then move to its incoming slot by a step-0 combine transfer."""
    h, i, el, e, P = p.hidden, p.intermediate, p.local_experts, p.experts, p.world_size
    cap, me = Var("cap"), Var("me")
    per_source = 4 * el * cap * h  # elements from one source slot to the next
    act_per_source = el * cap * i
    if rows is None:
        rows = Call("max_all_rows") if with_self else Call("max_remote_rows")
    common = dict(counts=Ptr("counts", me * el), count_cap=cap, rows_fixed=0,
                  inner_groups=el, counts_outer_stride=e,
                  skip_outer=Lit(-1) if with_self else me)
    gate_up = dict(common, A=Ptr("layout", (DISPATCH * 2 + INCOMING) * el * cap * h),
                   a_group_stride=0, B0=Ptr("w1"), B1=Ptr("w3"), b_group_stride=i * h,
                   C=Ptr("act"), c_group_stride=cap * i, N=i, K=h,
                   a_outer_stride=per_source, c_outer_stride=act_per_source,
                   a_row_off=Ptr("row_off", me * el), c_row_off=NULL)
    down = dict(common, A=Ptr("act"), a_group_stride=cap * i, B0=Ptr("w2"), B1=NULL,
                b_group_stride=h * i, C=Ptr("layout", (COMBINE * 2 + STAGING) * el * cap * h),
                c_group_stride=0, N=h, K=i, a_outer_stride=act_per_source,
                c_outer_stride=per_source, a_row_off=NULL, c_row_off=Ptr("row_off", me * el))
    return (_launch(True, rows, P * el, gate_up), _launch(False, rows, P * el, down))


def _gathered_launches(p: MoEProblem) -> tuple[GemmLaunch, ...]:
    """``gather_experts``: every peer's rows for all local experts, one group per expert
    (its rows from every peer back to back in ``gathered``, ``gcounts`` of them), so an m
    tile may span two peers' rows and only an expert's last tile is partial. The down
    results overwrite the expert's inputs there (the gate/up launch before it on the same
    stream has read them); the combine transfers send them from there."""
    h, i = p.hidden, p.intermediate
    el, run, _ = gathered_shape(p, Var("cap"))  # rows of one expert's run
    common = dict(counts=Ptr("gcounts"), count_cap=run, rows_fixed=0, inner_groups=0,
                  counts_outer_stride=0, skip_outer=-1, a_outer_stride=0, c_outer_stride=0,
                  a_row_off=NULL, c_row_off=NULL)
    gate_up = dict(common, A=Ptr("gathered"), a_group_stride=run * h, B0=Ptr("w1"),
                   B1=Ptr("w3"), b_group_stride=i * h, C=Ptr("act"), c_group_stride=run * i,
                   N=i, K=h)
    down = dict(common, A=Ptr("act"), a_group_stride=run * i, B0=Ptr("w2"), B1=NULL,
                b_group_stride=h * i, C=Ptr("gathered"), c_group_stride=run * h, N=h, K=i)
    rows = Call("max_gathered_rows")
    return (_launch(True, rows, el, gate_up), _launch(False, rows, el, down))


def _shared_launches(p: MoEProblem) -> tuple[GemmLaunch, ...]:
    """The fused shared experts on this rank's tokens (no counts: ``tokens`` rows)."""
    h, w, tokens = p.hidden, p.shared_width, Var("tokens")
    common = dict(a_group_stride=0, b_group_stride=0, c_group_stride=0, counts=NULL,
                  count_cap=0, rows_fixed=tokens, inner_groups=0, a_outer_stride=0,
                  c_outer_stride=0, counts_outer_stride=0, skip_outer=-1, a_row_off=NULL,
                  c_row_off=NULL)
    gate_up = dict(common, A=Ptr("x"), B0=Ptr("sw1"), B1=Ptr("sw3"), C=Ptr("shared_act"),
                   N=w, K=h)
    down = dict(common, A=Ptr("shared_act"), B0=Ptr("sw2"), B1=NULL, C=Ptr("shared_out"),
                N=h, K=w)
    return (_launch(True, tokens, 1, gate_up), _launch(False, tokens, 1, down))


def _launch(gated: bool, rows: Expr, groups: int, args: dict) -> GemmLaunch:
    return GemmLaunch(gated, rows, groups,
                      tuple((n, args[n] if isinstance(args[n], Ptr) else lift(args[n]))
                            for n in GEMM.names))


class _Events:
    def __init__(self):
        self.names: list[str] = []

    def new(self, name: str) -> int:
        self.names.append(name)
        return len(self.names) - 1


def own_halves(chunks: list[tuple[int, int]]) -> tuple[list, list]:
    """The local experts' chunks in two halves for ``own_split``: the first half of the
    chunks and the rest, or one chunk cut at its middle expert."""
    if len(chunks) >= 2:
        return chunks[:len(chunks) // 2], chunks[len(chunks) // 2:]
    (e0, e1), = chunks
    mid = (e0 + e1) // 2
    return [(e0, mid)], [(mid, e1)]


def _per_source_schedule(p: MoEProblem, cfg: KernelConfig, steps, chunks, ev, transfer,
                         local_blocks, bound) -> list[Op]:
    """Each (step, chunk) dispatched on its own, computed as soon as it lands, its results
    sent back as soon as they are computed (this rank's tokens meanwhile)."""
    ns = cfg.comm_streams
    ops: list[Op] = []
    arrived = []
    for j, (step, e0, e1) in enumerate(steps):
        ops.append(transfer(DISPATCH, step, e0, e1, comm(j % ns)))
        arrived.append(ev.new(f"arrived[{j}]"))
        ops.append(Record(arrived[-1], comm(j % ns)))
    if not cfg.overlap:  # serialized baseline: all traffic lands before any compute
        ops += [Wait(MAIN, a) for a in arrived]
    ops += local_blocks()
    computed = []
    for j, (step, e0, e1) in enumerate(steps):
        if cfg.overlap:
            ops.append(Wait(MAIN, arrived[j]))
        ops.append(Gemms(f"experts [{e0}, {e1}) of the tokens from step {step}", step,
                         MAIN, _expert_launches(p, e0, e1, False, bound)))
        computed.append(ev.new(f"computed[{j}]"))
        ops.append(Record(computed[-1], MAIN))
    if not cfg.overlap:  # serialized: results go back only after all compute
        ops += [Wait(comm(c), computed[-1]) for c in range(ns)]
    for j, (step, e0, e1) in enumerate(steps):
        if cfg.overlap:
            ops.append(Wait(comm(j % ns), computed[j]))
        ops.append(transfer(COMBINE, step, e0, e1, comm(j % ns)))
    return ops


def _fused_schedule(p: MoEProblem, cfg: KernelConfig, steps, chunks, ev, transfer,
                    local_blocks, bound) -> list[Op]:
    """Fused sources: each communication stream's dispatch transfers as one NCCL group;
    this rank's tokens meanwhile (unless they join the fused launch, ``fuses_own_tokens``);
    the one launch once everything landed; then each stream's combine transfers as one
    group (with this rank's own results, staging -> incoming, when they joined: a device
    copy in host mode, a send/recv to self in graph mode)."""
    ns, with_self = cfg.comm_streams, cfg.fuses_own_tokens
    mine = [[s for j, s in enumerate(steps) if j % ns == c] for c in range(ns)]
    ops: list[Op] = []
    arrived = []
    for c in range(ns):
        if mine[c]:
            ops.append(TransferGroup(tuple(transfer(DISPATCH, s, e0, e1, comm(c))
                                           for s, e0, e1 in mine[c])))
            arrived.append(ev.new(f"arrived[{c}]"))
            ops.append(Record(arrived[-1], comm(c)))
    waits = [Wait(MAIN, a) for a in arrived]
    if not cfg.overlap:  # serialized baseline: all traffic lands before any compute
        ops += waits
    own = SHARED if cfg.own_stream else MAIN
    if cfg.own_stream:  # this rank's rows are permuted: the shared stream may start on them
        ready = ev.new("own_ready")
        ops += [Record(ready, MAIN), Wait(SHARED, ready)]
    if not with_self:  # this rank's tokens (own_split: the first half) hide the dispatch
        ops += local_blocks(0 if cfg.own_split else None, own)
    if cfg.overlap:
        ops += waits
    what = "every source's tokens, this rank's too" if with_self else "every peer's tokens"
    fused = _gathered_launches(p) if cfg.gather_experts else \
        _fused_launches(p, bound, with_self)
    own_done = None
    if cfg.own_stream:  # the second half beside the fused down launch, then the combine
        ops.append(Gemms(f"experts of {what} (fused, gate/up)", None, MAIN, fused[:1]))
        gate_up_done, own_done = ev.new("fused_gate_up"), ev.new("own_done")
        ops += [Record(gate_up_done, MAIN), Wait(SHARED, gate_up_done)]
        ops += local_blocks(1, SHARED) + [Record(own_done, SHARED)]
        ops.append(Gemms(f"experts of {what} (fused, down)", None, MAIN, fused[1:]))
    else:
        ops.append(Gemms(f"experts of {what} (fused)", None, MAIN, fused))
    done = ev.new("computed")
    ops.append(Record(done, MAIN))
    for c in range(ns):
        back = [transfer(COMBINE, s, e0, e1, comm(c)) for s, e0, e1 in mine[c]]
        if with_self and c == 0:  # own results: staging -> incoming (step 0, to self)
            back += [transfer(COMBINE, 0, e0, e1, comm(0)) for e0, e1 in chunks]
        if back:
            ops += [Wait(comm(c), done), TransferGroup(tuple(back))]
    if cfg.own_split and not cfg.own_stream:  # the second half while the combine is in flight
        ops += local_blocks(1)
    if own_done is not None:
        ops.append(Wait(MAIN, own_done))
    return ops


def build_plan(problem: MoEProblem, config: KernelConfig) -> ForwardPlan:
    """The host-planned forward (design in docs/symmetric-layout.md, "Overlap")."""
    p, cfg, P = problem, config, problem.world_size
    chunks = expert_chunks(p, cfg)
    graph = cfg.mode == "graph"
    fixed = fixed_slots(p, cfg) if graph else None
    bound = Lit(fixed.capacity) if graph else None  # the grid's rows: fixed, or counted
    regions = dict(zip(chunks, zip(fixed.chunk_base, fixed.chunk_rows, strict=True),
                       strict=True)) if graph else {}
    ev = _Events()
    ops: list[Op] = [Route(), ExchangeCounts(device=graph), Permute()]
    shared_done = None
    if p.shared_experts:
        stream = SHARED if cfg.shared_stream and cfg.overlap else MAIN
        if stream != MAIN:
            permuted = ev.new("permuted")
            ops += [Record(permuted, MAIN), Wait(stream, permuted)]
        ops.append(Gemms("shared experts", None, stream, _shared_launches(p)))
        if stream != MAIN:
            shared_done = ev.new("shared_done")
            ops.append(Record(shared_done, stream))

    def local_blocks(half: int | None = None, stream: Stream = MAIN) -> list[Op]:
        spans = chunks if half is None else own_halves(chunks)[half]
        return [Gemms(f"experts [{e0}, {e1}) of this rank's tokens", 0, stream,
                      _expert_launches(p, e0, e1, True, bound, cfg.own_stream))
                for e0, e1 in spans]

    def transfer(round_: int, step: int, e0: int, e1: int, stream: Stream) -> Transfer:
        base, rows = regions.get((e0, e1), (None, None))
        return Transfer(round_, step, e0, e1, stream, base, rows)

    if P == 1:
        ops += local_blocks()
    else:
        ns = cfg.comm_streams
        steps = [(step, e0, e1) for step in range(1, P) for (e0, e1) in chunks]
        start = ev.new("start")
        ops.append(Record(start, MAIN))
        ops += [Wait(comm(c), start) for c in range(ns)]
        schedule = _fused_schedule if cfg.fuse_sources else _per_source_schedule
        ops += schedule(p, cfg, steps, chunks, ev, transfer, local_blocks, bound)
        for c in range(ns):
            drained = ev.new(f"drained[{c}]")
            ops += [Record(drained, comm(c)), Wait(MAIN, drained)]
    if shared_done is not None:
        ops.append(Wait(MAIN, shared_done))
    ops.append(Combine())
    return ForwardPlan(p, cfg, tuple(ops), tuple(ev.names))
