"""Split-K of the persistent kernel's fused weight-streaming tasks (config ``gu_splits``,
``dn_splits``): where and how much scratch the kernel's split tiles take.

A split tile's K range is cut into S parts, one task each. Every part stores its fp32
accumulators into the tile's scratch ``[S][registers][threads]``, bumps the tile's arrival
counter, and the last to arrive sums the S parts in order 0..S-1 (the same result whatever
the arrival order) and runs the tile's epilogue (SiLU * up, or the store into the source's
heap). Only tiles whose rows fit one pass split; with more rows part 0 computes the whole
tile alone. Tiles are the shared experts' n-tiles, then ``slots`` routed experts' (a
rank's active experts, at most ``min(local experts, sources x tokens x top_k)``). Arrival
counters carry the call's epoch (nothing is reset between calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import KernelConfig
    from .problem import MoEProblem

#: Scratch the split tiles may take per rank; more means a token bound too large for splits
#: (they pay off at decode, where tiles are fewer than SMs).
MAX_SCRATCH_BYTES = 256 << 20


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SplitK:
    """The split tiles' geometry of one (problem, config); all zero/one when nothing splits.

    Scratch (uint64 words): the shared experts' region, then one region per slot (a rank's
    active routed expert), each ``[arrival counters: gate/up n-tiles, down n-tiles]`` then
    fp32 ``[gate/up tiles x gu_area][down tiles x dn_area]``. Every offset but the slots'
    count is independent of ``tokens_per_rank`` (the kernel code is too)."""

    gu_splits: int = 1  # K parts of a gate/up tile (capped by its K steps)
    dn_splits: int = 1
    gu_area: int = 0  # floats of one tile's scratch: parts x B operands x bn x tokens
    dn_area: int = 0
    ngu: int = 0  # n-tiles of a routed expert's gate/up and down, and of the shared ones
    ndn: int = 0
    ngu_shared: int = 0
    ndn_shared: int = 0
    slots: int = 0

    @classmethod
    def of(cls, problem: MoEProblem, config: KernelConfig) -> SplitK:
        if config.gu_splits == 1 and config.dn_splits == 1:
            return cls()
        gu, dn = config.gate_up, config.down
        sw = problem.shared_width
        narrow = min(problem.intermediate, sw or problem.intermediate)
        gs = min(config.gu_splits, _cdiv(problem.hidden, gu.bk))
        ds = min(config.dn_splits, _cdiv(narrow, dn.bk))
        ndn = _cdiv(problem.hidden, dn.bn)
        return cls(gs, ds, gs * 2 * gu.bn * gu.bm if gs > 1 else 0,
                   ds * dn.bn * dn.bm if ds > 1 else 0,
                   _cdiv(problem.intermediate, gu.bn), ndn,
                   _cdiv(sw, gu.bn) if sw else 0, ndn if sw else 0,
                   min(problem.local_experts,
                       problem.world_size * problem.tokens_per_rank * problem.top_k))

    @property
    def splits(self) -> bool:
        return self.gu_splits > 1 or self.dn_splits > 1

    def _region(self, ngu: int, ndn: int) -> int:
        if not self.splits:
            return 0
        return ngu + ndn + _cdiv(ngu * self.gu_area + ndn * self.dn_area, 2)

    @property
    def shared_words(self) -> int:
        """uint64 words of the shared experts' region."""
        return self._region(self.ngu_shared, self.ndn_shared)

    @property
    def slot_words(self) -> int:
        """uint64 words of one routed expert slot's region."""
        return self._region(self.ngu, self.ndn)

    @property
    def words(self) -> int:
        return self.shared_words + self.slots * self.slot_words

    @property
    def fits(self) -> bool:
        """Whether the scratch stays within ``MAX_SCRATCH_BYTES``."""
        return self.words * 8 <= MAX_SCRATCH_BYTES

    def check(self, config_name: str) -> None:
        if not self.fits:
            raise ConfigError("dn_splits" if self.dn_splits > 1 else "gu_splits",
                              max(self.gu_splits, self.dn_splits),
                              f"split tiles need {self.words * 8 / 2**20:.0f} MiB of "
                              f"scratch per rank, at most {MAX_SCRATCH_BYTES >> 20} MiB: fewer "
                              "splits, or a smaller tokens_per_rank (splits pay off at decode)",
                              config_name)


#: Blocks the default's split tasks aim to fill: one wave on an H100's 132 SMs (H200: 132).
SPLIT_TARGET_TASKS = 132
#: Fewest K steps a part keeps (each part pays a scratch round trip and an arrival).
SPLIT_MIN_STEPS = 4


def default_splits(problem: MoEProblem, down, choices: tuple[int, ...]) -> tuple[int, int]:
    """K splits (gate/up, down) of the persistent default's fused ws tiles, ``down`` being
    its down tile: gate/up whole; down in the most parts with which the down tiles of the
    experts a decode step activates still fit one wave (``SPLIT_TARGET_TASKS``), each part
    keeping ``SPLIT_MIN_STEPS`` K steps. Active
    experts per rank are expected under uniform routing: ``E_local (1 - (1 - 1/E)^(P T k))``.
    (2 x H200, seed example, kernel us at T=1 / T=8: splits 1x1 48.7 / 50.1, 1x4 38.9 / 40.4,
    1x8 38.9 / 44.7, 2x4 40.1 / 47.5: splitting gate/up did not pay; bench/results
    2026-11-26_nvlink_splitk_2xH200_d3d0d4f.md.)"""
    draws = problem.world_size * problem.tokens_per_rank * problem.top_k
    active = problem.local_experts * (1 - (1 - 1 / problem.experts) ** draws)
    sw = problem.shared_width
    k = min(problem.intermediate, sw or problem.intermediate)
    tasks = active * _cdiv(problem.hidden, down.bn) + (_cdiv(problem.hidden, down.bn) if sw else 0)
    fit = [s for s in choices
           if tasks * s <= SPLIT_TARGET_TASKS and _cdiv(k, down.bk) >= s * SPLIT_MIN_STEPS]
    return 1, max(fit, default=1)
