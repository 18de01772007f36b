"""The PyTorch expert-parallel baseline: synchronous all-to-all around grouped GEMMs.

Same semantics as the layer (softmax top-k, SwiGLU experts, shared experts), same weights
(taken from a FlashMoE layer's device arrays through DLPack), ``torch._grouped_mm`` for the
experts and ``torch.distributed.all_to_all_single`` for dispatch and combine.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def _bf16(cupy_array) -> torch.Tensor:
    t = torch.from_dlpack(cupy_array)
    return t.view(torch.bfloat16)


class TorchEP:
    """Baseline layer built from a FlashMoE layer's weights (rank-local experts)."""

    def __init__(self, layer):
        p = layer.problem
        self.p, self.rank = p, layer.rank
        self.gate = _bf16(layer.w_gate)                           # [H, E]
        # Device weights are N x K; grouped_mm wants [G, K, N]: a transposed view.
        self.w1 = _bf16(layer.w1).transpose(-2, -1)
        self.w3 = _bf16(layer.w3).transpose(-2, -1)
        self.w2 = _bf16(layer.w2).transpose(-2, -1)
        if p.shared_experts:
            self.sw1, self.sw3 = _bf16(layer.sw1).t(), _bf16(layer.sw3).t()   # [H, S*Is]
            self.sw2 = _bf16(layer.sw2).t()                                   # [S*Is, H]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        P, El, k = p.world_size, p.local_experts, p.top_k
        # fp32 logits as docs/semantics.md says (a bf16 matmul output would round them and
        # flip near-tied top-k choices, which is a different function, not noise).
        probs = torch.softmax(x.float() @ self.gate.float(), dim=-1)
        w, idx = probs.topk(k, dim=-1)
        if p.normalize_topk:
            w = w / w.sum(-1, keepdim=True)
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
        xr = got[perm]
        offs = torch.cumsum(recv.sum(0), 0).to(torch.int32)
        h = torch.nn.functional.silu(torch._grouped_mm(xr, self.w1, offs=offs)) * \
            torch._grouped_mm(xr, self.w3, offs=offs)
        y = torch._grouped_mm(h, self.w2, offs=offs)
        yb = torch.empty_like(y)
        yb[perm] = y
        back = x.new_empty((xs.shape[0], p.hidden))
        dist.all_to_all_single(back, yb, in_splits, out_splits)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, back.float() * w.flatten()[order, None])
        if p.shared_experts:
            out += (torch.nn.functional.silu(x @ self.sw1) * (x @ self.sw3)) @ self.sw2
        return out.to(torch.bfloat16)
