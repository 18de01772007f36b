"""Repository functions: each public one is a single transaction on an engine.

Records returned are plain frozen dataclasses, detached from any session. Readers create
nothing (a missing or empty database reads as empty); ``record_trial`` makes the schema when
it is missing. A row this version cannot read (written by a newer flashmoe_gen: an unknown
config field, a problem it cannot parse) is skipped with one ``UnreadableRowsWarning``.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Engine, case, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ArgumentError
from flashmoe_gen.problem import MoEProblem

from .engine import make_engine, session_scope
from .environment import Environment
from .models import STATUSES, EnvironmentModel, ProblemModel, TrialModel, WinnerModel
from .schema import database_error, describe, ready_to_read, ready_to_write

EngineLike = Engine | str | None
_M = TypeVar("_M")
_R = TypeVar("_R")


class NearestTokensWarning(UserWarning):
    """A winner tuned for another token count was used (no exact match)."""


class UnreadableRowsWarning(UserWarning):
    """Rows this version cannot read (from a newer flashmoe_gen, or damaged) were skipped."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial as plain values."""

    trial_id: int
    problem: MoEProblem
    environment: Environment
    config: KernelConfig
    config_name: str
    status: str
    failure_reason: str | None
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    rel_error: float | None
    tflops: float | None
    tokens_per_s: float | None
    study_name: str | None
    number: int | None
    created_at: datetime


@dataclass(frozen=True)
class WinnerRecord(TrialRecord):
    """The winning trial of a problem x environment, and when it last changed."""

    updated_at: datetime


def family_of(problem: MoEProblem) -> str:
    """The problem's name with the token count set to a placeholder (0)."""
    return problem.replace(tokens_per_rank=0).name


def _engine(engine: EngineLike) -> Engine:
    if isinstance(engine, Engine):
        return engine
    if engine is not None and not isinstance(engine, str):
        raise ArgumentError("engine", engine, "a sqlalchemy Engine, a SQLAlchemy URL string, "
                            "or None for $FLASHMOE_DB / the default database")
    return make_engine(engine)


def _reader(engine: EngineLike) -> Engine | None:
    """The engine to read from, or None when the database has nothing yet (left as is)."""
    e = _engine(engine)
    return e if ready_to_read(e) else None


def _writer(engine: EngineLike) -> Engine:
    e = _engine(engine)
    ready_to_write(e)
    return e


@contextmanager
def _typed_errors(engine: Engine) -> Iterator[None]:
    """The database's own failures (locked, not a database, ...) as a ``DatabaseError``."""
    try:
        yield
    except SQLAlchemyError as e:
        raise database_error(engine.url, e) from e


# (url, trial id) of unreadable rows already reported: one warning per row and process.
_reported: set[tuple[str, int]] = set()
_reported_lock = threading.Lock()
_UNREADABLE = (ValueError, TypeError, KeyError, AttributeError)  # JSON, Problem/ConfigError


def _readable(engine: Engine, rows: Iterable[_M], build: Callable[[_M], _R]) -> list[_R]:
    """``build`` of every row it can read; the rest skipped with one warning per call."""
    out, skipped = [], []
    for row in rows:
        try:
            out.append(build(row))
        except _UNREADABLE as e:
            skipped.append((getattr(row, "trial_id", None) or row.id, e))
    url = describe(engine.url)
    with _reported_lock:
        new = [(i, e) for i, e in skipped if (url, i) not in _reported]
        _reported.update((url, i) for i, _ in new)
    if new:
        shown = "; ".join(f"trial {i}: {e}" for i, e in new[:3]) + ("; ..." if new[3:] else "")
        warnings.warn(
            f"skipped {len(new)} row(s) of {url} that this flashmoe_gen cannot read (written "
            f"by a newer version, or damaged): {shown}. Upgrade flashmoe_gen to use them",
            UnreadableRowsWarning, stacklevel=3)
    return out


def _finite(x: float | None) -> float | None:
    # inf/NaN mean "no time" (a failed candidate is timed as inf); store them as NULL.
    return None if x is None or not math.isfinite(x) else float(x)


def _get_or_create(session: Session, model: type[_M], where, build: Callable[[], _M]) -> _M:
    """Select by natural key, else insert; if a racing writer inserted first, re-select."""
    row = session.scalars(select(model).where(where)).one_or_none()
    if row is not None:
        return row
    try:
        # A SAVEPOINT, so a unique-key collision undoes only this insert, not the trial.
        with session.begin_nested():
            row = build()
            session.add(row)
        return row
    except IntegrityError:
        return session.scalars(select(model).where(where)).one()


def _problem_row(session: Session, problem: MoEProblem) -> ProblemModel:
    return _get_or_create(
        session, ProblemModel, ProblemModel.name == problem.name,
        lambda: ProblemModel(name=problem.name, family=family_of(problem),
                             tokens_per_rank=problem.tokens_per_rank, json=problem.to_json()))


