"""The persistent router's staged logits (templates/router_staged.cu.j2): where many token
batches route, each call's token rows and the gate weights come into shared memory by
cp.async, a ring of hidden-dimension stages, and the warps compute (m16 token tile, 8 or 16
experts) units on the tensor cores from ldmatrix fragments.

The fragment loads of ``split_logits`` (4-byte token loads, 16-byte weight loads, both from
global memory, a few k steps in flight per warp) kept few bytes in flight: its logits took
131 of the 153 us route phase at H=I=2048 E=64 T=16384 on 4 x H200, ~12 GB/s per block where
reading x alone takes ~15 us (bench/results/2026-11-27_sweep_router_clocks_4xH200_a877941.md).
Staged: 59 us, the route 87 us, the forward 1.987 -> 1.934-1.958 ms
(bench/results/2026-11-27_sweep_staged_router_4xH200_dcc2808.md); E=32 and E=64's 8-token
calls on 2 x H200 (bench/results/2026-11-27_sweep_staged_all_2xH200_3bc4e5c.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import KernelConfig
from .problem import ELEM_BYTES, MoEProblem

#: Hidden rows per stage: 128-byte token rows, the gemm tiles' swizzle (swz<64>).
STAGED_KC = 64
#: The most stages (bytes in flight: STAGES - 1 of them).
STAGED_MAX_STAGES = 8
#: ... and the fewest worth a ring.
STAGED_MIN_STAGES = 3
#: Experts per column block of the ring's weight tile (its rows, 128 bytes, are the
#: swizzle's span); fewer experts take one block of their own width.
STAGED_BLOCK = 64
#: The regime measured on a GPU is the only one taken unless this is set: the tensor-core
#: router's 16-expert units with every expert in one column block (E=64 32-token calls:
#: route 153 -> 87 us on 4 x H200; E=32 T=16384, k lanes: 102 -> 72 us, E=64 T=1024's
#: 8-token calls 17.4 -> 14.3 us on 2 x H200). Left out: 8-expert units (E=8, the FMA
#: router's problems: E=8 T=16384 152 -> 168 us, Mixtral T=4096 60 -> 93 us, slower) and
#: 64-expert blocks of more experts (E=128 and 256, not yet timed). All are emulated lane by
#: lane (tests/test_router_staged.py); ``bench/nvlink_sweep.py --staged-all`` sets this for
#: an A/B.
STAGED_ALL = False
#: Each call reads the hidden dimension's stages from its own starting stage (the call's
#: index mod the stage count), not from 0: every block reads the same gate weights, and in
#: step they ask the same L2 lines at once. The sums' order changes, not what they sum; the
#: same call index starts at the same stage every forward. 4 x H200, E=64 T=16384, the
#: default with and without, alternating (bench/results/2026-11-28_gpu_checks_session32.md):
#: logits per block 58.8 / 58.5 -> 49.3 / 50.0 us, the route phase 85.3 / 86.3 -> 76.0 /
#: 77.1 us; E=32 T=16384 32.0 -> 31.0 us (the route phase 58.1 both); the forwards within
#: the runs' noise. ``bench/nvlink_sweep.py --no-staged-rotate`` clears it for an A/B.
STAGED_ROTATE = True


@dataclass(frozen=True)
class StagedPlan:
    """The ring's stages, the experts per unit (8 or 16) and per weight column block, and
    whether each call starts at its own stage (STAGED_ROTATE)."""
    stages: int
    unit: int
    block: int
    rotate: bool = False


def staged_stage_bytes(problem: MoEProblem, mtiles: int) -> int:
    """Shared memory of one stage: ``mtiles`` x 16 token rows and STAGED_KC weight rows."""
    return (mtiles * 16 + problem.experts) * STAGED_KC * ELEM_BYTES


def staged_plan(problem: MoEProblem, config: KernelConfig, mtiles: int, mma_experts: int,
                split_h: bool) -> StagedPlan | None:
    """How the persistent router stages its logits, None where ``split_logits`` keeps
    them: the persistent kernel (its dynamic shared memory is free while it routes, and the
    ring takes no more than the tiles'), the split router's layout (``split_h``: its
    s_logit; router_layout.router_split), experts in
    whole column blocks, the hidden size in STAGED_KC steps, units the warps share evenly
    (whole units per warp, or a unit per k lane); and, unless STAGED_ALL, the measured
    regime: the tensor-core router (``mma_experts``), 16-expert units, every expert in one
    column block."""
    e, warps = problem.experts, config.router_tokens_per_block
    unit = 16 if e % 16 == 0 else 8 if e % 8 == 0 else 0
    block = STAGED_BLOCK if e % STAGED_BLOCK == 0 else e if e in (8, 16, 32) else 0
    if (config.transport != "nvlink" or not unit or not block
            or not split_h or problem.hidden % STAGED_KC):
        return None
    units = mtiles * e // unit
    if units % warps and warps % units:
        return None
    if not STAGED_ALL and (not mma_experts or unit != 16 or block != e):
        return None
    stages = min(STAGED_MAX_STAGES,
                 config.persistent_smem() // staged_stage_bytes(problem, mtiles))
    return StagedPlan(stages, unit, block, STAGED_ROTATE) if stages >= STAGED_MIN_STAGES \
        else None
