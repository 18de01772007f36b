"""The prefixed schema (fmoe_problems, fmoe_environments, fmoe_trials, fmoe_winners).

Also adopts a database of the unversioned layout of flashmoe_gen 0.1 (tables ``problems``,
``environments``, ``trials``, ``winners``): its rows are copied with their ids, then its
tables are dropped, which frees the name ``trials`` for Optuna's study storage.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

from flashmoe_gen.db.schema import LEGACY_COLUMNS, legacy_layout

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "fmoe_problems",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("family", sa.String(255), nullable=False),
        sa.Column("tokens_per_rank", sa.Integer(), nullable=False),
        sa.Column("json", sa.Text(), nullable=False),
        _created_at(),
        sa.UniqueConstraint("name", name="uq_fmoe_problems_name"))
    op.create_index("ix_fmoe_problems_family", "fmoe_problems", ["family"])
    op.create_table(
        "fmoe_environments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("gpu_name", sa.String(255), nullable=False),
        sa.Column("compute_capability", sa.String(16), nullable=False),
        sa.Column("arch", sa.String(32), nullable=False),
        sa.Column("world_size", sa.Integer(), nullable=False),
        sa.Column("cuda_driver", sa.String(32), nullable=False),
        sa.Column("nvrtc_version", sa.String(32), nullable=False),
        sa.Column("nccl_version", sa.String(32), nullable=True),
        sa.Column("cupy_version", sa.String(32), nullable=False),
        sa.Column("package_version", sa.String(32), nullable=False),
        sa.Column("template_hash", sa.String(64), nullable=False),
        _created_at(),
        sa.UniqueConstraint("key", name="uq_fmoe_environments_key"))
    op.create_table(
        "fmoe_trials",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("problem_id", sa.Integer(), sa.ForeignKey("fmoe_problems.id"),
                  nullable=False),
        sa.Column("environment_id", sa.Integer(), sa.ForeignKey("fmoe_environments.id"),
                  nullable=False),
        sa.Column("study_name", sa.String(255), nullable=True),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("config_name", sa.String(255), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        *(sa.Column(c, sa.Float(), nullable=True)
          for c in ("median_ms", "p20_ms", "p80_ms", "rel_error", "tflops", "tokens_per_s")),
        _created_at())
    op.create_index("ix_fmoe_trials_problem_env", "fmoe_trials",
                    ["problem_id", "environment_id"])
    op.create_index("ix_fmoe_trials_study", "fmoe_trials", ["study_name"])
    op.create_table(
        "fmoe_winners",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("problem_id", sa.Integer(), sa.ForeignKey("fmoe_problems.id"),
                  nullable=False),
        sa.Column("environment_id", sa.Integer(), sa.ForeignKey("fmoe_environments.id"),
                  nullable=False),
        sa.Column("trial_id", sa.Integer(), sa.ForeignKey("fmoe_trials.id"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("problem_id", "environment_id",
                            name="uq_fmoe_winners_problem_env"))
    bind = op.get_bind()
    if legacy_layout(bind):
        _adopt_legacy(bind)


def _adopt_legacy(bind) -> None:
    """Copy every row of the unprefixed layout (ids kept), then drop its tables."""
    for old, columns in LEGACY_COLUMNS.items():  # parents before children
        cols = ", ".join(columns)
        op.execute(f"INSERT INTO fmoe_{old} ({cols}) SELECT {cols} FROM {old}")
        if bind.dialect.name == "postgresql":  # explicit ids: move the sequence past them
            op.execute(f"SELECT setval(pg_get_serial_sequence('fmoe_{old}', 'id'), "
                       f"COALESCE((SELECT MAX(id) FROM fmoe_{old}), 0) + 1, false)")
    for old in reversed(LEGACY_COLUMNS):  # children before parents
        op.drop_table(old)


def downgrade() -> None:
    for table in ("fmoe_winners", "fmoe_trials", "fmoe_environments", "fmoe_problems"):
        op.drop_table(table)
