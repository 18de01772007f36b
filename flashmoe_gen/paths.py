"""Where flashmoe_gen keeps its files: one place for every default path and URL.

- the user cache folder: ``$XDG_CACHE_HOME/flashmoe_gen`` (``~/.cache/flashmoe_gen``);
- compiled kernels: ``$FLASHMOE_CACHE`` or the cache folder, then the package version;
- the winners database: ``$FLASHMOE_DB`` or ``sqlite:///<cache folder>/tuning.db``;
- the Optuna study store: ``$FLASHMOE_STUDIES`` or ``sqlite:///<cache folder>/studies.db``.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import __version__

#: Environment variables that override the defaults (command-line flags win over them).
CACHE_ENV, DB_ENV, STUDIES_ENV = "FLASHMOE_CACHE", "FLASHMOE_DB", "FLASHMOE_STUDIES"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flashmoe_gen`` or ``~/.cache/flashmoe_gen`` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashmoe_gen"


def kernel_cache_root() -> Path:
    """Root of the compiled-kernel cache: ``$FLASHMOE_CACHE`` or the user cache, then the
    package version (a new version never reads an older version's cubins)."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else user_cache_dir()) / __version__


def _sqlite_in_cache(filename: str) -> str:
    folder = user_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / filename}"


def default_db_url() -> str:
    """The winners database: ``$FLASHMOE_DB`` or a SQLite file in the user cache."""
    return os.environ.get(DB_ENV) or _sqlite_in_cache("tuning.db")


def default_storage_url() -> str:
    """Optuna's study store: ``$FLASHMOE_STUDIES`` or a SQLite file in the user cache."""
    return os.environ.get(STUDIES_ENV) or _sqlite_in_cache("studies.db")
