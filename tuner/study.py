"""The search: an Optuna study driven by rank 0, evaluated on every rank (SPMD).

Only rank 0 talks to the sampler and the storages. Each step it asks for a candidate,
broadcasts its config, every rank evaluates it, the outcomes are combined (a failure on
one rank fails the candidate everywhere) and rank 0 records the trial, then tells the
sampler. ``None`` broadcast ends the loop on every rank. Every step has a deadline and
any error on any rank ends the job (docs/reliability.md).

Only valid configs become trials (``tuner.sampling``: constraints applied while sampling).
A new study is seeded with the heuristic default, the winners of the nearest tuned problems
(``seeds``) and the known-good configs. With a compile pool (``tuner.prefetch``) rank 0 asks
a few trials ahead and their configs compile in worker processes while the current one is
evaluated.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize runs
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError, ContextLost, DatabaseError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.status import TrialStatus
from flashmoe_gen.watchdog import (
    abort_on_error,
    allgather,
    bcast,
    comm_timeout,
    deadline,
    root_wait_s,
)

from .objective import INVALID, Outcome, combine, context_lost, failure_outcome, is_fatal
from .prefetch import DEFAULT_DEPTH, CompilePool, Lookahead
from .sampling import distributions, make_valid_sampler, space_changes
from .space import SearchSpace

SAMPLERS = ("tpe", "random", "grid", "cmaes")
#: Give up when this many consecutive candidates are invalid (the samplers propose valid
#: configs only, so this is a guard, never the way a search ends).
MAX_INVALID_STREAK = 500
INTERRUPTED = TrialStatus.INTERRUPTED
#: Seconds between heartbeats of a running trial in an RDB study store.
HEARTBEAT_S = 10
#: A running trial whose job sent no heartbeat for this many intervals is a dead job's.
STALE_AFTER = 6


@dataclass(frozen=True)
class TrialResult:
    number: int
    config: KernelConfig
    outcome: Outcome


@dataclass
class StudyResult:
    study_name: str
    trials: list[TrialResult]
    best: TrialResult | None
    seconds: float


def make_sampler(name: str, space: SearchSpace, seed: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler ``name``, proposing only valid configs of ``space`` (``tuner.sampling``);
    the grid visits every valid config once."""
    if name not in SAMPLERS:
        raise ConfigError("sampler", name, f"choose one of {list(SAMPLERS)}")
    return make_valid_sampler(name, space, seed)


def study_seeds(space: SearchSpace, seeds: Sequence[KernelConfig] = ()) -> list[KernelConfig]:
    """The first trials of a new study: the heuristic default, then ``seeds`` (the nearest
    tuned problems' winners), then the known-good configs; each once, valid ones only."""
    base = space.seeds()
    out: list[KernelConfig] = []
    for cfg in (*base[:1], *seeds, *base[1:]):
        if cfg not in out and space.contains(cfg) and \
                space.check(space.params_from_config(cfg)) is None:
            out.append(cfg)
    return out


def _fail_stale(study: optuna.Study) -> None:
    """Trials whose job stopped sending heartbeats (it died) become FAIL; trials of other
    jobs that are alive and share the study are left running."""
    with warnings.catch_warnings():  # "experimental" since optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def shown_url(url: str) -> str:
    """A storage URL as printed: any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show it as given
        return url


def _storage(url: str, heartbeat_s: int):
    """An RDB storage whose running trials send heartbeats, so that a job sharing the study
    tells a dead job's trials (no heartbeat for ``STALE_AFTER`` heartbeats) from live ones."""
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_s,
                                              grace_period=STALE_AFTER * heartbeat_s)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DatabaseError(shown_url(url), f"cannot open it as the Optuna study store "
                            f"({type(e).__name__}: {first})",
                            "pass --storage a SQLAlchemy URL such as "
                            "sqlite:////path/to/studies.db (or set FLASHMOE_STUDIES)") from e


def open_study(study_name: str, storage: str | None, sampler: optuna.samplers.BaseSampler,
               resume: bool, heartbeat_s: int = HEARTBEAT_S) -> optuna.Study:
    store = _storage(storage, heartbeat_s) if storage is not None else None
    if store is not None and not resume:
        names = {s.study_name for s in optuna.get_all_study_summaries(store)}
        if study_name in names:
            raise ConfigError("study", study_name,
                              "already exists in the storage: pass --resume to continue it, "
                              "or --study-name for a new one")
    return optuna.create_study(study_name=study_name, storage=store, sampler=sampler,
                               direction="minimize", load_if_exists=resume)


