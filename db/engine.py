"""Engines and the one session scope every repository function runs in.

SQLite is the embedded default (WAL + busy timeout so several processes on one machine can
share a file); any SQLAlchemy URL works, e.g. PostgreSQL for several tuning jobs. Making an
engine checks the URL and looks at the database without writing to it; the schema is made
by the first write (``schema.ready_to_write``), so readers never create files or tables.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from flashmoe_gen.errors import ArgumentError, DatabaseError
from flashmoe_gen.paths import DB_ENV, default_db_url

from .schema import READONLY, describe, inspect_schema, sqlite_file

#: Environment variable that overrides the database URL (the CLI's ``--db`` wins over it).
ENV_VAR = DB_ENV
#: Milliseconds a SQLite writer waits for another writer's lock before giving up.
BUSY_TIMEOUT_MS = 30_000

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def default_url() -> str:
    """``$FLASHMOE_DB`` if set, else a SQLite file under the user's cache directory."""
    return default_db_url()


_URL_HINT = ("pass a SQLAlchemy URL, e.g. sqlite:////abs/path/tuning.db or "
             "postgresql://user@host/dbname (flag --db or FLASHMOE_DB)")


def _parse(url: str) -> URL:
    """The parsed URL; a typed error for what SQLAlchemy could not use."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        hint = _URL_HINT
        if "://" not in url:  # a plain path: say how to write it as a URL
            hint = f"write a file as a URL: sqlite:///{url}"
        raise DatabaseError(url, "is not a database URL", hint) from None
    path = sqlite_file(parsed)
    if path is not None:
        if path.is_dir():
            raise DatabaseError(describe(parsed), f"{path} is a directory",
                                "name a database file inside it, e.g. "
                                f"sqlite:///{path / 'tuning.db'}")
        if not path.parent.is_dir():
            raise DatabaseError(describe(parsed), f"directory {path.parent} does not exist",
                                "create it, or choose a file in an existing directory")
    return parsed


def _create(url: str, parsed: URL) -> Engine:
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(url, parsed)
        return create_engine(url, pool_pre_ping=True)
    except sa_exc.NoSuchModuleError:
        raise DatabaseError(describe(parsed), f"SQLAlchemy has no dialect "
                            f"{parsed.drivername!r}", _URL_HINT) from None
    except ImportError as e:  # the dialect's DB driver is not installed
        raise DatabaseError(describe(parsed), f"the database driver is missing ({e})",
                            f"install the Python package of module {e.name!r} for "
                            f"{parsed.drivername} (postgresql: pip install 'psycopg[binary]')"
                            ) from None
    except sa_exc.ArgumentError as e:
        raise DatabaseError(describe(parsed), f"cannot be used ({e})", _URL_HINT) from None


def _sqlite_engine(url: str, parsed: URL) -> Engine:
    db = parsed.database
    memory = not db or db == ":memory:" or "mode=memory" in db
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
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Writers take the write lock up front: a deferred transaction that reads and then
        # writes after another writer committed fails at once (SQLITE_BUSY_SNAPSHOT) instead
        # of waiting out the busy timeout. Readers stay deferred so they never block.
        readonly = conn.get_execution_options().get(READONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def make_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: :func:`default_url`); one per URL.

    Checks the URL and, read only, that the database is this project's, missing or empty
    (``DatabaseError`` otherwise); creates nothing: the first write makes the schema.
    """
    if url is not None and not isinstance(url, str):
        raise ArgumentError("db", url, "a SQLAlchemy URL string (e.g. sqlite:///tuning.db), "
                            "a sqlalchemy Engine, or None for $FLASHMOE_DB / the default")
    url = url or default_url()
    with _lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        engine = _create(url, _parse(url))
        try:
            inspect_schema(engine)
        except BaseException:
            engine.dispose()
            raise
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
    bind = engine.execution_options(**{READONLY: True}) if readonly else engine
    session = Session(bind=bind, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
