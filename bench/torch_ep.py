"""The PyTorch expert-parallel baseline: synchronous all-to-all around grouped GEMMs.

Same semantics as the layer (softmax top-k, SwiGLU experts, shared experts), same weights
(taken from a FlashMoE layer's device arrays through DLPack), ``torch._grouped_mm`` for the
experts and ``torch.distributed.all_to_all_single`` for dispatch and combine. The split sizes
are read on the host (one synchronisation per forward); ``torch_ep_graph.TorchEPGraph`` is the
same layer with fixed-size transfers, captured in a CUDA graph. The benches time both and call
the faster one "PyTorch EP" (``faster``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from flashmoe_gen.errors import ProblemError


def init_torch_dist(mpi_comm, device: int) -> None:
    """NCCL process group on the MPI ranks (rank 0 picks the TCP port)."""
    import socket

    if dist.is_initialized():
        return
    port = None
    if mpi_comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = mpi_comm.bcast(port, root=0)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=mpi_comm.Get_rank(), world_size=mpi_comm.Get_size(),
                            device_id=torch.device("cuda", device))


def _bf16(a) -> torch.Tensor:
    """A bf16 tensor viewing ``a`` (a torch tensor, or a cupy array of bf16 bits)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_dlpack(a)
    return t if t.dtype == torch.bfloat16 else t.view(torch.bfloat16)


def faster(sync_ms: float, graph_ms: float | None) -> tuple[float, str]:
    """"PyTorch EP" of the tables: the faster baseline's time and its name."""
    if graph_ms is None or sync_ms <= graph_ms:
        return sync_ms, "sync"
    return graph_ms, "graph"


class TorchEP:
    """Baseline layer built from a FlashMoE layer's weights (rank-local experts).

    ``layer``: anything with ``.problem``, ``.rank`` and ``.weights`` (``DeviceWeights``
    layouts: experts N x K, as cupy arrays of bf16 bits or torch bf16 tensors).
    """

    def __init__(self, layer):
        p = layer.problem
        if not p.default_routing:
            raise ProblemError("routing", p.name, "the PyTorch baselines implement plain "
                               "softmax top-k only (no bias, groups, scaling or shared gate)")
        self.p, self.rank = p, layer.rank
        w = layer.weights
        self.gate = _bf16(w.gate)                                  # [H, E]
        # Device weights are N x K; grouped_mm wants [G, K, N]: a transposed view.
        self.w1 = _bf16(w.w1).transpose(-2, -1)
        self.w3 = _bf16(w.w3).transpose(-2, -1)
        self.w2 = _bf16(w.w2).transpose(-2, -1)
        if p.shared_experts:
            self.sw1, self.sw3 = _bf16(w.sw1).t(), _bf16(w.sw3).t()   # [H, S*Is]
            self.sw2 = _bf16(w.sw2).t()                               # [S*Is, H]

    # -- pieces both baselines share (same routing, same expert math) ----------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, global expert ids [T, k] int64)."""
        # fp32 logits as docs/semantics.md says (a bf16 matmul output would round them and
        # flip near-tied top-k choices, which is a different function, not noise).
        probs = torch.softmax(x.float() @ self.gate.float(), dim=-1)
        w, idx = probs.topk(self.p.top_k, dim=-1)
        if self.p.normalize_topk:
            w = w / w.sum(-1, keepdim=True)
        return w, idx

    def experts(self, xr: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """SwiGLU of rows grouped by local expert (``offs``: int32 ends of the groups)."""
        h = torch.nn.functional.silu(torch._grouped_mm(xr, self.w1, offs=offs)) * \
            torch._grouped_mm(xr, self.w3, offs=offs)
        return torch._grouped_mm(h, self.w2, offs=offs)

    def add_shared(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` (fp32) plus the shared experts of ``x``, as bf16."""
        if self.p.shared_experts:
            out += (torch.nn.functional.silu(x @ self.sw1) * (x @ self.sw3)) @ self.sw2
        return out.to(torch.bfloat16)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        P, El, k = p.world_size, p.local_experts, p.top_k
        w, idx = self.route(x)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        tok = order // k
        xs = x[tok]
        send = torch.bincount(flat, minlength=p.experts).view(P, El)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        got = x.new_empty((sum(out_splits), p.hidden))
        dist.all_to_all_single(got, xs, out_splits, in_splits)
        local_e = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(P),
                                          recv.flatten())
        perm = local_e.argsort(stable=True)
        offs = torch.cumsum(recv.sum(0), 0).to(torch.int32)
        y = self.experts(got[perm], offs)
        yb = torch.empty_like(y)
        yb[perm] = y
        back = x.new_empty((xs.shape[0], p.hidden))
        dist.all_to_all_single(back, yb, in_splits, out_splits)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, back.float() * w.flatten()[order, None])
        return self.add_shared(out, x)
