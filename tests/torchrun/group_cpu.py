"""Run by tests/test_torch_cpu.py under ``torchrun --nproc-per-node 2`` (CPU, gloo)."""

from __future__ import annotations

import torch.distributed as dist

from flashmoe_gen.comm import agree, local_rank
from flashmoe_gen.errors import CommError
from flashmoe_gen.torch import TorchGroup
from flashmoe_gen.tuner import launch

world, size, rank = launch.mpi_ranks(2)  # initialises gloo from torchrun's environment
assert isinstance(world, TorchGroup) and (size, rank) == (2, dist.get_rank()), (size, rank)
assert world.bcast(("uid", 7) if rank == 0 else None) == ("uid", 7)
assert world.allgather(rank * 10) == [0, 10]
assert local_rank(world) == rank
agree(world, "problem", "same")
try:
    agree(world, "problem", f"rank{rank}")
    raise AssertionError("disagreement not detected")
except CommError as e:
    assert "ranks disagree on problem" in str(e)
world.Barrier()
print(f"rank {rank}: torchrun world OK", flush=True)
dist.destroy_process_group()
