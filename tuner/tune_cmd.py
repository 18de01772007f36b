"""``flashmoe-tune tune``: the search on every rank, the report and the winner on rank 0.

``--tokens 1,8,32`` is a sweep: each count is tuned in turn in one job, each with its own
study and winner; the device code does not depend on the count, so the later counts reuse
the earlier counts' cubins, and each new study starts from the nearest tuned problems'
winners (the earlier counts' among them). Rank 0 compiles the next candidates in a process
pool (``tuner.prefetch``) while the current one is evaluated.

Any failure on any rank ends the whole job with one line naming the rank and the cause
(``flashmoe_gen.watchdog.abort_on_error``); ``--resume`` reconciles the study and the winners
database (``flashmoe_gen.db.sync``). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from flashmoe_gen.errors import CommError


class GpuBackend:
    """What a tune measures on: this GPU's limits and environment, and the layer evaluator.
    Tests pass a CPU stand-in (tests/mpi/tune_cpu.py) to run the real command without one."""

    def __init__(self):
        #: Per rank count, the IPC probe's answer (None: every rank opens every peer's memory).
        self._ipc: dict[int, str | None] = {}

    def limits(self):
        from flashmoe_gen.arch import current_device_limits
        return current_device_limits()

    def environment(self, world_size: int):
        from flashmoe_gen.db import Environment
        from flashmoe_gen.render import template_hash
        return Environment.detect(world_size, template_hash())

    #: Rank 0's progress hears the evaluator's stages through this (``TuneProgress.stage``).
    stage = None

    def evaluator(self, problem, world, space, a: argparse.Namespace):
        """Collective: (evaluate, Communicator or None)."""
        from flashmoe_gen.comm import Communicator
        from flashmoe_gen.tuner.objective import LayerEvaluator

        P = problem.world_size
        comm = Communicator(world, n_streams=max(space.choices["streams"])) if P > 1 else None
        return LayerEvaluator(problem, comm, seed=a.seed, warmup=a.warmup, iters=a.iters,
                              check_mode=getattr(a, "check", "sampled"),
                              check_rows=getattr(a, "check_rows", None),
                              stage=self.stage), comm

    def transports(self, comm, requested: str) -> tuple[str, ...]:
        """Collective: the transports a tune chooses between. ``auto``: nccl, and nvlink
        where every rank opens every peer's memory (one node, CUDA IPC)."""
        if requested == "nccl":
            return ("nccl",)
        from flashmoe_gen.persistent import probe_ipc

        # One probe per rank count for the run (a --tokens sweep builds a Communicator per
        # count; whether the ranks open each other's memory does not change): every rank
        # caches alike, so all probe or none.
        key = 1 if comm is None else comm.world_size
        if key not in self._ipc:
            self._ipc[key] = None if comm is None else probe_ipc(comm)  # one rank: no peers
        reason = self._ipc[key]
        if reason is None:
            return ("nccl", "nvlink") if requested == "auto" else ("nvlink",)
        if requested == "nvlink":
            raise CommError(f"--transport nvlink: {reason}; use --transport nccl or auto")
        if comm.rank == 0:
            print(f"transport nvlink left out of the search: {reason}", flush=True)
        return ("nccl",)

    def compile_pool(self, limits, a: argparse.Namespace):
        """Rank 0's pool compiling candidates ahead (None: each rank compiles its own)."""
        from flashmoe_gen.tuner.prefetch import CompilePool, default_workers

        workers = getattr(a, "compile_workers", None)
        workers = default_workers() if workers is None else workers
        return CompilePool(limits, workers) if workers > 0 else None


def run_tune(a: argparse.Namespace, backend: GpuBackend | None = None) -> int:
    from flashmoe_gen.tuner.launch import mpi_ranks
    from flashmoe_gen.watchdog import abort_on_error

    world, P, rank = mpi_ranks(a.gpus)
    with abort_on_error(world if P > 1 else None):
        return _tune(a, backend or GpuBackend(), world, P, rank)


