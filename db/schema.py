"""Schema version and migrations of the winners database.

- Tables: ``fmoe_problems``, ``fmoe_environments``, ``fmoe_trials``, ``fmoe_winners``
  (``models.PREFIX``), so one database (one SQLite file, one PostgreSQL database) may hold
  both the winners (``--db``) and Optuna's study storage (``--storage``).
- Version: the alembic revision in ``fmoe_alembic_version`` (Optuna keeps its own in
  ``alembic_version``); ``SCHEMA_VERSION`` is the newest this package knows.
- Migrations: ``flashmoe_gen/db/migrations`` (alembic env.py and revisions). The first write
  applies them; by hand: ``python -m flashmoe_gen.db upgrade [URL]``. Revision 0001 also
  adopts a database of the unversioned, unprefixed layout of 0.1 (rows kept, ids kept).

Readers only look: a missing or empty database reads as empty and is left untouched, and a
database that is not this project's (other tables and none of ours, not a database at all)
is refused with a ``DatabaseError`` before anything is written to it. Schema work takes the
write lock (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock) only when the schema is
missing or old, and checks again under the lock, so racing processes migrate once.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

from flashmoe_gen.errors import DatabaseError

from .models import PREFIX, Base

#: Alembic's version table for this project's schema.
VERSION_TABLE = PREFIX + "alembic_version"
#: The newest schema revision this package knows (its file: migrations/versions/0001_*.py).
SCHEMA_VERSION = "0001"
#: Execution option that marks a read-only transaction (a deferred BEGIN on SQLite).
READONLY = "flashmoe_readonly"
#: Where alembic finds env.py and the revisions (a package resource).
SCRIPT_LOCATION = "flashmoe_gen.db:migrations"

OUR_TABLES = frozenset(Base.metadata.tables)
#: The unversioned layout of flashmoe_gen 0.1, parents before children: table -> columns.
LEGACY_COLUMNS: dict[str, tuple[str, ...]] = {
    "problems": ("id", "name", "family", "tokens_per_rank", "json", "created_at"),
    "environments": ("id", "key", "gpu_name", "compute_capability", "arch", "world_size",
                     "cuda_driver", "nvrtc_version", "nccl_version", "cupy_version",
                     "package_version", "template_hash", "created_at"),
    "trials": ("id", "problem_id", "environment_id", "study_name", "number", "config_name",
               "config_json", "status", "failure_reason", "median_ms", "p20_ms", "p80_ms",
               "rel_error", "tflops", "tokens_per_s", "created_at"),
    "winners": ("id", "problem_id", "environment_id", "trial_id", "updated_at"),
}
#: Optuna's RDB storage tables (a test checks them against optuna's models): a database
#: holding only these is a study store we may share, not a foreign database.
OPTUNA_TABLES = frozenset({
    "alembic_version", "studies", "study_directions", "study_user_attributes",
    "study_system_attributes", "trials", "trial_user_attributes", "trial_system_attributes",
    "trial_params", "trial_values", "trial_intermediate_values", "trial_heartbeats",
    "version_info",
})
_PG_LOCK_KEY = 0x666D6F65  # "fmoe": serialises migrations of one PostgreSQL database


class SchemaState(enum.Enum):
    MISSING = "missing"   # no database yet, or none of our tables (maybe Optuna's)
    CURRENT = "current"   # at SCHEMA_VERSION
    OLD = "old"           # the 0.1 layout or an older revision: upgrade() migrates it
    NEWER = "newer"       # a revision this package does not know (a newer flashmoe_gen)


@dataclass(frozen=True)
class Schema:
    state: SchemaState
    version: str | None = None


def describe(url: URL | str) -> str:
    """The URL as the user wrote it, password hidden."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return str(url)


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL; None for in-memory SQLite and other databases."""
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:" or "mode=memory" in db or db.startswith("file:"):
        return None
    return Path(db)


def database_error(url: URL | str, e: BaseException) -> DatabaseError:
    """A typed error for a failure of the database itself (not of our logic)."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
    low = text.lower()
    if "file is not a database" in low or "not a database" in low:
        return DatabaseError(describe(url), "is not a SQLite database (" + text + ")",
                             "pass --db (or FLASHMOE_DB) a database created by flashmoe_gen "
                             "or a new file; this one was not modified")
    if "locked" in low or "busy" in low:
        return DatabaseError(describe(url), f"stayed locked by another writer ({text})",
                             "retry when the other job's write has finished")
    if "unable to open" in low:
        return DatabaseError(describe(url), f"cannot be opened ({text})",
                             "check that the path exists and is writable")
    return DatabaseError(describe(url), f"failed: {text}",
                         "check --db / FLASHMOE_DB and that the database server answers")


