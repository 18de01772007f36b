"""The executor on the CPU: a plan run against stand-in streams, kernels and NCCL.

Every operation of every mode and schedule knob is executed (no GPU: launches, events and
transfers are recorded instead), and the record is checked against the plan: each kernel
launched as often as the plan says, each transfer a matching send and receive, GEMM grids
from the counts (host mode) or the fixed capacity (graph mode), and the benchmark splits
(``parts``) skipping what they say.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import types

import numpy as np
import pytest

from flashmoe_gen.build import build
from flashmoe_gen.config import GemmTile, KernelConfig, expert_chunks
from flashmoe_gen.executor import python_launcher
from flashmoe_gen.layout import SymmetricLayout
from flashmoe_gen.plan import Gemms, fixed_slots
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.runtime import FlashMoE, _SlotBuffers, _TokenBuffers

COUNT = 40  # every (source, expert) count the stand-in exchange reports


class _Arr:
    def __init__(self, shape=(1,)):
        self.shape, self.size = shape, int(np.prod(shape))
        self.nbytes = 4 * self.size
        self.data = types.SimpleNamespace(ptr=4096, copy_from_host_async=lambda *a, **k: None)

    def __getitem__(self, key):
        return self


class _Counts(_Arr):
    def get(self, stream=None, out=None):
        out[...] = COUNT
        return out


class _Stream:
    ptr = 0

    def __init__(self, log, name):
        self.log, self.name = log, name

    def record(self):
        self.log.append(("record", self.name))
        return types.SimpleNamespace(synchronize=lambda: None)

    def wait_event(self, event):
        self.log.append(("wait", self.name))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Comm:
    def __init__(self, log, rank, world):
        self.log, self.rank, self.world_size = log, rank, world
        self.streams = [_Stream(log, f"comm{i}") for i in range(4)]

    def allgather_bytes(self, *args):
        self.log.append(("allgather",))

    def wait(self, event, what):
        pass

    def send(self, ptr, nbytes, peer, stream, which):
        self.log.append(("send", peer, nbytes))

    def recv(self, ptr, nbytes, peer, stream, which):
        self.log.append(("recv", peer, nbytes))

    def group(self):
        return _Stream(self.log, "group")


def _layer(problem: MoEProblem, cfg: KernelConfig, log: list) -> FlashMoE:
    """A FlashMoE whose GPU parts are stand-ins (the executor sees the same attributes)."""
    k = build(problem, cfg)
    layer = object.__new__(FlashMoE)
    layer.kernel, layer.problem, layer.config, layer.plan = k, problem, cfg, k.plan
    layer.kernels = k.kernels
    layer.compiled = types.SimpleNamespace(dynamic_smem=dict.fromkeys(k.kernels.all(), 0))
    layer._sms, layer._gemm_sms, layer._tma, layer._persistent = 132, 132, None, None

    def kernel(name):
        return lambda grid, block, args, **kw: log.append(("launch", name, grid))

    layer.module = {n: kernel(n) for n in k.kernels.all()}
    layer._launchers = {id(g): python_launcher(g) for op in k.plan.ops
                        if isinstance(op, Gemms) for g in op.launches}
    p = problem
    layer.rank = p.world_size - 1
    layer.comm = _Comm(log, layer.rank, p.world_size) if p.world_size > 1 else None
    w = types.SimpleNamespace(**{n: _Arr() for n in ("w1", "w3", "w2", "sw1", "sw3", "sw2",
                                                    "gate")}, expert_bias=None,
                              shared_gate=None)
    layer.weights, layer.w_gate = w, w.gate
    layer._router_part, layer._router_done = _Arr(), _Arr()
    layer._weight_ptrs = dict.fromkeys(("w1", "w3", "w2", "sw1", "sw3", "sw2"), 8192)
    layer.stream, layer.shared_stream = _Stream(log, "main"), _Stream(log, "shared")
    layer.counts = _Counts((p.world_size, p.experts))
    layer.row_off = _Arr((p.world_size, p.experts))
    nbytes = p.world_size * p.experts * 4
    layer._counts_host = np.zeros(nbytes, np.uint8)
    layer._row_off_host = np.zeros(nbytes, np.uint8)
    layer._tok = _TokenBuffers(1 << 20, _Arr(), _Arr(), _Arr(), _Arr(), _Arr())
    layer.fixed = fixed_slots(p, cfg)
    layer._region, layer._dropped = _Arr(), _Arr()
    cap = layer.fixed.capacity if cfg.mode == "graph" else 64
    layer._buf = _SlotBuffers(SymmetricLayout(p.world_size, p.local_experts, cap, p.hidden),
                              _Arr(), _Arr())
    layer._slot_buffers = lambda need: layer._buf
    layer._dropped_host, layer.capacity = 0, 0
    layer._copy = lambda dst, src, nbytes, stream: log.append(("copy", nbytes))
    return layer


P1 = MoEProblem(512, 1024, 8, 2, shared_experts=1, tokens_per_rank=64)
P4 = MoEProblem(512, 1024, 16, 2, shared_experts=1, world_size=4, tokens_per_rank=64)
KNOBS = list(itertools.product(("host", "graph"), (False, True), (True, False), (1, 2), (1, 2)))


@pytest.mark.parametrize("problem,kind", [(P1, "sync"), (P4, "sync"), (P1, "ws"), (P4, "ws")],
                         ids=["p1", "p4", "p1_ws", "p4_ws"])
def test_every_operation_runs_as_planned(problem, kind):
    base = KernelConfig.default(problem)
    if kind == "sync":
        base = dataclasses.replace(base, gate_up=GemmTile(64, 64, 64, 2, 2, 3),
                                   down=GemmTile(64, 128, 64, 2, 4, 3))
    assert base.gate_up.mma == kind
    for mode, fuse, overlap, chunks, streams in KNOBS:
        if problem.world_size == 1 and (fuse or chunks > 1 or streams > 1):
            continue
        cfg = dataclasses.replace(base, mode=mode, fuse_sources=fuse, overlap=overlap,
                                  chunks_per_peer=chunks, comm_streams=streams)
        log: list = []
        layer = _layer(problem, cfg, log)
        layer._run_plan(_Arr(), 100, _Arr(), "all")
        launched = [e[1] for e in log if e[0] == "launch"]
        k = layer.kernels
        for name in (k.router, k.positions, k.permute, k.combine):
            assert launched.count(name) == 1, (cfg.name, name)
        assert launched.count(k.slot_offsets) == (mode == "graph")
        gemm_ops = [op for op in layer.plan.ops if isinstance(op, Gemms)]
        assert launched.count(k.gate_up) == launched.count(k.down) == len(gemm_ops)
        grids = [e[2] for e in log if e[0] == "launch" and e[1] == k.gate_up]
        rows = {g[1] for g in grids[1:]}  # after the shared experts' launch
        bm = cfg.gate_up.bm
        want = -(-layer.fixed.capacity // bm) if mode == "graph" else -(-COUNT // bm)
        if cfg.gate_up.mma == "ws":  # one block row; the fused launch: a block per expert
            want = 1
            zs = {g[2] for g in grids[1:]}
            assert zs <= {problem.local_experts, *(e1 - e0 for e0, e1 in
                                                   expert_chunks(problem, cfg))}, zs
        assert rows == {want}, (cfg.name, rows)
        sends = [e for e in log if e[0] == "send"]
        recvs = [e for e in log if e[0] == "recv"]
        copies = [e for e in log if e[0] == "copy"]  # own rows (host mode), not NCCL
        transfers = layer.plan.transfers()  # those of NCCL groups too
        assert len(sends) == len(recvs)
        assert len(sends) + len(copies) >= len(transfers)
        own = [op for op in transfers if op.step == 0]
        assert bool(copies) == (mode == "host" and bool(own)), cfg.name
        if mode == "graph":  # one send and one receive of a fixed region per transfer
            row_bytes = problem.hidden * 2
            assert sorted(e[2] for e in sends) == sorted(op.rows * row_bytes
                                                         for op in transfers)
        assert ("allgather",) in log if problem.world_size > 1 else ("allgather",) not in log


def test_benchmark_splits_skip_what_they_say():
    cfg = KernelConfig.default(P4)
    for parts, gemms, transfers in (("comm", False, True), ("compute", True, False)):
        log: list = []
        layer = _layer(P4, cfg, log)
        layer._run_plan(_Arr(), 100, _Arr(), parts)
        launched = [e[1] for e in log if e[0] == "launch"]
        assert (layer.kernels.gate_up in launched) == gemms
        assert any(e[0] == "send" for e in log) == transfers


def test_max_group_ops_splits_groups_alike_for_sends_and_receives(monkeypatch):
    """``$FLASHMOE_MAX_GROUP_OPS`` = n: the same operations, in groups holding at most n per
    (peer, direction), the i-th send to a peer in group i // n (so is the receive it matches
    on that peer, which splits by the same rule); 0 is one group; unset is the default cap."""
    from flashmoe_gen import executor
    from flashmoe_gen.errors import ArgumentError

    cfg = dataclasses.replace(KernelConfig.default(P4), fuse_sources=True, packed_slots=False)

    def groups_of(limit: str | None) -> list[list[tuple]]:
        if limit is None:
            monkeypatch.delenv("FLASHMOE_MAX_GROUP_OPS", raising=False)
        else:
            monkeypatch.setenv("FLASHMOE_MAX_GROUP_OPS", limit)
        log: list = []
        layer = _layer(P4, cfg, log)
        layer.comm.group = lambda: _Group(log)
        layer._run_plan(_Arr(), 100, _Arr(), "all")
        out, cur = [], None
        for e in log:
            if e == ("group_start",):
                cur = []
            elif e == ("group_end",):
                out.append(cur)
            elif e[0] in ("send", "recv"):
                cur.append(e)
        return out

    whole, split = groups_of("0"), groups_of("2")
    monkeypatch.setattr(executor, "DEFAULT_MAX_GROUP_OPS", 2)
    default = groups_of(None)  # unset: the default cap (2 here, so it splits these)
    assert sorted(o for g in whole for o in g) == sorted(o for g in split for o in g)
    assert max(len(g) for g in whole) > 2 * 2 * (P4.world_size - 1)  # big groups exist
    assert len(split) > len(whole)
    for g in split:  # at most 2 per (peer, direction)
        per = collections.Counter((kind, peer) for kind, peer, _ in g)
        assert max(per.values()) <= 2, per
    assert default == split
    monkeypatch.setenv("FLASHMOE_MAX_GROUP_OPS", "two")
    with pytest.raises(ArgumentError, match="FLASHMOE_MAX_GROUP_OPS"):
        layer = _layer(P4, cfg, [])  # built fine: the forward reads the variable
        layer._run_plan(_Arr(), 100, _Arr(), "all")


class _Group:
    def __init__(self, log):
        self.log = log

    def __enter__(self):
        self.log.append(("group_start",))

    def __exit__(self, *exc):
        self.log.append(("group_end",))
        return False
