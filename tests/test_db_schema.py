"""Winners database schema: prefix, version, migrations, sharing with Optuna, files that are
not ours, readers that create nothing and never wait on a writer. CPU only."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import optuna
import pytest
from db_fixtures import ENV, PROBLEM, cfg, fresh_engines  # noqa: F401 (autouse fixture)
from sqlalchemy import inspect, text

from flashmoe_gen.api import TuningFallbackWarning, lookup
from flashmoe_gen.db import (
    SCHEMA_VERSION,
    UnreadableRowsWarning,
    dispose_engines,
    find_nearest,
    find_winner,
    list_winners,
    make_engine,
    record_trial,
    trials_for,
)
from flashmoe_gen.db import __main__ as db_main
from flashmoe_gen.db.models import Base
from flashmoe_gen.db.schema import OPTUNA_TABLES, OUR_TABLES, SCRIPT_LOCATION, VERSION_TABLE
from flashmoe_gen.errors import ArgumentError, DatabaseError, FlashMoEError
from flashmoe_gen.problem import MoEProblem

HERE = Path(__file__).parent
optuna.logging.set_verbosity(optuna.logging.WARNING)




@pytest.fixture
def db(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "w.db"
    return path, f"sqlite:///{path}"


def tables(url: str) -> set[str]:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as c:
        return {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of a folder and its sha256: proves nothing was written."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


# ---- prefix, version, migrations -----------------------------------------------------------
def test_tables_are_prefixed_and_versioned(db):
    _, url = db
    record_trial(url, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    assert OUR_TABLES == {"fmoe_problems", "fmoe_environments", "fmoe_trials", "fmoe_winners"}
    assert tables(url) == OUR_TABLES | {VERSION_TABLE}
    assert VERSION_TABLE == "fmoe_alembic_version"
    with sqlite3.connect(url.removeprefix("sqlite:///")) as c:
        assert c.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall() == [
            (SCHEMA_VERSION,)]
        indexes = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                           "AND name NOT LIKE 'sqlite_%'")]
    assert indexes and all(n.startswith(("ix_fmoe_", "uq_fmoe_")) for n in indexes)


def test_migrations_build_exactly_the_models_and_head_is_the_schema_version(db):
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg_ = Config()
    cfg_.set_main_option("script_location", SCRIPT_LOCATION)
    assert ScriptDirectory.from_config(cfg_).get_current_head() == SCHEMA_VERSION
    _, url = db
    record_trial(url, PROBLEM, ENV, cfg(), status="failed")
    with make_engine(url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(ctx, Base.metadata) == []


def test_optuna_table_names_are_optunas():
    from optuna.storages._rdb import models

    assert OPTUNA_TABLES == set(models.BaseModel.metadata.tables) | {"alembic_version"}
    assert not OPTUNA_TABLES & OUR_TABLES


LEGACY_DDL = """
CREATE TABLE environments (id INTEGER NOT NULL, "key" VARCHAR(64) NOT NULL,
 gpu_name VARCHAR(255) NOT NULL, compute_capability VARCHAR(16) NOT NULL,
 arch VARCHAR(32) NOT NULL, world_size INTEGER NOT NULL, cuda_driver VARCHAR(32) NOT NULL,
 nvrtc_version VARCHAR(32) NOT NULL, nccl_version VARCHAR(32),
 cupy_version VARCHAR(32) NOT NULL, package_version VARCHAR(32) NOT NULL,
 template_hash VARCHAR(64) NOT NULL, created_at DATETIME NOT NULL, PRIMARY KEY (id),
 CONSTRAINT uq_environments_key UNIQUE ("key"));
CREATE TABLE problems (id INTEGER NOT NULL, name VARCHAR(255) NOT NULL,
 family VARCHAR(255) NOT NULL, tokens_per_rank INTEGER NOT NULL, json TEXT NOT NULL,
 created_at DATETIME NOT NULL, PRIMARY KEY (id), CONSTRAINT uq_problems_name UNIQUE (name));
CREATE INDEX ix_problems_family ON problems (family);
CREATE TABLE trials (id INTEGER NOT NULL, problem_id INTEGER NOT NULL,
 environment_id INTEGER NOT NULL, study_name VARCHAR(255), number INTEGER,
 config_name VARCHAR(255) NOT NULL, config_json TEXT NOT NULL, status VARCHAR(32) NOT NULL,
 failure_reason TEXT, median_ms FLOAT, p20_ms FLOAT, p80_ms FLOAT, rel_error FLOAT,
 tflops FLOAT, tokens_per_s FLOAT, created_at DATETIME NOT NULL, PRIMARY KEY (id),
 FOREIGN KEY(problem_id) REFERENCES problems (id),
 FOREIGN KEY(environment_id) REFERENCES environments (id));
