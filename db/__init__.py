"""Winners database (SQLAlchemy 2.0): problems, environments, trials and the best trial per
problem x environment; SQLite (WAL) by default, any SQLAlchemy URL. See docs/architecture.md."""

from .engine import default_url, dispose_engines, make_engine, session_scope
from .environment import Environment
from .repository import (
    NearestTokensWarning,
    TrialRecord,
    WinnerRecord,
    find_nearest,
    find_winner,
    list_winners,
    record_trial,
    trials_for,
)

__all__ = [
    "Environment", "NearestTokensWarning", "TrialRecord", "WinnerRecord", "default_url",
    "dispose_engines", "find_nearest", "find_winner", "list_winners", "make_engine",
    "record_trial", "session_scope", "trials_for",
]
