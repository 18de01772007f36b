"""Mode "graph": the whole forward captured once per token count and replayed.

A plan of mode "graph" reads nothing on the host (counts, capacity and row offsets stay on
the device; every transfer has a size fixed when the layer was built), so one forward can be
captured as a CUDA graph — kernels, events across the layer's streams and the NCCL
operations — and replayed. Inputs and outputs go through static buffers sized for the
problem's token bound: a call copies ``x`` in, launches the graph and copies the result out,
all on the layer's stream ordered after the caller's, so each replay sees only its own input.

Transport "nvlink" (one kernel, no NCCL) also replays *direct* graphs: a caller that passes
the same ``x`` and ``out`` buffers on two calls in a row (a decode loop) gets, from the
second on, a graph captured with its own pointers, so a replay costs one launch and no
copies. Keyed by (tokens, x, out) addresses: a replay reads whatever those addresses hold
then, which is the caller's current input.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

#: Graphs kept per layer (one per distinct token count; the oldest goes first).
MAX_GRAPHS = 32


class _Entry:
    """One captured forward: the graph and the device pointers and byte count of its
    token count's slices of the static input and output (computed once: slicing a cupy
    array per call costs microseconds a replay should not pay)."""

    __slots__ = ("graph", "x_ptr", "out_ptr", "nbytes")

    def __init__(self, graph, x_ptr: int, out_ptr: int, nbytes: int):
        self.graph, self.x_ptr, self.out_ptr, self.nbytes = graph, x_ptr, out_ptr, nbytes


class GraphCache:
    """Captured forwards of one layer, by token count."""

    def __init__(self, layer, max_tokens: int):
        import cupy

        h = layer.problem.hidden
        self.layer = layer
        self.x = cupy.empty((max(max_tokens, 1), h), np.uint16)
        self.out = cupy.empty((max(max_tokens, 1), h), np.uint16)
        self.graphs: OrderedDict[int, _Entry] = OrderedDict()
        self.captures = 0  # how many graphs were captured (tests: replays do not recapture)
        # Direct graphs (nvlink only: no NCCL op may register a caller's buffer).
        self.direct: OrderedDict[tuple[int, int, int], object] = OrderedDict()
        self.direct_captures = 0
        self._direct_ok = getattr(layer, "_persistent", None) is not None
        self._last_key: tuple[int, int, int] | None = None
        # The tma kernel encodes its tensor maps on first use, which capture forbids: one
        # plain forward first (every rank alike: each one's first call).
        self._plain_run_first = getattr(layer, "_tma", None) is not None
        track = getattr(getattr(layer, "comm", None), "track_graphs", None)
        if track is not None:
            track(self)

    def release(self) -> None:
        """Drop every captured graph (the next call captures again)."""
        self.graphs.clear()
        self.direct.clear()
        self._last_key = None

    def _capture(self, run_plan, tokens: int, stream) -> _Entry:
        xs, os_ = self.x[:tokens], self.out[:tokens]
        stream.begin_capture()
        try:
            run_plan(xs, tokens, os_)
        finally:
            graph = stream.end_capture()
        entry = _Entry(graph, xs.data.ptr, os_.data.ptr, xs.nbytes)
        self.graphs[tokens] = entry
        self.captures += 1
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return entry

    def forward(self, run_plan, x, out) -> None:
        """Copy ``x`` in, replay (or first capture) the graph of its token count, copy out,
        on the layer's stream (the caller orders it after its own and back, FlashMoE.forward).
        ``run_plan(x, tokens, out)`` issues the plan's operations on the layer's streams."""
        s = self.layer.stream
        graph = self._direct(run_plan, x, out, s) if self._direct_ok else None
        if graph is not None:
            graph.launch(stream=s)
        else:
            self._through_static(run_plan, x, out, s)

    def _through_static(self, run_plan, x, out, s) -> None:
        """This token count's graph over the static buffers, ``x`` copied in and the result
        copied out on ``s`` (captured on first use, after one plain run where the tma
        kernel must encode its maps)."""
        from cupy.cuda import runtime

        tokens = x.shape[0]
        entry = self.graphs.get(tokens)
        if entry is None and self._plain_run_first:
            xs = self.x[:tokens]
            if tokens:
                runtime.memcpyAsync(xs.data.ptr, x.data.ptr, xs.nbytes,
                                    runtime.memcpyDeviceToDevice, s.ptr)
            run_plan(xs, tokens, self.out[:tokens])
            self._plain_run_first = False
        if entry is None:
            entry = self._capture(run_plan, tokens, s)
        else:
            self.graphs.move_to_end(tokens)
        # The copies stay outside the graph: the caller's x and out differ between calls.
        if tokens:
            runtime.memcpyAsync(entry.x_ptr, x.data.ptr, entry.nbytes,
                                runtime.memcpyDeviceToDevice, s.ptr)
        entry.graph.launch(stream=s)
        if tokens:
            runtime.memcpyAsync(out.data.ptr, entry.out_ptr, entry.nbytes,
                                runtime.memcpyDeviceToDevice, s.ptr)

    def captured_direct(self, x, out):
        """This call's direct graph if one was captured already (a decode loop's steady
        state), else None. Its one kernel node may be launched on the caller's stream: the
        persistent kernel touches only the layer's buffers, ``x`` and ``out``, so the layer
        stream and the two event hops around it (~2 x the GPU's stream-wait latency per
        forward) are not needed."""
        if not self._direct_ok:
            return None
        key = _direct_key(x, out)
        graph = self.direct.get(key)
        if graph is not None:
            self.direct.move_to_end(key)
            self._last_key = key
        return graph

    def _direct(self, run_plan, x, out, stream):
        """The direct graph of this call's (tokens, x, out), captured on the second call in a
        row with them; None (copy through the static buffers) otherwise."""
        key = _direct_key(x, out)
        graph = self.direct.get(key)
        if graph is None and key == self._last_key:
            stream.begin_capture()
            try:
                run_plan(x, key[0], out)
            finally:
                graph = stream.end_capture()
            self.direct[key] = graph
            self.direct_captures += 1
            while len(self.direct) > MAX_GRAPHS:
                self.direct.popitem(last=False)
        elif graph is not None:
            self.direct.move_to_end(key)
        self._last_key = key
        return graph

    def poison(self, bits: int) -> None:
        self.x.fill(bits)
        self.out.fill(bits)


def _direct_key(x, out) -> tuple[int, int, int]:
    """What a direct graph is captured for: the token count and the caller's x and out
    (their addresses are baked into the graph's kernel node)."""
    return x.shape[0], x.data.ptr, out.data.ptr
