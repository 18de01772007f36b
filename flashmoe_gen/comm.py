"""One process per GPU under MPI; NCCL communicators for the all-to-all traffic.

mpi4py carries the small host messages (NCCL unique ids, problem agreement, counts for
host-side decisions); ``cupy.cuda.nccl`` moves the tokens. One NCCL communicator per
communication stream, because NCCL orders operations per communicator: several streams
sharing one communicator could interleave differently on different ranks and deadlock.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import CommError, CommTimeout, DeviceError, FlashMoEError

#: Environment variable: seconds a rank waits for a peer (``300``, ``90s``, ``5m``).
TIMEOUT_ENV = "FLASHMOE_COMM_TIMEOUT"
#: Seconds a rank waits for a collective or a peer before it ends the job (dead or stopped
#: peer), unless ``$FLASHMOE_COMM_TIMEOUT`` says otherwise.
DEFAULT_TIMEOUT_S = 300.0
#: Seconds ``wait`` busy-polls before it starts sleeping between polls.
SPIN_S = 0.005


def comm_timeout() -> float:
    """``$FLASHMOE_COMM_TIMEOUT`` in seconds (a number, optionally with an ``s`` or ``m``
    suffix), else DEFAULT_TIMEOUT_S. Read on each call, never at import."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    text = raw.strip().lower()
    scale = 60.0 if text.endswith("m") else 1.0
    try:
        seconds = float(text[:-1] if text[-1] in "sm" else text) * scale
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise CommError(f"{TIMEOUT_ENV}={raw!r} is invalid: give the seconds a rank waits for "
                        "a peer as a positive number, optionally with s or m (e.g. 300, 90s, "
                        "5m)")
    return seconds


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
        with deadline(self.mpi, "setting up the NCCL communicators"):
            for _ in range(n_streams):
                uid = nccl.get_unique_id() if self.rank == 0 else None
                uid = self.mpi.bcast(uid, root=0)
                self.nccl.append(nccl.NcclCommunicator(self.world_size, uid, self.rank))
        # A rank that ends the job (abort_world) first aborts NCCL, so no peer's GPU work
        # waits on a communicator that will never answer.
        _abort_hooks.append(self.abort)

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

    def wait(self, event, what: str) -> None:
        """Wait for ``event`` on the host; a peer that never answers becomes CommError.

        Spins for the first ``SPIN_S`` (the count exchange is on every forward's critical
        path, and a sleep costs ~0.1 ms), then polls with short sleeps.
        """
        self.check_usable()
        now = time.monotonic()
        spin_until, until = now + SPIN_S, now + self.timeout_s
        polls = 0
        while not event.done:
            polls += 1
            if polls % 256 == 0 or now > spin_until:
                for c in self.nccl:
                    c.check_async_error()
                if now > until:
                    self.abort()
                    raise CommTimeout(f"rank {self.rank}: {what} did not finish in "
                                    f"{self.timeout_s:.0f} s (a peer died or hangs); NCCL aborted")
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

    def close(self) -> None:
        for c in self.nccl:
            c.destroy()
        self.nccl = []
        if self.abort in _abort_hooks:
            _abort_hooks.remove(self.abort)


# -- ending the whole job --------------------------------------------------------------
#: Run (best effort) before MPI_Abort: e.g. each live Communicator's NCCL abort.
_abort_hooks: list = []
#: Extra seconds a rank waiting for rank 0's bookkeeping gives it, so that rank 0's own,
#: more telling deadline (e.g. a locked database) fires first.
ROOT_MARGIN_S = 10.0


#: Seconds between printing the cause and MPI_Abort (see abort_world).
ABORT_FLUSH_S = 0.3


def root_wait_s() -> float:
    """Deadline of a rank waiting for rank 0's bookkeeping: the timeout plus a margin."""
    t = comm_timeout()
    return t + min(ROOT_MARGIN_S, t / 2)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (a compiler log or SQL never floods the line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def exit_code(exc: BaseException) -> int:
    """2 for a typed error (as the CLI), 130 for Ctrl-C, else 1."""
    if isinstance(exc, FlashMoEError):
        return 2
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def abort_world(mpi, cause: str, code: int = 1) -> None:
    """End every rank of the job now: one line naming this rank and the cause on stderr,
    NCCL aborted, then MPI_Abort on the world (mpirun kills the other ranks, even stopped
    ones). Does not return."""
    rank = mpi.Get_rank()
    # The process's own stderr: a live progress display may have redirected sys.stderr.
    out = sys.__stderr__ or sys.stderr
    print(f"flashmoe-tune: rank {rank} ends the job: {cause}", file=out, flush=True)
    # mpirun forwards a rank's output asynchronously and drops what it has not read when
    # the abort kills the ranks: give it a moment to carry this line.
    time.sleep(ABORT_FLUSH_S)
    for hook in list(_abort_hooks):
        try:
            hook()
        except Exception:  # the job ends anyway; a broken NCCL must not stop the abort
            pass
    mpi.Abort(code)


@contextmanager
def abort_on_error(mpi) -> Iterator[None]:
    """In a world of several ranks, any exception on this rank ends the whole job (the
    others would wait for it forever); with one rank it propagates as usual."""
    try:
        yield
    except BaseException as e:
        if mpi is None or mpi.Get_size() < 2 or (isinstance(e, SystemExit)
                                                  and e.code in (0, None)):
            raise
        abort_world(mpi, describe(e), exit_code(e))
        raise  # only reached when Abort is a test double


class Watchdog:
    """A thread that ends the job when the step in progress runs past its deadline.

    MPI's blocking collectives cannot time out, and a stopped or hung peer never answers,
    so each protocol step runs under ``deadline(...)``; when one expires this thread calls
    :func:`abort_world` while the main thread still waits inside MPI.
    """

    def __init__(self):
        self._steps: list[tuple[str, float, float, object]] = []  # what, seconds, until, mpi
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="flashmoe-watchdog", daemon=True).start()

    @contextmanager
    def step(self, mpi, what: str, seconds: float) -> Iterator[None]:
        entry = (what, seconds, time.monotonic() + seconds, mpi)
        with self._cond:
            self._steps.append(entry)
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._steps.remove(entry)
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._steps:
                    self._cond.wait()
                    continue
                what, seconds, until, mpi = min(self._steps, key=lambda s: s[2])
                left = until - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
        abort_world(mpi, CommTimeout.__name__ + f": {what} did not finish in "
                    f"{seconds:g} s (a peer died, hangs or was stopped; "
                    f"{TIMEOUT_ENV} sets the limit)", 3)


_watchdog: Watchdog | None = None
_watchdog_lock = threading.Lock()


@contextmanager
def deadline(mpi, what: str, seconds: float | None = None) -> Iterator[None]:
    """Run the block under the job's deadline (default :func:`comm_timeout`): past it, the
    whole job ends with one line naming this rank and ``what``. No-op with one rank."""
    if mpi is None or mpi.Get_size() < 2:
        yield
        return
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = Watchdog()
    with _watchdog.step(mpi, what, comm_timeout() if seconds is None else seconds):
        yield


def bcast(mpi, obj, what: str, root: int = 0, seconds: float | None = None):
    """``mpi.bcast`` under a deadline."""
    with deadline(mpi, what, seconds):
        return mpi.bcast(obj, root=root)


def allgather(mpi, obj, what: str, seconds: float | None = None) -> list:
    """``mpi.allgather`` under a deadline."""
    with deadline(mpi, what, seconds):
        return mpi.allgather(obj)
