"""tuner.bench.time_callable on the CPU: a stand-in for CuPy's stream and events."""
from __future__ import annotations

import gc
import sys
import types

import pytest

from flashmoe_gen.tuner.bench import time_callable


class _Event:
    def __init__(self):
        self.t = 0.0

    def record(self, stream=None):
        self.t = _Clock.now
        return self

    def synchronize(self):
        pass


class _Clock:
    now = 0.0


@pytest.fixture
def fake_cupy(monkeypatch):
    stream = types.SimpleNamespace(synchronize=lambda: None, record=lambda: _Event())
    cuda = types.SimpleNamespace(
        get_current_stream=lambda: stream, Event=_Event,
        get_elapsed_time=lambda a, b: b.t - a.t)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    _Clock.now = 0.0


def test_no_garbage_collection_while_timed(fake_cupy):
    """The timed calls run with the collector off (a host stall there idles the GPU inside
    the events' span); it is on again afterwards, and per-forward times divide by chain."""
    seen = []

    def fn():
        seen.append(gc.isenabled())
        _Clock.now += 2.0

    assert gc.isenabled()
    t = time_callable(fn, warmup=2, iters=3, chain=4)
    assert gc.isenabled()
    assert seen[:2] == [True, True] and seen[2:] == [False] * 12
    assert t.median_ms == pytest.approx(2.0) and t.iters == 3


def test_collector_back_on_after_a_failure(fake_cupy):
    def fn():
        if not gc.isenabled():
            raise RuntimeError("launch failed")

    with pytest.raises(RuntimeError):
        time_callable(fn, warmup=1, iters=2)
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled(fake_cupy):
    gc.disable()
    try:
        time_callable(lambda: None, warmup=0, iters=1)
        assert not gc.isenabled()
    finally:
        gc.enable()
