"""Winners database (SQLAlchemy 2.0): problems, environments, trials and the best trial per
problem x environment; SQLite (WAL) by default, any SQLAlchemy URL. See docs/architecture.md.

Tables are prefixed ``fmoe_`` and versioned by alembic in ``fmoe_alembic_version``, so the
winners and Optuna's study storage may share one database (see ``schema``); migrate by hand
with ``python -m flashmoe_gen.db upgrade [URL]`` (the first write does it too)."""

from .engine import default_url, dispose_engines, make_engine, session_scope
from .environment import Environment
from .repository import (
    NearestTokensWarning,
    TrialRecord,
    UnreadableRowsWarning,
    WinnerRecord,
    find_nearest,
    find_winner,
    list_winners,
    record_trial,
    trials_for,
)
from .schema import SCHEMA_VERSION, VERSION_TABLE

__all__ = [
    "SCHEMA_VERSION", "VERSION_TABLE", "Environment", "NearestTokensWarning", "TrialRecord",
    "UnreadableRowsWarning", "WinnerRecord", "default_url", "dispose_engines", "find_nearest",
    "find_winner", "list_winners", "make_engine", "record_trial", "session_scope", "trials_for",
]