def _tune(a: argparse.Namespace, backend: GpuBackend, world, P: int, rank: int) -> int:
    import optuna

    from flashmoe_gen.paths import default_storage_url
    from flashmoe_gen.tuner.args import problem_from_args

    counts = tuple(a.tokens) if isinstance(a.tokens, (tuple, list)) else (a.tokens,)
    # Every count's problem is checked before any work starts.
    problems = [problem_from_args(a, world_size=P, tokens=t) for t in counts]
    if rank == 0:  # the first second shows the job: set-up of large models takes a while
        print(f"flashmoe-tune: {a.trials} trial(s) of {problems[0].name}"
              + (f" (and {len(problems) - 1} more token count(s))" if len(problems) > 1
                 else "") + f" on {P} rank(s)", flush=True)
    limits = backend.limits()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = a.storage or default_storage_url()
    pool = backend.compile_pool(limits, a) if rank == 0 else None
    results = []
    try:
        for problem in problems:
            results.append((problem, _tune_count(a, backend, world, P, rank, problem, limits,
                                                 storage, pool, sweep=len(problems) > 1)))
    except BaseException:
        if pool is not None:
            pool.close(now=True)  # a failing job does not wait for compiles
        raise
    if pool is not None:
        pool.close()
    if rank == 0 and len(problems) > 1:
        sweep_report(results, a)
    return 0


def _tune_count(a: argparse.Namespace, backend: GpuBackend, world, P: int, rank: int,
                problem, limits, storage: str, pool, sweep: bool):
    """Collective: tune one token count; rank 0 returns (StudyResult, Environment)."""
    from flashmoe_gen.tuner.progress import TuneProgress

    progress = None
    if rank == 0:
        if sweep:
            print(f"tokens per rank {problem.tokens_per_rank}: {problem.name}", flush=True)
        progress = TuneProgress(a.trials, f"T={problem.tokens_per_rank} " if sweep else "")
    try:
        return _tune_study(a, backend, world, P, rank, problem, limits, storage, pool, sweep,
                           progress)
    finally:
        if progress is not None:
            progress.stop()


def _tune_study(a, backend, world, P, rank, problem, limits, storage, pool, sweep, progress):
    from flashmoe_gen.tuner.space import SearchSpace
    from flashmoe_gen.tuner.study import run_study
    from flashmoe_gen.watchdog import allgather, bcast, deadline, root_wait_s

    mpi = world if P > 1 else None
    space = SearchSpace.for_problem(problem, limits, a.space)
    if progress is not None:
        progress.stage(f"setting up weights and inputs on {P} rank(s)", trial=False)
    backend.stage = progress.stage if progress is not None else None
    evaluate, comm = backend.evaluator(problem, world, space, a)
    transports = backend.transports(comm, getattr(a, "transport", "nccl"))
    if transports != ("nccl",):
        space = SearchSpace.for_problem(problem, limits, a.space, transports)
    mine = getattr(evaluate, "memory", None)
    uses = allgather(mpi, mine, "gathering the memory report") if mpi is not None else [mine]
    if progress is not None and all(u is not None for u in uses):
        progress.memory(uses)

    env = None
    record = sync = on_trial = None
    seeds: list = []
    if rank == 0:
        from flashmoe_gen.db import make_engine, record_trial
        from flashmoe_gen.db.repository import nearest_winners
        from flashmoe_gen.db.sync import reconcile

        progress.stage("opening the winners database and the study", trial=False)
        with deadline(mpi, "opening the winners database"):
            env = backend.environment(P)
            engine = make_engine(a.db)
            seeds = [w.config for w in nearest_winners(engine, problem, env.compute_capability)]
        # A study's knob values are fixed: one with nvlink in its space, or whose values
        # changed (the fingerprint), is another study.
        space_key = a.space + ("" if transports == ("nccl",) else "+" + "+".join(transports))
        study_name = a.study_name or \
            f"{problem.name}__{space_key}__{env.key}__{space.fingerprint}"
        if sweep and a.study_name:
            study_name = f"{a.study_name}__t{problem.tokens_per_rank}"

        def record(res):  # before the study's tell: the database is written first
            o = res.outcome
            record_trial(engine, problem, env, res.config, status=o.status,
                         median_ms=o.median_ms, p20_ms=o.p20_ms, p80_ms=o.p80_ms,
                         rel_error=o.rel_error, failure_reason=o.reason,
                         study_name=study_name, number=res.number)

        def sync(study):
            r = reconcile(study, engine, problem, env)
            if r.repaired:
                print(f"study {study.study_name} and the winners database reconciled: "
                      f"{len(r.told) + len(r.readded)} trial(s) told from the database, "
                      f"{len(r.recorded)} recorded from the study"
                      + ("; winner recomputed" if r.winner_changed else ""), flush=True)

        on_trial = progress.trial
    else:
        study_name = None
    if mpi is not None:
        study_name = bcast(mpi, study_name, "waiting for rank 0 to open the winners database",
                           seconds=root_wait_s())
    t0 = time.monotonic()
    if progress is not None:
        progress.stage("choosing the first candidate (compiling ahead)")
    res = run_study(problem, evaluate, mpi=mpi, space=space, study_name=study_name,
                    sampler=a.sampler, n_trials=a.trials, timeout_s=a.timeout,
                    storage=storage if rank == 0 else None, resume=a.resume, seed=a.seed,
                    on_trial=on_trial, record=record, sync=sync, seeds=seeds, pool=pool)
    if progress is not None:
        progress.stop()
    if comm is not None:  # every rank is done with the GPU: nobody waits for the report
        comm.barrier()
        comm.close()
    if rank == 0:
        report(problem, res, study_name, storage, env, a, time.monotonic() - t0)
    return res, env


