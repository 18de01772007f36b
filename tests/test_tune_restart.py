"""A candidate that leaves the GPU or NCCL unusable (a fault, an aborted hang) ends the
tuning job's processes with RESUME_EXIT once it is recorded as failed; `flashmoe-tune tune`
resumes the study in fresh processes, at most --restarts times (CPU: the fake backend)."""

import sys

import optuna
import pytest
from optuna.trial import TrialState

from flashmoe_gen.errors import RESUME_EXIT, ContextLost
from flashmoe_gen.tuner import cli, launch
from flashmoe_gen.tuner.objective import COMM_LOST, TIMEOUT, Outcome
from flashmoe_gen.watchdog import exit_code

SEED = ["--hidden", "512", "--intermediate", "2048", "--experts", "8", "--top-k", "2",
        "--shared-experts", "1", "--tokens", "256", "--space", "small"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHMOE_DB", f"sqlite:///{tmp_path}/w.db")
    monkeypatch.setenv("FLASHMOE_STUDIES", f"sqlite:///{tmp_path}/s.db")
    for var in (*launch.MPI_SIZE_VARS, *launch.MPI_RANK_VARS):
        monkeypatch.delenv(var, raising=False)


def _faulty_backend(monkeypatch, hang_in_process):
    """The fake backend, whose second candidate hangs (an aborted forward: NCCL gone) in the
    processes ``hang_in_process(n)`` picks (n: 0 the first, 1 the first restart, ...)."""
    import fake_backend

    import flashmoe_gen.tuner.tune_cmd as tune_cmd

    process = {"n": 0}

    class Faulty(fake_backend.CpuBackend):
        def evaluator(self, problem, world, space, a):
            evaluate, extra = super().evaluator(problem, world, space, a)
            hangs, calls = hang_in_process(process["n"]), [0]

            def ev(cfg):
                calls[0] += 1
                if hangs and calls[0] == 2:
                    return Outcome(TIMEOUT, reason=COMM_LOST + "rank 0: the checked forward "
                                   "did not finish in 25 s (planted)")
                return evaluate(cfg)
            return ev, extra

    monkeypatch.setattr(tune_cmd, "GpuBackend", Faulty)
    children = []

    def fresh_process(cmd):  # [python, -m, flashmoe_gen.tuner.cli, *argv]
        process["n"] += 1
        children.append(cmd)
        assert cmd[:3] == [sys.executable, "-m", "flashmoe_gen.tuner.cli"]
        return cli.main(cmd[3:])
    monkeypatch.setattr(cli.subprocess, "call", fresh_process)
    return children


def _trials(tmp_path):
    (s,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/s.db")
    study = optuna.load_study(study_name=s.study_name, storage=f"sqlite:///{tmp_path}/s.db")
    return [t.state for t in study.trials]


def test_the_job_resumes_past_the_candidate_in_fresh_processes(monkeypatch, capsys, tmp_path):
    children = _faulty_backend(monkeypatch, lambda n: n == 0)
    assert cli.main(["tune", "--gpus", "1", *SEED, "--trials", "4"]) == 0
    (cmd,) = children
    assert cmd[3:] == ["tune", "--gpus", "1", *SEED, "--trials", "4", "--resume",
                       "--restarts", "0"]
    out = capsys.readouterr()
    assert "left the GPU or NCCL unusable" in out.err
    assert "resuming the study in fresh processes (restart 1 of 3)" in out.err
    assert "winner stored" in out.out
    states = _trials(tmp_path)
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3


def test_restarts_are_bounded(monkeypatch, capsys, tmp_path):
    children = _faulty_backend(monkeypatch, lambda n: True)
    assert cli.main(["tune", "--gpus", "1", *SEED, "--trials", "9", "--restarts", "2"]) \
        == RESUME_EXIT
    assert len(children) == 2 and all(c[-2:] == ["--restarts", "0"] for c in children)
    assert "restart 2 of 2" in capsys.readouterr().err
    assert _trials(tmp_path).count(TrialState.FAIL) == 3
    children.clear()
    assert cli.main(["tune", "--gpus", "1", *SEED, "--trials", "12", "--restarts", "0",
                     "--resume"]) == RESUME_EXIT
    assert not children


def test_several_gpus_relaunch_the_mpirun_job_with_resume(monkeypatch, capsys, tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("flashmoe_gen.arch.visible_gpu_count", lambda: 8)
    calls, codes = [], [RESUME_EXIT, 0]
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or codes.pop(0))
    assert cli.main(["--gpus", "2", *SEED, "--trials", "4", "--restarts=5"]) == 0
    first, second = (c[c.index(sys.executable) + 3:] for c in calls)
    assert first == ["tune", "--gpus", "2", *SEED, "--trials", "4", "--restarts=5"]
    assert second == ["tune", "--gpus", "2", *SEED, "--trials", "4", "--resume",
                      "--restarts", "0"]


def test_the_exit_status_says_resume():
    assert exit_code(ContextLost("x")) == RESUME_EXIT == 75
    assert launch.resume_argv(["tune", "--resume", "--restarts", "4", "--trials", "3"]) == \
        ["tune", "--resume", "--trials", "3", "--restarts", "0"]
