"""One process per GPU under MPI; NCCL communicators for the all-to-all traffic.

mpi4py carries the small host messages (NCCL unique ids, problem agreement, counts for
host-side decisions), each under a deadline (``flashmoe_gen.watchdog``); ``cupy.cuda.nccl``
moves the tokens. One NCCL communicator per
communication stream, because NCCL orders operations per communicator: several streams
sharing one communicator could interleave differently on different ranks and deadlock.
"""

from __future__ import annotations

import os
import time
import weakref
from contextlib import contextmanager

from .errors import CommError, CommTimeout, DeviceError
from .watchdog import (
    allgather,
    comm_timeout,
    deadline,
    register_abort_hook,
    unregister_abort_hook,
)

#: Seconds ``wait`` busy-polls before it starts sleeping between polls.
SPIN_S = 0.005


def wait_gpu(comm, what: str, event=None) -> None:
    """Wait for ``event`` (else all work so far on the current CuPy stream). With a
    communicator the wait is bounded at half its timeout (so a rank that waited it out still
    meets the others' next collective in time): work that never ends (a stuck candidate, a
    peer gone) aborts NCCL and raises CommTimeout instead of blocking for good."""
    import cupy

    if comm is None:
        (event or cupy.cuda.get_current_stream()).synchronize()
    else:
        comm.wait(event or cupy.cuda.get_current_stream().record(), what, comm.timeout_s / 2)


