"""The search loop on CPU with a fake evaluator: protocol, resume, samplers, space."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from fake_evaluator import FakeEvaluator, fake_latency
from optuna.trial import TrialState
from test_mpi_cpu import _mpirun

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.space import SearchSpace
from flashmoe_gen.tuner.study import run_study

HERE = Path(__file__).parent
P2 = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=256)
P1 = MoEProblem(2048, 1408, 64, 6, shared_experts=2, tokens_per_rank=512)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_two_rank_protocol_with_one_rank_failing(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    from test_faults import FAST_MPI
    env = {"PYTHONPATH": f"{HERE}:{HERE / 'mpi'}", "PYTHONUNBUFFERED": "1"}
    import os
    r = subprocess.run([*_mpirun(), sys.executable, str(HERE / "mpi" / "study_cpu.py"), url],
                       capture_output=True, text=True, timeout=300,
                       env={**FAST_MPI, **os.environ, **env})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("study protocol OK") == 2


def test_resume_after_interrupt_loses_no_finished_trial(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    run_study(P1, FakeEvaluator(), space=space, study_name="r", n_trials=5, storage=url)
    with pytest.raises(KeyboardInterrupt):
        run_study(P1, FakeEvaluator(interrupt_after=2), space=space, study_name="r",
                  n_trials=10, storage=url, resume=True)
    before = optuna.load_study(study_name="r", storage=url).trials
    finished = [t for t in before if t.state == TrialState.COMPLETE]
    assert len(finished) == 7
    assert before[-1].state == TrialState.FAIL and before[-1].user_attrs["reason"] == "interrupted"
    res = run_study(P1, FakeEvaluator(), space=space, study_name="r", n_trials=10, storage=url,
                    resume=True)
    after = optuna.load_study(study_name="r", storage=url).trials
    assert len(res.trials) == 3  # 7 done before, 10 wanted
    done_after = {t.number: t.value for t in after if t.state == TrialState.COMPLETE}
    assert all(done_after[t.number] == t.value for t in finished)  # nothing lost or changed
    assert len(done_after) == 10


def test_resume_over_another_space_says_what_to_do(tmp_path):
    """A study resumed with other knob values (an upgrade added router_batches 8 and
    tanh_silu, or another --space) cannot draw from them (Optuna: "dynamic value space"):
    a ConfigError names the study, a knob and its old and new values, and the way out."""
    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    run_study(P1, FakeEvaluator(), space=space, study_name="v", n_trials=2, storage=url)
    grown = SearchSpace(space.problem, space.limits,
                        space.choices | {"router": (*space.choices["router"], 64)},
                        space.nvlink_only)
    with pytest.raises(ConfigError, match="--study-name") as e:
        run_study(P1, FakeEvaluator(), space=grown, study_name="v", n_trials=4, storage=url,
                  resume=True)
    assert e.value.field == "study" and "router: " in str(e.value) and "64]" in str(e.value)
    res = run_study(P1, FakeEvaluator(), space=space, study_name="v", n_trials=4,
                    storage=url, resume=True)  # the same space resumes
    assert len(res.trials) == 2


def test_space_fingerprint_follows_the_knobs_values():
    """Default study names end with it: equal spaces give one fingerprint (in any process:
    no hash randomisation), a value added or a transport more another."""
    import os
    import subprocess
    import sys

    space = SearchSpace.for_problem(P1, "sm_90", "small")
    fp = space.fingerprint
    assert len(fp) == 8 and fp == SearchSpace.for_problem(P1, "sm_90", "small").fingerprint
    grown = SearchSpace(space.problem, space.limits,
                        space.choices | {"router": (*space.choices["router"], 64)})
    assert grown.fingerprint != fp
    assert SearchSpace.for_problem(P1, "sm_90", "small", ("nccl", "nvlink")).fingerprint != fp
    code = ("from flashmoe_gen.tuner.space import SearchSpace; from flashmoe_gen.problem import "
            f"MoEProblem; print(SearchSpace.for_problem(MoEProblem.from_name({P1.name!r}), "
            "'sm_90', 'small').fingerprint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    assert out.stdout.strip() == fp


def test_existing_study_needs_resume(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    run_study(P1, FakeEvaluator(), space=space, study_name="x", n_trials=2, storage=url)
    with pytest.raises(ConfigError, match="--resume"):
        run_study(P1, FakeEvaluator(), space=space, study_name="x", n_trials=2, storage=url)


def test_first_trials_are_the_default_and_known_good():
    space = SearchSpace.for_problem(P1, "sm_90", "full")
    res = run_study(P1, FakeEvaluator(), space=space, study_name="s", n_trials=4)
    assert res.trials[0].config == KernelConfig.default(P1)
    seeds = space.seeds()
    assert len(seeds) >= 2 and all(space.contains(c) for c in seeds[1:])
    assert [t.config for t in res.trials[:len(seeds)]] == seeds


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes"])
def test_samplers_find_good_configs(sampler):
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    res = run_study(P1, FakeEvaluator(), space=space, study_name=sampler, sampler=sampler,
                    n_trials=40, seed=1)
    best_possible = min(fake_latency(c) for c in space.valid_configs())
    assert len(res.trials) == 40
    assert res.best.outcome.median_ms <= best_possible * 1.5


def test_grid_visits_every_valid_config_once():
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    valid = {c.name for c in space.valid_configs()}
    res = run_study(P1, FakeEvaluator(), space=space, study_name="g", sampler="grid",
                    n_trials=10_000)
    seen = [t.config.name for t in res.trials]
    assert len(seen) == len(set(seen)) == len(valid) and set(seen) == valid
    assert res.best.outcome.median_ms == min(fake_latency(c) for c in space.valid_configs())


def test_space_constraints_reject_before_compiling():
    space = SearchSpace.for_problem(P1, "sm_90", "full")
    params = space.params_from_config(KernelConfig.default(P1, "sm_80"))  # mma.sync tiles
    assert space.check(params) is None
    assert space.check(space.params_from_config(KernelConfig.default(P1))) is None  # tma
    assert "sm_90" in SearchSpace.for_problem(P1, "sm_80", "full").check(
        params | {"gu_mma": "wgmma"})
    # sm_80: no Hopper kinds; weight streaming (mma.sync) stays. sm_90: tma is sampled.
    assert SearchSpace.for_problem(P1, "sm_80", "full").choices["gu_mma"] == ("sync", "ws")
    assert "tma" in space.choices["gu_mma"]
    assert "bm=128" in space.check(params | {"gu_mma": "tma", "gu_bm": 64, "gu_w": "4x1"})
    too_big = params | {"gu_bm": 256, "gu_bn": 128, "gu_bk": 64, "gu_s": 4}
    assert "shared memory" in space.check(too_big)
    assert "warps_n" in space.check(params | {"gu_bn": 32, "gu_w": "2x4"})
    assert "warps_m" in space.check(params | {"gu_bm": 32, "gu_w": "4x2"})
    small = MoEProblem(64, 64, 4, 1)
    sp = SearchSpace.for_problem(small, "sm_90", "full")
    assert all(c.gate_up.bn <= 64 and c.down.bn <= 64 for c in sp.valid_configs())
    assert sp.choices["chunks"] == (1,) and sp.choices["streams"] == (1,)
    assert SearchSpace.for_problem(P2, "sm_90", "small").size >= 100
    assert sum(1 for _ in SearchSpace.for_problem(P2, "sm_90", "small").valid_configs()) >= 100


def test_report_prints_top_configs_default_and_writes_plots(tmp_path, capsys):
    import argparse

    from flashmoe_gen.db import Environment
    from flashmoe_gen.tuner.tune_cmd import report

    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "full")  # holds the (wgmma) default
    res = run_study(P1, FakeEvaluator(), space=space, study_name="rep", n_trials=12,
                    storage=url)
    env = Environment("NVIDIA H100 80GB HBM3", "9.0", 1, "t")
    for plot in ("h.html", "h.png"):
        a = argparse.Namespace(plot=str(tmp_path / plot), db=None, sampler="tpe")
        report(P1, res, "rep", url, env, a, 1.0)
        assert (tmp_path / plot).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "top configs" in out and "heuristic default" in out
    assert f"{res.best.outcome.median_ms:.4f}" in out


@pytest.mark.parametrize("transports", [("nccl",), ("nccl", "nvlink")])
def test_valid_configs_equal_the_brute_force_filter(transports):
    """Filtering tiles first and walking the other knobs (a moot value dropped where it
    stands) must keep exactly the configs a full product + canonical + check keeps; with
    nvlink, every knob of the persistent kernel over a few tiles."""
    import itertools

    wide = {"gu_mma": ("sync", "wgmma"), "gu_w": ("2x2", "8x1"), "gu_bn": (64, 2048)}
    if "nvlink" in transports:  # wgmma and ws tiles of 128 rows, every nvlink knob (the
        # count knobs with two values each: the brute force walks the whole product; the
        # router's batches and the staged epilogue each a value its rules single out and
        # one they do not, one K split and the blocks per SM (no rule reads them) fixed, so
        # 21 knobs stay a product of 2M)
        space = _small_nvlink_space()
        wide = {"gu_mma": ("wgmma", "ws"), "dn_mma": ("wgmma", "ws"), "gu_w": ("8x1",),
                "dn_w": ("8x1",), "gu_bm": (128,), "dn_bm": (128,), "gu_bn": (128,),
                "dn_bn": (128,), "gu_s": (4,), "dn_s": (4,), "router_batches": (1, 4),
                "stage_epilogue": (0, 3), "blocks": (0,), "ksplit_gu": (1,)}
    else:
        space = SearchSpace.for_problem(P2, "sm_90", "small", transports)
    space = SearchSpace(space.problem, space.limits, space.choices | wide, space.nvlink_only)
    keys = list(space.choices)
    brute = set()
    for values in itertools.product(*(space.choices[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        if space.check(params) is None:
            brute.add(space.config_from_params(params))
    fast = list(space.valid_configs())
    assert len(fast) == len(set(fast)) == len(brute) and set(fast) == brute
    assert any(c.gate_up.mma == "wgmma" for c in fast)
    if "nvlink" in transports:
        nvl = [c for c in fast if c.transport == "nvlink"]
        assert any(c.ws_tma and c.task_tiles == 2 for c in nvl)
        assert any(c.ws_wgmma for c in nvl) and any(c.send_blocks for c in nvl)
        assert any(c.stage_epilogue == 3 for c in nvl) and any(c.router_batches == 4 for c in nvl)
    else:
        assert any(c.gate_up.bn == 64 for c in fast)


def test_comm_timeout_is_read_when_used_and_checked(monkeypatch):
    from flashmoe_gen.errors import CommError
    from flashmoe_gen.watchdog import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, comm_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert comm_timeout() == DEFAULT_TIMEOUT_S
    for text, seconds in (("45", 45.0), ("2.5", 2.5), ("90s", 90.0), ("5m", 300.0),
                          (" 1M ", 60.0)):
        monkeypatch.setenv(TIMEOUT_ENV, text)
        assert comm_timeout() == seconds
    for bad in ("abc", "0", "-3", "inf", "nan", "5h", "m"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(CommError, match=rf"FLASHMOE_COMM_TIMEOUT='{bad}' is invalid.*5m"):
            comm_timeout()
    # A bad value never breaks the import (it used to crash at import time).
    code = "import flashmoe_gen.comm, flashmoe_gen.tuner.study"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**__import__("os").environ, TIMEOUT_ENV: "5x"})
    assert r.returncode == 0, r.stderr


def test_communication_failure_ends_the_search_instead_of_failing_a_trial(tmp_path):
    from flashmoe_gen.errors import CommError, CommTimeout

    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    fake = FakeEvaluator()

    def evaluate(cfg):
        if fake.calls == 2:
            raise CommTimeout("rank 0: the count exchange did not finish in 3 s")
        return fake(cfg)

    with pytest.raises(CommError, match="count exchange"):
        run_study(P1, evaluate, space=space, study_name="c", n_trials=10, storage=url)
    trials = optuna.load_study(study_name="c", storage=url).trials
    statuses = [t.user_attrs["status"] for t in trials if t.user_attrs["status"] != "invalid"]
    assert statuses == ["ok", "ok", "interrupted"]  # the third is not a failed candidate


def test_reconcile_repairs_the_study_and_the_database_both_ways(tmp_path):
    from flashmoe_gen.db import Environment, find_winner, record_trial, trials_for
    from flashmoe_gen.db.sync import RECOVERED_FROM, finished_trials, reconcile

    url, db = f"sqlite:///{tmp_path}/s.db", f"sqlite:///{tmp_path}/w.db"
    env = Environment("NVIDIA H100 80GB HBM3", "9.0", 1, "t")
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    # The study finished 4 trials the database never saw (a crash after the tell).
    run_study(P1, FakeEvaluator(), space=space, study_name="s", n_trials=4, storage=url,
              enqueue_seeds=False, sampler="random")
    study = optuna.load_study(study_name="s", storage=url)
    dists = {k: optuna.distributions.CategoricalDistribution(list(v))
             for k, v in space.choices.items()}

    def recorded_not_told(ms):
        """A trial written to the database whose study trial was left RUNNING."""
        while space.check((t := study.ask(dists)).params) is not None:
            study.tell(t, state=TrialState.FAIL)
        cfg = space.config_from_params(t.params)
        t.set_user_attr("config", cfg.name)
        record_trial(db, P1, env, cfg, status="ok", median_ms=ms, p20_ms=ms, p80_ms=ms,
                     study_name="s", number=t.number)
        return t.number

    fastest = recorded_not_told(0.25)    # faster than every fake latency: the true winner
    stale = recorded_not_told(0.5)
    study._storage.set_trial_state_values(study.trials[stale]._trial_id, TrialState.FAIL)

    report = reconcile(study, db, P1, env)
    assert report.told == (fastest,) and report.readded == (stale,)
    assert len(report.recorded) == 4
    in_study = {n: t.user_attrs["config"] for n, t in finished_trials(study).items()}
    rows = trials_for(db, P1, env, study_name="s")
    assert in_study == {r.number: r.config_name for r in rows} and len(rows) == 6
    assert study.trials[fastest].state == TrialState.COMPLETE
    assert study.trials[fastest].value == 0.25
    assert [t.user_attrs[RECOVERED_FROM] for t in study.trials
            if RECOVERED_FROM in t.user_attrs] == [stale]
    assert find_winner(db, P1, env).median_ms == 0.25
    # A winner pointing at a slower trial (a lost best trial, before) is recomputed.
    from sqlalchemy import select

    from flashmoe_gen.db import make_engine, session_scope
    from flashmoe_gen.db.models import TrialModel, WinnerModel
    from flashmoe_gen.db.sync import recompute_winner
    with session_scope(make_engine(db)) as s:
        slow = s.scalars(select(TrialModel).where(TrialModel.median_ms > 1)).first()
        s.scalars(select(WinnerModel)).one().trial_id = slow.id
    assert find_winner(db, P1, env).median_ms > 1
    assert recompute_winner(db, P1, env) and find_winner(db, P1, env).median_ms == 0.25
    again = reconcile(study, db, P1, env)  # idempotent
    assert again.repaired == 0 and len(study.trials) == len(optuna.load_study(
        study_name="s", storage=url).trials)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # this test asks by hand
def test_a_dead_jobs_trial_goes_stale_a_live_one_does_not(tmp_path, monkeypatch):
    import time

    import flashmoe_gen.tuner.study as st

    monkeypatch.setattr(st, "STALE_AFTER", 1)
    url = f"sqlite:///{tmp_path}/s.db"
    smp = st.make_sampler("random", SearchSpace.for_problem(P1, "sm_90", "small"))
    study = st.open_study("h", url, smp, resume=False, heartbeat_s=1)
    dead, live = study.ask(), study.ask()
    for t in (dead, live):
        study._storage.record_heartbeat(t._trial_id)
    time.sleep(1.2)
    study._storage.record_heartbeat(live._trial_id)  # the live job's heartbeat goes on
    time.sleep(1.2)
    study._storage.record_heartbeat(live._trial_id)
    other = st.open_study("h", url, smp, resume=True, heartbeat_s=1)  # a second job
    st._fail_stale(other)
    states = {t.number: t.state for t in other.trials}
    assert states == {dead.number: TrialState.FAIL, live.number: TrialState.RUNNING}


def test_report_names_the_study_store_and_plots_only_where_asked(tmp_path, capsys,
                                                                  monkeypatch):
    import argparse

    from flashmoe_gen.db import Environment
    from flashmoe_gen.tuner.tune_cmd import report

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    res = run_study(P1, FakeEvaluator(), space=space, study_name="np", n_trials=3, storage=url)
    env = Environment("NVIDIA H100 80GB HBM3", "9.0", 1, "t")
    report(P1, res, "np", url, env, argparse.Namespace(plot=None, db=None, sampler="tpe"), 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db"]  # no HTML appeared
    out = " ".join(capsys.readouterr().out.split())
    assert f"study store: {url} (study np)" in out and "--resume" in out


class _FakeWorld:
    """Two ranks; records MPI_Abort instead of ending the test process."""

    def __init__(self):
        self.aborted = None

    def Get_rank(self):
        return 1

    def Get_size(self):
        return 2

    def Abort(self, code):
        self.aborted = code


def test_an_error_on_one_rank_aborts_nccl_and_the_world_with_one_line(capfd, monkeypatch):
    import flashmoe_gen.watchdog as wd
    from flashmoe_gen.comm import Communicator
    from flashmoe_gen.errors import CommError
    from flashmoe_gen.watchdog import abort_on_error

    monkeypatch.setattr(wd, "ABORT_FLUSH_S", 0)
    c = Communicator.__new__(Communicator)  # no GPU here: only the abort bookkeeping
    c.rank, c.nccl, c.aborted = 1, [], False
    monkeypatch.setattr(wd, "_abort_hooks", [c.abort])
    world = _FakeWorld()
    with pytest.raises(ConfigError), abort_on_error(world):
        raise ConfigError("study", "x", "already exists\nsecond line")
    assert world.aborted == 2 and c.aborted
    err = capfd.readouterr().err
    assert err == ("flashmoe-tune: rank 1 ends the job: ConfigError: config.study='x' is "
                   "invalid: already exists\n")
    with pytest.raises(CommError, match="aborted"):  # the tune cannot go on after it
        c.wait(None, "the count exchange")
    with abort_on_error(None), pytest.raises(KeyError):  # one rank: raised as usual
        raise KeyError("x")


def test_a_step_past_its_deadline_ends_the_job_naming_the_step(capfd, monkeypatch):
    import time

    import flashmoe_gen.watchdog as wd

    monkeypatch.setattr(wd, "ABORT_FLUSH_S", 0)
    monkeypatch.setattr(wd, "_watchdog", None)  # a fresh watchdog, dropped afterwards
    world = _FakeWorld()
    with wd.deadline(world, "a quick step", 5):
        pass
    with wd.deadline(world, "gathering the outcomes of a candidate", 0.2):
        time.sleep(0.6)  # what a stopped peer looks like from here
    assert world.aborted == 3
    assert capfd.readouterr().err.startswith(
        "flashmoe-tune: rank 1 ends the job: CommTimeout: gathering the outcomes of a "
        "candidate did not finish in 0.2 s")


def _failing_at(call: int, error: str) -> FakeEvaluator:
    """A FakeEvaluator whose candidate number ``call`` (from 0) raises DeviceError(error)."""
    from flashmoe_gen.errors import DeviceError

    class Failing(FakeEvaluator):
        def __call__(self, cfg):
            if self.calls == call:
                self.calls += 1
                raise DeviceError(error)
            return super().__call__(cfg)

    return Failing()


def test_a_kernel_fault_is_recorded_then_ends_the_run_and_resume_goes_on(tmp_path):
    # A trap or illegal address poisons the CUDA context: the candidate is recorded as
    # launch_failed, the run ends with a typed error (every later candidate would fail on
    # the dead context), and the same command resumes after it.
    from flashmoe_gen.errors import DeviceError
    from flashmoe_gen.status import TrialStatus

    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    with pytest.raises(DeviceError, match="run the same command with --resume"):
        run_study(P1, _failing_at(2, "cudaErrorLaunchFailure: unspecified launch failure"),
                  space=space, study_name="f", n_trials=6, storage=url)
    study = optuna.load_study(study_name="f", storage=url)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["status"] == TrialStatus.LAUNCH_FAILED
    assert failed[0].user_attrs["reason"].startswith("context lost: ")
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2
    res = run_study(P1, FakeEvaluator(), space=space, study_name="f", n_trials=6, storage=url,
                    resume=True)
    study = optuna.load_study(study_name="f", storage=url)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 5
    assert res.best is not None


def test_a_hung_candidate_is_recorded_as_timeout_then_ends_the_run_and_resume_goes_on(
        tmp_path):
    # Found on 4 x H200 (DeepSeek-V3 tune): a candidate whose forward never ended blocked
    # every rank for good. The objective now waits for it with a bound, aborts NCCL and
    # returns a timeout outcome; the study records it, ends the run (the communicator is
    # gone) and a resumed run goes on past it instead of trying it again.
    from flashmoe_gen.errors import DeviceError
    from flashmoe_gen.status import TrialStatus
    from flashmoe_gen.tuner.objective import COMM_LOST, TIMEOUT, Outcome

    class Hanging(FakeEvaluator):
        def __call__(self, cfg):
            if self.calls == 1:
                self.calls += 1
                return Outcome(TIMEOUT, reason=COMM_LOST + "rank 0: the checked forward did "
                               "not finish in 25 s (a peer died or hangs); NCCL aborted")
            return super().__call__(cfg)

    url = f"sqlite:///{tmp_path}/h.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    with pytest.raises(DeviceError, match="left the GPU or NCCL unusable"):
        run_study(P1, Hanging(), space=space, study_name="h", n_trials=5, storage=url)
    study = optuna.load_study(study_name="h", storage=url)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["status"] == TrialStatus.TIMEOUT
    hung = failed[0].params
    run_study(P1, FakeEvaluator(), space=space, study_name="h", n_trials=5, storage=url,
              resume=True)
    study = optuna.load_study(study_name="h", storage=url)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 4
    assert sum(t.params == hung for t in study.trials) == 1  # not tried again


def test_an_ordinary_launch_error_is_a_failed_trial_and_the_run_goes_on():
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    bad = _failing_at(1, "cudaErrorInvalidConfiguration: too many resources requested")
    res = run_study(P1, bad, space=space, study_name="b", n_trials=4)
    assert len(res.trials) == 4 and sum(not r.outcome.ok for r in res.trials) == 1


def test_a_config_the_build_refuses_is_a_failed_trial_the_database_keeps():
    # Found on 2 x H200 (grid over the steep space): a persistent kernel that fits no SM is
    # refused with a ConfigError at build, after the space allowed it. It was classified
    # "invalid", which the database refuses, and the whole tune ended.
    from flashmoe_gen.db.models import STATUSES
    from flashmoe_gen.status import TrialStatus

    class Refusing(FakeEvaluator):
        def __call__(self, cfg):
            if self.calls == 1:
                self.calls += 1
                raise ConfigError("transport", "nvlink", "the persistent kernel does not fit "
                                  "one SM", cfg.name)
            return super().__call__(cfg)

    recorded = []

    def record(res):
        assert res.outcome.status in STATUSES, res.outcome
        recorded.append(res.outcome)

    space = SearchSpace.for_problem(P1, "sm_90", "small")
    res = run_study(P1, Refusing(), space=space, study_name="c", n_trials=3, record=record)
    assert len(res.trials) == 3 and len(recorded) == 3
    bad = [o for o in recorded if not o.ok]
    assert len(bad) == 1 and bad[0].status == TrialStatus.FAILED
    assert bad[0].reason.startswith("refused when built: ") and "ConfigError" in bad[0].reason


def _small_nvlink_space(every_knob: bool = True) -> SearchSpace:
    """P2's small space with transport nvlink, two values of each of the persistent
    kernel's count knobs (blocks, K splits, senders), every knob kept: small enough for a
    brute-force walk of the whole product, and for a grid (the whole space holds more than
    sampling.MAX_GRID valid configs since E=8's router takes pairs). Not ``every_knob``:
    atomic_front, the own down tasks last, the streamed down tasks (first or not) and the
    shared tiles beside the front off and no router eights too, so nvlink's configs do not
    crowd nccl's out of a short grid."""
    space = SearchSpace.for_problem(P2, "sm_90", "small", ("nccl", "nvlink"))
    few = {"blocks": (0, 1), "ksplit_gu": (1, 2), "ksplit_dn": (1, 2), "senders": (0, 8)}
    if not every_knob:
        few["atomic_front"] = few["own_down_last"] = (False,)
        few["stream_down"] = few["early_down"] = few["shared_front"] = (False,)
        few["router_batches"] = (1, 2, 4)
    return SearchSpace(space.problem, space.limits, space.choices | few,
                       {k: v for k, v in (space.nvlink_only | {k: v[1:] for k, v in
                                                                few.items()}).items() if v})


def test_space_with_transport_nvlink():
    """With nvlink among the transports, its forced schedule knobs make one parameter set
    per config: the grid holds each nvlink config once, samplers canonicalise, a tile nvlink
    cannot take is repaired (or the draw goes back to nccl), and the persistent default is
    an early seed."""
    from flashmoe_gen.config import GemmTile

    space = SearchSpace.for_problem(P2, "sm_90", "small", ("nccl", "nvlink"))
    assert space.choices["transport"] == ("nccl", "nvlink")
    assert 8 in space.choices["router"] and False in space.choices["packed"]
    configs = list(space.valid_configs())
    names = [c.name for c in configs]
    assert len(names) == len(set(names))
    nvl = [c for c in configs if c.transport == "nvlink"]
    assert nvl and all(c.router_tokens_per_block == 8 and not c.packed_slots for c in nvl)
    assert len(configs) - len(nvl) == sum(
        1 for _ in SearchSpace.for_problem(P2, "sm_90", "small").valid_configs())
    # A draw with transport nvlink and any schedule knobs stands for the forced ones.
    params = space.params_from_config(nvl[0]) | {"router": 16, "chunks": 4, "packed": True}
    assert space.canonical(params) == space.params_from_config(nvl[0])
    assert space.config_from_params(params) == nvl[0]
    # Tiles of 4 warps cannot serve the persistent kernel: repaired to a valid config.
    bad = space.params_from_config(nvl[0]) | {"gu_w": "2x2"}
    assert space.check(bad) is not None and space.check(space.repair(bad)) is None
    seeds = SearchSpace.for_problem(P2, "sm_90", "full", ("nccl", "nvlink")).seeds()
    assert seeds[1] == KernelConfig.persistent_default(P2)
    assert KernelConfig(GemmTile(32, 128, 64, 8, 1, 4, "ws"), GemmTile(32, 128, 64, 8, 1, 4,
                        "ws"), transport="nvlink") not in seeds[:1]
    with pytest.raises(ConfigError):
        SearchSpace.for_problem(P2, "sm_90", "small", ("ib",))


def test_nvlink_seeds_try_the_close_knobs_flipped_early():
    """The persistent default's knobs measured close (router_batches, task_tiles,
    stage_epilogue, phased_tasks, task_producer, atomic_front, tanh_silu, interleave_sources)
    are tried flipped
    right after it, where the problem allows them."""
    from dataclasses import replace

    e64 = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=4096)
    seeds = SearchSpace.for_problem(e64, "sm_90", "full", ("nccl", "nvlink")).seeds()
    pd = KernelConfig.persistent_default(e64, "sm_90")
    assert pd.router_batches == 4 and pd.task_tiles == 1  # 4096 tokens: quads by default
    assert pd.phased_tasks  # several ranks: every source's gate/up tasks first
    assert pd.tanh_silu  # TMA row tasks: silu by tanh
    assert pd.stage_epilogue == 2  # both GEMMs' results staged
    assert pd.interleave_sources  # 2 ranks, 32 local experts: one list over both sources
    # (the flips it makes moot: without phased lists or with a producer, per-source lists)
    assert seeds[1:10] == [pd, replace(pd, router_batches=2),  # two row tiles per task: the
                           replace(pd, task_tiles=2, stage_epilogue=0),  # ring unstaged
                           replace(pd, stage_epilogue=1),
                           replace(pd, phased_tasks=False, interleave_sources=False),
                           replace(pd, task_producer=True, interleave_sources=False),
                           replace(pd, atomic_front=True), replace(pd, tanh_silu=False),
                           replace(pd, interleave_sources=False)]
    # fused weight-streaming decode: none applies (no TMA rows, 256 experts)
    dsv3 = MoEProblem(7168, 2048, 256, 8, shared_experts=1, world_size=2, tokens_per_rank=8)
    seeds = SearchSpace.for_problem(dsv3, "sm_90", "full", ("nccl", "nvlink")).seeds()
    assert not any(c.router_batches != 1 or c.task_tiles != 1 or c.phased_tasks
                   or c.task_producer for c in seeds)


