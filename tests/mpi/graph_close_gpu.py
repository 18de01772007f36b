"""Under ``mpirun -np 2`` with 2 GPUs: a graph-mode layer still alive (and in a reference
cycle) when its Communicator closes. close() must release the captured graphs before it
destroys NCCL; a rank prints ``CLOSED`` once close() returns, then exits normally."""

import dataclasses
import sys

import cupy

from flashmoe_gen.comm import Communicator
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.runtime import FlashMoE
from flashmoe_gen.weights import MoEWeights, random_tokens

comm = Communicator()
p = MoEProblem(512, 1024, 8, 2, world_size=2, tokens_per_rank=64)
cfg = dataclasses.replace(KernelConfig.default(p), mode="graph")
layer = FlashMoE(p, cfg, weights=MoEWeights.random(p, 1), comm=comm)
layer.cycle = layer  # only a collection frees it
out = layer.forward(cupy.asarray(random_tokens(64, p.hidden, seed=comm.rank)))
cupy.cuda.Device().synchronize()
captured = layer._graph_cache.captures
comm.barrier()
comm.close()
print(f"CLOSED rank {comm.rank} captures={captured}", flush=True)
sys.exit(0)
