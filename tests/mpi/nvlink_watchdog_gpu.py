"""Under ``mpirun -np 2`` with 2 GPUs: transport "nvlink" with a late rank and a lost one.

1. Rank 1 sleeps before its forward: rank 0's kernel waits on rank 1's flags and both get
   the reference's answer.
2. Rank 1 never calls: rank 0's kernel must end with an error within the watchdog bound
   (FLASHMOE_COMM_TIMEOUT), and the record must name rank 1's dispatch.

FLASHMOE_WATCHDOG_CASE=producer runs both with a producer warpgroup (config task_producer),
whose thread, not the workers', waits on the peer's flags.

Prints one ``NVLINK ...`` line per result; exits with os._exit (a trapped context cannot
finalize cleanly).
"""

import os
import sys
import time

import cupy

from flashmoe_gen.check import check_layer
from flashmoe_gen.comm import Communicator
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.runtime import FlashMoE
from flashmoe_gen.weights import MoEWeights, random_tokens

comm = Communicator()
rank = comm.rank
p = MoEProblem(512, 1024, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=200)
ws = GemmTile(32, 128, 64, 8, 1, 4, "ws")
cfg = KernelConfig(ws, ws, router_tokens_per_block=8, transport="nvlink")
if os.environ.get("FLASHMOE_WATCHDOG_CASE") == "producer":  # the producer waits on the flags
    gu = GemmTile(128, 128, 64, 8, 1, 4, "wgmma")
    cfg = KernelConfig(gu, GemmTile(128, 256, 64, 8, 1, 4, "wgmma"), transport="nvlink",
                       ws_tma=True, task_producer=True, stage_epilogue=1, phased_tasks=True)
w = MoEWeights.random(p, 3)
layer = FlashMoE(p, cfg, weights=w, comm=comm)
x_bits = random_tokens(200, p.hidden, seed=10 + rank)

if rank == 1:
    time.sleep(1.5)  # late: rank 0's kernel is already waiting on this rank's flags
res = check_layer(layer, x_bits, w, comm)
print(f"NVLINK late rank {rank}: rel err {res.max_rel_error:.2e} ok={res.ok}", flush=True)
comm.barrier()

if rank == 0:
    t0 = time.monotonic()
    try:
        layer.forward(cupy.asarray(x_bits))
        cupy.cuda.Device().synchronize()
        print("NVLINK lost peer: no error", flush=True)
    except Exception as e:  # the trap surfaces as a CUDA error at the synchronisation
        stall = layer._persistent.stall()
        print(f"NVLINK lost peer after {time.monotonic() - t0:.1f} s: {type(e).__name__}; "
              f"{stall}", flush=True)
else:
    time.sleep(float(os.environ.get("FLASHMOE_COMM_TIMEOUT", "5")) + 10)
sys.stdout.flush()
os._exit(0)