def test_nvlink_only_space_repairs_every_draw_to_a_persistent_config():
    """`flashmoe-tune --transport nvlink`: with no nccl to fall back to, a draw whose tiles
    the persistent kernel cannot take gets the nearest ones it can (on 2 x H200 such a draw,
    sync tiles of 2 warps, ended the run with "no repair found")."""
    import random

    p = MoEProblem(7168, 2048, 256, 8, shared_experts=1, world_size=2, tokens_per_rank=1)
    space = SearchSpace.for_problem(p, "sm_90", "full", ("nvlink",))
    seen = {"gu_bm": 32, "gu_bn": 32, "gu_bk": 64, "gu_w": "1x2", "gu_s": 2, "gu_mma": "sync",
            "dn_bm": 128, "dn_bn": 64, "dn_bk": 64, "dn_w": "2x4", "dn_s": 2, "dn_mma": "sync",
            "router": 8, "chunks": 1, "streams": 1, "shared_stream": False, "fuse": False,
            "packed": False, "mode": "host", "transport": "nvlink", "blocks": 0}
    rng = random.Random(1)
    draws = [seen] + [{k: rng.choice(v) for k, v in space.choices.items()} for _ in range(60)]
    for d in draws:
        fixed = space.repair(d)
        assert space.check(fixed) is None and fixed["transport"] == "nvlink", d
    fixed = space.repair(seen)  # gate/up: 8 warps now; down (8 warps, sync) was fine
    wm, wn = (int(v) for v in fixed["gu_w"].split("x"))
    assert wm * wn == 8 and all(fixed[k] == v for k, v in seen.items() if k.startswith("dn_"))


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_study_chooses_between_transports(sampler):
    space = _small_nvlink_space(every_knob=False)  # (the whole one: > MAX_GRID configs)
    res = run_study(P2, FakeEvaluator(), space=space, study_name="t" + sampler,
                    sampler=sampler, n_trials=40)
    seen = [r.config for r in res.trials]
    assert {c.transport for c in seen} == {"nccl", "nvlink"}
    assert len({c.name for c in seen}) == len(seen)  # no config measured twice
    assert all(space.contains(c) for c in seen)


