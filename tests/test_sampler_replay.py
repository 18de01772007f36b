"""bench/sampler_replay.py replays the committed grid: its space is the grid's own."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from sampler_replay import load_grid, space_of, steepness  # noqa: E402

from flashmoe_gen.problem import MoEProblem  # noqa: E402

GRID = ROOT / "bench" / "results" / "2026-11-26_grid_dsv2lite_small_2xH100.json"


def test_replay_space_is_the_stored_grid():
    """A grid stored before a knob existed (this one predates packed slots) is replayed over
    exactly the configs it measured, not the current space's names."""
    table = load_grid(str(GRID), "-")
    p = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=2, tokens_per_rank=512)
    space = space_of(table, p)
    assert space.choices["packed"] == (False,)
    assert {c.name for c in space.valid_configs()} == set(table)


def test_steepness():
    assert steepness({"a": 1.0, "b": 1.05, "c": 1.2, "d": 2.0}) == 0.5
    table = load_grid(str(GRID), "-")
    assert steepness(table) < 0.5  # the committed grid is flat: the target needs another
