"""Faults during a 2-rank tune on CPU (the real ``tune`` command, the fake evaluator):
each ends the job within its bound, and ``--resume`` completes with the study and the
winners database agreeing (docs/reliability.md records the measured end times)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from fake_backend import fake_environment
from optuna.trial import TrialState
from test_mpi_cpu import _mpirun

from flashmoe_gen.db import dispose_engines, find_winner, trials_for
from flashmoe_gen.db.sync import RECOVERED_FROM, finished_trials
from flashmoe_gen.problem import MoEProblem

HERE = Path(__file__).parent
#: What the command's default problem flags name, with 2 ranks.
PROBLEM = MoEProblem(512, 2048, 8, 2, world_size=2, tokens_per_rank=256)
ENV = fake_environment(2)
STUDY = "faults"
#: FLASHMOE_COMM_TIMEOUT of the jobs: small, so a stopped rank ends the job fast.
COMM_TIMEOUT_S = 3
#: A killed rank ends the job at once (MPI sees the process die): well within this.
KILL_BOUND_S = 10
#: A stopped rank or a locked database: the deadline, its margin and the abort.
STALL_BOUND_S = COMM_TIMEOUT_S * 1.5 + 6
#: No job may outlive this (the test fails instead of hanging).
HARD_LIMIT_S = 120

#: Open MPI on one host: shared memory only. MPI_Init then takes 0.07 s instead of 1.1 s
#: (no network transports probed). Other MPIs ignore these variables.
FAST_MPI = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def work(tmp_path):
    """A folder for the databases: in memory (/dev/shm) where there is one, since SQLite's
    fsyncs are most of a tune's time on CPU and no fault here depends on them."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path
    yield folder
    dispose_engines()  # the databases go away with the folder
    if folder != tmp_path:
        shutil.rmtree(folder, ignore_errors=True)


