"""The forward schedule as data: the plan the export embeds and prints is the runtime's.

For every configuration of the small search space, and for every combination of the
schedule knobs (chunks, communication streams, shared stream, fused sources, packed slots,
overlap), the exported file's ``// plan:`` header equals ``build_plan`` (what
``runtime.FlashMoE`` executes) and its generated forward holds one ``// op N:`` statement
group per plan operation, in the plan's order. The plan's GEMM arguments, evaluated, point
where ``SymmetricLayout`` says each slot is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest

from flashmoe_gen.build import build
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.executor import python_launcher
from flashmoe_gen.export import export_cu
from flashmoe_gen.layout import COMBINE, DISPATCH, INCOMING, STAGING, SymmetricLayout
from flashmoe_gen.plan import Combine, Gemms, Record, Transfer, TransferGroup, Wait, build_plan
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.space import SearchSpace

P2 = MoEProblem(1024, 512, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=300)
P4 = MoEProblem(512, 1024, 16, 2, world_size=4, tokens_per_rank=256, capacity_factor=1.5)
P1 = MoEProblem(512, 1024, 8, 2, shared_experts=2, tokens_per_rank=100)
SCHEDULE = dict(chunks_per_peer=(1, 2, 4), comm_streams=(1, 2), shared_stream=(True, False),
                fuse_sources=(False, True), packed_slots=(True, False), overlap=(True, False),
                mode=("host", "graph"))


def _embedded(text: str) -> tuple[dict, list[str]]:
    plan = json.loads(re.search(r"^// plan: (.*)$", text, re.M).group(1))
    ops = re.findall(r"^  // op (\d+): (.*)$", text, re.M)
    assert [int(n) for n, _ in ops] == list(range(len(ops)))
    return plan, [line for _, line in ops]


def _check_export(problem: MoEProblem, cfg: KernelConfig) -> None:
    plan = build_plan(problem, cfg)
    text = export_cu(problem, cfg, with_main=problem.world_size > 1)
    embedded, lines = _embedded(text)
    assert embedded == json.loads(plan.to_json())
    assert lines == plan.lines()
    assert build(problem, cfg).plan == plan  # the plan FlashMoE(problem, cfg) executes


def _small_space_configs(problem: MoEProblem) -> list[KernelConfig]:
    space = SearchSpace.for_problem(problem, "sm_90", "small")
    keys = list(space.choices)
    out = []
    for values in itertools.product(*(space.choices[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        if space.check(params) is None:
            out.append(space.config_from_params(params))
    return out


@pytest.mark.parametrize("problem", [P2, P1], ids=["p2", "p1"])
def test_export_plan_equals_runtime_plan_small_space(problem):
    configs = _small_space_configs(problem)
    assert len(configs) >= 16
    for cfg in configs:
        _check_export(problem, cfg)


@pytest.mark.parametrize("problem", [P2, P4], ids=["p2_shared", "p4_capacity"])
def test_export_plan_equals_runtime_plan_every_schedule_knob(problem):
    base = KernelConfig.default(problem)
    for values in itertools.product(*SCHEDULE.values()):
        knobs = dict(zip(SCHEDULE, values, strict=True))
        _check_export(problem, dataclasses.replace(base, **knobs))


@pytest.mark.parametrize("knobs", [dict(), dict(fuse_sources=True, chunks_per_peer=2),
                                   dict(overlap=False, comm_streams=2, chunks_per_peer=4)],
                         ids=["default", "fused", "serial"])
def test_plan_orders_every_transfer(knobs):
    """Each (step, chunk) is dispatched once and combined once, after it was computed;
    every wait names an event recorded before it; remote experts wait for their data."""
    cfg = dataclasses.replace(KernelConfig.default(P4), **knobs)
    ops = build_plan(P4, cfg).ops
    recorded: set[int] = set()
    main_waits: set[int] = set()
    arrived: dict[tuple[int, int], int] = {}  # (step, e0) -> the event recorded after it
    computed: set[tuple[int, int]] = set()
    combined: list[tuple[int, int]] = []
    for j, op in enumerate(ops):
        if isinstance(op, Record):
            recorded.add(op.event)
        elif isinstance(op, Wait):
            assert op.event in recorded, op
            if op.stream.kind == "main":
                main_waits.add(op.event)
        elif isinstance(op, (Transfer, TransferGroup)):
            group = op.transfers if isinstance(op, TransferGroup) else (op,)
            assert all(t.stream == op.stream for t in group)
            for t in group:
                if t.round == DISPATCH:
                    after = ops[j + 1]
                    assert isinstance(after, Record) and after.stream == op.stream
                    arrived[(t.step, t.e0)] = after.event
                elif t.step != 0:  # step 0: this rank's own results, staging -> incoming
                    assert (t.step, t.e0) in computed, t
                    combined.append((t.step, t.e0))
        elif isinstance(op, Gemms) and "fused" in op.what:
            assert set(arrived.values()) <= main_waits
            computed |= set(arrived)
        elif isinstance(op, Gemms) and op.step not in (None, 0):
            e0 = int(re.search(r"experts \[(\d+),", op.what).group(1))
            assert arrived[(op.step, e0)] in main_waits, op.what
            computed.add((op.step, e0))
    assert sorted(combined) == sorted(arrived)
    assert len(arrived) == (P4.world_size - 1) * min(cfg.chunks_per_peer, P4.local_experts)


@pytest.mark.parametrize("fuse", [False, True])
def test_gemm_arguments_point_into_the_right_slots(fuse):
    """Evaluated as the runtime does, A and C of each expert GEMM are the slots that
    SymmetricLayout names for that source (own results straight to the incoming slot)."""
    p = P4
    cfg = dataclasses.replace(KernelConfig.default(p), chunks_per_peer=2, fuse_sources=fuse)
    plan = build_plan(p, cfg)
    cap, me, base = 64, 1, 1 << 40
    lay = SymmetricLayout(p.world_size, p.local_experts, cap, p.hidden)
    env = dict(me=me, cap=cap, tokens=7, layout=base, act=0, w1=0, w3=0, w2=0, sw1=0, sw3=0,
               sw2=0, x=0, shared_act=0, shared_out=0, counts=0, row_off=0,
               max_rows=lambda s, a, b: 5, max_remote_rows=lambda: 6)
    seen = 0
    for op in plan.ops:
        if not isinstance(op, Gemms) or op.step is None and not fuse:
            continue
        src = me if op.step in (None, 0) else (me - op.step) % p.world_size
        gate_up, down = (python_launcher(g)(dict(env, src=src))[2] for g in op.launches)
        if "fused" in op.what:  # outer index = source; this rank's own slot skipped
            assert gate_up[0] == base + 2 * lay.slot_offset(0, DISPATCH, INCOMING)
            assert down[5] == base + 2 * lay.slot_offset(0, COMBINE, STAGING)
            assert gate_up[13] == 2 * 0 + lay.slot_offset(1, DISPATCH, INCOMING) - \
                lay.slot_offset(0, DISPATCH, INCOMING)
            assert gate_up[16] == me
        else:
            out_buf = INCOMING if src == me else STAGING
            assert gate_up[0] == base + 2 * lay.slot_offset(src, DISPATCH, INCOMING)
            assert down[5] == base + 2 * lay.slot_offset(src, COMBINE, out_buf)
        seen += 1
    assert seen == (3 if fuse else 2 + 2 * 3)  # local chunks (+ each peer's chunks | fused)


def test_signatures_pack_by_name():
    from flashmoe_gen.signatures import GEMM, POSITIONS
    packed = POSITIONS.pack(dict(topk_idx=5, tokens=7, pos=None, counts=8))
    assert packed == (5, 7, 0, 8) and type(packed[1]).__name__ == "int32"
    with pytest.raises(TypeError, match="counts"):
        POSITIONS.pack(dict(topk_idx=5, tokens=7, pos=6))
    with pytest.raises(TypeError, match="bogus"):
        POSITIONS.pack(dict(topk_idx=5, tokens=7, pos=6, counts=8, bogus=1))
    # the template declarations and the export's instantiations print the same list
    assert GEMM.types().count(",") == len(GEMM.params) - 1
    assert GEMM.declaration().split(", ")[0] == "const fmoe::elem_t* __restrict__ A"


def test_weight_streaming_fused_launch_reads_each_weight_once():
    """Fused sources with weight-streaming tiles: no early launch for this rank's tokens;
    one launch per GEMM over every source (nothing skipped), after every dispatch landed;
    then this rank's results go staging -> incoming by a step-0 combine transfer per chunk,
    ordered after the launch, before the combine."""
    ws = GemmTile(32, 64, 64, 4, 1, 4, "ws")
    cfg = KernelConfig(ws, dataclasses.replace(ws, bn=128), fuse_sources=True,
                       packed_slots=True)
    assert cfg.fuses_own_tokens
    assert not dataclasses.replace(cfg, fuse_sources=False).fuses_own_tokens
    ops = build_plan(P4, cfg).ops
    gemms = [op for op in ops if isinstance(op, Gemms) and op.what != "shared experts"]
    assert [g.what for g in gemms] == ["experts of every source's tokens, this rank's too "
                                       "(fused)"]
    env = dict(me=1, cap=64, tokens=7, layout=0, act=0, w1=0, w3=0, w2=0, sw1=0, sw3=0, sw2=0,
               x=0, shared_act=0, shared_out=0, counts=0, row_off=0, max_all_rows=lambda: 9,
               max_remote_rows=lambda: 0)
    for launch in gemms[0].launches:
        rows, _, args = python_launcher(launch)(env)
        assert rows == 9 and args[16] == -1  # every source's rows, this rank's too
    at = ops.index(gemms[0])
    recorded = next(op.event for op in ops[at:] if isinstance(op, Record))
    # One NCCL group per stream and direction; the combine group holds own results too.
    groups = [(j, op) for j, op in enumerate(ops) if isinstance(op, TransferGroup)]
    assert not any(isinstance(op, Transfer) for op in ops)
    assert [g.transfers[0].round for _, g in groups] == [DISPATCH, COMBINE]
    j, back = groups[1]
    assert j > at and [t.step for t in back.transfers] == [1, 2, 3, 0]
    waits = [op for op in ops[at:j] if isinstance(op, Wait) and op.stream == back.stream]
    assert any(w.event == recorded for w in waits)
    assert isinstance(ops[-1], Combine)
    lines = build_plan(P4, cfg).lines()
    assert any(line.startswith("one NCCL group: combine step 1") for line in lines)
