"""Samplers that only propose valid configs: constraints applied while sampling.

An invalid combination (a tile that does not fit shared memory, registers or the problem)
never becomes an Optuna trial, so every trial of a study is a real candidate and
optuna-dashboard shows no placeholders:

- ``ValidOnlySampler`` wraps TPE, random or CMA-ES. It samples all knobs of a trial at
  once (relative sampling), draws again while the combination breaks a constraint or repeats
  a config the study already tried (then takes an untried neighbour of the repeat), and
  after ``max_draws`` repairs it (``SearchSpace.repair``: the nearest valid tile). The
  inner sampler is never told about the rejected draws, so TPE's model holds measured
  trials only.
- ``ValidGridSampler`` visits every valid config once (``SearchSpace.valid_configs``, in a
  seeded random order); Optuna's grid sampler can only walk a full product of knob values.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from flashmoe_gen.errors import ConfigError
from flashmoe_gen.status import TrialStatus

from .space import SearchSpace

#: Draws of the inner sampler per trial before the last draw is repaired.
MAX_DRAWS = 64
#: Draws of configs the study already tried before a neighbour of the last one is taken.
MAX_REPEATS = 8
#: Most valid configs a grid enumerates (a larger space: another sampler, or --space small).
MAX_GRID = 20_000


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """One categorical distribution per knob (the trial's parameters)."""
    return {k: CategoricalDistribution(list(v)) for k, v in space.choices.items()}


def space_changes(study, space: SearchSpace) -> dict[str, tuple[tuple, tuple]]:
    """Knobs whose values the study's trials were drawn from differ from ``space``'s, as
    {knob: (the study's, the space's)}: Optuna refuses to draw a knob from other values than
    it recorded (``CategoricalDistribution does not support dynamic value space``), e.g.
    after an upgrade added a value, or a resume with another ``--space``."""
    now = distributions(space)
    out: dict[str, tuple[tuple, tuple]] = {}
    for t in study.get_trials(deepcopy=False):
        for k, d in t.distributions.items():
            if k not in out and k in now and isinstance(d, CategoricalDistribution) \
                    and tuple(d.choices) != tuple(now[k].choices):
                out[k] = (tuple(d.choices), tuple(now[k].choices))
    return out


def _tried(study, keys: list[str], exclude: int | None = None) -> set[tuple]:
    """The knob values of the study's trials that ran or run (a repeat would measure a
    config again instead of a new candidate)."""
    out = set()
    for t in study.get_trials(deepcopy=False):
        if t.number != exclude and t.state in (TrialState.COMPLETE, TrialState.FAIL,
                                               TrialState.RUNNING) \
                and all(k in t.params for k in keys):
            out.add(tuple(t.params[k] for k in keys))
    return out


class ValidOnlySampler(BaseSampler):
    """``inner``'s proposals, restricted to the configs of ``space`` that are valid."""

    def __init__(self, inner: BaseSampler, space: SearchSpace, max_draws: int = MAX_DRAWS,
                 seed: int = 0):
        self.inner, self.space, self.max_draws = inner, space, max_draws
        self._dists = distributions(space)
        self._rng = random.Random(seed)
        self.draws = self.repairs = 0  # counters for tests and reports

    def infer_relative_search_space(self, study, trial: FrozenTrial) -> dict:
        return dict(self._dists)  # every knob is sampled jointly, so it can be checked

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict) -> dict:
        if not search_space:
            return {}
        keys = list(self._dists)
        seen = _tried(study, keys, exclude=trial.number)
        params: dict = {}
        repeat, repeats = None, 0
        for _ in range(self.max_draws):
            params = self.space.canonical(self._draw(study, trial))
            self.draws += 1
            if self.space.check(params) is None:
                if tuple(params[k] for k in keys) not in seen:
                    return params
                repeat, repeats = params, repeats + 1  # valid, but measured already
                if repeats >= MAX_REPEATS:
                    break
        if repeat is not None:  # the sampler insists on tried configs (it converged)
            return self._neighbour(repeat, seen) or self._untried(seen) or repeat
        self.repairs += 1
        return self.space.repair(params)

    def _neighbour(self, params: dict, seen: set[tuple]) -> dict | None:
        """An untried valid config one knob away from ``params`` (knobs in random order),
        so a converged search still measures something new next to its best guess."""
        keys = list(self._dists)
        order = keys[:]
        self._rng.shuffle(order)
        for k in order:
            values = [v for v in self.space.choices[k] if v != params[k]]
            self._rng.shuffle(values)
            for v in values:
                cand = self.space.canonical(params | {k: v})
                if tuple(cand[x] for x in keys) not in seen and self.space.check(cand) is None:
                    return cand
        return None

    def _untried(self, seen: set[tuple]) -> dict | None:
        """A random untried valid config (every neighbour of the best guess was tried)."""
        keys = list(self._dists)
        for _ in range(4 * self.max_draws):
            cand = self.space.canonical({k: self._rng.choice(self.space.choices[k])
                                         for k in keys})
            if tuple(cand[x] for x in keys) not in seen and self.space.check(cand) is None:
                return cand
        return None

    def _draw(self, study, trial: FrozenTrial) -> dict:
        inner_space = self.inner.infer_relative_search_space(study, trial)
        params = dict(self.inner.sample_relative(study, trial, inner_space)) if inner_space \
            else {}
        for name, dist in self._dists.items():
            if name in params:
                continue
            params[name] = (dist.choices[0] if dist.single()  # the inner sampler skips these
                            else self.inner.sample_independent(study, trial, name, dist))
        return params

    def sample_independent(self, study, trial, name: str, dist: BaseDistribution):
        return self.inner.sample_independent(study, trial, name, dist)

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class ValidGridSampler(BaseSampler):
    """Every valid config of ``space`` once, in an order shuffled by ``seed``. A trial that
    never got a result (status ``interrupted``, or failed with no status: a dead job's,
    failed as stale) is visited again on resume."""

    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space = space
        self._dists = distributions(space)
        keys = list(space.choices)
        grid = [tuple(space.params_from_config(c)[k] for k in keys)
                for c in itertools.islice(space.valid_configs(), MAX_GRID + 1)]
        if len(grid) > MAX_GRID:
            raise ConfigError("sampler", "grid", f"the space holds more than {MAX_GRID} valid "
                              "configs: use --space small for a grid, or tpe / random")
        if not grid:
            raise ConfigError("space", space.problem.name, "holds no valid config on "
                              f"{space.limits.arch}")
        random.Random(seed).shuffle(grid)
        self._keys, self._grid = keys, grid

    def _visited(self, study, exclude: int | None = None) -> set[tuple]:
        out = set()
        for t in study.get_trials(deepcopy=False):
            status = t.user_attrs.get("status")
            if t.number == exclude or status == TrialStatus.INTERRUPTED or (
                    t.state == TrialState.FAIL and status is None):
                continue
            if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING) \
                    and all(k in t.params for k in self._keys):
                out.add(tuple(t.params[k] for k in self._keys))
        return out

    def is_exhausted(self, study) -> bool:
        return len(self._visited(study)) >= len(self._grid)

    def infer_relative_search_space(self, study, trial: FrozenTrial) -> dict:
        return dict(self._dists)

    def sample_relative(self, study, trial: FrozenTrial, search_space: dict) -> dict:
        if not search_space:
            return {}
        seen = self._visited(study, exclude=trial.number)
        point = next((g for g in self._grid if g not in seen), self._grid[0])
        return dict(zip(self._keys, point, strict=True))

    def sample_independent(self, study, trial, name: str, dist: BaseDistribution):
        raise ConfigError(name, None, "not a knob of this search space")


def make_valid_sampler(name: str, space: SearchSpace, seed: int = 0) -> BaseSampler:
    """The sampler ``name`` (``study.SAMPLERS``) proposing only valid configs of ``space``."""
    import warnings

    if name == "grid":
        return ValidGridSampler(space, seed)
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate/group are "experimental" since 2.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            inner = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8,
                                               multivariate=True, group=True,
                                               constant_liar=True)
    elif name == "random":
        inner = optuna.samplers.RandomSampler(seed=seed)
    elif name == "cmaes":  # categorical knobs fall back to the independent sampler
        inner = optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    else:
        raise ConfigError("sampler", name, "choose one of ['tpe', 'random', 'grid', 'cmaes']")
    return ValidOnlySampler(inner, space, seed=seed)
