"""Token-count sweeps: one device code (one cubin) for every count of a problem family."""

from dataclasses import replace

import pytest

from flashmoe_gen.build import build
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

COUNTS = (0, 1, 8, 32, 128, 512, 2048, 8192)
FAMILIES = [
    MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2),
    MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=4, capacity_factor=1.25,
               normalize_topk=False),
    MoEProblem(256, 128, 16, 4, shared_experts=1, world_size=2, scoring="sigmoid",
               expert_bias=True, n_group=4, topk_group=2, routed_scaling=2.5),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda p: p.name)
def test_device_code_does_not_depend_on_the_token_count(family):
    """Guard of the sweep's shared compile: the kernels never see tokens_per_rank (in any
    mode, with or without a fixed capacity), so every count renders the same text."""
    default = KernelConfig.default(family.replace(tokens_per_rank=128))
    for cfg in (default, replace(default, mode="graph")):
        codes = {render(family.replace(tokens_per_rank=t), cfg).code for t in COUNTS}
        assert len(codes) == 1
        assert f"// problem: {family.replace(tokens_per_rank=0).name}" in codes.pop()


def test_a_sweep_compiles_once_for_all_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path))
    family = FAMILIES[0]
    cfg = KernelConfig.default(family.replace(tokens_per_rank=8), "sm_80")
    first = build(family.replace(tokens_per_rank=8), cfg, "sm_80").compiled
    again = [build(family.replace(tokens_per_rank=t), cfg, "sm_80").compiled
             for t in (1, 128, 8192)]
    assert not first.cache_hit and all(m.cache_hit for m in again)
    assert {m.cubin_path for m in again} == {first.cubin_path}
    assert len(list((tmp_path).rglob("*.cubin"))) == 1


# -- the tune command's sweep (one rank, in process, the fake evaluator) --------------------
def _tune(monkeypatch, tmp_path, *flags: str) -> str:
    """Run `flashmoe-tune tune` with the GPU replaced by the fake evaluator; its stdout."""
    import fake_backend

    import flashmoe_gen.tuner.tune_cmd as tune_cmd
    from flashmoe_gen.tuner.cli import main

    monkeypatch.setattr(tune_cmd, "GpuBackend", fake_backend.CpuBackend)
    monkeypatch.setenv("COLUMNS", "250")
    argv = ["tune", "--space", "small", "--sampler", "random", "--db",
            f"sqlite:///{tmp_path}/w.db", "--storage", f"sqlite:///{tmp_path}/s.db", *flags]
    assert main(argv) == 0


SWEEP = MoEProblem(512, 2048, 8, 2, tokens_per_rank=0)


def test_a_sweep_tunes_each_count_and_stores_every_winner(tmp_path, monkeypatch, capsys):
    import optuna
    from fake_backend import fake_environment

    from flashmoe_gen.api import TuningFallbackWarning, lookup
    from flashmoe_gen.db import find_winner, list_winners

    db, env = f"sqlite:///{tmp_path}/w.db", fake_environment(1)
    _tune(monkeypatch, tmp_path, "--tokens", "1,8,32", "--trials", "5", "--study-name", "sw")
    out = capsys.readouterr().out
    assert "token sweep" in out and all(f"tokens per rank {t}:" in out for t in (1, 8, 32))
    winners = {t: find_winner(db, SWEEP.replace(tokens_per_rank=t), env) for t in (1, 8, 32)}
    assert all(w is not None and w.status == "ok" for w in winners.values())
    assert len(list_winners(db)) == 3
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/s.db")}
    assert set(studies) == {"sw__t1", "sw__t8", "sw__t32"}
    for name in studies:  # every trial a real candidate: 5 evaluated, none invalid
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/s.db").trials
        assert len(trials) == 5 and {t.user_attrs["status"] for t in trials} == {"ok"}
    # each later count starts from the earlier counts' winners (the nearest tuned problems)
    t8 = optuna.load_study(study_name="sw__t8", storage=f"sqlite:///{tmp_path}/s.db").trials
    assert winners[1].config_name in [t.user_attrs["config"] for t in t8[:3]]
    with pytest.warns(TuningFallbackWarning, match="tuned for 8 tokens"):
        k = lookup(SWEEP.replace(tokens_per_rank=12), device=env, db=db)
    assert (k.provenance, k.tuned_tokens, k.config) == ("nearest-tokens", 8, winners[8].config)


def test_one_count_keeps_the_study_name_and_a_list_is_checked_before_any_work(
        tmp_path, monkeypatch, capsys):
    import optuna

    from flashmoe_gen.tuner.cli import main

    _tune(monkeypatch, tmp_path, "--tokens", "64", "--trials", "2", "--study-name", "one")
    assert [s.study_name for s in optuna.get_all_study_summaries(
        f"sqlite:///{tmp_path}/s.db")] == ["one"]
    capsys.readouterr()
    assert main(["tune", "--tokens", "8,-1", "--db", f"sqlite:///{tmp_path}/x.db"]) == 2
    err = capsys.readouterr().err
    assert "tokens_per_rank=-1" in err and err.count("\n") == 1
    assert not (tmp_path / "x.db").exists()
    assert main(["tune", "--tokens", "8,x"]) == 2
    assert main(["tune", "--tokens", "8,8"]) == 2
    assert "appears twice" in capsys.readouterr().err


def test_the_pool_compiles_the_candidates_the_search_evaluates(tmp_path, monkeypatch, capsys):
    """Rank 0's compile pool (real NVRTC, no GPU) built every evaluated candidate: the fake
    evaluator compiles nothing, so each cubin in the cache is the pool's work."""
    import optuna

    cache = tmp_path / "cache"
    monkeypatch.setenv("FLASHMOE_CACHE", str(cache))
    monkeypatch.setenv("FAKE_COMPILE_AHEAD", "1")
    _tune(monkeypatch, tmp_path, "--hidden", "64", "--intermediate", "64", "--experts", "4",
          "--top-k", "1", "--tokens", "16,4096", "--trials", "2", "--compile-workers", "1")
    configs = set()
    for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/s.db"):
        trials = optuna.load_study(study_name=s.study_name,
                                   storage=f"sqlite:///{tmp_path}/s.db").trials
        assert len(trials) == 2 and {t.user_attrs["status"] for t in trials} == {"ok"}
        configs |= {t.user_attrs["config"] for t in trials}
    cubins = {p.name.split("__", 1)[1].rsplit("-", 1)[0] for p in cache.rglob("*.cubin")}
    assert configs and configs <= cubins  # every evaluated candidate compiled ahead
    assert all(p.name.startswith("moe_h64_i64_e4_k1_p1_t0_") for p in cache.rglob("*.cubin"))