def _environment_row(session: Session, env: Environment) -> EnvironmentModel:
    return _get_or_create(
        session, EnvironmentModel, EnvironmentModel.key == env.key,
        lambda: EnvironmentModel(key=env.key, **env.to_dict()))


def _upsert_winner(session: Session, trial: TrialModel) -> None:
    """Make ``trial`` the winner if it is ok and strictly faster than the current one."""
    if trial.status != "ok" or trial.median_ms is None:
        return
    where = ((WinnerModel.problem_id == trial.problem_id)
             & (WinnerModel.environment_id == trial.environment_id))
    # FOR UPDATE serialises racing writers on PostgreSQL (SQLite: BEGIN IMMEDIATE already did).
    query = select(WinnerModel).where(where).with_for_update(of=WinnerModel)
    current = session.scalars(query).one_or_none()
    if current is None:
        try:
            with session.begin_nested():
                session.add(WinnerModel(problem_id=trial.problem_id,
                                        environment_id=trial.environment_id, trial_id=trial.id))
            return
        except IntegrityError:
            current = session.scalars(query).one()
    best = current.trial.median_ms
    if best is None or trial.median_ms < best:
        current.trial_id = trial.id
        session.flush()


def record_trial(engine: EngineLike, problem: MoEProblem, env: Environment,
                 config: KernelConfig, *, status: str, median_ms: float | None = None,
                 p20_ms: float | None = None, p80_ms: float | None = None,
                 rel_error: float | None = None, failure_reason: str | None = None,
                 study_name: str | None = None, number: int | None = None) -> int:
    """Store one trial and, in the same transaction, update the winner; returns the trial id."""
    if status not in STATUSES:
        raise ValueError(f"status={status!r} is invalid: choose one of {list(STATUSES)}")
    median_ms = _finite(median_ms)
    if status == "ok" and (median_ms is None or median_ms <= 0):
        raise ValueError(f"an 'ok' trial needs a positive finite median_ms, got {median_ms!r}")
    tflops = tokens_per_s = None
    if status == "ok":
        seconds = median_ms * 1e-3
        tflops = problem.flops() * problem.world_size / seconds / 1e12
        tokens_per_s = problem.world_size * problem.tokens_per_rank / seconds
    engine = _writer(engine)
    with _typed_errors(engine), session_scope(engine) as s:
        prow = _problem_row(s, problem)
        erow = _environment_row(s, env)
        trial = TrialModel(
            problem_id=prow.id, environment_id=erow.id, study_name=study_name, number=number,
            config_name=config.name, config_json=config.to_json(), status=status,
            failure_reason=failure_reason, median_ms=median_ms, p20_ms=_finite(p20_ms),
            p80_ms=_finite(p80_ms), rel_error=_finite(rel_error), tflops=tflops,
            tokens_per_s=tokens_per_s)
        s.add(trial)
        s.flush()
        _upsert_winner(s, trial)
        return trial.id


def _trial_fields(t: TrialModel) -> dict:
    return dict(
        trial_id=t.id, problem=MoEProblem.from_json(t.problem.json),
        environment=Environment.from_dict(
            {f.name: getattr(t.environment, f.name) for f in fields(Environment)}),
        config=KernelConfig.from_json(t.config_json), config_name=t.config_name,
        status=t.status, failure_reason=t.failure_reason, median_ms=t.median_ms,
        p20_ms=t.p20_ms, p80_ms=t.p80_ms, rel_error=t.rel_error, tflops=t.tflops,
        tokens_per_s=t.tokens_per_s, study_name=t.study_name, number=t.number,
        created_at=t.created_at)


def _winner_record(w: WinnerModel) -> WinnerRecord:
    return WinnerRecord(**_trial_fields(w.trial), updated_at=w.updated_at)


def _winners_query(env_key: str | None = None):
    q = (select(WinnerModel)
         .join(ProblemModel, WinnerModel.problem_id == ProblemModel.id)
         .join(EnvironmentModel, WinnerModel.environment_id == EnvironmentModel.id))
    return q if env_key is None else q.where(EnvironmentModel.key == env_key)


def find_winner(engine: EngineLike, problem: MoEProblem,
                env: Environment) -> WinnerRecord | None:
    """The winner for exactly this problem name and environment key, or None."""
    if (engine := _reader(engine)) is None:
        return None
    with _typed_errors(engine), session_scope(engine, readonly=True) as s:
        rows = s.scalars(_winners_query(env.key).where(ProblemModel.name == problem.name))
        records = _readable(engine, rows.all(), _winner_record)
    return records[0] if records else None


