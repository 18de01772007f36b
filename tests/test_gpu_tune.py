"""Tuning on one GPU: the real evaluator, a short study, the winner found again by lookup."""

import pytest

from flashmoe_gen import MoEProblem, lookup
from flashmoe_gen.config import GemmTile, KernelConfig

pytestmark = pytest.mark.gpu
P = MoEProblem(512, 1024, 8, 2, shared_experts=1, tokens_per_rank=200)


def test_evaluator_times_good_and_reports_bad_configs():
    from flashmoe_gen.tuner.objective import FAILED, REFUSED_AT_BUILD, LayerEvaluator

    ev = LayerEvaluator(P, None, seed=1, warmup=1, iters=5)
    good = ev(KernelConfig.default(P))
    assert good.ok and 0 < good.p20_ms <= good.median_ms <= good.p80_ms
    assert good.rel_error < 1e-2
    # Shared memory over the limit is refused by the build before any compile or launch: a
    # failed trial the database keeps, named as refused (0822adb; "invalid" is only for
    # configs the space itself rejects, which never reach the evaluator).
    huge = KernelConfig(GemmTile(256, 128, 64, 4, 2, 6), KernelConfig.default(P).down)
    bad = ev(huge)
    assert bad.status == FAILED and bad.reason.startswith(REFUSED_AT_BUILD)
    assert "shared memory" in bad.reason


def test_short_study_records_winner_and_lookup_returns_it(tmp_path):
    from flashmoe_gen.db import Environment, make_engine, record_trial
    from flashmoe_gen.render import template_hash
    from flashmoe_gen.tuner.objective import LayerEvaluator
    from flashmoe_gen.tuner.space import SearchSpace
    from flashmoe_gen.tuner.study import run_study

    engine = make_engine(f"sqlite:///{tmp_path}/w.db")
    env = Environment.detect(1, template_hash())
    space = SearchSpace.for_problem(P, env.arch, "small")

    def record(res, best):
        o = res.outcome
        record_trial(engine, P, env, res.config, status=o.status, median_ms=o.median_ms,
                     p20_ms=o.p20_ms, p80_ms=o.p80_ms, rel_error=o.rel_error,
                     failure_reason=o.reason)

    res = run_study(P, LayerEvaluator(P, None, warmup=1, iters=5), space=space,
                    study_name="gpu", sampler="random", n_trials=5,
                    storage=f"sqlite:///{tmp_path}/s.db", on_trial=record)
    assert res.best is not None and res.best.outcome.ok
    k = lookup(P, device=env, db=engine)
    assert k.provenance == "exact" and k.config == res.best.config
    assert k.latency_ms == pytest.approx(res.best.outcome.median_ms)


def test_run_command_checks_and_times_one_gpu():
    """``flashmoe-tune run`` end to end on one GPU: device-made weights, the sampled check
    passes, a latency line is printed."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "flashmoe_gen.tuner.cli", "run", "--gpus", "1", "--hidden",
           "512", "--intermediate", "1024", "--experts", "8", "--top-k", "2",
           "--shared-experts", "1", "--tokens", "200", "--iters", "5", "--warmup", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASS" in res.stdout and "latency (max over ranks per iteration)" in res.stdout
