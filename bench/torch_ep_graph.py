"""The graph-captured PyTorch EP baseline: fixed-size padded transfers, no host synchronisation.

The same layer as ``torch_ep.TorchEP`` (same routing, same expert math, same weights),
written the way a serving engine would for small token counts (docs/results.md, Anchors:
"A stronger PyTorch baseline at small T"): route on the device, scatter each token into a
fixed-size block per destination peer (``tokens x min(k, E/P)`` rows: a token sends a peer at
most one row per local expert), one ``all_to_all_single`` with equal splits for the rows and
one for their local expert ids (padding rows carry id E/P, so they sort last and no GEMM group
covers them), sort the received rows by expert on the device, group offsets from a
device-side count + cumsum, grouped GEMMs, un-sort, ``all_to_all_single`` back, weighted
``index_add_``. Every shape is fixed by the token count, so the forward is captured once per
token count with ``torch.cuda.graph`` (after a warm-up on a side stream) and replayed, with
static input/output tensors copied in and out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch_ep import TorchEP

from flashmoe_gen.errors import ProblemError

#: Largest relative difference allowed between the two baselines' outputs.
AGREE = 1e-2
#: Eager forwards on a side stream before capture (NCCL and cuBLAS set up, allocator warm).
CAPTURE_WARMUP = 3


class TorchEPGraph(TorchEP):
    """``tokens``: most tokens per rank (the block size; default ``problem.tokens_per_rank``).
    ``graphs=False`` runs the same padded forward eagerly (no capture; CPU/gloo checks).

    Capture runs collectives (warm-up forwards), so every rank must meet a new token count at
    the same call, as in the benches, where all ranks have the same T.
    """

    def __init__(self, layer, tokens: int | None = None, graphs: bool = True):
        super().__init__(layer)
        p = self.p
        self.tokens = p.tokens_per_rank if tokens is None else tokens
        self.block = max(1, self.tokens * min(p.top_k, p.local_experts))
        self.graphs = graphs
        self._captured: dict[int, tuple] = {}

    @torch.no_grad()
    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        P, El, k, B, H = p.world_size, p.local_experts, p.top_k, self.block, p.hidden
        T, dev = x.shape[0], x.device
        if T > self.tokens:
            raise ProblemError("tokens", T, f"this baseline's blocks hold at most {self.tokens} "
                               "tokens per rank; build it with tokens >= the largest call")
        w, idx = self.route(x)
        flat = idx.flatten()                                  # [T*k], token-major
        dest = flat // El
        # Row of each (token, choice) inside its destination's block: how many earlier
        # entries go to the same peer (token order, as the sync baseline sends them).
        hit = dest[:, None] == torch.arange(P, device=dev)
        pos = (hit.cumsum(0) - 1).gather(1, dest[:, None]).squeeze(1)
        slot = dest * B + pos
        tok = torch.arange(T * k, device=dev) // k
        send = x.new_empty((P * B, H))
        send.index_copy_(0, slot, x.index_select(0, tok))
        ids = torch.full((P * B,), El, dtype=torch.int64, device=dev)
        ids.index_copy_(0, slot, flat % El)
        recv, recv_ids = torch.empty_like(send), torch.empty_like(ids)
        dist.all_to_all_single(recv, send)
        dist.all_to_all_single(recv_ids, ids)
        perm = recv_ids.argsort(stable=True)                  # padding (id El) sorts last
        counts = torch.zeros(El + 1, dtype=torch.int64, device=dev)
        counts.scatter_add_(0, recv_ids, torch.ones_like(recv_ids))
        offs = counts[:El].cumsum(0).to(torch.int32)
        # Rows past offs[-1] (padding) belong to no group: their outputs are never read.
        y = self.experts(recv.index_select(0, perm), offs)
        yb = torch.empty_like(y)
        yb.index_copy_(0, perm, y)
        back = torch.empty_like(send)
        dist.all_to_all_single(back, yb)
        out = torch.zeros((T, H), dtype=torch.float32, device=dev)
        out.index_add_(0, tok, back.index_select(0, slot).float() * w.flatten()[:, None])
        return self.add_shared(out, x)

    @torch.no_grad()
    def _capture(self, x: torch.Tensor) -> tuple:
        x_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                self.forward_eager(x_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread's event queries must not end the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.forward_eager(x_in)
        return graph, x_in, out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One forward: the captured graph of this token count (captured on first use)."""
        if not self.graphs:
            return self.forward_eager(x)
        entry = self._captured.get(x.shape[0])
        if entry is None:
            entry = self._captured[x.shape[0]] = self._capture(x)
        graph, x_in, out = entry
        x_in.copy_(x)
        graph.replay()
        return out.clone()

    def release(self) -> None:
        """Drop the captured graphs and their memory pools."""
        self._captured.clear()


def to_f64(t: torch.Tensor):
    """A bf16 torch tensor as a float64 numpy array on the host."""
    return t.float().cpu().numpy().astype("float64")


def time_baselines(layer, xt: torch.Tensor, comm, *, warmup: int, iters: int,
                   tokens: int | None = None, chain: int = 1) -> dict:
    """Both baselines on ``layer``'s weights and the tokens ``xt`` (every rank calls it).

    Checks the graph baseline against the sync one (max over ranks of the relative
    difference, asserted < ``AGREE``), times both (``time_callable``: CUDA events, max over
    ranks per iteration, median) and names the faster one "PyTorch EP". The returned
    ``"out"`` is the sync baseline's output (for checking our layer against it).
    """
    from torch_ep import faster

    from flashmoe_gen.comm import allgather
    from flashmoe_gen.reference import relative_error
    from flashmoe_gen.tuner.bench import time_callable

    sync = TorchEP(layer)
    graph = TorchEPGraph(layer, tokens=tokens or xt.shape[0])
    out_s, out_g = sync(xt), graph(xt)          # the graph's first call captures it
    torch.cuda.synchronize()
    mine = relative_error(to_f64(out_g), to_f64(out_s)) if len(xt) else 0.0
    agree = max(allgather(comm.mpi, mine, "comparing the PyTorch baselines"))
    assert agree < AGREE, f"graph-captured PyTorch EP differs from the sync one by {agree:.2e}"
    kw = dict(warmup=warmup, iters=iters, comm=comm, chain=chain)
    sync_ms = time_callable(lambda: sync(xt), **kw).median_ms
    graph_ms = time_callable(lambda: graph(xt), **kw).median_ms
    best, which = faster(sync_ms, graph_ms)
    graph.release()
    return dict(torch_sync_ms=round(sync_ms, 4), torch_graph_ms=round(graph_ms, 4),
                torch_ep_ms=round(best, 4), torch_ep_is=which,
                agree_baselines=float(f"{agree:.2e}"), out=out_s)