def find_nearest(engine: EngineLike, problem: MoEProblem, env: Environment, *,
                 warn: bool = True) -> tuple[WinnerRecord, MoEProblem] | None:
    """The winner of the same family and environment whose token count is nearest in log
    scale (ties: the larger count), with the problem it was tuned for; None if none.

    May return the exact match. Warns (``NearestTokensWarning``) when the token count differs.
    """
    if (engine := _reader(engine)) is None:
        return None
    with _typed_errors(engine), session_scope(engine, readonly=True) as s:
        rows = s.scalars(_winners_query(env.key)
                         .where(ProblemModel.family == family_of(problem))).all()
        records = _readable(engine, rows, _winner_record)
    if not records:
        return None
    record = nearest_tokens(records, problem.tokens_per_rank)
    if warn and record.problem.tokens_per_rank != problem.tokens_per_rank:
        warnings.warn(
            f"no tuned winner for {problem.name} on {env.gpu_name} (environment {env.key}); "
            f"using the one tuned for tokens_per_rank={record.problem.tokens_per_rank} "
            f"(nearest to {problem.tokens_per_rank} in log scale)",
            NearestTokensWarning, stacklevel=2)
    return record, record.problem


def _token_distance(count: int, tokens: int) -> tuple[float, int]:
    """How far a tuned ``count`` is from ``tokens``: log scale, ties to the larger count."""
    return abs(math.log(count + 1) - math.log(tokens + 1)), -count


def nearest_count(counts: Iterable[int], tokens: int) -> int:
    """The count nearest to ``tokens`` in log scale (ties: the larger count); the rule of
    ``nearest_tokens``, for counts without records (config files)."""
    return min(counts, key=lambda c: _token_distance(c, tokens))


def nearest_tokens(records: list[WinnerRecord], tokens: int) -> WinnerRecord:
    """The record tuned for the token count nearest to ``tokens`` in log scale (ties: the
    larger count, then the most recently updated)."""
    return min(records, key=lambda w: (*_token_distance(w.problem.tokens_per_rank, tokens),
                                       -w.updated_at.timestamp()))


def shape_distance(a: MoEProblem, b: MoEProblem) -> float:
    """How different two layers are for a kernel config, token count aside: the summed
    |log ratio| of hidden, routed and shared widths, local experts, top-k and world size,
    plus 1 where the routing rule differs (0 within a family)."""
    def logs(p: MoEProblem) -> tuple[float, ...]:
        return tuple(math.log(v) for v in (p.hidden, p.intermediate, p.shared_width + 1,
                                           p.local_experts, p.top_k, p.world_size))
    rule = (a.scoring, a.expert_bias, a.n_group, a.shared_gate) != \
        (b.scoring, b.expert_bias, b.n_group, b.shared_gate)
    return sum(abs(x - y) for x, y in zip(logs(a), logs(b), strict=True)) + float(rule)


def nearest_winners(engine: EngineLike, problem: MoEProblem, compute_capability: str, *,
                    limit: int = 4) -> list[WinnerRecord]:
    """Winners on GPUs of ``compute_capability`` (one GPU family: its configs fit) nearest
    to ``problem``: its own family first, by token count; then other shapes, nearest
    first. One record per distinct config, at most ``limit`` (the seeds of a new study)."""
    ranked = sorted(
        (w for w in list_winners(engine) if w.environment.compute_capability
         == compute_capability),
        key=lambda w: (shape_distance(w.problem, problem),
                       *_token_distance(w.problem.tokens_per_rank, problem.tokens_per_rank),
                       -w.updated_at.timestamp()))
    out: list[WinnerRecord] = []
    for w in ranked:
        if len(out) < limit and all(o.config_name != w.config_name for o in out):
            out.append(w)
    return out


def list_winners(engine: EngineLike, env_key: str | None = None) -> list[WinnerRecord]:
    """Every winner (of one environment if ``env_key``), by problem name."""
    if (engine := _reader(engine)) is None:
        return []
    with _typed_errors(engine), session_scope(engine, readonly=True) as s:
        q = _winners_query(env_key).order_by(ProblemModel.name, EnvironmentModel.key)
        return _readable(engine, s.scalars(q).all(), _winner_record)


def trials_for(engine: EngineLike, problem: MoEProblem, env: Environment | None = None,
               study_name: str | None = None) -> list[TrialRecord]:
    """Trials of a problem (optionally one environment / study): fastest first, failed last."""
    if (engine := _reader(engine)) is None:
        return []
    with _typed_errors(engine), session_scope(engine, readonly=True) as s:
        q = (select(TrialModel)
             .join(ProblemModel, TrialModel.problem_id == ProblemModel.id)
             .join(EnvironmentModel, TrialModel.environment_id == EnvironmentModel.id)
             .where(ProblemModel.name == problem.name))
        if env is not None:
            q = q.where(EnvironmentModel.key == env.key)
        if study_name is not None:
            q = q.where(TrialModel.study_name == study_name)
        failed_last = case((TrialModel.status == "ok", 0), else_=1)
        no_time_last = case((TrialModel.median_ms.is_(None), 1), else_=0)
        q = q.order_by(failed_last, no_time_last, TrialModel.median_ms, TrialModel.id)
        return _readable(engine, s.scalars(q).unique().all(),
                         lambda t: TrialRecord(**_trial_fields(t)))
