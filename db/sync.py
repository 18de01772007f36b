"""One set of finished trials: the Optuna study and the winners database, reconciled.

The tune records a finished trial in the database *before* it tells the study
(``tuner/study.py``), so a crash between the two leaves a study trial RUNNING (or, once its
heartbeat went stale, FAIL) with a database record. :func:`reconcile`, run on ``--resume``
before stale trials are failed, repairs both directions:

- a database record whose study trial is RUNNING: the trial is told from the record;
- a database record whose study trial was failed unfinished (stale heartbeat, interrupted):
  the result is added to the study again, marked ``recovered_from=<number>``;
- a finished study trial without a database record: it is recorded from its attributes;

then the winner is recomputed from the ok trials (the fastest one wins).

A study trial stands for the database record with its number, or with its
``recovered_from`` attribute (:func:`record_number`).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Engine, select

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.status import RECORDED, TrialStatus

from .engine import make_engine, session_scope
from .environment import Environment
from .models import EnvironmentModel, ProblemModel, TrialModel, WinnerModel
from .repository import TrialRecord, record_trial, trials_for

#: User attribute of a study trial re-added from a database record.
RECOVERED_FROM = "recovered_from"
_UNFINISHED = (None, TrialStatus.INTERRUPTED.value)


@dataclass(frozen=True)
class SyncReport:
    """Trial numbers (database numbering) repaired by one :func:`reconcile`."""

    told: tuple[int, ...] = ()        # RUNNING study trials told from their record
    readded: tuple[int, ...] = ()     # failed-unfinished study trials re-added from the record
    recorded: tuple[int, ...] = ()    # finished study trials recorded in the database
    orphans: tuple[int, ...] = ()     # records whose study trial is gone (left alone)
    winner_changed: bool = False

    @property
    def repaired(self) -> int:
        return len(self.told) + len(self.readded) + len(self.recorded) + self.winner_changed


def record_number(t: FrozenTrial) -> int:
    """The database number a study trial stands for."""
    return int(t.user_attrs.get(RECOVERED_FROM, t.number))


def finished_trials(study: optuna.Study) -> dict[int, FrozenTrial]:
    """Study trials that finished with a recorded status, by database number."""
    return _finished(study.get_trials(deepcopy=False))


def _finished(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    out = {}
    for t in trials:
        if (t.state in (TrialState.COMPLETE, TrialState.FAIL)
                and t.user_attrs.get("status") in RECORDED):
            out.setdefault(record_number(t), t)
    return out


def _attrs(r: TrialRecord) -> dict:
    attrs = {"config": r.config_name, "status": r.status, "reason": r.failure_reason,
             "p20_ms": r.p20_ms, "p80_ms": r.p80_ms, "rel_error": r.rel_error}
    return {k: v for k, v in attrs.items() if v is not None}


def _state_value(r: TrialRecord) -> tuple[TrialState, float | None]:
    if r.status == TrialStatus.OK and r.median_ms is not None:
        return TrialState.COMPLETE, r.median_ms
    return TrialState.FAIL, None


def _tell_from(study: optuna.Study, t: FrozenTrial, r: TrialRecord) -> bool:
    """Tell a RUNNING trial its recorded outcome; False if it finished meanwhile."""
    trial = optuna.trial.Trial(study, t._trial_id)
    state, value = _state_value(r)
    try:
        for k, v in _attrs(r).items():
            trial.set_user_attr(k, v)
        study.tell(trial, value, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # its own job (alive after all) told it first, with the same outcome
    return True


def _readd(study: optuna.Study, t: FrozenTrial, r: TrialRecord) -> None:
    state, value = _state_value(r)
    study.add_trial(optuna.trial.create_trial(
        params=t.params, distributions=t.distributions, value=value, state=state,
        user_attrs=_attrs(r) | {RECOVERED_FROM: r.number}))


def _record_from(engine: Engine, problem: MoEProblem, env: Environment, study_name: str,
                 number: int, t: FrozenTrial) -> None:
    u = t.user_attrs
    ok = t.state == TrialState.COMPLETE
    record_trial(engine, problem, env, KernelConfig.parse(u["config"]), status=u["status"],
                 median_ms=t.value if ok else None, p20_ms=u.get("p20_ms"),
                 p80_ms=u.get("p80_ms"), rel_error=u.get("rel_error"),
                 failure_reason=u.get("reason"), study_name=study_name, number=number)


def reconcile(study: optuna.Study, engine: Engine | str | None, problem: MoEProblem,
              env: Environment) -> SyncReport:
    """Make the study and the database hold the same finished trials (see the module
    docstring); safe while other jobs run on the same study."""
    engine = engine if isinstance(engine, Engine) else make_engine(engine)
    # The study first, then the database: a trial finished in this snapshot had its record
    # committed before its tell, so the records read next hold it (no double recording).
    snapshot = study.get_trials(deepcopy=False)
    records: dict[int, TrialRecord] = {}
    for r in trials_for(engine, problem, env, study_name=study.study_name):
        if r.number is not None:
            records.setdefault(r.number, r)
    trials = {t.number: t for t in snapshot}
    recovered = {int(t.user_attrs[RECOVERED_FROM]) for t in trials.values()
                 if RECOVERED_FROM in t.user_attrs}
    told, readded, orphans = [], [], []
    for n, r in sorted(records.items()):
        t = trials.get(n)
        if t is None:
            orphans.append(n)
        elif t.state == TrialState.RUNNING:
            if _tell_from(study, t, r):
                told.append(n)
        elif (t.state == TrialState.FAIL and t.user_attrs.get("status") in _UNFINISHED
              and n not in recovered):
            _readd(study, t, r)
            readded.append(n)
    recorded = []
    for n, t in sorted(_finished(snapshot).items()):
        if n not in records and "config" in t.user_attrs:
            _record_from(engine, problem, env, study.study_name, n, t)
            recorded.append(n)
    has_ok = recorded or any(r.status == TrialStatus.OK for r in records.values())
    return SyncReport(tuple(told), tuple(readded), tuple(recorded), tuple(orphans),
                      bool(has_ok) and recompute_winner(engine, problem, env))


def recompute_winner(engine: Engine | str | None, problem: MoEProblem,
                     env: Environment) -> bool:
    """Point the winner of ``problem`` x ``env`` at its fastest ok trial; True if it moved."""
    engine = engine if isinstance(engine, Engine) else make_engine(engine)
    with session_scope(engine) as s:
        best = s.scalars(
            select(TrialModel)
            .join(ProblemModel, TrialModel.problem_id == ProblemModel.id)
            .join(EnvironmentModel, TrialModel.environment_id == EnvironmentModel.id)
            .where(ProblemModel.name == problem.name, EnvironmentModel.key == env.key,
                   TrialModel.status == TrialStatus.OK.value,
                   TrialModel.median_ms.is_not(None))
            .order_by(TrialModel.median_ms, TrialModel.id).limit(1)).first()
        if best is None:
            return False
        winner = s.scalars(select(WinnerModel).where(
            WinnerModel.problem_id == best.problem_id,
            WinnerModel.environment_id == best.environment_id)).one_or_none()
        if winner is None:
            s.add(WinnerModel(problem_id=best.problem_id, environment_id=best.environment_id,
                              trial_id=best.id))
            return True
        if winner.trial_id == best.id or winner.trial.median_ms == best.median_ms:
            return False
        winner.trial_id = best.id
        return True
