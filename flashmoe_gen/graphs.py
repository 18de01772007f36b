"""Mode "graph": the whole forward captured once per token count and replayed.

A plan of mode "graph" reads nothing on the host (counts, capacity and row offsets stay on
the device; every transfer has a size fixed when the layer was built), so one forward can be
captured as a CUDA graph — kernels, events across the layer's streams and the NCCL
operations — and replayed. Inputs and outputs go through static buffers sized for the
problem's token bound: a call copies ``x`` in, launches the graph and copies the result out,
all on the layer's stream ordered after the caller's, so each replay sees only its own input.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

#: Graphs kept per layer (one per distinct token count; the oldest goes first).
MAX_GRAPHS = 32


class GraphCache:
    """Captured forwards of one layer, by token count."""

    def __init__(self, layer, max_tokens: int):
        import cupy

        h = layer.problem.hidden
        self.layer = layer
        self.x = cupy.empty((max(max_tokens, 1), h), np.uint16)
        self.out = cupy.empty((max(max_tokens, 1), h), np.uint16)
        self.graphs: OrderedDict[int, object] = OrderedDict()
        self.captures = 0  # how many graphs were captured (tests: replays do not recapture)

    def forward(self, run_plan, x, out):
        """Copy ``x`` in, replay (or first capture) the graph of its token count, copy out.
        ``run_plan(x, tokens, out)`` issues the plan's operations on the layer's streams."""
        import cupy

        layer, tokens = self.layer, x.shape[0]
        s = layer.stream
        s.wait_event(cupy.cuda.get_current_stream().record())
        xs, os_ = self.x[:tokens], self.out[:tokens]
        if tokens:
            xs.data.copy_from_device_async(x.data, x.nbytes, stream=s)
        graph = self.graphs.get(tokens)
        if graph is None:
            s.begin_capture()
            try:
                run_plan(xs, tokens, os_)
            finally:
                graph = s.end_capture()
            self.graphs[tokens] = graph
            self.captures += 1
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(tokens)
        graph.launch(stream=s)
        if tokens:
            out.data.copy_from_device_async(os_.data, os_.nbytes, stream=s)
        cupy.cuda.get_current_stream().wait_event(s.record())
        return out

    def poison(self, bits: int) -> None:
        self.x.fill(bits)
        self.out.fill(bits)