def run_study(problem: MoEProblem, evaluate: Callable[[KernelConfig], Outcome], *,
              mpi=None, space: SearchSpace, study_name: str, sampler: str = "tpe",
              n_trials: int = 30, timeout_s: float | None = None, storage: str | None = None,
              resume: bool = False, seed: int = 0, enqueue_seeds: bool = True,
              on_trial: Callable[[TrialResult, TrialResult | None], None] | None = None,
              record: Callable[[TrialResult], None] | None = None,
              sync: Callable[[optuna.Study], None] | None = None,
              heartbeat_s: int = HEARTBEAT_S, seeds: Sequence[KernelConfig] = (),
              pool: CompilePool | None = None,
              lookahead: int = DEFAULT_DEPTH) -> StudyResult | None:
    """Collective. Returns the result on rank 0, None on the other ranks.

    ``n_trials`` counts evaluated candidates (including earlier runs of a resumed
    study); invalid combinations are rejected before compiling and do not count.
    ``enqueue_seeds``: evaluate the heuristic default, ``seeds`` (e.g. the nearest tuned
    problems' winners) and the known-good configs first (``study_seeds``).
    ``pool``: rank 0's compile pool; with one, ``lookahead`` trials are asked ahead of the
    one evaluated and compile meanwhile (without one, trials are asked one at a time).
    ``record(result)`` stores a finished trial durably (the winners database) *before* the
    study is told, so a crash between the two leaves a trial that ``sync(study)`` (run
    when the study is opened, before dead jobs' trials are failed) tells from the record.
    ``on_trial(result, best)`` runs after the tell (progress).

    Any exception on any rank, and any protocol step past its deadline
    (``$FLASHMOE_COMM_TIMEOUT``), ends the whole job with one line naming the rank
    (see ``flashmoe_gen.watchdog.abort_on_error``); a failed candidate is a result instead.
    """
    rank = mpi.Get_rank() if mpi is not None else 0
    with abort_on_error(mpi):
        if rank != 0:
            return _follow(evaluate, mpi)
        return _lead(problem, evaluate, mpi, space, study_name, sampler, n_trials, timeout_s,
                     storage, resume, seed, enqueue_seeds, on_trial, record, sync, heartbeat_s,
                     seeds, pool, lookahead)


def _follow(evaluate, mpi) -> None:
    """Ranks other than 0: evaluate what rank 0 sends until it sends None."""
    while True:
        msg = bcast(mpi, None, "waiting for rank 0's next candidate", seconds=root_wait_s())
        if msg is None:
            return None
        outcome = _safe(evaluate, KernelConfig.from_json(msg))
        allgather(mpi, outcome, "gathering the outcomes of a candidate")