def test_combined_failures_name_each_rank_once():
    from flashmoe_gen.tuner.objective import FAILED, OK, Outcome, combine

    once = combine([Outcome(OK, 1.0), Outcome(FAILED, reason="no fit")])
    assert once.status == FAILED and once.reason == "rank 1: no fit"
    # What the study gathers after the objective's gate: every rank returns the same.
    assert combine([once, once]) == once
    both = combine([Outcome(FAILED, reason="a"), Outcome(FAILED, reason="b")])
    assert both.reason == "rank 0: a; rank 1: b"


def test_the_heuristic_default_is_the_first_trial_of_every_preset():
    # 2 x H200: the DeepSeek-V3 preset tune never measured its default (the decode default's
    # 4x1 weight-streaming down tile lay outside the full space), so "tuned / default" had
    # nothing to compare with.
    from flashmoe_gen.errors import ProblemError
    from flashmoe_gen.presets import PRESETS, get_preset
    from flashmoe_gen.tuner.study import study_seeds

    n = 0
    for name in PRESETS:
        for world in (1, 2, 4):
            for tokens in (1, 32, 512, 8192):
                try:
                    p = get_preset(name).problem(world_size=world, tokens_per_rank=tokens)
                except ProblemError:
                    continue  # experts not divisible by the world size
                for transports in (("nccl",), ("nccl", "nvlink")):
                    space = SearchSpace.for_problem(p, "sm_90", "full", transports)
                    assert study_seeds(space)[0] == KernelConfig.default(p, "sm_90"), \
                        (name, world, tokens, transports)
                    n += 1
    assert n > 100


