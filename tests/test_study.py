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
    env = {"PYTHONPATH": f"{HERE}:{HERE / 'mpi'}", "PYTHONUNBUFFERED": "1"}
    import os
    r = subprocess.run([*_mpirun(), sys.executable, str(HERE / "mpi" / "study_cpu.py"), url],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **env})
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
    assert space.check(space.params_from_config(KernelConfig.default(P1))) is None  # wgmma
    assert "sm_90" in SearchSpace.for_problem(P1, "sm_80", "full").check(
        params | {"gu_mma": "wgmma"})
    assert SearchSpace.for_problem(P1, "sm_80", "full").choices["gu_mma"] == ("sync",)
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


def test_valid_configs_equal_the_brute_force_filter():
    """Filtering tiles first must keep exactly the configs a full product + check keeps."""
    import itertools

    space = SearchSpace.for_problem(P2, "sm_90", "small")
    space = SearchSpace(space.problem, space.limits,
                        space.choices | {"gu_mma": ("sync", "wgmma"), "gu_w": ("2x2", "8x1"),
                                         "gu_bn": (64, 2048)})
    keys = list(space.choices)
    brute = set()
    for values in itertools.product(*(space.choices[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        if space.check(params) is None:
            brute.add(space.config_from_params(params))
    fast = list(space.valid_configs())
    assert len(fast) == len(set(fast)) == len(brute) and set(fast) == brute
    assert any(c.gate_up.mma == "wgmma" for c in fast) and any(c.gate_up.bn == 64 for c in fast)
