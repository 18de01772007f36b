"""The persistent router's staged logits (templates/router_staged.cu.j2): where many token
batches route, each call's token rows and the gate weights come into shared memory by
cp.async, a ring of hidden-dimension stages, and every warp computes whole (token tile, 16
experts) units on the tensor cores from ldmatrix fragments.

The fragment loads of ``split_logits`` (4-byte token loads, 16-byte weight loads, both from
global memory, a few k steps in flight per warp) kept few bytes in flight: its logits took
131 of the 153 us route phase at H=I=2048 E=64 T=16384 on 4 x H200, ~12 GB/s per block where
reading x alone takes ~15 us (bench/results/2026-11-27_sweep_router_clocks_4xH200_a877941.md).
"""
from __future__ import annotations

from .config import KernelConfig
from .problem import MoEProblem

#: Bytes per element (bf16, the supported dtype).
ELEM_BYTES = 2
#: Hidden rows per stage: 128-byte token rows, the gemm tiles' swizzle (swz<64>).
STAGED_KC = 64
#: The most stages (bytes in flight: STAGES - 1 of them).
STAGED_MAX_STAGES = 8
#: ... and the fewest worth a ring.
STAGED_MIN_STAGES = 3
#: m16 token tiles per call it takes (two: 32 tokens, each weight byte read per 32 tokens)
STAGED_MTILES = 2


def staged_stage_bytes(problem: MoEProblem, mtiles: int) -> int:
    """Shared memory of one stage: ``mtiles`` x 16 token rows and STAGED_KC weight rows."""
    return (mtiles * 16 + problem.experts) * STAGED_KC * ELEM_BYTES


def router_staged_stages(problem: MoEProblem, config: KernelConfig, mma_experts: int,
                         mtiles: int) -> int:
    """Stages of the staged logits' ring, 0 where ``split_logits`` keeps them: the
    persistent kernel (its dynamic shared memory is free while it routes, and the ring
    takes no more than the tiles'), the tensor-core router (``mma_experts``) over experts
    in whole 64-wide column blocks (the weight tile's swizzle), the hidden size in
    STAGED_KC steps, and the (m16 token tile, 16 experts) units of a call shared evenly by
    the block's warps (no partial sums to add across warps); calls of two m16 token tiles
    (``router_batches`` 4, where it was measured: E=64 from 2048 tokens per rank)."""
    warps = config.router_tokens_per_block
    units = mtiles * problem.experts // 16
    if (config.transport != "nvlink" or not mma_experts or problem.experts % 64
            or problem.hidden % STAGED_KC or units % warps or mtiles < STAGED_MTILES):
        return 0
    stages = min(STAGED_MAX_STAGES,
                 config.persistent_smem() // staged_stage_bytes(problem, mtiles))
    return stages if stages >= STAGED_MIN_STAGES else 0
