"""Index arithmetic of the symmetric tensor layout L[P][2][2][E_local][C][H].

Mirrors ``fmoe::slot_offset`` in templates/common.cuh.j2: a sender computes the receiver's
address from the shape alone, because the shape is the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

DISPATCH, COMBINE = 0, 1      # rounds
STAGING, INCOMING = 0, 1      # buffers


@dataclass(frozen=True)
class SymmetricLayout:
    world_size: int
    local_experts: int
    capacity: int
    hidden: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.world_size, 2, 2, self.local_experts, self.capacity, self.hidden)

    @property
    def elements(self) -> int:
        return 4 * self.world_size * self.local_experts * self.capacity * self.hidden

    def offset(self, peer: int, round_: int, buffer: int, expert: int, row: int) -> int:
        """Element offset of the first value of one row."""
        for name, v, n in (("peer", peer, self.world_size), ("round", round_, 2),
                           ("buffer", buffer, 2), ("expert", expert, self.local_experts),
                           ("row", row, self.capacity)):
            if not 0 <= v < n:
                raise IndexError(f"{name}={v} outside 0..{n - 1}")
        return ((((peer * 2 + round_) * 2 + buffer) * self.local_experts + expert)
                * self.capacity + row) * self.hidden

    def slot_offset(self, peer: int, round_: int, buffer: int, expert: int = 0) -> int:
        """Offset of the first row of expert ``expert`` in slot (peer, round, buffer)."""
        return self.offset(peer, round_, buffer, expert, 0)

    @staticmethod
    def dispatch_buffer(dest: int, self_rank: int) -> int:
        """Tokens for this rank's own experts skip the staging copy (see permute kernel)."""
        return INCOMING if dest == self_rank else STAGING
