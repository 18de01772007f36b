"""A torch.distributed process group behind the few mpi4py methods flashmoe_gen calls.

``Communicator`` and the tuner talk to "the world" through ``Get_rank``, ``Get_size``,
``bcast``, ``allgather``, ``Barrier`` and ``Abort``; ``TorchGroup`` implements them with
torch.distributed's object collectives, so a job started by torchrun needs no MPI library:
the NCCL unique ids travel through ``broadcast_object_list``.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist

from flashmoe_gen.errors import CommError

#: Seconds the ranks wait for each other at exit before tearing the group down anyway.
EXIT_BARRIER_S = 30


def init_from_env(backend: str = "gloo") -> None:
    """``init_process_group`` from torchrun's environment, unless already initialised.
    The default ``gloo`` carries host messages only (NCCL moves the tokens). The group this
    makes is torn down at exit after every rank got there: a rank that exits while another
    still closes its gloo connections can abort (SIGABRT) in gloo's destructors."""
    if not dist.is_initialized():
        dist.init_process_group(backend)
        atexit.register(_shutdown)


def _shutdown() -> None:
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":  # bounded: a dead peer costs seconds, not a hang
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_S))
        dist.destroy_process_group()
    except Exception:  # at exit: a peer that already died must not turn into a traceback
        pass


class TorchGroup:
    """``MPI.COMM_WORLD``'s methods on a torch.distributed process group (None: the
    default group). ``torch.distributed.init_process_group`` must have run."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise CommError("torch.distributed is not initialised: call "
                            "torch.distributed.init_process_group('nccl') first (under "
                            "torchrun it reads RANK, WORLD_SIZE, MASTER_ADDR from the "
                            "environment)")
        self.group = group
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)
        if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
            # NCCL's object collectives stage through the current CUDA device: one per rank.
            n = torch.cuda.device_count()
            if self.local_rank() < n:
                torch.cuda.set_device(self.local_rank())

    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return self._size

    def local_rank(self) -> int:
        """This process's GPU index: torchrun's LOCAL_RANK, else the group rank."""
        lr = os.environ.get("LOCAL_RANK", "")
        return int(lr) if lr.isdigit() else self._rank

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def bcast(self, obj, root: int = 0):
        box = [obj if self._rank == root else None]
        dist.broadcast_object_list(box, src=self._global(root), group=self.group)
        return box[0]

    def allgather(self, obj) -> list:
        out: list = [None] * self._size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def Barrier(self) -> None:
        dist.barrier(group=self.group)

    barrier = Barrier

    def Abort(self, code: int = 1) -> None:
        """End this process now; torchrun then ends the other ranks (as MPI_Abort does)."""
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:  # a closed stream must not stop the abort
                pass
        os._exit(code)
