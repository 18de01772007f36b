"""Compiling ahead: the next candidates compile in worker processes while the GPU times the
current one.

``CompilePool`` runs ``build(problem, config, limits).compiled`` (NVRTC, no GPU) in a
``ProcessPoolExecutor``; the cubins land in the disk cache, where every rank's own build then
finds them. Workers are started with ``spawn``: a rank holds MPI, NCCL and CUDA state that a
forked child must not inherit; and they skip re-running the rank's ``__main__`` (a launcher
script without a ``__name__`` guard would start a second job). They die with their rank. A
compile that fails in a worker is only a missed head start: the evaluator builds the
candidate itself and records the failure as usual.

``Lookahead`` keeps up to ``depth`` asked trials queued behind the one being evaluated, so
their configs are known early enough to compile. Queued trials are RUNNING in the study and
send heartbeats like the current one (another job must not take them for a dead job's); the
ones left when the search stops are marked ``interrupted``. TPE runs with ``constant_liar``,
so asking a few trials ahead is what it does for parallel workers anyway.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem

#: Trials asked ahead of the one being evaluated (each compiles in the pool meanwhile).
DEFAULT_DEPTH = 2


def default_workers() -> int:
    """Compile workers: the CPUs this process may use, less one for the rank itself, at most
    ``DEFAULT_DEPTH`` + 1 (more would only compile trials nobody asked for yet)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min((cpus or 2) - 1, DEFAULT_DEPTH + 1))


@dataclass(frozen=True)
class Prefetched:
    """What a worker did for one config."""

    config_name: str
    ok: bool
    seconds: float
    cache_hit: bool = False
    error: str | None = None


def _worker_init() -> None:
    """A worker ends with its rank: killed when the rank dies (Linux PR_SET_PDEATHSIG), so no
    compile outlives a job that was killed, and deaf to Ctrl-C, which the rank handles."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:  # no glibc: workers then end when the pool's pipes close
            pass
        if os.getppid() == 1:  # the rank died before prctl: nothing to compile for
            os._exit(0)


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that does not import the parent's ``__main__``: workers need only
    flashmoe_gen, and a rank's main script may start a job at import."""

    @staticmethod
    def _Popen(process_obj):
        main = sys.modules["__main__"]
        saved = {k: main.__dict__.pop(k) for k in ("__file__",) if k in main.__dict__}
        spec, main.__spec__ = getattr(main, "__spec__", None), None
        try:  # spawn reads __main__'s spec or file while it prepares the child
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            main.__dict__.update(saved)
            main.__spec__ = spec


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


def _compile(problem_json: str, config_json: str, limits) -> Prefetched:
    """In a worker: build and compile one candidate into the disk cache."""
    from flashmoe_gen.build import build

    cfg = KernelConfig.from_json(config_json)
    t0 = time.monotonic()
    try:
        mod = build(MoEProblem.from_json(problem_json), cfg, limits).compiled
    except Exception as e:  # the evaluator meets it again and records it as the trial's
        return Prefetched(cfg.name, False, time.monotonic() - t0,
                          error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return Prefetched(cfg.name, True, time.monotonic() - t0, mod.cache_hit)


class CompilePool:
    """Compiles configs for one target in worker processes. Jobs are keyed by the device
    code's name (``render.device_problem``: no token count), so the candidates of a token
    sweep's later counts are known to be compiled already."""

    def __init__(self, limits, workers: int | None = None):
        self.limits = limits
        self._pool = ProcessPoolExecutor(max_workers=workers or default_workers(),
                                         mp_context=_WorkerContext(),
                                         initializer=_worker_init)
        self._jobs: dict[tuple[str, str], Future] = {}

    @staticmethod
    def _key(problem: MoEProblem, config: KernelConfig) -> tuple[str, str]:
        from flashmoe_gen.render import device_problem
        return device_problem(problem).name, config.name

    def submit(self, problem: MoEProblem, config: KernelConfig) -> None:
        """Start compiling ``config`` (once per device code; a repeat is left alone)."""
        key = self._key(problem, config)
        if key not in self._jobs:
            self._jobs[key] = self._pool.submit(_compile, problem.to_json(), config.to_json(),
                                                self.limits)

    def wait(self, problem: MoEProblem, config: KernelConfig,
             timeout: float | None = None) -> Prefetched | None:
        """The worker's result for ``config`` once done (None if it was never submitted or
        is not done within ``timeout``): waiting for the worker instead of compiling the
        same source again on this rank."""
        job = self._jobs.get(self._key(problem, config))
        if job is None:
            return None
        try:
            return job.result(timeout=timeout)
        except FutureTimeout:
            return None
        except Exception as e:  # a worker that died: the evaluator compiles itself
            return Prefetched(config.name, False, 0.0, error=f"{type(e).__name__}: {e}")

    @property
    def submitted(self) -> list[str]:
        """Config names in the order submitted."""
        return [name for _, name in self._jobs]

    def close(self, now: bool = False) -> None:
        """Drop what has not started, then wait for the workers to end: the compiles in
        flight finish, unless ``now`` (the job is failing), which kills them first (their
        cache writes are atomic). Waiting also keeps Python 3.11's exit from writing to a
        closed pool's pipe (a traceback at exit)."""
        if now:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CompilePool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(now=exc_type is not None)


class Lookahead:
    """Trials asked ahead of evaluation; each new one's config goes to the pool.

    ``ask()`` returns an asked ``optuna.Trial`` whose config is valid (the sampler sees to
    it), or None; ``next(budget)`` fills the queue up to ``depth`` + 1 trials without asking
    more than ``budget`` in all (trials still to evaluate), and pops the oldest. ``close()``
    marks what is still queued as interrupted.
    """

    def __init__(self, study, ask, space, pool: CompilePool | None, depth: int = DEFAULT_DEPTH,
                 mark_interrupted=None):
        from optuna.storages._heartbeat import get_heartbeat_thread

        self.study, self._ask, self.space, self.pool = study, ask, space, pool
        self.depth, self._mark = max(0, depth), mark_interrupted
        self._heartbeat = get_heartbeat_thread
        self._queue: deque = deque()   # (trial, config, heartbeat thread)

    def __len__(self) -> int:
        return len(self._queue)

    def next(self, budget: int):
        """The next trial to evaluate and its config, or (None, None) when none is left."""
        while len(self._queue) < self.depth + 1 and len(self._queue) < budget:
            trial = self._ask()
            if trial is None:
                break
            cfg = self.space.config_from_params(trial.params)
            trial.set_user_attr("config", cfg.name)
            beat = self._heartbeat(trial._trial_id, self.study._storage)
            beat.start()
            self._queue.append((trial, cfg, beat))
            if self.pool is not None:
                self.pool.submit(self.space.problem, cfg)
        if not self._queue:
            return None, None
        trial, cfg, beat = self._queue.popleft()
        beat.join()  # the evaluation's own heartbeat takes over
        return trial, cfg

    def ready(self, cfg: KernelConfig, timeout: float | None = None) -> Prefetched | None:
        """Wait for the pool's compile of ``cfg`` (if any), so this rank reuses its cubin."""
        return (self.pool.wait(self.space.problem, cfg, timeout) if self.pool is not None
                else None)

    def close(self) -> None:
        """Queued trials that will not be evaluated: marked interrupted, heartbeats stopped."""
        while self._queue:
            trial, _, beat = self._queue.popleft()
            beat.join()
            if self._mark is not None:
                self._mark(self.study, trial)