def mpi_world():
    """MPI.COMM_WORLD (imported lazily: mpi4py initialises MPI on import)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD


def local_rank(mpi_comm) -> int:
    """Rank among the processes of this node (GPU index)."""
    if hasattr(mpi_comm, "local_rank"):  # e.g. flashmoe_gen.torch.TorchGroup (torchrun)
        return mpi_comm.local_rank()
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    from mpi4py import MPI
    return mpi_comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()


def agree(mpi_comm, what: str, value) -> None:
    """Raise CommError on every rank unless every rank holds the same ``value``."""
    values = allgather(mpi_comm, value, f"agreeing on {what}")
    if any(v != values[0] for v in values):
        diff = {r: v for r, v in enumerate(values) if v != values[0]}
        raise CommError(f"ranks disagree on {what}: rank 0 has {values[0]!r}, others {diff!r}")


class Communicator:
    """MPI world + ``n_streams`` NCCL communicators and their streams, one GPU per rank."""

    def __init__(self, mpi_comm=None, n_streams: int = 1, timeout_s: float | None = None,
                 device: int | None = None):
        import cupy
        from cupy.cuda import nccl

        self.mpi = mpi_comm if mpi_comm is not None else mpi_world()
        self.rank, self.world_size = self.mpi.Get_rank(), self.mpi.Get_size()
        self.timeout_s = comm_timeout() if timeout_s is None else timeout_s
        self.aborted = False
        ngpu = cupy.cuda.runtime.getDeviceCount() if device is None else None
        self.local_rank = local_rank(self.mpi)
        if device is None:
            # Collective: every rank learns whether any rank lacks a GPU, so none hangs.
            ok = self.local_rank < ngpu
            if not all(allgather(self.mpi, ok, "checking every rank has a GPU")):
                raise DeviceError(f"{self.world_size} ranks, but rank(s) without a GPU: node "
                                  f"has {ngpu} visible GPU(s); start at most {ngpu} ranks per "
                                  "node or set CUDA_VISIBLE_DEVICES")
            device = self.local_rank
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self.streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(n_streams)]
        self.nccl = []
        # Graph caches whose captures hold this communicator's NCCL kernels: released before
        # the communicators are destroyed (close()).
        self._graph_caches: weakref.WeakSet = weakref.WeakSet()
        with deadline(self.mpi, "setting up the NCCL communicators"):
            for _ in range(n_streams):
                uid = nccl.get_unique_id() if self.rank == 0 else None
                uid = self.mpi.bcast(uid, root=0)
                self.nccl.append(nccl.NcclCommunicator(self.world_size, uid, self.rank))
        # A rank that ends the job (abort_world) first aborts NCCL, so no peer's GPU work
        # waits on a communicator that will never answer.
        register_abort_hook(self.abort)

    @classmethod
    def from_torch(cls, group=None, n_streams: int = 1, timeout_s: float | None = None,
                   device: int | None = None) -> Communicator:
        """The communicators of a torch.distributed process group (None: the default one),
        e.g. under torchrun after ``torch.distributed.init_process_group("nccl")``: the
        NCCL unique ids travel through ``broadcast_object_list``; no MPI library needed."""
        from .torch.dist import TorchGroup
        return cls(TorchGroup(group), n_streams=n_streams, timeout_s=timeout_s, device=device)

    # -- host side -------------------------------------------------------------------
    def agree(self, what: str, value) -> None:
        agree(self.mpi, what, value)

    def barrier(self) -> None:
        with deadline(self.mpi, "a barrier"):
            self.mpi.Barrier()

    # -- device side -----------------------------------------------------------------
    @contextmanager
    def group(self):
        from cupy.cuda import nccl
        self.check_usable()
        nccl.groupStart()
        try:
            yield
        finally:
            nccl.groupEnd()

    def allgather_bytes(self, send_ptr: int, recv_ptr: int, nbytes: int, stream, which: int = 0):
        from cupy.cuda import nccl
        self.check_usable()
        self.nccl[which].allGather(send_ptr, recv_ptr, nbytes, nccl.NCCL_UINT8, stream.ptr)

    def send(self, ptr: int, nbytes: int, peer: int, stream, which: int = 0) -> None:
        from cupy.cuda import nccl
        self.check_usable()
        self.nccl[which].send(ptr, nbytes, nccl.NCCL_UINT8, peer, stream.ptr)

    def recv(self, ptr: int, nbytes: int, peer: int, stream, which: int = 0) -> None:
        from cupy.cuda import nccl
        self.check_usable()
        self.nccl[which].recv(ptr, nbytes, nccl.NCCL_UINT8, peer, stream.ptr)

    def wait(self, event, what: str, seconds: float | None = None) -> None:
        """Wait for ``event`` on the host, at most ``seconds`` (default the communicator's
        timeout); a peer that never answers becomes CommError.

        Spins for the first ``SPIN_S`` (the count exchange is on every forward's critical
        path, and a sleep costs ~0.1 ms), then polls with short sleeps.
        """
        self.check_usable()
        now = time.monotonic()
        bound = self.timeout_s if seconds is None else seconds
        spin_until, until = now + SPIN_S, now + bound
        polls = 0
        while not event.done:
            polls += 1
            if polls % 256 == 0 or now > spin_until:
                for c in self.nccl:
                    c.check_async_error()
                if now > until:
                    self.abort()
                    raise CommTimeout(f"rank {self.rank}: {what} did not finish in "
                                      f"{bound:.0f} s (a peer died or hangs); NCCL aborted")
                if now > spin_until:
                    time.sleep(1e-4)
            now = time.monotonic()

    def check_usable(self) -> None:
        """Raise CommError once the communicators were aborted: the run must end."""
        if self.aborted:
            raise CommError(f"rank {self.rank}: the NCCL communicators were aborted after a "
                            "communication failure; the run cannot go on")

    def abort(self) -> None:
        self.aborted = True
        for c in self.nccl:
            try:
                c.abort()
            except Exception:  # already broken: the abort is best effort
                pass
        self.nccl = []

    def track_graphs(self, cache) -> None:
        """Have close() release ``cache``'s captured graphs first (a GraphCache)."""
        self._graph_caches.add(cache)

    def close(self) -> None:
        """Destroy the NCCL communicators, after every CUDA graph captured over them."""
        # ncclCommDestroy does not return while an instantiated graph still holds the
        # communicator's kernels (seen on 2 and 4 x H200: a run that kept a graph-mode layer
        # alive past close() hung at exit); layers in reference cycles die only at a collect.
        if self.nccl:
            from .persistent import release_pending

            # Collects (layers in reference cycles die only then) and frees collected nvlink
            # heaps; not a collective: a rank may close alone on an error.
            release_pending(self, collective=False)
            for cache in list(self._graph_caches):
                cache.release()
            self.device.synchronize()
        for c in self.nccl:
            c.destroy()
        self.nccl = []
        unregister_abort_hook(self.abort)
