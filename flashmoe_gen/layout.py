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


def row_offsets(rows, capacity: int, local_experts: int, packed: bool):
    """First row of each (source, global expert) inside its slot: int32 ``[P][E]``.

    ``rows[s][e]``: rows source ``s`` sends to global expert ``e`` (its count, at most C).
    Expert slots put local expert ``j`` at row ``j * C``; packed slots put the destination's
    local experts back to back (exclusive prefix sum of ``rows`` per destination), so each
    (source, destination) block is one contiguous run. Every rank computes the same table
    from the same exchanged counts, so sender and receiver agree on every address.
    """
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    p, e = rows.shape
    if e % local_experts:
        raise ValueError(f"{e} experts do not split into blocks of {local_experts}")
    if (rows > capacity).any() or (rows < 0).any():
        raise ValueError(f"rows must lie in 0..capacity={capacity}")
    if not packed:
        return np.tile((np.arange(e) % local_experts) * capacity, (p, 1)).astype(np.int32)
    r = rows.reshape(p, e // local_experts, local_experts)
    return (np.cumsum(r, axis=2) - r).reshape(p, e).astype(np.int32)


def contiguous_runs(starts, lengths) -> list[tuple[int, int]]:
    """Merge (start, length) row runs that touch, in order, dropping empty ones.

    One NCCL op per run: packed slots give one run per peer and chunk; expert slots give
    one per expert unless an expert's rows fill its whole slot.
    """
    runs: list[tuple[int, int]] = []
    for s, n in zip(starts, lengths, strict=True):
        s, n = int(s), int(n)
        if n <= 0:
            continue
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((s, n))
    return runs


def fixed_row_offsets(counts, capacity: int, local_experts: int, region, packed: bool):
    """Mode "graph": the row offsets the ``slot_offsets`` kernel computes on the device.

    ``region[j]`` = (first local expert of j's chunk, first row of that chunk's fixed region,
    ``plan.FixedSlots.region``). Packed slots stack a chunk's experts from its
    region's first row (each taking min(count, C) rows); expert slots put expert j at j * C.
    """
    import numpy as np

    counts = np.minimum(np.asarray(counts, dtype=np.int64), capacity)
    p, e = counts.shape
    out = np.empty((p, e), np.int32)
    for i in range(e):
        j = i % local_experts
        if not packed:
            out[:, i] = j * capacity
            continue
        first, row = region[j]
        out[:, i] = row + counts[:, i - j + first:i].sum(axis=1)
    return out