def report(problem, res, study_name: str, storage: str, env, a, seconds: float) -> None:
    """Top configs, the default vs the best, and a plot of the search."""
    import optuna
    from rich.console import Console
    from rich.table import Table

    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.tuner.study import shown_url

    console = Console(width=200)
    study = optuna.load_study(study_name=study_name, storage=storage)
    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                  key=lambda t: t.value)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and t.user_attrs.get("status") not in ("invalid", None)]
    console.print(f"{problem.name} on {env.gpu_name} x {problem.world_size}: "
                  f"{len(done)} ok, {len(failed)} failed trials in study {study_name} "
                  f"({seconds:.0f} s this run)")
    t = Table(title="top configs (median of max-over-ranks latency)")
    for col in ("#", "trial", "median ms", "p20", "p80", "rel err", "config"):
        t.add_column(col)
    for i, tr in enumerate(done[:10]):
        u = tr.user_attrs
        t.add_row(str(i + 1), str(tr.number), f"{tr.value:.4f}", f"{u.get('p20_ms', 0):.4f}",
                  f"{u.get('p80_ms', 0):.4f}", f"{u.get('rel_error', 0):.1e}",
                  u.get("config", ""))
    console.print(t)
    default = KernelConfig.default(problem, env.arch).name
    dflt = [tr for tr in done if tr.user_attrs.get("config") == default]
    if done and dflt:
        console.print(f"heuristic default {dflt[0].value:.4f} ms, best {done[0].value:.4f} ms: "
                      f"{dflt[0].value / done[0].value:.2f}x faster")
    for tr in failed[:5]:
        console.print(f"failed trial {tr.number} ({tr.user_attrs.get('status')}): "
                      f"{tr.user_attrs.get('reason', '')[:160]}")
    if a.plot and done:  # only where asked: no file appears unrequested
        try:
            path = Path(a.plot)
            if path.suffix == ".png":
                import matplotlib
                matplotlib.use("Agg")
                with warnings.catch_warnings():  # "experimental" since optuna 2.2
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    ax = optuna.visualization.matplotlib.plot_optimization_history(study)
                ax.set_ylabel("median latency, ms (max over ranks)")
                ax.figure.savefig(path, dpi=110, bbox_inches="tight")
            else:  # self-contained HTML (plotly.js embedded): opens offline
                fig = optuna.visualization.plot_optimization_history(study)
                fig.write_html(str(path), include_plotlyjs=True)
            console.print(f"plot of the search: {path}")
        except Exception as e:  # plotting is a report extra: never fail the run for it
            console.print(f"no plot ({type(e).__name__}: {e}); pip install plotly")
    if done:
        console.print(f"winner stored in {a.db or 'the default database'}: "
                      f"{done[0].user_attrs.get('config')}")
    console.print(f"study store: {shown_url(storage)} (study {study_name}); to continue this "
                  "study, run the same command with --resume", soft_wrap=True, highlight=False)



def sweep_report(results, a) -> None:
    """One line per token count of a sweep: its winner and latency (every one is stored)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="token sweep: the winner of each count (stored; flashmoe-tune "
              "export-configs ships them)")
    for col in ("tokens/rank", "best ms", "M tok/s", "trials", "config"):
        t.add_column(col)
    for problem, (res, _env) in results:
        best = res.best if res is not None else None
        if best is None:
            t.add_row(str(problem.tokens_per_rank), "-", "-", str(len(res.trials) if res else 0),
                      "no candidate passed")
            continue
        ms = best.outcome.median_ms
        rate = problem.world_size * problem.tokens_per_rank / (ms * 1e-3) / 1e6
        t.add_row(str(problem.tokens_per_rank), f"{ms:.4f}", f"{rate:.2f}", str(len(res.trials)),
                  best.config.name)
    Console(width=200).print(t)
