"""A search that spends trials on real candidates (CPU): valid-only samplers, seeds from the
nearest tuned problems, and the compile pool that builds the next candidates ahead."""

import warnings

import optuna
import pytest
from fake_backend import fake_environment
from fake_evaluator import fake_latency

from flashmoe_gen.build import build
from flashmoe_gen.config import GemmTile, KernelConfig
from flashmoe_gen.db import record_trial
from flashmoe_gen.db.repository import nearest_winners
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.tuner.prefetch import CompilePool, Lookahead
from flashmoe_gen.tuner.sampling import (
    ValidGridSampler,
    ValidOnlySampler,
    distributions,
    make_valid_sampler,
)
from flashmoe_gen.tuner.space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
P1 = MoEProblem(2048, 1408, 64, 6, shared_experts=2, tokens_per_rank=512)
P2 = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=256)


def _invalid_fraction(space: SearchSpace, n: int = 400) -> float:
    """How much of the product of knob values breaks a constraint (random sample)."""
    smp = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=smp)
    bad = 0
    for _ in range(n):
        t = study.ask(distributions(space))
        bad += space.check(t.params) is not None
        study.tell(t, 0.0)
    return bad / n


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "grid"])
def test_every_asked_trial_is_a_valid_config(name):
    size = "small" if name == "grid" else "full"
    space = SearchSpace.for_problem(P1, "sm_90", size)
    if size == "full":
        assert _invalid_fraction(space) > 0.5  # the space this must work on
    smp = make_valid_sampler(name, space, seed=3)
    study = optuna.create_study(sampler=smp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "sampled independently" or other warnings
        for _ in range(30):
            t = study.ask(distributions(space))
            assert space.check(t.params) is None, t.params
            study.tell(t, fake_latency(space.config_from_params(t.params)))
    if isinstance(smp, ValidOnlySampler):
        assert smp.draws >= 30


def test_a_draw_that_never_fits_is_repaired_to_the_nearest_valid_tile():
    space = SearchSpace.for_problem(P1, "sm_90", "full")

    class Stubborn(optuna.samplers.RandomSampler):
        """Always proposes a gate_up tile too big for shared memory."""

        def sample_independent(self, study, trial, name, dist):
            bad = {"gu_bm": 256, "gu_bn": 128, "gu_bk": 64, "gu_s": 4, "gu_w": "4x2",
                   "gu_mma": "sync"}
            return bad.get(name, super().sample_independent(study, trial, name, dist))

    smp = ValidOnlySampler(Stubborn(seed=0), space, max_draws=3)
    study = optuna.create_study(sampler=smp)
    t = study.ask(distributions(space))
    assert smp.repairs == 1 and space.check(t.params) is None
    kept = sum(t.params[k] == v for k, v in {"gu_bm": 256, "gu_bn": 128, "gu_bk": 64,
                                               "gu_s": 4, "gu_w": "4x2"}.items())
    assert kept >= 3  # the nearest valid tile: most of the asked knobs survive


def test_grid_skips_running_trials_and_revisits_interrupted_ones():
    space = SearchSpace.for_problem(P2, "sm_90", "small")
    grid = ValidGridSampler(space, seed=0)
    n = sum(1 for _ in space.valid_configs())
    study = optuna.create_study(sampler=grid)
    first, second = study.ask(distributions(space)), study.ask(distributions(space))
    assert first.params != second.params  # a running trial's point is taken
    third = study.ask(distributions(space))  # a dead job's: failed as stale, no status
    first.set_user_attr("status", "interrupted")
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    study.tell(third, state=optuna.trial.TrialState.FAIL)
    study.tell(second, 1.0)
    seen = {tuple(second.params.values())}
    while not grid.is_exhausted(study):
        t = study.ask(distributions(space))
        seen.add(tuple(t.params.values()))
        study.tell(t, 1.0)
    assert len(seen) == n and tuple(first.params.values()) in seen
    assert tuple(third.params.values()) in seen


def test_grid_refuses_a_space_too_large_to_list(monkeypatch):
    import flashmoe_gen.tuner.sampling as sampling
    from flashmoe_gen.errors import ConfigError

    monkeypatch.setattr(sampling, "MAX_GRID", 10)
    with pytest.raises(ConfigError, match="--space small"):
        ValidGridSampler(SearchSpace.for_problem(P2, "sm_90", "small"))


def test_nearest_winners_prefer_the_family_then_the_nearest_shape(tmp_path):
    from flashmoe_gen.db import Environment

    db = f"sqlite:///{tmp_path}/w.db"
    h100, h200 = fake_environment(1), Environment("NVIDIA H200", "9.0", 1, "t")
    a100 = Environment("NVIDIA A100", "8.0", 1, "t")
    fam = P1.replace(tokens_per_rank=128)

    def cfg(bm):  # a distinct config per record (nearest_winners returns distinct ones)
        return KernelConfig(GemmTile(bm, 64, 64, 2, 2, 3), GemmTile(64, 128, 64, 2, 4, 3))

    for problem, env, bm in ((fam.replace(tokens_per_rank=4096), h100, 128),
                             (fam.replace(tokens_per_rank=64), h200, 64),
                             (fam.replace(hidden=4096), h100, 32),
                             (fam.replace(hidden=7168, experts=256, top_k=8), h100, 256),
                             (fam, a100, 16)):  # another GPU family: never a seed
        record_trial(db, problem, env, cfg(bm), status="ok", median_ms=1.0)
    got = nearest_winners(db, fam, "9.0")
    assert [w.problem.tokens_per_rank for w in got[:2]] == [64, 4096]  # same family first
    assert [w.problem.hidden for w in got[2:]] == [4096, 7168]  # then the nearer shape
    assert all(w.environment.compute_capability == "9.0" for w in got)
    assert [w.config for w in nearest_winners(db, fam, "9.0", limit=2)] == [cfg(64), cfg(128)]


def test_compile_pool_builds_ahead_into_the_cache(tmp_path, monkeypatch):
    """The real NVRTC compile in worker processes; the rank's own build is a cache hit."""
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path))
    p = MoEProblem(64, 64, 4, 1, tokens_per_rank=32)
    space = SearchSpace.for_problem(p, "sm_80", "full")
    configs = [next(space.valid_configs())]
    bad = KernelConfig(GemmTile(64, 64, 64, 2, 2, 3), GemmTile(64, 128, 64, 2, 4, 3))
    with CompilePool(space.limits, workers=1) as pool:
        for c in [*configs, bad]:
            pool.submit(p, c)
        pool.submit(p.replace(tokens_per_rank=8192), configs[0])  # the same device code
        assert pool.submitted == [c.name for c in configs] + [bad.name]
        done = [pool.wait(p, c, timeout=120) for c in configs]
        failed = pool.wait(p, bad, timeout=120)
    assert all(d.ok and not d.cache_hit for d in done)
    assert not failed.ok and "ConfigError" in failed.error  # the evaluator meets it too
    assert all(build(p, c, space.limits).compiled.cache_hit for c in configs)
    assert pool.wait(p, KernelConfig.default(p, "sm_80")) is None  # never submitted


