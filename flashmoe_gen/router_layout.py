"""The router's layouts (templates/router.cu.j2): lanes per expert and hidden row, the
split-H logits (hidden slices over blocks, tensor-core passes, token tiles per weight
fragment) and the grid and scratch they need. Shared by the router kernel, the persistent
kernel's route phase, the runtime's buffers and the tuner's space."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .problem import ELEM_BYTES, MoEProblem

if TYPE_CHECKING:
    from .config import KernelConfig


def router_lanes(experts: int) -> tuple[int, int, int]:
    """Split a warp's 32 lanes into (expert lanes, hidden lanes, experts per lane)."""
    lanes_e = 1
    while lanes_e < min(experts, 32):
        lanes_e *= 2
    return lanes_e, 32 // lanes_e, -(-experts // lanes_e)


#: Most static shared memory the split router's logits may take (tokens x experts x 4 B).
ROUTER_SPLIT_SMEM = 32 * 1024


def router_split(experts: int, warps: int) -> dict[str, int | str] | None:
    """The router's split-H layout (templates/router.cu.j2): 8 experts per 16-byte load,
    the largest power of two of lanes (<= 32) that divides the experts' vectors across
    them, the rest of the warp across the hidden dimension, and as many tokens at once as
    keep 64 accumulators per lane. None where the experts are not a multiple of 8 or the
    block's logits do not fit ``ROUTER_SPLIT_SMEM`` (the warp-per-token layout then)."""
    if experts % 8 or warps * experts * 4 > ROUTER_SPLIT_SMEM:
        return None
    vectors = experts // 8
    lanes_e = 1
    while lanes_e * 2 <= 32 and vectors % (lanes_e * 2) == 0:
        lanes_e *= 2
    per_lane = vectors // lanes_e
    return {"router_vec_lanes_e": lanes_e, "router_vec_per_lane": per_lane,
            "router_token_batch": max(1, min(warps, 64 // (8 * per_lane)))}


#: The most experts the split router's tensor-core logits take (router_mma_experts). 4 x
#: H200, persistent kernel, route phase FMA -> mma: E=64 (H=2048) 30.0 -> 17.2 us at
#: DeepSeek-V2-Lite T=1 and 459 -> 224 us at E=64 T=16384; E=256 (H=7168, DeepSeek-V3-like)
#: 33.1 -> 43.3 us at T=1 and 71.3 -> 73.9 at T=128 when the passes of 64 experts ran one
#: after another, each with all the warps' serial sums (32 barriers a slice); with the warps
#: split between passes (router_mma_pass_warps: 2 barriers) 33.0 -> 28.1 us at T=1 and
#: 73.2 -> 32.6 us at T=128 against the FMAs (session 16).
ROUTER_MMA_MAX_EXPERTS = 256


def router_mma_experts(problem: MoEProblem, warps: int) -> int:
    """Experts per pass of the split router's tensor-core logits (templates/router.cu.j2,
    split_logits): 64 or 32 where the split layout applies, the experts are a multiple of 32
    (four n tiles of 8 from one 16-byte weight load per lane) and at most
    ROUTER_MMA_MAX_EXPERTS, 8 at E=8 (one n tile from a 4-byte load), and the hidden size a
    multiple of 16 (one k step); 0 elsewhere (the FMA path). A warp per 16 hidden rows of
    mma.sync instead of FMAs per (token, expert, hidden row)."""
    e = problem.experts
    if router_split(e, warps) is None or (e % 32 and e != 8) \
            or e > ROUTER_MMA_MAX_EXPERTS or problem.hidden % 16:
        return 0
    return 64 if e % 64 == 0 else 32 if e % 32 == 0 else 8


#: The most m16 tiles of tokens one split_logits call takes per weight fragment.
ROUTER_MAX_MTILES = 4


def router_pairs_fit(problem: MoEProblem, warps: int, batches: int = 2) -> bool:
    """Whether the persistent kernel's router can take ``batches`` batches (of ``warps``
    tokens) per split_logits call (config ``router_batches``): where the tensor cores take
    every expert in one pass (8, 32 or 64 experts; s_logit grows by 4 KB per batch at 64) and
    the batches fill at most ROUTER_MAX_MTILES m16 tiles, each weight fragment feeding all
    of them. One 8-token batch filled half a tile and read all H x E gate weights per 8
    tokens (E=64 T=16384's route phase: 217 us of a 2.25 ms forward on 4 x H200; pairs:
    169 us)."""
    per = router_mma_experts(problem, warps)
    return bool(per) and per == problem.experts and batches * warps <= 16 * ROUTER_MAX_MTILES


def router_mtiles(batches: int, warps: int) -> int:
    """m16 tiles of tokens split_logits keeps per weight fragment: its calls' rows."""
    return max(1, -(-batches * warps // 16))


def router_mma_pass_warps(problem: MoEProblem, warps: int) -> int:
    """Warps of a router block that work on different passes of ``router_mma_experts``
    experts at once (each pass's k steps then split among warps // this many): the greatest
    common divisor of the passes and the warps. The passes' experts are disjoint,
    so their sums meet in s_logit without waiting on each other: warps // this many serial
    rounds (barriers) instead of passes x warps."""
    per = router_mma_experts(problem, warps)
    if not per:
        return 0
    passes = problem.experts // per
    return math.gcd(passes, warps)


#: The split router's items to aim for, (token batch, hidden slice) pairs (the router
#: kernel's blocks, or the persistent kernel's router phase): about two per SM of an
#: H100/H200, so a decode batch's gate-weight read is spread over the GPU.
ROUTER_ITEMS = 256
#: Fewest hidden rows a slice keeps (enough loads in flight per block).
ROUTER_SLICE_MIN_ROWS = 64
#: Gate weights below this many bytes are read whole by each block (a split would cost more
#: in its second pass than one block's read).
ROUTER_SLICE_MIN_BYTES = 512 * 1024


def router_slices_max(hidden: int, experts: int) -> int:
    """Most slices the router splits the hidden dimension into (1: no split)."""
    if hidden * experts * ELEM_BYTES < ROUTER_SLICE_MIN_BYTES:
        return 1
    return max(1, min(64, hidden // ROUTER_SLICE_MIN_ROWS))


def router_slices(batches: int, hidden: int, experts: int) -> int:
    """Slices per token batch (templates/router.cu.j2 router_slices spells the same)."""
    if not batches:
        return 1
    return max(1, min(router_slices_max(hidden, experts), ROUTER_ITEMS // batches))


def router_grid(problem: MoEProblem, config: KernelConfig, tokens: int) -> int:
    """Blocks of the router kernel for ``tokens``: one per token batch, times the hidden
    slices where the split router applies."""
    warps = config.router_tokens_per_block
    batches = -(-tokens // warps)
    if router_split(problem.experts, warps) is None:
        return batches
    return batches * router_slices(batches, problem.hidden, problem.experts)


def _split_items(problem: MoEProblem, max_batches: int) -> tuple[int, int]:
    """The most (batch, slice) items of a split router call with up to ``max_batches``
    token batches, and the most batches such a call has ((0, 0): none splits)."""
    split = [(b, router_slices(b, problem.hidden, problem.experts))
             for b in range(1, max_batches + 1)]
    split = [(b, s) for b, s in split if s > 1]
    return max((b * s for b, s in split), default=0), max((b for b, _ in split), default=0)


def router_part_floats(problem: MoEProblem, warps: int) -> tuple[int, int]:
    """The router kernel's (partial-logit floats, batch counters) for any token count: a
    split happens only while batches x slices <= ROUTER_ITEMS."""
    if router_split(problem.experts, warps) is None:
        return 0, 0
    items, batches = _split_items(problem, ROUTER_ITEMS)
    return items * warps * problem.experts, batches


def router_scratch_words(problem: MoEProblem, warps: int) -> int:
    """uint64 words after the persistent kernel's state for its router's partial logits
    (float [slices][batches][warps][experts]) at up to ``problem.tokens_per_rank`` tokens;
    0 where the router never splits the hidden dimension (one slice: read directly)."""
    if router_split(problem.experts, warps) is None:
        return 0
    batches = min(-(-problem.tokens_per_rank // warps), ROUTER_ITEMS)  # more never split
    items, _ = _split_items(problem, batches)
    return -(-items * warps * problem.experts // 2)
