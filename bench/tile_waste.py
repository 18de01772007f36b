"""Row-tile waste of the persistent kernel's TMA row tasks by how rows are grouped (CPU).

A row task covers 128 rows of one group; a group's last tile is ragged, and one of at most
64 rows costs about half a tile (its second warpgroup idles). Groups today are (source,
local expert); merging the peers' rows of an expert into one group, or every source's,
leaves one ragged tail per expert instead of one per (source, expert). Counts are drawn
as uniform top-k routing does (a multinomial over the experts per source). Prints, per
ranks and experts, the tiles a rank computes under each grouping against the rows' own
need (rows / 128).

    python bench/tile_waste.py --ranks 2,4 --experts 8,32,64 --tokens 16384
"""
from __future__ import annotations

import argparse

import numpy as np

ROW_TILE = 128


def tile_cost(rows: np.ndarray) -> np.ndarray:
    """Tiles of ROW_TILE rows per group of ``rows``; a last tile of at most half the rows
    counts half (its second warpgroup issues no MMAs)."""
    rows = np.asarray(rows)
    tail = rows % ROW_TILE
    return rows // ROW_TILE + np.where(tail == 0, 0.0, np.where(tail <= ROW_TILE // 2, 0.5, 1.0))


def waste(ranks: int, experts: int, tokens: int, top_k: int, seed: int = 0) -> dict:
    """Mean over ranks of the tiles per grouping, and the rows' need."""
    rng = np.random.default_rng(seed)
    counts = np.array([rng.multinomial(tokens * top_k, [1 / experts] * experts)
                       for _ in range(ranks)])  # [source, expert]
    local = experts // ranks
    out = {"need": 0.0, "per_source": 0.0, "own_and_peers": 0.0, "merged": 0.0}
    for d in range(ranks):
        rows = counts[:, d * local:(d + 1) * local]  # every source's rows of d's experts
        peers = np.delete(rows, d, axis=0).sum(axis=0)
        out["need"] += rows.sum() / ROW_TILE
        out["per_source"] += tile_cost(rows).sum()
        out["own_and_peers"] += tile_cost(rows[d]).sum() + tile_cost(peers).sum()
        out["merged"] += tile_cost(rows.sum(axis=0)).sum()
    return {k: v / ranks for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap.add_argument("--ranks", type=ints, default=[2, 4])
    ap.add_argument("--experts", type=ints, default=[8, 32, 64])
    ap.add_argument("--tokens", type=int, default=16384, help="per rank")
    ap.add_argument("--top-k", type=int, default=2)
    a = ap.parse_args()
    print("| ranks | experts | tiles needed | per (source, expert) | own + peers merged | "
          "every source merged |\n|---|---|---|---|---|---|")
    for p in a.ranks:
        for e in a.experts:
            w = waste(p, e, a.tokens, a.top_k)
            cells = [f"{w[k]:.0f} (+{w[k] / w['need'] - 1:.1%})"
                     for k in ("per_source", "own_and_peers", "merged")]
            print(f"| {p} | {e} | {w['need']:.0f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