def test_k_split_knobs_mean_something_only_for_fused_ws_nvlink_tiles():
    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=1)
    space = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink"))
    assert set(space.choices["ksplit_dn"]) == {1, 2, 4, 8}
    dflt = KernelConfig.persistent_default(p)
    assert dflt.dn_splits > 1 and space.contains(dflt)
    params = space.params_from_config(dflt)
    assert space.config_from_params(params) == dflt and space.canonical(params) == params
    # not fused, or nccl: the split knobs are forced to 1 (one config, one parameter set)
    for change in ({"fuse": False}, {"transport": "nccl"}):
        q = space.canonical(params | change)
        assert q["ksplit_gu"] == q["ksplit_dn"] == 1
        cfg = space.config_from_params(params | change)
        assert cfg.gu_splits == cfg.dn_splits == 1


def test_ws_tma_knob_and_the_persistent_defaults_deep_ring_are_in_the_space():
    """The persistent default for GBs of weights (6 stages, TMA weight loads) is a seed the
    full space holds; ws_tma means something only for nvlink ws tiles of BK 64 on Hopper."""
    p = MoEProblem(7168, 2048, 256, 8, shared_experts=1, world_size=4, tokens_per_rank=128)
    space = SearchSpace.for_problem(p, "sm_90", "full", ("nccl", "nvlink"))
    dflt = KernelConfig.persistent_default(p, "sm_90")
    assert dflt.ws_tma and 6 in space.choices["gu_s"] and space.choices["ws_tma"] == (False, True)
    assert space.contains(dflt) and dflt in space.seeds("sm_90")
    params = space.params_from_config(dflt)
    assert space.config_from_params(params) == dflt and space.canonical(params) == params
    for change in ({"transport": "nccl"}, {"gu_bk": 32}, {"dn_mma": "sync"}):
        q = space.canonical(params | change)
        assert q["ws_tma"] is False and not space.config_from_params(params | change).ws_tma
    assert SearchSpace.for_problem(p, "sm_80", "full", ("nccl", "nvlink")).choices["ws_tma"] \
        == (False,)
    nccl_only = SearchSpace.for_problem(p, "sm_90", "full")
    assert nccl_only.choices["ws_tma"] == (False,) and 6 not in nccl_only.choices["gu_s"]