class Job:
    """One ``mpirun -np 2`` tune, in its own process group so a test can always end it."""

    def __init__(self, tmp: Path, *flags: str, trials: int = 8, sleep: float = 0.0,
                 **fault: str):
        self.tmp = tmp
        env = {**FAST_MPI, **os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE / 'mpi'}",
               "PYTHONUNBUFFERED": "1", "FLASHMOE_COMM_TIMEOUT": str(COMM_TIMEOUT_S),
               "FAKE_DIR": str(tmp), "FAKE_SLEEP": str(sleep), **fault}
        for f in tmp.glob("rank*.*"):
            f.unlink()
        cmd = [*_mpirun(), sys.executable, str(HERE / "mpi" / "tune_cpu.py"), "--gpus", "2",
               "--space", "small", "--sampler", "random", "--trials", str(trials),
               "--storage", storage(tmp), "--db", db(tmp), "--study-name", STUDY, *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)

    def pid(self, rank: int) -> int:
        return int(self._wait_for(self.tmp / f"rank{rank}.pid").read_text())

    def wait_for_calls(self, rank: int, n: int) -> None:
        """Until ``rank`` has started its n-th evaluation."""
        path = self.tmp / f"rank{rank}.calls"
        until = time.monotonic() + 60
        while not (path.exists() and len(path.read_text().splitlines()) >= n):
            assert self.proc.poll() is None, self.result()
            assert time.monotonic() < until, f"rank {rank} made no {n} calls"
            time.sleep(0.05)

    def _wait_for(self, path: Path) -> Path:
        until = time.monotonic() + 60
        while not path.exists():
            assert self.proc.poll() is None, self.result()
            assert time.monotonic() < until, f"no {path.name}"
            time.sleep(0.05)
        return path

    def result(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=HARD_LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            pytest.fail(f"the job hung: {out[-2000:]}{err[-2000:]}")
        assert "Traceback" not in out + err, err[-3000:]  # one cause line, never a traceback
        return self.proc.returncode, out, err

    def ended_within(self, since: float, bound: float) -> tuple[int, str, str]:
        rc, out, err = self.result()
        took = time.monotonic() - since
        print(f"[fault] ended {took:.2f} s after the fault (bound {bound} s)")
        assert took <= bound, f"the job took {took:.1f} s to end (bound {bound} s): {err}"
        return rc, out, err


def _state(pid: int) -> str:
    """The process's state letter (``Z``: a zombie, dead), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def storage(tmp: Path) -> str:
    return f"sqlite:///{tmp}/studies.db"


def db(tmp: Path) -> str:
    return f"sqlite:///{tmp}/winners.db"


def ends_job(err: str, rank: int, cause: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("flashmoe-tune: rank")]
    assert lines, err
    assert lines[0].startswith(f"flashmoe-tune: rank {rank} ends the job: ") and cause in lines[0]


def resume_and_agree(tmp: Path, trials: int = 6,
                     repaired: bool | None = None) -> optuna.Study:
    """``--resume`` completes; the study's finished trials are the database's. ``repaired``:
    whether the resume must (True) or must not (False) report a reconciliation; None when
    the fault may land between a database write and a tell."""
    rc, out, err = Job(tmp, "--resume", trials=trials).result()
    assert rc == 0, out[-3000:] + err[-3000:]
    if repaired is not None:
        assert ("the winners database reconciled" in out) == repaired, out[-3000:]
    return assert_agree(tmp, trials)


def assert_agree(tmp: Path, at_least: int = 1) -> optuna.Study:
    study = optuna.load_study(study_name=STUDY, storage=storage(tmp))
    in_study = {n: (t.user_attrs["config"], t.user_attrs["status"],
                    t.value if t.state == TrialState.COMPLETE else None)
                for n, t in finished_trials(study).items()}
    rows = trials_for(db(tmp), PROBLEM, ENV, study_name=STUDY)
    in_db = {r.number: (r.config_name, r.status, r.median_ms) for r in rows}
    assert len(rows) == len(in_db), "a trial recorded twice"
    assert in_db == in_study
    assert len(in_db) >= at_least
    ok = [r.median_ms for r in rows if r.status == "ok"]
    assert find_winner(db(tmp), PROBLEM, ENV).median_ms == min(ok)
    return study


@pytest.mark.parametrize("rank", [0, 1])
def test_killed_rank_ends_the_job_and_resume_completes(work, rank):
    job = Job(work, trials=40, sleep=0.1)
    job.wait_for_calls(rank, 3)
    t0 = time.monotonic()
    os.kill(job.pid(rank), signal.SIGKILL)
    rc, _, _ = job.ended_within(t0, KILL_BOUND_S)
    assert rc != 0
    resume_and_agree(work)


@pytest.mark.parametrize("rank", [0, 1])
def test_stopped_rank_ends_the_job_within_the_deadline(work, rank):
    job = Job(work, trials=40, sleep=0.1)
    job.wait_for_calls(rank, 3)
    pid = job.pid(rank)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        rc, _, err = job.ended_within(t0, STALL_BOUND_S)
        state = _state(pid)
    finally:
        if _state(pid) not in ("gone", "Z"):
            os.kill(pid, signal.SIGKILL)  # only if mpirun left it (it must not)
    print("stopped rank after the job:", state)
    assert rc != 0
    ends_job(err, 1 - rank, "CommTimeout")
    assert f"did not finish in {COMM_TIMEOUT_S}" in err and "FLASHMOE_COMM_TIMEOUT" in err
    assert state in ("gone", "Z"), f"the stopped rank outlived the job ({state})"
    resume_and_agree(work)


def test_communication_failure_ends_the_run_instead_of_failing_a_trial(work):
    rc, _, err = Job(work, trials=10, FAKE_COMM_ERROR="1:3").result()
    assert rc != 0
    ends_job(err, 1, "CommError: rank 1: timing")
    study = optuna.load_study(study_name=STUDY, storage=storage(work))
    assert not any("planted" in str(t.user_attrs.get("reason")) for t in study.trials)
    assert len(finished_trials(study)) == 2
    resume_and_agree(work, repaired=False)


def test_a_hung_candidate_ends_the_job_with_the_resume_status(work):
    """Every rank's candidate hung (NCCL aborted): recorded, then the job ends with exit
    status 75 (mpirun carries MPI_Abort's code: what `flashmoe-tune tune`'s launcher resumes
    on), and a resumed job goes on past the candidate."""
    from flashmoe_gen.errors import RESUME_EXIT

    t0 = time.monotonic()
    rc, _, err = Job(work, trials=8, FAKE_HANG="3").ended_within(t0, HARD_LIMIT_S / 2)
    assert rc == RESUME_EXIT, err[-2000:]
    # (every rank raises it: whichever aborts first names itself)
    assert any("ends the job: ContextLost: candidate" in ln for ln in err.splitlines()), err
    study = optuna.load_study(study_name=STUDY, storage=storage(work))
    hung = [t for t in study.trials if t.user_attrs.get("status") == "timeout"]
    assert len(hung) == 1 and len(finished_trials(study)) == 3
    resume_and_agree(work, repaired=False)


def test_death_between_database_write_and_tell_is_repaired_on_resume(work):
    rc, _, _ = Job(work, trials=10, FAKE_DIE_AFTER_RECORD="3").result()
    assert rc != 0
    study = optuna.load_study(study_name=STUDY, storage=storage(work))
    running = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    recorded = {r.number for r in trials_for(db(work), PROBLEM, ENV, study_name=STUDY)}
    assert len(running) == 1 and running[0] in recorded  # in the database, not in the study
    study = resume_and_agree(work, repaired=True)
    assert study.trials[running[0]].state != TrialState.RUNNING  # told, same number


def test_rank0_start_up_failures_end_the_job_at_once(work):
    t0 = time.monotonic()
    rc, _, err = Job(work, "--storage", "garbage://x").ended_within(t0, HARD_LIMIT_S / 4)
    assert rc == 2, err
    ends_job(err, 0, "DatabaseError: database garbage://x: cannot open it as the Optuna study")
    rc, out, err = Job(work, trials=3).result()
    assert rc == 0, out[-2000:] + err[-2000:]
    assert f"study store: {storage(work)} (study {STUDY})" in out.replace("\n", " ")
    assert "--resume" in out
    t0 = time.monotonic()
    rc, _, err = Job(work, trials=5).ended_within(t0, HARD_LIMIT_S / 4)  # no --resume
    assert rc == 2
    ends_job(err, 0, "ConfigError: config.study='faults'")
    assert "--resume" in err
    resume_and_agree(work, trials=4, repaired=False)


def test_locked_database_ends_the_job_and_resume_completes(work):
    job = Job(work, trials=40, sleep=0.1)
    job.wait_for_calls(0, 3)
    locker = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(60)",
         str(work / "winners.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        rc, _, err = job.ended_within(t0, STALL_BOUND_S)
    finally:
        locker.kill()
        locker.wait()
    assert rc != 0
    ends_job(err, 0, "recording trial")
    resume_and_agree(work, repaired=False)  # the locked write never committed


def test_two_jobs_share_one_study(work):
    first = Job(work, trials=8, sleep=0.15)
    first.wait_for_calls(0, 2)
    (work / "second").mkdir()
    second = Job(work / "second", "--resume", "--storage", storage(work), "--db",
                 db(work), trials=8, sleep=0.15)
    for job in (first, second):
        rc, out, err = job.result()
        assert rc == 0, out[-3000:] + err[-3000:]
        assert "UpdateFinishedTrialError" not in err
    study = assert_agree(work, 8)
    # Neither job failed the other's running trial: every failure is a measured one.
    assert all(t.user_attrs.get("status") for t in study.trials if t.state == TrialState.FAIL)
    assert not any(RECOVERED_FROM in t.user_attrs for t in study.trials)