def _lead(problem, evaluate, mpi, space, study_name, sampler, n_trials, timeout_s, storage,
          resume, seed, enqueue_seeds, on_trial, record, sync, heartbeat_s, seeds, pool,
          lookahead) -> StudyResult:
    t0 = time.monotonic()
    with deadline(mpi, "opening the study"):
        smp = make_sampler(sampler, space, seed)
        study = open_study(study_name, storage, smp, resume, heartbeat_s)
        changed = space_changes(study, space)
        if changed:
            k, (old, new) = next(iter(changed.items()))
            raise ConfigError(
                "study", study_name,
                f"was searched over another space ({len(changed)} knob(s) differ, e.g. {k}: "
                f"{list(old)} then, {list(new)} now; an upgrade or another --space / "
                "--transport): pass --study-name for a new study (the winners database "
                "keeps this one's trials, and their winners seed the new one)")
        if sync is not None:
            sync(study)  # before failing stale trials: a recorded trial keeps its number
        _fail_stale(study)
        # Resumed studies count what earlier runs evaluated; unfinished trials do not count.
        evaluated = sum(1 for t in study.trials
                        if t.user_attrs.get("status") not in (None, INVALID, INTERRUPTED)
                        and t.state in (TrialState.COMPLETE, TrialState.FAIL))
        if sampler != "grid" and enqueue_seeds:
            for cfg in study_seeds(space, seeds):
                study.enqueue_trial(space.params_from_config(cfg), skip_if_exists=True)
                if pool is not None:  # the seeds are known now: compile them all ahead
                    pool.submit(problem, cfg)
        best = _best_so_far(study)
    ahead = Lookahead(study, _asker(study, space, smp, sampler), space, pool,
                      lookahead if pool is not None else 0, _interrupted)
    results: list[TrialResult] = []
    trial = None
    try:
        while evaluated < n_trials:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                break
            with deadline(mpi, "asking the sampler for a candidate"):
                _fail_stale(study)
                trial, cfg = ahead.next(n_trials - evaluated)
                if trial is None:  # a grid that is done, or only invalid proposals
                    break
            # This rank waits for the pool's compile rather than compiling it again (bounded
            # well inside the other ranks' wait for the candidate; past it, each compiles).
            ahead.ready(cfg, timeout=comm_timeout() / 2)
            with get_heartbeat_thread(trial._trial_id, study._storage):
                if mpi is not None:
                    bcast(mpi, cfg.to_json(), "sending the candidate")
                mine = _safe(evaluate, cfg)
                outcome = (combine(allgather(mpi, mine, "gathering the outcomes of a candidate"))
                           if mpi is not None else mine)
                res = TrialResult(trial.number, cfg, outcome)
                with deadline(mpi, f"recording trial {trial.number}"):
                    if record is not None:
                        record(res)  # durable first: a crash after it is repaired by sync
                    _tell(study, trial, outcome, sync)
                    trial = None
            evaluated += 1
            results.append(res)
            if context_lost(outcome):  # recorded; every later candidate would fail as well
                raise ContextLost(
                    f"candidate {cfg.name} left the GPU or NCCL unusable "
                    f"({outcome.reason[:300]}). Trial {res.number} is recorded as "
                    f"{outcome.status}: the job resumes with the next candidates in fresh "
                    "processes (--restarts), or run the same command with --resume")
            if outcome.ok and (best is None or outcome.value < best.outcome.value):
                best = res
            if on_trial is not None:
                on_trial(res, best)
    finally:
        with deadline(mpi, "marking the interrupted trial"):
            if trial is not None:  # interrupted mid-trial: keep the study consistent
                _interrupted(study, trial)
            ahead.close()  # trials asked ahead and never evaluated
    if mpi is not None:
        bcast(mpi, None, "ending the search")
    return StudyResult(study.study_name, results, best, time.monotonic() - t0)


def _asker(study: optuna.Study, space: SearchSpace, smp, sampler: str):
    """``ask()``: the next trial (a valid config), or None when the grid is done. The
    samplers propose valid configs only; an invalid one is still refused here, as a guard,
    and recorded as such."""
    dists = distributions(space)

    def ask():
        for _ in range(MAX_INVALID_STREAK):
            if sampler == "grid" and smp.is_exhausted(study):
                return None
            with warnings.catch_warnings():  # heartbeats outside study.optimize: ours
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask(dists)
            reason = space.check(trial.params)
            if reason is None:
                return trial
            trial.set_user_attr("status", INVALID)
            trial.set_user_attr("reason", reason[:500])
            study.tell(trial, state=TrialState.FAIL)
        return None

    return ask


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, sync) -> None:
    """The outcome as user attributes, then the tell. A trial finished meanwhile by another
    job (a sync that read our record, or a heartbeat judged stale) is repaired by ``sync``."""
    try:
        for k, v in (("status", outcome.status), ("reason", outcome.reason),
                     ("p20_ms", outcome.p20_ms), ("p80_ms", outcome.p80_ms),
                     ("rel_error", outcome.rel_error)):
            if v is not None:
                trial.set_user_attr(k, v)
        if outcome.ok:
            study.tell(trial, outcome.median_ms)
        else:
            study.tell(trial, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        if sync is not None:
            sync(study)


def _interrupted(study: optuna.Study, trial: optuna.Trial) -> None:
    try:
        trial.set_user_attr("status", INTERRUPTED)
        trial.set_user_attr("reason", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # another job's sync told it from our record: nothing to mark


def _safe(evaluate, cfg: KernelConfig) -> Outcome:
    """A failed candidate is a result; a failed run (communication, Ctrl-C) is not."""
    try:
        return evaluate(cfg)
    except Exception as e:
        if is_fatal(e):
            raise
        return failure_outcome(e)


def _best_so_far(study: optuna.Study) -> TrialResult | None:
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    t = min(done, key=lambda t: t.value)
    cfg = SearchSpace.config_from_params(t.params)
    return TrialResult(t.number, cfg, Outcome(TrialStatus.OK, t.value, t.user_attrs.get("p20_ms"),
                                              t.user_attrs.get("p80_ms"),
                                              t.user_attrs.get("rel_error")))

