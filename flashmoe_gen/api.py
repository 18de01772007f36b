"""The lookup API: the best known kernel for a problem, with its provenance.

Order of preference (each fallback warns, saying what it fell back to):
1. a winner tuned for this exact problem in this exact environment;
2. the same problem family in this environment, nearest token count (log scale);
3. the same GPU model and world size tuned with another package or template version
   (exact problem, else nearest tokens): configs stay valid across versions, so an
   upgrade does not throw tuning away;
4. the heuristic default.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .config import KernelConfig
from .errors import ArgumentError, ConfigError, DeviceError
from .problem import MoEProblem


class TuningFallbackWarning(UserWarning):
    """lookup() returned something other than an exact winner for this environment."""


@dataclass(frozen=True)
class TunedKernel:
    problem: MoEProblem
    config: KernelConfig
    provenance: str                   # "exact" | "nearest-tokens" | "other-version" | "default"
    latency_ms: float | None = None   # measured median (max over ranks), when tuned
    tuned_for: MoEProblem | None = None
    environment: object | None = None  # flashmoe_gen.db.Environment of the winning trial
    trial_id: int | None = None

    @property
    def source(self) -> str:
        from .build import build
        return build(self.problem, self.config).source.code

    def kernel(self):
        """The built layer (``flashmoe_gen.build.CompiledLayer``) for this GPU."""
        from .arch import current_device_limits
        from .build import build
        return build(self.problem, self.config, current_device_limits())

    def build(self, comm=None, weights=None, seed: int = 0):
        """A ready ``FlashMoE`` layer with this config (needs a GPU)."""
        from .runtime import FlashMoE
        return FlashMoE(self.kernel(), weights=weights, comm=comm, seed=seed)

    layer = build

    def export(self, path: str, with_main: bool = False) -> str:
        from .export import export_cu
        return export_cu(self.problem, self.config, path, with_main=with_main)


def _detect_env(problem: MoEProblem):
    from .db import Environment
    from .render import template_hash
    return Environment.detect(problem.world_size, template_hash())


def _check_arguments(problem, device, db) -> None:
    """Typed errors for arguments of the wrong kind (they would otherwise fall back quietly)."""
    from sqlalchemy import Engine

    from .db import Environment

    if not isinstance(problem, MoEProblem):
        raise ArgumentError("problem", problem, "a flashmoe_gen.MoEProblem, e.g. MoEProblem("
                            "hidden=4096, intermediate=14336, experts=8, top_k=2)")
    if device is not None and not isinstance(device, Environment) and not (
            isinstance(device, str) and device.strip()):
        raise ArgumentError("device", device, "a flashmoe_gen.db.Environment, a GPU name such "
                            "as 'NVIDIA H100 80GB HBM3', or None for the current GPU")
    if db is not None and not isinstance(db, (str, Engine)):
        raise ArgumentError("db", db, "a SQLAlchemy URL string (e.g. sqlite:///tuning.db), a "
                            "sqlalchemy Engine, or None for $FLASHMOE_DB / the default")


def lookup(problem: MoEProblem, world_size: int | None = None, device=None,
           db=None) -> TunedKernel:
    """Best known kernel for ``problem`` on ``device``.

    ``device``: a ``flashmoe_gen.db.Environment``, a GPU name (e.g. "NVIDIA H100 80GB
    HBM3", matched with any versions), or None to read the current GPU. ``db``: engine or
    SQLAlchemy URL (default: ``$FLASHMOE_DB`` or the user cache). A database that does not
    exist yet reads as empty; one that is not flashmoe_gen's raises ``DatabaseError``.
    A stored config that is not valid for ``problem`` is passed over with a warning.
    """
    from .db import Environment, find_nearest, find_winner, list_winners, make_engine
    from .db.repository import family_of, nearest_tokens

    _check_arguments(problem, device, db)
    if world_size is not None:
        problem = problem.replace(world_size=world_size)
    engine = make_engine(db) if db is None or isinstance(db, str) else db
    env = device if isinstance(device, Environment) else None
    gpu_name = device if isinstance(device, str) else env.gpu_name if env else None
    if device is None:
        try:
            env = _detect_env(problem)
            gpu_name = env.gpu_name
        except DeviceError:
            pass

    def from_record(rec, provenance: str) -> TunedKernel | None:
        try:
            rec.config.validate(problem, rec.environment.arch)
        except ConfigError as e:
            warnings.warn(f"{problem.name}: passing over the stored config of trial "
                          f"{rec.trial_id} ({rec.config_name}): {e}", TuningFallbackWarning,
                          stacklevel=3)
            return None
        return TunedKernel(problem, rec.config, provenance, rec.median_ms, rec.problem,
                           rec.environment, rec.trial_id)

    if env is not None:
        if (rec := find_winner(engine, problem, env)) is not None:
            if (k := from_record(rec, "exact")) is not None:
                return k
        hit = find_nearest(engine, problem, env, warn=False)
        if hit is not None and hit[1] != problem:
            rec = hit[0]
            if (k := from_record(rec, "nearest-tokens")) is not None:
                warnings.warn(f"{problem.name}: no winner for {problem.tokens_per_rank} tokens "
                              f"in this environment; using the one tuned for "
                              f"{rec.problem.tokens_per_rank} tokens (nearest in log scale)",
                              TuningFallbackWarning, stacklevel=2)
                return k
    if gpu_name is not None:
        same_hw = [w for w in list_winners(engine)
                   if w.environment.gpu_name == gpu_name
                   and w.environment.world_size == problem.world_size
                   and (env is None or w.environment.compute_capability
                        == env.compute_capability)
                   and family_of(w.problem) == family_of(problem)
                   and (env is None or w.environment.key != env.key)]
        while same_hw:
            exact = [w for w in same_hw if w.problem == problem]
            rec = nearest_tokens(exact or same_hw, problem.tokens_per_rank)
            same_hw.remove(rec)
            if (k := from_record(rec, "other-version")) is None:
                continue
            warnings.warn(f"{problem.name}: using a config tuned on {gpu_name} with "
                          f"flashmoe_gen {rec.environment.package_version}, templates "
                          f"{rec.environment.template_hash}, {rec.problem.tokens_per_rank} "
                          "tokens (this environment has no winner); re-tune to be sure",
                          TuningFallbackWarning, stacklevel=2)
            return k
    arch = env.arch if env is not None else "sm_90"
    warnings.warn(f"{problem.name}: no tuned config for "
                  f"{gpu_name or 'this device'} x {problem.world_size}; using the heuristic "
                  "default (run flashmoe-tune to tune it)", TuningFallbackWarning, stacklevel=2)
    return TunedKernel(problem, KernelConfig.default(problem, arch), "default")
