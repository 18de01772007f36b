"""A Hugging Face Mixtral-style MoE block run through FlashMoELayer on 2 GPUs (torchrun).

Every rank builds the same small random ``MixtralSparseMoeBlock`` (transformers), takes its
half of the experts with ``FlashMoELayer.from_hf`` (config from the winners database via
``flashmoe_gen.lookup``, else the heuristic default), runs its own tokens through both the
block's own forward and the layer, and prints the relative error and both times (CUDA
events, median):

    torchrun --nproc-per-node 2 examples/hf_mixtral_block.py
    torchrun --nproc-per-node 2 examples/hf_mixtral_block.py --hidden 4096 --intermediate 14336

Needs ``pip install "flashmoe_gen[hf]"`` (torch + transformers) and one GPU per rank.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch
import torch.distributed as dist
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from flashmoe_gen.comm import Communicator
from flashmoe_gen.torch import FlashMoELayer


def random_block(a) -> MixtralSparseMoeBlock:
    """The same random block on every rank (seeded): experts ~ N(0, 1/fan_in); the router
    a few times larger so routing is decided, as in a trained model."""
    cfg = MixtralConfig(hidden_size=a.hidden, intermediate_size=a.intermediate,
                        num_local_experts=a.experts, num_experts_per_tok=a.top_k)
    cfg._experts_implementation = "eager"  # transformers' own loop over the experts
    block = MixtralSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            scale = 4.0 if name.startswith("gate.") else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1]))
    return block.to(torch.bfloat16).cuda().eval().requires_grad_(False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cuda_ms(fn, warmup: int, iters: int) -> float:
    """Median time of ``fn`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on shared machines
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    comm = Communicator.from_torch()  # NCCL ids through torch.distributed, no MPI
    rank, world = comm.rank, comm.world_size

    block = random_block(a)
    layer = FlashMoELayer.from_hf(block, world_size=world, comm=comm, tokens_per_rank=a.tokens)
    if rank == 0:
        t = layer.tuned
        print(f"problem {layer.problem.name} on {world} GPU(s)\n"
              f"config  {layer.kernel_config.name} ({t.provenance if t else 'given'})",
              flush=True)

    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(a.tokens, a.hidden, generator=g).to(torch.bfloat16).cuda()
    with torch.inference_mode():
        ref = block(x[None])[0]  # the block's own forward (all experts on this GPU)
        out = layer(x)           # this rank's tokens through the experts of all ranks
        err = rel_err(out, ref)
        # HF rounds the router logits to bf16 (the layer keeps them fp32): a token near a
        # tie may pick another expert. The error over the tokens both route alike:
        _, _, hf_idx = block.gate(x)
        same = (hf_idx.sort(1).values == layer.last_routing()[0].long().sort(1).values).all(1)
        err_same = rel_err(out[same], ref[same])
        n_same = int(same.sum())
        hf_ms = cuda_ms(lambda: block(x[None]), a.warmup, a.iters)
        ours_ms = cuda_ms(lambda: layer(x), a.warmup, a.iters)
    rows = comm.mpi.allgather((rank, err, n_same, err_same, hf_ms, ours_ms))
    if rank == 0:
        print(f"{'rank':>4}  {'rel err vs block':>16}  {'same experts':>12}  "
              f"{'rel err there':>13}  {'HF block ms':>11}  {'FlashMoELayer ms':>16}")
        for r, e, n, es, h, o in rows:
            print(f"{r:>4}  {e:>16.2e}  {n:>5}/{a.tokens:<6}  {es:>13.2e}  {h:>11.3f}  "
                  f"{o:>16.3f}")
        print(f"HF eager on 1 GPU: {max(r[4] for r in rows):.3f} ms per {a.tokens} tokens; "
              f"FlashMoELayer on {world} GPUs: {max(r[5] for r in rows):.3f} ms "
              "(slowest rank)")
    comm.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