CREATE INDEX ix_trials_problem_env ON trials (problem_id, environment_id);
CREATE INDEX ix_trials_study ON trials (study_name);
CREATE TABLE winners (id INTEGER NOT NULL, problem_id INTEGER NOT NULL,
 environment_id INTEGER NOT NULL, trial_id INTEGER NOT NULL, updated_at DATETIME NOT NULL,
 PRIMARY KEY (id), CONSTRAINT uq_winners_problem_env UNIQUE (problem_id, environment_id),
 FOREIGN KEY(problem_id) REFERENCES problems (id),
 FOREIGN KEY(environment_id) REFERENCES environments (id),
 FOREIGN KEY(trial_id) REFERENCES trials (id));
"""  # what flashmoe_gen 0.1's create_all made (unprefixed, no version table)


def make_legacy(path: Path) -> None:
    """A 0.1 database: two problems, one environment, three trials, two winners."""
    from flashmoe_gen.db.repository import family_of

    stamp = "2026-01-01 00:00:00.000000"
    with sqlite3.connect(path) as c:
        c.executescript(LEGACY_DDL)
        e = ENV.to_dict()
        c.execute(f"INSERT INTO environments (id, key, {', '.join(e)}, created_at) "
                  f"VALUES (7, ?, {', '.join('?' * len(e))}, ?)", [ENV.key, *e.values(), stamp])
        for pid, p in ((3, PROBLEM), (4, PROBLEM.replace(tokens_per_rank=4096))):
            c.execute("INSERT INTO problems VALUES (?, ?, ?, ?, ?, ?)",
                      (pid, p.name, family_of(p), p.tokens_per_rank, p.to_json(), stamp))
        for tid, pid, ms in ((10, 3, 2.0), (11, 3, 1.5), (12, 4, 9.0)):
            c.execute("INSERT INTO trials (id, problem_id, environment_id, study_name, number, "
                      "config_name, config_json, status, median_ms, created_at) "
                      "VALUES (?, ?, 7, 'old', ?, ?, ?, 'ok', ?, ?)",
                      (tid, pid, tid, cfg().name, cfg().to_json(), ms, stamp))
        c.executemany("INSERT INTO winners VALUES (?, ?, 7, ?, ?)",
                      [(1, 3, 11, stamp), (2, 4, 12, stamp)])


def test_old_unprefixed_layout_is_migrated_without_losing_rows(db):
    path, url = db
    make_legacy(path)
    assert db_main.main(["status", url]) == 0
    # A reader migrates it (a one-time write); every row and id is kept.
    winners = list_winners(url)
    assert [(w.trial_id, w.median_ms) for w in winners] == [(11, 1.5), (12, 9.0)]
    assert tables(url) == OUR_TABLES | {VERSION_TABLE}  # the old tables are gone
    assert [t.trial_id for t in trials_for(url, PROBLEM, ENV)] == [11, 10]
    assert find_winner(url, PROBLEM, ENV).environment == ENV
    # Writing goes on after the old ids, and the winner logic still holds.
    tid = record_trial(url, PROBLEM, ENV, cfg(comm_streams=2), status="ok", median_ms=1.0)
    assert tid == 13 and find_winner(url, PROBLEM, ENV).trial_id == 13
    assert len(trials_for(url, PROBLEM)) == 3


def test_migration_command(db, capsys):
    path, url = db
    make_legacy(path)
    assert db_main.main(["upgrade", url]) == 0
    assert f"schema current (version {SCHEMA_VERSION}" in capsys.readouterr().out
    assert tables(url) == OUR_TABLES | {VERSION_TABLE}
    assert db_main.main(["status", "garbage://x"]) == 2
    assert "garbage://x" in capsys.readouterr().err


def test_racing_first_writers_create_the_schema_once(db):
    _, url = db
    start, errors = threading.Barrier(4), []

    def write(i: int) -> None:
        try:
            start.wait()
            record_trial(url, PROBLEM, ENV, cfg(chunks_per_peer=i + 1), status="ok",
                         median_ms=1.0 + i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(trials_for(url, PROBLEM)) == 4 and find_winner(url, PROBLEM, ENV).median_ms == 1.0


# ---- one database for the winners and Optuna's studies --------------------------------------
@pytest.mark.parametrize("optuna_first", [True, False])
def test_db_and_optuna_storage_share_one_sqlite_file(db, optuna_first):
    _, url = db

    def optuna_round(name: str) -> None:
        study = optuna.create_study(study_name=name, storage=url, load_if_exists=True)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)

    if optuna_first:
        optuna_round("a")
    record_trial(url, PROBLEM, ENV, cfg(), status="ok", median_ms=2.0, study_name="a")
    optuna_round("a")
    record_trial(url, PROBLEM, ENV, cfg(comm_streams=2), status="ok", median_ms=1.0)
    optuna_round("b")
    dispose_engines()  # a new process: both read back what the other wrote beside them
    assert len(optuna.load_study(study_name="a", storage=url).trials) == (6 if optuna_first
                                                                           else 3)
    assert find_winner(url, PROBLEM, ENV).median_ms == 1.0
    both = tables(url)
    assert {"trials", "studies", "alembic_version"} <= both
    assert OUR_TABLES | {VERSION_TABLE} <= both


def test_study_loop_with_db_and_storage_in_one_file(db):
    from fake_evaluator import FakeEvaluator

    from flashmoe_gen.tuner.space import SearchSpace
    from flashmoe_gen.tuner.study import run_study

    _, url = db
    engine = make_engine(url)
    p = MoEProblem(2048, 1408, 64, 6, shared_experts=2, tokens_per_rank=512)
    env = dataclasses.replace(ENV, world_size=1)

    def on_trial(res, best):
        o = res.outcome
        record_trial(engine, p, env, res.config, status=o.status, median_ms=o.median_ms,
                     study_name="one", number=res.number)

    res = run_study(p, FakeEvaluator(), space=SearchSpace.for_problem(p, "sm_90", "small"),
                    study_name="one", n_trials=6, storage=url, on_trial=on_trial)
    study = optuna.load_study(study_name="one", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 == len(trials_for(url, p, env, study_name="one"))
    assert find_winner(url, p, env).median_ms == pytest.approx(min(t.value for t in done))
    assert res.best.outcome.median_ms == pytest.approx(study.best_value)


# ---- readers create nothing; files that are not ours are refused untouched ------------------
def readers(url: str) -> list:
    return [list_winners(url), find_winner(url, PROBLEM, ENV),
            find_nearest(url, PROBLEM, ENV), trials_for(url, PROBLEM)]


def test_readers_on_a_missing_or_empty_database_return_nothing_and_create_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    assert readers(url) == [[], None, None, []]
    with pytest.warns(TuningFallbackWarning, match="heuristic default"):
        assert lookup(PROBLEM, device=ENV, db=url).provenance == "default"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty.db").touch()
    assert readers(f"sqlite:///{tmp_path / 'empty.db'}") == [[], None, None, []]
    assert snapshot(tmp_path) == {"empty.db": hashlib.sha256(b"").hexdigest()}
    assert readers("sqlite://") == [[], None, None, []]  # in memory


def foreign_file(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        c.execute("INSERT INTO customers (name) VALUES ('ada')")


@pytest.mark.parametrize("kind", ["foreign", "random"])
def test_a_file_that_is_not_ours_is_refused_and_never_modified(tmp_path, kind):
    path = tmp_path / "other.db"
    if kind == "foreign":
        foreign_file(path)
    else:
        path.write_bytes(os.urandom(8192))
    url = f"sqlite:///{path}"
    before = snapshot(tmp_path)
    calls = [lambda: make_engine(url), lambda: list_winners(url),
             lambda: find_winner(url, PROBLEM, ENV), lambda: trials_for(url, PROBLEM),
             lambda: record_trial(url, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0),
             lambda: lookup(PROBLEM, device=ENV, db=url)]
    for call in calls:
        with pytest.raises(DatabaseError) as e:
            call()
        msg = str(e.value)
        assert url in msg and "was not modified" in msg
        assert ("not a flashmoe_gen database" in msg and "customers" in msg
                if kind == "foreign" else "not a SQLite database" in msg)
    assert snapshot(tmp_path) == before


def test_bad_urls_raise_typed_errors(tmp_path):
    import importlib.util

    cases = {
        str(tmp_path / "plain.db"): "write a file as a URL: sqlite:///",
        "garbage://x": "no dialect 'garbage'",
        f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}": "does not exist",
        f"sqlite:///{tmp_path}": "is a directory",
    }
    if importlib.util.find_spec("pg8000") is None:
        cases["postgresql+pg8000://u@localhost/db"] = "driver is missing"
    for url, message in cases.items():
        with pytest.raises(DatabaseError, match=message) as e:
            list_winners(url)
        assert e.value.url == url and e.value.hint
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArgumentError, match="engine=123"):
        list_winners(123)


def test_rows_from_a_newer_version_are_skipped_with_one_warning(db):
    path, url = db
    others = [PROBLEM.replace(hidden=512), PROBLEM.replace(hidden=1024)]
    for p in (PROBLEM, *others):
        record_trial(url, p, ENV, cfg(p), status="ok", median_ms=1.0)
    with sqlite3.connect(path) as c:  # an unknown config field; a problem that does not parse
        new = cfg(others[0]).to_dict() | {"warp_specialize": True}
        c.execute("UPDATE fmoe_trials SET config_json = ? WHERE problem_id = 2",
                  (json.dumps(new),))
        c.execute("UPDATE fmoe_problems SET json = '{\"hidden\": 1024, \"new\": ' WHERE id = 3")
    dispose_engines()
    with pytest.warns(UnreadableRowsWarning) as caught:
        winners = list_winners(url)
    assert [w.problem for w in winners] == [PROBLEM]
    assert len(caught) == 1 and "skipped 2 row(s)" in str(caught[0].message)
    assert "warp_specialize" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: no second warning
        assert len(list_winners(url)) == 1
        assert lookup(PROBLEM, device=ENV, db=url).provenance == "exact"
    with pytest.warns(TuningFallbackWarning, match="heuristic default"):
        assert lookup(others[0], device=ENV, db=url).provenance == "default"


def test_a_newer_schema_version_is_read_but_not_written(db):
    path, url = db
    record_trial(url, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    with sqlite3.connect(path) as c:
        c.execute(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'")
    dispose_engines()
    assert find_winner(url, PROBLEM, ENV).median_ms == 1.0
    with pytest.raises(DatabaseError, match="newer flashmoe_gen .*9999_future"):
        record_trial(url, PROBLEM, ENV, cfg(), status="ok", median_ms=0.5)


# ---- readers never wait on a writer ---------------------------------------------------------
HOLD = textwrap.dedent("""
    import sqlite3, sys, time
    c = sqlite3.connect(sys.argv[1], isolation_level=None)
    c.execute("BEGIN IMMEDIATE")
    c.execute("UPDATE fmoe_trials SET median_ms = median_ms")
    print("holding", flush=True)
    time.sleep(60)
