"""GPU memory one rank's layer takes: weights and buffers, by arithmetic (no GPU needed).

``runtime.graph_memory_bytes`` gives mode "graph"'s fixed buffers; ``host_buffer_bytes`` is
mode "host"'s counterpart, mirroring the runtime's allocations (token buffers, the symmetric
tensor and expert activations at capacity C, the count tables). In host mode C follows the
counts of each call (at most every token of a source at one expert), so the default is that
bound. The tuner prints ``MemoryUse`` per rank before the first trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import KernelConfig
from .layout import SymmetricLayout
from .plan import act_slots, gathered_shape
from .problem import MoEProblem

BF16 = 2  # bytes per element of every weight and activation (bf16)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def weight_bytes(problem: MoEProblem) -> int:
    """Device bytes of one rank's weights (``DeviceWeights``): the gate, E/P routed experts,
    the fused shared experts, and the routing rule's bias and shared gate."""
    p = problem
    routed = 3 * p.local_experts * p.hidden * p.intermediate
    shared = 3 * p.hidden * p.shared_width if p.shared_experts else 0
    return ((p.hidden * p.experts + routed + shared) * BF16
            + (4 * p.experts if p.expert_bias else 0)
            + (BF16 * p.hidden if p.shared_gate else 0))


def host_buffer_bytes(problem: MoEProblem, config: KernelConfig,
                      capacity: int | None = None) -> int:
    """Device bytes of mode "host"'s buffers at ``capacity`` rows per (source, expert)
    (default: the most a call can need, every token of a source at one expert, or the
    capacity factor's C)."""
    p = problem
    if capacity is None:
        capacity = p.fixed_capacity(config.block_m) or max(
            round_up(p.tokens_per_rank, config.block_m), config.block_m)
    el, t = p.local_experts, max(p.tokens_per_rank, 1)
    slots = SymmetricLayout(p.world_size, el, capacity, p.hidden).elements * BF16
    act = act_slots(p, config) * el * capacity * p.intermediate * BF16
    # gather_experts: each local expert's run of P x C rows, and its row count
    gathered = math.prod(gathered_shape(p, capacity)) * BF16 + 4 * el \
        if config.gather_experts else 0
    per_token = 3 * 4 * p.top_k + ((p.shared_width + p.hidden) * BF16
                                   if p.shared_experts else 0)
    counts = 2 * p.world_size * p.experts * 4  # counts and row offsets, int32
    return slots + act + gathered + t * per_token + counts


def buffer_bytes(problem: MoEProblem, config: KernelConfig) -> int:
    """The buffers ``config``'s mode takes at most for ``problem``."""
    if config.mode == "graph":
        from .runtime import graph_memory_bytes
        return graph_memory_bytes(problem, config)
    return host_buffer_bytes(problem, config)


@dataclass(frozen=True)
class MemoryUse:
    """One rank's memory before the first trial, in bytes."""

    rank: int
    weights: int      # the rank's DeviceWeights
    buffers: int      # the default config's layer buffers (at most)
    free: int         # free GPU memory with the weights in place
    total: int        # the GPU's memory

    @property
    def headroom(self) -> int:
        """Free memory left once the buffers are taken (negative: they do not fit)."""
        return self.free - self.buffers


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
