"""Winners database on SQLite (in-memory and on disk): CPU only."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading

import pytest
from db_fixtures import ENV, PROBLEM, cfg, fresh_engines  # noqa: F401 (autouse fixture)
from sqlalchemy import func, inspect, select

from flashmoe_gen.db import (
    Environment,
    NearestTokensWarning,
    default_url,
    dispose_engines,
    find_nearest,
    find_winner,
    list_winners,
    make_engine,
    record_trial,
    repository,
    session_scope,
    trials_for,
)
from flashmoe_gen.db.models import EnvironmentModel, ProblemModel, TrialModel, WinnerModel


@pytest.fixture(params=["memory", "disk"])
def url(request, tmp_path) -> str:
    return "sqlite://" if request.param == "memory" else f"sqlite:///{tmp_path / 'x.db'}"


@pytest.fixture
def disk_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'x.db'}"


def counts(engine) -> dict[str, int]:
    """Rows per table (prefix dropped); zeros while the schema does not exist yet."""
    models = (ProblemModel, EnvironmentModel, TrialModel, WinnerModel)
    if not inspect(engine).has_table(TrialModel.__tablename__):
        return {m.__tablename__.removeprefix("fmoe_"): 0 for m in models}
    with session_scope(engine, readonly=True) as s:
        return {m.__tablename__.removeprefix("fmoe_"): s.scalar(select(func.count())
                                                                .select_from(m))
                for m in models}


def test_winner_is_fastest_ok_trial(url):
    engine = make_engine(url)
    assert find_winner(engine, PROBLEM, ENV) is None
    record_trial(engine, PROBLEM, ENV, cfg(router_tokens_per_block=4), status="ok",
                 median_ms=2.0, p20_ms=1.9, p80_ms=2.1, rel_error=1e-3, study_name="s", number=0)
    fast = record_trial(engine, PROBLEM, ENV, cfg(router_tokens_per_block=16), status="ok",
                        median_ms=1.0, study_name="s", number=1)
    record_trial(engine, PROBLEM, ENV, cfg(router_tokens_per_block=2), status="ok",
                 median_ms=1.5, study_name="s", number=2)
    # Equal time is not strictly faster: the first winner stays.
    record_trial(engine, PROBLEM, ENV, cfg(router_tokens_per_block=1), status="ok",
                 median_ms=1.0)
    w = find_winner(engine, PROBLEM, ENV)
    assert w is not None and w.trial_id == fast and w.median_ms == 1.0
    assert w.config == cfg(router_tokens_per_block=16) and w.config_name == w.config.name
    assert w.problem == PROBLEM and w.environment == ENV and w.environment.key == ENV.key
    assert w.tflops == pytest.approx(PROBLEM.flops() * 2 / 1e-3 / 1e12)
    assert w.tokens_per_s == pytest.approx(2 * 256 / 1e-3)
    assert counts(engine) == {"problems": 1, "environments": 1, "trials": 4, "winners": 1}
    medians = [t.median_ms for t in trials_for(engine, PROBLEM, ENV, study_name="s")]
    assert medians == [1.0, 1.5, 2.0]


def test_failed_trials_never_win(url):
    engine = make_engine(url)
    record_trial(engine, PROBLEM, ENV, cfg(), status="compile_failed", failure_reason="nvrtc")
    record_trial(engine, PROBLEM, ENV, cfg(comm_streams=2), status="wrong_answer",
                 median_ms=0.01, rel_error=0.5)
    assert find_winner(engine, PROBLEM, ENV) is None
    assert find_nearest(engine, PROBLEM, ENV) is None
    ok = record_trial(engine, PROBLEM, ENV, cfg(), status="ok", median_ms=3.0)
    for status in ("compile_failed", "launch_failed", "wrong_answer", "timeout", "failed"):
        record_trial(engine, PROBLEM, ENV, cfg(chunks_per_peer=2), status=status,
                     median_ms=0.001 if status == "wrong_answer" else None,
                     failure_reason=f"{status} on purpose")
    assert find_winner(engine, PROBLEM, ENV).trial_id == ok
    trials = trials_for(engine, PROBLEM)
    assert trials[0].trial_id == ok and all(t.status != "ok" for t in trials[1:])
    assert trials[-1].failure_reason is not None and trials[-1].tflops is None


def test_rejects_bad_status_and_ok_without_time(url):
    engine = make_engine(url)
    with pytest.raises(ValueError, match="status"):
        record_trial(engine, PROBLEM, ENV, cfg(), status="great", median_ms=1.0)
    with pytest.raises(ValueError, match="median_ms"):
        record_trial(engine, PROBLEM, ENV, cfg(), status="ok", median_ms=float("inf"))
    assert counts(engine)["trials"] == 0


@pytest.mark.parametrize("change", [{"gpu_name": "NVIDIA A100-SXM4-80GB"}, {"world_size": 4},
                                    {"template_hash": "def456"}, {"nvrtc_version": "12.8"}])
def test_environment_mismatch_never_returns_foreign_winner(url, change):
    engine = make_engine(url)
    record_trial(engine, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    other = dataclasses.replace(ENV, **change)
    assert other.key != ENV.key
    assert find_winner(engine, PROBLEM, other) is None
    assert find_nearest(engine, PROBLEM, other) is None
    assert find_nearest(engine, PROBLEM.replace(tokens_per_rank=512), other) is None
    assert list_winners(engine, other.key) == []
    assert [w.environment for w in list_winners(engine, ENV.key)] == [ENV]


def test_nearest_tokens_in_log_scale(url):
    engine = make_engine(url)
    for t, ms in ((256, 1.0), (4096, 9.0)):
        p = PROBLEM.replace(tokens_per_rank=t)
        record_trial(engine, p, ENV, cfg(p), status="ok", median_ms=ms)
    exact = find_nearest(engine, PROBLEM, ENV)
    assert exact is not None and exact[1] == PROBLEM
    with pytest.warns(NearestTokensWarning, match="tokens_per_rank=256"):
        rec, tuned = find_nearest(engine, PROBLEM.replace(tokens_per_rank=512), ENV)
    assert tuned.tokens_per_rank == 256 and rec.problem == tuned and rec.median_ms == 1.0
    assert find_winner(engine, PROBLEM.replace(tokens_per_rank=512), ENV) is None
    with pytest.warns(NearestTokensWarning):
        assert find_nearest(engine, PROBLEM.replace(tokens_per_rank=3000), ENV)[1] \
            .tokens_per_rank == 4096
    # Never across families: any field besides the token count must match.
    for change in ({"hidden": 512}, {"top_k": 1}, {"capacity_factor": 1.25}):
        assert find_nearest(engine, PROBLEM.replace(tokens_per_rank=512, **change), ENV) is None


def test_nearest_tie_prefers_larger_count(url):
    engine = make_engine(url)
    for t in (0, 3):  # log(0+1) and log(3+1) are equally far from log(1+1)
        p = PROBLEM.replace(tokens_per_rank=t)
        record_trial(engine, p, ENV, cfg(p), status="ok", median_ms=1.0)
    with pytest.warns(NearestTokensWarning):
        assert find_nearest(engine, PROBLEM.replace(tokens_per_rank=1), ENV)[1] \
            .tokens_per_rank == 3


def test_failure_midway_leaves_no_partial_rows(url, monkeypatch):
    engine = make_engine(url)

    def boom(session, trial):
        assert trial.id is not None  # the trial row was inserted (flushed) already
        raise RuntimeError("crash after the trial insert")

    monkeypatch.setattr(repository, "_upsert_winner", boom)
    with pytest.raises(RuntimeError, match="crash"):
        record_trial(engine, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    assert counts(engine) == {"problems": 0, "environments": 0, "trials": 0, "winners": 0}
    monkeypatch.undo()
    first = record_trial(engine, PROBLEM, ENV, cfg(), status="ok", median_ms=2.0)
    monkeypatch.setattr(repository, "_upsert_winner", boom)
    with pytest.raises(RuntimeError):
        record_trial(engine, PROBLEM, ENV, cfg(comm_streams=2), status="ok", median_ms=0.5)
    assert counts(engine) == {"problems": 1, "environments": 1, "trials": 1, "winners": 1}
    assert find_winner(engine, PROBLEM, ENV).trial_id == first


def test_get_or_create_recovers_from_a_racing_insert(url, monkeypatch):
    """Another writer inserted the problem between our SELECT and our INSERT."""
    engine = make_engine(url)
    record_trial(engine, PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    with session_scope(engine) as s:
        real = s.scalars
        calls = []

        class Missing:
            def one_or_none(self):
                return None

        def scalars(stmt, *a, **k):
            calls.append(stmt)
            return Missing() if len(calls) == 1 else real(stmt, *a, **k)

        monkeypatch.setattr(s, "scalars", scalars)
        row = repository._problem_row(s, PROBLEM)  # INSERT collides inside a SAVEPOINT
        monkeypatch.undo()
        assert row.name == PROBLEM.name and len(calls) == 2
        # The outer transaction survived the collision and can still write.
        s.add(TrialModel(problem_id=row.id, environment_id=1, config_name="x",
                         config_json=cfg().to_json(), status="failed"))
    assert counts(engine) == {"problems": 1, "environments": 1, "trials": 2, "winners": 1}


def test_on_disk_database_persists_across_engines(disk_url):
    engine = make_engine(disk_url)
    tid = record_trial(engine, PROBLEM, ENV, cfg(), status="ok", median_ms=1.25)
    dispose_engines()  # as if a new process opened the file
    engine2 = make_engine(disk_url)
    assert engine2 is not engine
    w = find_winner(engine2, PROBLEM, ENV)
    assert w is not None and w.trial_id == tid and w.median_ms == 1.25
    assert [t.trial_id for t in trials_for(disk_url, PROBLEM, ENV)] == [tid]  # URL works too


def test_sqlite_pragmas(disk_url):
    record_trial(disk_url, PROBLEM, ENV, cfg(), status="failed")  # the first write sets WAL
    with make_engine(disk_url).connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert make_engine(disk_url) is make_engine(disk_url)  # one engine per URL


def test_in_memory_engine_is_shared():
    record_trial("sqlite://", PROBLEM, ENV, cfg(), status="ok", median_ms=1.0)
    assert find_winner(make_engine("sqlite://"), PROBLEM, ENV) is not None


def test_default_url(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHMOE_DB", "postgresql://tuner@db/flashmoe")
    assert default_url() == "postgresql://tuner@db/flashmoe"
    monkeypatch.delenv("FLASHMOE_DB")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_url() == f"sqlite:///{tmp_path / 'cache' / 'flashmoe_gen' / 'tuning.db'}"
    assert (tmp_path / "cache" / "flashmoe_gen").is_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_db = tmp_path / "home" / ".cache" / "flashmoe_gen" / "tuning.db"
    assert default_url() == f"sqlite:///{home_db}"


def test_concurrent_writers(disk_url):
    engine = make_engine(disk_url)
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    times = {0: [3.0, 1.7, 2.2, 0.9, 2.5, 1.1], 1: [2.9, 0.8, 1.9, 3.3, 0.85, 1.4]}

    def worker(rank: int) -> None:
        try:
            start.wait()
            for i, ms in enumerate(times[rank]):
                record_trial(engine, PROBLEM, ENV, cfg(chunks_per_peer=rank + 1), status="ok",
                             median_ms=ms, study_name=f"job{rank}", number=i)
        except BaseException as e:  # reported below, a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert counts(engine) == {"problems": 1, "environments": 1, "trials": 12, "winners": 1}
    w = find_winner(engine, PROBLEM, ENV)
    assert w.median_ms == 0.8 and w.study_name == "job1" and w.config.chunks_per_peer == 2


def test_first_writers_race_to_wal(tmp_path):
    """Engines of separate processes switching a new file to WAL at once: SQLite answers
    the loser BUSY without waiting, so the switch must retry (a CI run failed on it)."""
    from sqlalchemy import create_engine

    from flashmoe_gen.db import schema

    for i in range(30):
        url = f"sqlite:///{tmp_path / f'race{i}.db'}"
        engines = [create_engine(url) for _ in range(4)]
        start = threading.Barrier(len(engines))
        errors: list[BaseException] = []

        def switch(engine, start=start, errors=errors) -> None:
            try:
                start.wait()
                schema._use_wal(engine)
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=switch, args=(eng,)) for eng in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for eng in engines:
            eng.dispose()
        assert not errors, f"file {i}: {errors[0]!r}"


def test_environment_key_and_arch():
    assert ENV.arch == "sm_90" and len(ENV.key) == 16
    assert Environment.from_dict(ENV.to_dict()) == ENV
    assert dataclasses.replace(ENV, cupy_version="14.0").key != ENV.key


def test_import_does_not_load_cupy():
    code = "import sys, flashmoe_gen.db; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