def legacy_layout(conn: Connection) -> bool:
    """Whether the database holds the unprefixed tables of flashmoe_gen 0.1 (columns checked:
    Optuna has a ``trials`` table too)."""
    insp = sa.inspect(conn)
    for table, columns in LEGACY_COLUMNS.items():
        if not insp.has_table(table):
            return False
        if not set(columns) <= {c["name"] for c in insp.get_columns(table)}:
            return False
    return True


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory
    return {r.revision for r in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _alembic_config(conn: Connection | None = None):
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["connection"] = conn
    return cfg


def _state(conn: Connection) -> Schema:
    tables = {t for t in sa.inspect(conn).get_table_names() if not t.startswith("sqlite_")}
    if VERSION_TABLE in tables:
        version = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        if version == SCHEMA_VERSION:
            return Schema(SchemaState.CURRENT, version)
        if version is None or version in _known_revisions():
            return Schema(SchemaState.OLD, version)
        return Schema(SchemaState.NEWER, version)
    if legacy_layout(conn):
        return Schema(SchemaState.OLD)
    foreign = sorted(tables - OPTUNA_TABLES)
    if foreign:
        shown = ", ".join(foreign[:6]) + (", ..." if len(foreign) > 6 else "")
        raise DatabaseError(
            describe(conn.engine.url),
            f"is not a flashmoe_gen database (it has tables {shown} and no "
            f"{VERSION_TABLE})",
            "pass --db (or FLASHMOE_DB) a new file or database, or one flashmoe_gen "
            "created; it was not modified")
    return Schema(SchemaState.MISSING)


# Engines whose schema was seen current / made ready for writing in this process.
_current: weakref.WeakSet[Engine] = weakref.WeakSet()
_writable: weakref.WeakSet[Engine] = weakref.WeakSet()
_setup_lock = threading.Lock()
#: Seconds the first writer retries the switch to WAL while another process makes it.
_WAL_WAIT_S = 30.0


def inspect_schema(engine: Engine) -> Schema:
    """The schema's state, read only: never creates a file, a table or a lock that blocks."""
    if engine in _current:
        return Schema(SchemaState.CURRENT, SCHEMA_VERSION)
    path = sqlite_file(engine.url)
    if path is not None and not path.exists():
        return Schema(SchemaState.MISSING)  # connecting would create the file
    try:
        with engine.execution_options(**{READONLY: True}).connect() as conn:
            schema = _state(conn)
    except sa_exc.SQLAlchemyError as e:
        raise database_error(engine.url, e) from e
    if schema.state is SchemaState.CURRENT:
        _current.add(engine)
    return schema


def _newer(engine: Engine, version: str | None) -> DatabaseError:
    return DatabaseError(describe(engine.url),
                         f"was written by a newer flashmoe_gen (schema version {version}; "
                         f"this one knows up to {SCHEMA_VERSION})",
                         "upgrade flashmoe_gen, or write to another database")


def upgrade(engine: Engine) -> Schema:
    """Create or migrate the schema to ``SCHEMA_VERSION`` under the write lock."""
    try:
        with engine.connect() as conn, conn.begin():  # BEGIN IMMEDIATE on SQLite
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            schema = _state(conn)  # again: another process may have migrated meanwhile
            if schema.state is SchemaState.NEWER:
                raise _newer(engine, schema.version)
            if schema.state is not SchemaState.CURRENT:
                from alembic import command
                command.upgrade(_alembic_config(conn), "head")
    except sa_exc.SQLAlchemyError as e:
        raise database_error(engine.url, e) from e
    _current.add(engine)
    return Schema(SchemaState.CURRENT, SCHEMA_VERSION)


def _use_wal(engine: Engine) -> None:
    # WAL lets readers read while a writer writes; it is a property of the file, so it is
    # set once by the first writer (not per connection: that would write to a file that a
    # reader may merely be looking at). Outside any transaction, as SQLite requires.
    # Two connections switching at once get SQLITE_BUSY at once: SQLite skips the busy
    # handler there (it could deadlock), so the wait is ours, bounded like the handler's.
    if sqlite_file(engine.url) is None:
        return
    deadline = time.monotonic() + _WAL_WAIT_S
    while True:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise database_error(engine.url, e) from e
            if time.monotonic() > deadline:
                raise database_error(engine.url, e) from e
        finally:
            raw.close()
        time.sleep(0.05)


def ready_to_read(engine: Engine) -> bool:
    """Whether there is anything to read: False for a missing or empty database (left as it
    is). An old layout is migrated first (a one-time write)."""
    schema = inspect_schema(engine)
    if schema.state is SchemaState.MISSING:
        return False
    if schema.state is SchemaState.OLD:
        upgrade(engine)
    return True


def ready_to_write(engine: Engine) -> None:
    """Create or migrate the schema when missing or old (once per engine and process)."""
    if engine in _writable:
        return
    with _setup_lock:  # threads of one process set up once; other processes race below
        if engine not in _writable:
            _ready_to_write(engine)


def _ready_to_write(engine: Engine) -> None:
    schema = inspect_schema(engine)  # refuses a foreign file before anything is written
    if schema.state is SchemaState.NEWER:
        raise _newer(engine, schema.version)
    try:
        _use_wal(engine)
    except sa_exc.SQLAlchemyError as e:
        raise database_error(engine.url, e) from e
    if schema.state is not SchemaState.CURRENT:
        upgrade(engine)
    _writable.add(engine)