""")
READ = textwrap.dedent("""
    import sys, time, warnings
    warnings.simplefilter("ignore")
    from flashmoe_gen import lookup
    from flashmoe_gen.db import Environment, find_winner, list_winners
    from flashmoe_gen.problem import MoEProblem
    p, env = MoEProblem.from_json(sys.argv[2]), Environment.from_dict(eval(sys.argv[3]))
    t0 = time.monotonic()
    assert len(list_winners(sys.argv[1])) == 1
    assert find_winner(sys.argv[1], p, env) is not None
    assert lookup(p, device=env, db=sys.argv[1]).provenance == "exact"
    print(f"answered in {time.monotonic() - t0:.3f} s")
""")


def test_a_reader_answers_while_another_process_holds_the_write_lock(db):
    path, url = db
    record_trial(url, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    dispose_engines()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        r = subprocess.run([sys.executable, "-c", READ, url, PROBLEM.to_json(),
                            repr(ENV.to_dict())], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr[-2000:]
        seconds = float(r.stdout.split()[2])
        assert seconds <= 1.0, r.stdout
        # The CLI too (the whole process, imports included: the lock was a 30 s wait before).
        t0 = time.monotonic()
        cli = subprocess.run([sys.executable, "-c", "import sys; from flashmoe_gen.tuner.cli "
                              "import main; sys.exit(main(sys.argv[1:]))", "list", "--db", url],
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and PROBLEM.name[:9] in cli.stdout, cli.stderr[-2000:]
        assert time.monotonic() - t0 < 5
        assert holder.poll() is None  # the write lock was held the whole time
    finally:
        holder.kill()
        holder.wait(10)


# ---- lookup() arguments ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, argument", [
    ({"problem": "moe_h512"}, "problem"),
    ({"device": 123}, "device"),
    ({"device": ""}, "device"),
    ({"db": 123}, "db"),
])
def test_lookup_rejects_arguments_of_the_wrong_kind(kwargs, argument, tmp_path):
    args = {"problem": PROBLEM, "device": ENV, "db": f"sqlite:///{tmp_path / 'w.db'}"} | kwargs
    with pytest.raises(ArgumentError) as e:
        lookup(**args)
    assert isinstance(e.value, FlashMoEError) and e.value.argument == argument
    accepted = "MoEProblem" if argument == "problem" else "or None"
    assert str(e.value).startswith(f"{argument}=") and accepted in str(e.value)


def test_lookup_passes_over_a_stored_config_that_is_invalid_for_the_problem(db):
    path, url = db
    record_trial(url, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    bad = dataclasses.replace(cfg(), router_tokens_per_block=3).to_json()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE fmoe_trials SET config_json = ?", (bad,))
    with pytest.warns(TuningFallbackWarning) as caught:
        k = lookup(PROBLEM, device=ENV, db=url)
    assert k.provenance == "default"
    messages = [str(w.message) for w in caught]
    assert "passing over the stored config" in messages[0] and "router_tokens_per_block=3" \
        in messages[0] and "heuristic default" in messages[-1]


def test_engine_without_schema_has_no_tables_until_the_first_write(db):
    path, url = db
    engine = make_engine(url)
    assert not path.exists()
    record_trial(engine, PROBLEM, ENV, cfg(), status="failed")
    assert inspect(engine).has_table("fmoe_trials")
    with engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
