"""The search: an Optuna study driven by rank 0, evaluated on every rank (SPMD).

Only rank 0 talks to the sampler and the storages. Each step it asks for a candidate,
broadcasts its config, every rank evaluates it, the outcomes are combined (a failure on
one rank fails the candidate everywhere) and rank 0 tells the sampler and records the
trial. ``None`` broadcast ends the loop on every rank.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.status import TrialStatus

from .objective import INVALID, Outcome, combine
from .space import SearchSpace

SAMPLERS = ("tpe", "random", "grid", "cmaes")
#: Give up when this many consecutive candidates are invalid (space exhausted / all bad).
MAX_INVALID_STREAK = 500
INTERRUPTED = TrialStatus.INTERRUPTED


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
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate/group are "experimental" since 2.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True,
                                              group=True, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _AskTellGrid({k: list(v) for k, v in space.choices.items()}, seed=seed)
    if name == "cmaes":  # categorical knobs fall back to the independent sampler
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ConfigError("sampler", name, f"choose one of {list(SAMPLERS)}")


class _AskTellGrid(optuna.samplers.GridSampler):
    """GridSampler calls ``study.stop()`` when the grid runs out, which only works inside
    ``study.optimize``; this loop asks and tells itself and checks ``is_exhausted``."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _distributions(space: SearchSpace) -> dict:
    return {k: CategoricalDistribution(list(v)) for k, v in space.choices.items()}


def _fail_stale(study: optuna.Study) -> int:
    """Trials left RUNNING by a process that died (e.g. a sticky CUDA error) become FAIL."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "status", INTERRUPTED)
        study._storage.set_trial_user_attr(t._trial_id, "reason",
                                           "interrupted: the tuning process ended mid-trial")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    return n


def open_study(study_name: str, storage: str | None, sampler: optuna.samplers.BaseSampler,
               resume: bool) -> optuna.Study:
    if storage is not None and not resume:
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        if study_name in names:
            raise ConfigError("study", study_name,
                              "already exists in the storage: pass --resume to continue it, "
                              "or --study-name for a new one")
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                direction="minimize", load_if_exists=resume)
    _fail_stale(study)
    return study


def run_study(problem: MoEProblem, evaluate: Callable[[KernelConfig], Outcome], *,
              mpi=None, space: SearchSpace, study_name: str, sampler: str = "tpe",
              n_trials: int = 30, timeout_s: float | None = None, storage: str | None = None,
              resume: bool = False, seed: int = 0, enqueue_seeds: bool = True,
              on_trial: Callable[[TrialResult, TrialResult | None], None] | None = None,
              ) -> StudyResult | None:
    """Collective. Returns the result on rank 0, None on the other ranks.

    ``n_trials`` counts evaluated candidates (including earlier runs of a resumed
    study); invalid combinations are rejected before compiling and do not count.
    ``enqueue_seeds``: evaluate the heuristic default and known-good configs first.
    """
    rank = mpi.Get_rank() if mpi is not None else 0
    if rank != 0:
        while True:
            msg = mpi.bcast(None, root=0)
            if msg is None:
                return None
            outcome = _safe(evaluate, KernelConfig.from_json(msg))
            mpi.allgather(outcome)

    t0 = time.monotonic()
    try:
        smp = make_sampler(sampler, space, seed)
        study = open_study(study_name, storage, smp, resume)
    except Exception:
        if mpi is not None:
            mpi.bcast(None, root=0)  # release the other ranks before raising
        raise
    dists = _distributions(space)
    # Resumed studies count what earlier runs evaluated; unfinished trials do not count.
    evaluated = sum(1 for t in study.trials
                    if t.user_attrs.get("status") not in (None, INVALID, INTERRUPTED)
                    and t.state in (TrialState.COMPLETE, TrialState.FAIL))
    if sampler != "grid" and enqueue_seeds:
        for cfg in space.seeds():
            if space.contains(cfg):
                study.enqueue_trial(space.params_from_config(cfg), skip_if_exists=True)
    results: list[TrialResult] = []
    best = _best_so_far(study)
    invalid_streak = 0
    trial = None
    try:
        while evaluated < n_trials and invalid_streak < MAX_INVALID_STREAK:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                break
            if sampler == "grid" and smp.is_exhausted(study):
                break
            trial = study.ask(dists)
            reason = space.check(trial.params)
            if reason is not None:
                trial.set_user_attr("status", INVALID)
                trial.set_user_attr("reason", reason[:500])
                told, trial = trial, None
                study.tell(told, state=TrialState.FAIL)
                invalid_streak += 1
                continue
            invalid_streak = 0
            cfg = space.config_from_params(trial.params)
            trial.set_user_attr("config", cfg.name)
            if mpi is not None:
                mpi.bcast(cfg.to_json(), root=0)
            mine = _safe(evaluate, cfg)
            outcome = combine(mpi.allgather(mine)) if mpi is not None else mine
            for k, v in (("status", outcome.status), ("reason", outcome.reason),
                         ("p20_ms", outcome.p20_ms), ("p80_ms", outcome.p80_ms),
                         ("rel_error", outcome.rel_error)):
                if v is not None:
                    trial.set_user_attr(k, v)
            told, trial = trial, None
            if outcome.ok:
                study.tell(told, outcome.median_ms)
            else:
                study.tell(told, state=TrialState.FAIL)
            evaluated += 1
            res = TrialResult(told.number, cfg, outcome)
            results.append(res)
            if outcome.ok and (best is None or outcome.value < best.outcome.value):
                best = res
            if on_trial is not None:
                on_trial(res, best)
    finally:
        if trial is not None:  # interrupted mid-trial: keep the study consistent
            trial.set_user_attr("status", INTERRUPTED)
            trial.set_user_attr("reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
        if mpi is not None:
            mpi.bcast(None, root=0)
    return StudyResult(study.study_name, results, best, time.monotonic() - t0)


def _safe(evaluate, cfg: KernelConfig) -> Outcome:
    from .objective import failure_outcome
    try:
        return evaluate(cfg)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
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

