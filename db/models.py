"""SQLAlchemy 2.0 models: problems, environments, trials, winners (one model per table).

Every table, index and constraint name starts with ``fmoe_`` (``PREFIX``) so the winners
database may share a database with Optuna's study storage (which has its own ``trials``)
or other applications. The schema is versioned by alembic (``db/migrations``).

Modelled on Optuna's RDB storage: explicit integer primary keys, a ``UniqueConstraint`` on
each natural key (problem name, environment key, problem x environment for winners) so that
racing writers collide in the database instead of creating duplicates.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from flashmoe_gen.status import RECORDED

#: Trial outcomes (``flashmoe_gen.status``). Only "ok" trials can become winners; the rest
#: are kept as values (Kernel Tuner convention) so a search never retries a failing config.
STATUSES = RECORDED


#: Prefix of every table of this project (and of its alembic version table).
PREFIX = "fmoe_"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ProblemModel(Base):
    """One MoE problem, keyed by ``MoEProblem.name``."""

    __tablename__ = PREFIX + "problems"
    __table_args__ = (UniqueConstraint("name", name="uq_fmoe_problems_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    # The name with tokens_per_rank replaced by a placeholder: problems that differ only in
    # token count share a family, which is what the nearest-token lookup searches.
    family: Mapped[str] = mapped_column(String(255), nullable=False, index=True)
    tokens_per_rank: Mapped[int] = mapped_column(Integer, nullable=False)
    json: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EnvironmentModel(Base):
    """Everything besides the problem that can change which config is fastest."""

    __tablename__ = PREFIX + "environments"
    __table_args__ = (UniqueConstraint("key", name="uq_fmoe_environments_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), nullable=False)
    gpu_name: Mapped[str] = mapped_column(String(255), nullable=False)
    compute_capability: Mapped[str] = mapped_column(String(16), nullable=False)
    arch: Mapped[str] = mapped_column(String(32), nullable=False)
    world_size: Mapped[int] = mapped_column(Integer, nullable=False)
    cuda_driver: Mapped[str] = mapped_column(String(32), nullable=False)
    nvrtc_version: Mapped[str] = mapped_column(String(32), nullable=False)
    nccl_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    cupy_version: Mapped[str] = mapped_column(String(32), nullable=False)
    package_version: Mapped[str] = mapped_column(String(32), nullable=False)
    template_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrialModel(Base):
    """One measured (or failed) config for a problem in an environment."""

    __tablename__ = PREFIX + "trials"
    __table_args__ = (
        Index("ix_fmoe_trials_problem_env", "problem_id", "environment_id"),
        Index("ix_fmoe_trials_study", "study_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    problem_id: Mapped[int] = mapped_column(ForeignKey(ProblemModel.id), nullable=False)
    environment_id: Mapped[int] = mapped_column(ForeignKey(EnvironmentModel.id), nullable=False)
    study_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    config_name: Mapped[str] = mapped_column(String(255), nullable=False)
    config_json: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    median_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p20_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p80_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    rel_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    tflops: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # Inner joins: the keys are NOT NULL, and PostgreSQL refuses FOR UPDATE on outer joins.
    problem: Mapped[ProblemModel] = relationship(lazy="joined", innerjoin=True)
    environment: Mapped[EnvironmentModel] = relationship(lazy="joined", innerjoin=True)


class WinnerModel(Base):
    """The best "ok" trial per problem x environment."""

    __tablename__ = PREFIX + "winners"
    __table_args__ = (
        UniqueConstraint("problem_id", "environment_id", name="uq_fmoe_winners_problem_env"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    problem_id: Mapped[int] = mapped_column(ForeignKey(ProblemModel.id), nullable=False)
    environment_id: Mapped[int] = mapped_column(ForeignKey(EnvironmentModel.id), nullable=False)
    trial_id: Mapped[int] = mapped_column(ForeignKey(TrialModel.id), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    trial: Mapped[TrialModel] = relationship(lazy="joined", innerjoin=True)