def test_lookahead_asks_ahead_within_the_budget_and_marks_the_rest(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    study = optuna.create_study(storage=url, sampler=make_valid_sampler("random", space))

    class Pool:
        submitted = []

        def submit(self, problem, cfg):
            self.submitted.append(cfg.name)

    marked = []
    ahead = Lookahead(study, lambda: study.ask(distributions(space)), space, Pool(), depth=2,
                      mark_interrupted=lambda s, t: marked.append(t.number))
    trial, cfg = ahead.next(budget=10)
    assert trial.number == 0 and len(ahead) == 2 and len(Pool.submitted) == 3
    assert trial.user_attrs["config"] == cfg.name == Pool.submitted[0]
    study.tell(trial, 1.0)
    trial, _ = ahead.next(budget=2)  # two left to evaluate: one queued, none asked
    assert trial.number == 1 and len(ahead) == 1 and len(Pool.submitted) == 3
    ahead.close()
    assert marked == [2] and len(ahead) == 0


def test_samplers_do_not_spend_a_trial_on_a_config_already_tried():
    space = SearchSpace.for_problem(P1, "sm_90", "small")
    # 40 of the 224: uniform picks would repeat with probability 0.97 (birthday bound)
    half = min(40, sum(1 for _ in space.valid_configs()) // 2)
    for name in ("random", "tpe"):
        study = optuna.create_study(sampler=make_valid_sampler(name, space, seed=0))
        seen = set()
        for _ in range(half):
            t = study.ask(distributions(space))
            seen.add(tuple(t.params.values()))
            study.tell(t, fake_latency(space.config_from_params(t.params)))
        assert len(seen) == half, name


def test_steep_space_is_a_small_grid_with_tiny_tiles():
    """--space steep: a grid of tens of configs whose tiles run from 16-wide (far too small
    for these GEMMs) to 128-wide, for a sampler comparison where most configs are slow."""
    from flashmoe_gen.tuner.space import SPACES, SearchSpace

    p = MoEProblem(2048, 1408, 64, 6, shared_experts=2, world_size=2, tokens_per_rank=512)
    space = SearchSpace.for_problem(p, "sm_90", "steep")
    configs = list(space.valid_configs())
    assert 30 <= len(configs) <= 200
    assert {c.gate_up.bn for c in configs} == {16, 64, 128}
    assert all(KernelConfig.from_name(c.name) == c for c in configs)
    assert set(SPACES) == {"full", "small", "steep"}
