"""lookup(): exact winner, nearest tokens, other versions, default; never a foreign GPU."""

import warnings

import pytest

from flashmoe_gen import KernelConfig, MoEProblem, lookup
from flashmoe_gen.api import TuningFallbackWarning
from flashmoe_gen.db import Environment, make_engine, record_trial

P = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=2, tokens_per_rank=512)
H100 = Environment("NVIDIA H100 80GB HBM3", "9.0", 2, "tmplA", package_version="0.1.0")


@pytest.fixture
def engine(tmp_path):
    return make_engine(f"sqlite:///{tmp_path}/w.db")


def _cfg(bm):
    base = KernelConfig.default(P, "sm_80")  # mma.sync tiles: bm / 32 warps is valid
    return KernelConfig.from_dict(base.to_dict() | {"gate_up": base.gate_up.__dict__ | {
        "bm": bm, "warps_m": bm // 32}})


def test_exact_winner(engine):
    record_trial(engine, P, H100, _cfg(64), status="ok", median_ms=2.0)
    record_trial(engine, P, H100, _cfg(128), status="ok", median_ms=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = lookup(P, device=H100, db=engine)
    assert k.provenance == "exact" and k.config == _cfg(128) and k.latency_ms == 1.5
    assert f"config:  {_cfg(128).name}" in k.source


def test_nearest_tokens_warns(engine):
    record_trial(engine, P.replace(tokens_per_rank=256), H100, _cfg(64), status="ok",
                 median_ms=1.0)
    record_trial(engine, P.replace(tokens_per_rank=4096), H100, _cfg(128), status="ok",
                 median_ms=3.0)
    with pytest.warns(TuningFallbackWarning, match="256 tokens"):
        k = lookup(P, device=H100, db=engine)
    assert k.provenance == "nearest-tokens" and k.config == _cfg(64)
    assert k.problem == P and k.tuned_for.tokens_per_rank == 256


def test_other_version_same_gpu_then_default(engine):
    old = Environment("NVIDIA H100 80GB HBM3", "9.0", 2, "tmplOLD", package_version="0.0.9")
    record_trial(engine, P, old, _cfg(128), status="ok", median_ms=1.0)
    with pytest.warns(TuningFallbackWarning, match="0.0.9"):
        k = lookup(P, device=H100, db=engine)
    assert k.provenance == "other-version" and k.config == _cfg(128)
    # A different GPU or world size never gets that winner.
    a100 = Environment("NVIDIA A100-SXM4-80GB", "8.0", 2, "tmplA")
    with pytest.warns(TuningFallbackWarning, match="heuristic default"):
        k = lookup(P, device=a100, db=engine)
    assert k.provenance == "default" and k.config == KernelConfig.default(P, "sm_80")
    with pytest.warns(TuningFallbackWarning, match="heuristic default"):
        k = lookup(P, world_size=4, device="NVIDIA H100 80GB HBM3", db=engine)
    assert k.provenance == "default" and k.problem.world_size == 4


def test_gpu_name_string_and_failed_trials(engine):
    record_trial(engine, P, H100, _cfg(64), status="wrong_answer", median_ms=0.1)
    with pytest.warns(TuningFallbackWarning, match="heuristic default"):
        assert lookup(P, device="NVIDIA H100 80GB HBM3", db=engine).provenance == "default"
    record_trial(engine, P, H100, _cfg(128), status="ok", median_ms=1.0)
    with pytest.warns(TuningFallbackWarning):
        k = lookup(P, device="NVIDIA H100 80GB HBM3", db=engine)
    assert k.config == _cfg(128)
