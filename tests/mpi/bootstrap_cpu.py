"""Run under ``mpirun -np 2`` on CPU: the MPI side of the bootstrap (no GPU, no NCCL)."""

import sys

from flashmoe_gen.comm import agree, local_rank, mpi_world
from flashmoe_gen.errors import CommError
from flashmoe_gen.problem import MoEProblem

world = mpi_world()
rank, size = world.Get_rank(), world.Get_size()
assert size == 2, size
assert local_rank(world) == rank  # one node: local rank == world rank

p = MoEProblem(512, 2048, 8, 2, world_size=2)
agree(world, "problem", p.name)  # same everywhere: no error

# Ranks that disagree must all raise, none may hang.
mine = p if rank == 0 else p.replace(top_k=3)
try:
    agree(world, "problem", mine.name)
except CommError as e:
    assert "disagree" in str(e) and "top_k" not in str(e) and "k3" in str(e), e
else:
    sys.exit(f"rank {rank}: disagreement not detected")

world.Barrier()
print(f"rank {rank}: bootstrap MPI side OK", flush=True)
