"""The C++ spelling of a ``ForwardPlan``: the exported host forward, one statement per
operation, so the export follows the runtime's schedule by construction.

The generated function sees: ``L`` (the ``FmoeLayer``), ``X`` (the harness's NCCL
communicators and streams, world size > 1), ``x``/``tokens``/``out``, the main stream ``s``;
the helpers it calls (``route``, ``plan_capacity``, ``permute``, ``combine``, ``exchange``,
``max_rows``, ``max_remote_rows``, ``max_gathered_rows``, ``gemm_gate_up``/``gemm_down``) are in
templates/export_host.cu.j2 and export_main.cu.j2.
"""

from __future__ import annotations

import re

from .layout import DISPATCH
from .plan import (
    Combine,
    ExchangeCounts,
    ForwardPlan,
    Gemms,
    Permute,
    Record,
    Route,
    Stream,
    Transfer,
    TransferGroup,
    Wait,
    describe,
)


def stream_cpp(s: Stream) -> str:
    if s.kind == "main":
        return "s"
    if s.kind == "shared":
        return "L->shared_stream"
    return f"X->streams[{s.index}]"


#: Locals the plan's expressions may name, bound at the top of the generated forward (only
#: those the statements use are declared: nvcc warns about the rest).
PROLOGUE = (
    ("me", "const long long me = L->rank;"),
    ("src", "long long src = me;"),
    ("cap", "long long cap = L->capacity;"),
    *((n, f"const elem* {n} = L->{n}t;") for n in ("w1", "w3", "w2", "sw1", "sw3", "sw2")),
    *((n, f"elem* {n} = L->{n};") for n in ("shared_act", "shared_out", "layout", "act",
                                              "gathered")),
    *((n, f"const int* {n} = L->{n};") for n in ("counts", "row_off", "gcounts")),
)


def _statements(op, plan: ForwardPlan) -> list[str]:
    world = plan.problem.world_size
    if isinstance(op, Route):
        out = ["FMOE_CHECK(route(L, x, tokens, s));"]
        if plan.problem.shared_experts:  # per-token buffers may have grown: rebind them
            out += ["shared_act = L->shared_act;", "shared_out = L->shared_out;"]
        return out
    if isinstance(op, ExchangeCounts):
        if op.device:
            call = "device_counts(L, X, s)" if world > 1 else \
                "local_counts_device(L, s, counts_host)"
        else:
            call = "exchange_counts(L, X, s)" if world > 1 else "local_counts(L, s, counts_host)"
        rebind = ["gathered = L->gathered;"] if plan.config.gather_experts else []
        return [f"FMOE_CHECK({call});",
                "cap = L->capacity;", "layout = L->layout;", "act = L->act;", *rebind]
    if isinstance(op, Permute):
        return ["FMOE_CHECK(permute(L, x, tokens, s));"]
    if isinstance(op, Record):
        return [f"FMOE_CHECK(cudaEventRecord(L->events[{op.event}], {stream_cpp(op.stream)}));"]
    if isinstance(op, Wait):
        return [f"FMOE_CHECK(cudaStreamWaitEvent({stream_cpp(op.stream)}, "
                f"L->events[{op.event}], 0));"]
    if isinstance(op, TransferGroup):  # NCCL groups nest: one launch for all of them
        return ["NCCL_CHECK(ncclGroupStart());",
                *(line for t in op.transfers for line in _statements(t, plan)),
                "NCCL_CHECK(ncclGroupEnd());"]
    if isinstance(op, Transfer):
        round_ = "DISPATCH" if op.round == DISPATCH else "COMBINE"
        if op.rows is not None:  # mode "graph": one fixed region of the slot
            return [f"exchange_fixed(L, X, {round_}, {op.step}, {op.base}, {op.rows}, "
                    f"{op.stream.index});"]
        return [f"exchange(L, X, {round_}, {op.step}, {op.e0}, {op.e1}, {op.stream.index});"]
    if isinstance(op, Gemms):
        if op.step is None or op.step == 0:
            out = ["src = me;"]
        else:
            out = [f"src = (me - {op.step} + WORLD_SIZE) % WORLD_SIZE;"]
        for g in op.launches:
            fn = "gemm_gate_up" if g.gated else "gemm_down"
            args = ", ".join(a.cpp() for _, a in g.args)
            out.append(f"FMOE_CHECK({fn}({g.rows.cpp()}, {g.groups}, "
                       f"{stream_cpp(op.stream)}, {args}));")
        return out
    if isinstance(op, Combine):
        return ["FMOE_CHECK(combine(L, tokens, out, s));"]
    raise TypeError(f"no C++ for plan operation {op!r}")


def forward_lines(plan: ForwardPlan) -> list[str]:
    """The body of the generated forward: the prologue, then each operation under a
    ``// op N: ...`` comment (tests read these back against the plan)."""
    body = []
    for n, op in enumerate(plan.ops):
        body.append(f"// op {n}: {describe(op, plan.events)}")
        body += _statements(op, plan)
    words = set(re.findall(r"\b\w+\b", "\n".join(line for line in body
                                                if not line.startswith("//"))))
    declared = {n for n, _ in PROLOGUE if n in words}
    if "src" in declared:
        declared.add("me")
    prologue = [decl for n, decl in PROLOGUE if n in declared]
    # a name only assigned (e.g. `act = L->act;`) is still a use for nvcc
    return [*prologue, *body, "return cudaSuccess;"]


def call_args(signature, **exprs: str) -> str:
    """A kernel call's argument list by parameter name (``signatures``): C++ expressions in
    the declared order; a missing or unknown name is an error here, not in nvcc."""
    missing, extra = set(signature.names) - set(exprs), set(exprs) - set(signature.names)
    if missing or extra:
        raise KeyError(f"kernel call: missing {sorted(missing)}, unknown {sorted(extra)}")
    return ", ".join(exprs[n] for n in signature.names)
