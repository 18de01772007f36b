"""Ending a job of several ranks: deadlines on collectives, and the abort of the world.

MPI's blocking collectives cannot time out and a stopped or hung peer never answers, so
each protocol step runs under :func:`deadline`; a watchdog thread ends the job when one
expires. Any exception on a rank ends the job too (:func:`abort_on_error`). Either way the
rank prints one line naming itself and the cause, aborts NCCL and calls MPI_Abort on the
world, which mpirun turns into the end of every rank (docs/reliability.md).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import RESUME_EXIT, CommError, CommTimeout, ContextLost, FlashMoEError

#: Environment variable: seconds a rank waits for a peer (``300``, ``90s``, ``5m``).
TIMEOUT_ENV = "FLASHMOE_COMM_TIMEOUT"
#: Seconds a rank waits for a collective or a peer before it ends the job (dead or stopped
#: peer), unless ``$FLASHMOE_COMM_TIMEOUT`` says otherwise. With the margin a rank gives rank
#: 0's bookkeeping (at most 10 s), any single-rank fault ends a job within a minute; raise it
#: where ranks can legitimately drift further apart (e.g. very slow compiles on one rank).
DEFAULT_TIMEOUT_S = 50.0


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


#: Run (best effort) before MPI_Abort: e.g. each live Communicator's NCCL abort.
_abort_hooks: list[Callable[[], None]] = []
#: Extra seconds a rank waiting for rank 0's bookkeeping gives it, so that rank 0's own,
#: more telling deadline (e.g. a locked database) fires first.
ROOT_MARGIN_S = 10.0
#: Seconds between printing the cause and MPI_Abort (see abort_world).
ABORT_FLUSH_S = 0.3


def register_abort_hook(hook: Callable[[], None]) -> None:
    """Run ``hook`` (e.g. ``Communicator.abort``) before this rank aborts the world."""
    _abort_hooks.append(hook)


def unregister_abort_hook(hook: Callable[[], None]) -> None:
    if hook in _abort_hooks:
        _abort_hooks.remove(hook)


def root_wait_s() -> float:
    """Deadline of a rank waiting for rank 0's bookkeeping: the timeout plus a margin."""
    t = comm_timeout()
    return t + min(ROOT_MARGIN_S, t / 2)


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (a compiler log or SQL never floods the line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def exit_code(exc: BaseException) -> int:
    """RESUME_EXIT for a candidate that left the GPU unusable, 2 for another typed error (as
    the CLI), 130 for Ctrl-C, else 1."""
    if isinstance(exc, ContextLost):
        return RESUME_EXIT
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
