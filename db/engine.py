"""Engines and the one session scope every repository function runs in.

SQLite is the embedded default (WAL + busy timeout so several processes on one machine can
share a file); any SQLAlchemy URL works, e.g. PostgreSQL for several tuning jobs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from flashmoe_gen.paths import DB_ENV, default_db_url

from .models import Base

#: Environment variable that overrides the database URL (the CLI's ``--db`` wins over it).
ENV_VAR = DB_ENV
#: Milliseconds a SQLite writer waits for another writer's lock before giving up.
BUSY_TIMEOUT_MS = 30_000
#: Execution option that marks a read-only transaction (a deferred BEGIN on SQLite).
_READONLY = "flashmoe_readonly"

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def default_url() -> str:
    """``$FLASHMOE_DB`` if set, else a SQLite file under the user's cache directory."""
    return default_db_url()


def _is_memory(database: str | None) -> bool:
    return not database or database == ":memory:" or "mode=memory" in database


def _sqlite_engine(url: str) -> Engine:
    memory = _is_memory(make_url(url).database)
    # The pool hands a connection to one thread at a time, so sqlite3's own thread check
    # only gets in the way. In-memory: one shared connection, or each checkout is a new DB.
    kwargs: dict = {"connect_args": {"check_same_thread": False}}
    if memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy emit BEGIN itself (below): pysqlite's implicit transactions break
        # SAVEPOINT and would start writes as deferred (see the SQLAlchemy pysqlite docs).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Writers take the write lock up front: a deferred transaction that reads and then
        # writes after another writer committed fails at once (SQLITE_BUSY_SNAPSHOT) instead
        # of waiting out the busy timeout. Readers stay deferred so they never block.
        readonly = conn.get_execution_options().get(_READONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def make_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: :func:`default_url`), tables created; one per URL."""
    url = url or default_url()
    with _lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        if make_url(url).get_backend_name() == "sqlite":
            engine = _sqlite_engine(url)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        try:
            Base.metadata.create_all(engine)
        except (OperationalError, ProgrammingError):
            # Another process created the tables between our check and our CREATE.
            Base.metadata.create_all(engine)
        _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Dispose every cached engine and forget it (tests; after ``fork``)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(engine: Engine, *, readonly: bool = False) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception, always close.

    ``readonly`` starts a deferred transaction on SQLite, so lookups never wait on a writer.
    """
    bind = engine.execution_options(**{_READONLY: True}) if readonly else engine
    session = Session(bind=bind, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
