"""Run by tests/test_torch_multigpu.py under ``torchrun --nproc-per-node 2`` (2 GPUs):
argv[1] is a scratch winners database."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_blocks import HIDDEN, make_block  # noqa: E402

from flashmoe_gen import MoEProblem  # noqa: E402
from flashmoe_gen.comm import Communicator  # noqa: E402
from flashmoe_gen.reference import moe_reference, relative_error  # noqa: E402
from flashmoe_gen.torch import FlashMoELayer  # noqa: E402
from flashmoe_gen.weights import MoEWeights  # noqa: E402

os.environ["FLASHMOE_DB"] = f"sqlite:///{sys.argv[1]}"
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
comm = Communicator.from_torch()
rank = comm.rank
assert (comm.world_size, comm.device.id) == (2, local)


def bits(x):
    return x.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def tokens(t, seed):
    return torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(
        torch.bfloat16).cuda()


# The layer with random weights, checked against the float64 reference (every rank's tokens).
p = MoEProblem(hidden=HIDDEN, intermediate=32, experts=8, top_k=2, shared_experts=1,
               world_size=2, tokens_per_rank=64)
w = MoEWeights.random(p, seed=0)
layer = FlashMoELayer(p, comm=comm, weights=w)
counts = (64, 40)  # ranks pass different token counts
xs = [tokens(counts[r], seed=10 + r) for r in range(2)]
with torch.inference_mode():
    y = layer(xs[rank])
ref = moe_reference(p, [bits(x) for x in xs], w)
clear = ref.routing[rank].clear(p)
err = relative_error(y.double().cpu().numpy()[clear], ref.out[rank][clear])
assert err < 2e-2, f"rank {rank}: layer vs reference {err}"

# A Mixtral block (same seed on both ranks) split over the 2 ranks vs its own forward.
block = make_block("mixtral", device="cuda")
hl = FlashMoELayer.from_hf(block, world_size=2, comm=comm, tokens_per_rank=64)
x = tokens(64, seed=20 + rank)
with torch.inference_mode():
    theirs, ours = block(x[None])[0], hl(x)
    _, _, their_idx = block.gate(x)
# Compare the tokens both route alike (HF rounds the router logits to bf16, we keep fp32).
same = (their_idx.sort(dim=1).values == hl.last_routing()[0].long().sort(dim=1).values).all(1)
same = same.cpu().numpy()
assert same.sum() >= 50, same.sum()
e2 = relative_error(ours.double().cpu().numpy()[same], theirs.double().cpu().numpy()[same])
assert e2 < 2e-2, f"rank {rank}: from_hf layer vs Mixtral block {e2}"
# Both ranks use the config rank 0 looked up.
names = comm.mpi.allgather(hl.kernel_config.name)
assert names[0] == names[1], names
print(f"rank {rank}: torchrun layer OK (errors {err:.2e}, {e2:.2e})", flush=True)
comm.close()
dist.destroy_process_group()
