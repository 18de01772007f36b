"""The lookup API: the best known kernel for a problem, with its provenance.

Order of preference (each fallback warns, saying what it fell back to):
1. a winner tuned for this exact problem in this exact environment;
2. the same problem family in this environment, nearest token count (log scale);
3. the same GPU model and world size tuned with another package or template version
   (exact problem, else nearest tokens): configs stay valid across versions, so an
   upgrade does not throw tuning away;
4. the heuristic default.

With ``configs_dir`` (a folder of files written by ``flashmoe-tune export-configs``, see
``flashmoe_gen.configs_io``) the files are read too: after the database when ``db`` is given,
instead of it when ``db`` is None (no database is opened). A file's entry is matched by
problem family, GPU name and world size; its token count, else the nearest one.
"""

from __future__ import annotations

import os
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
    origin: str | None = None         # where it came from: a database URL or a config file

    @property
    def tuned_tokens(self) -> int | None:
        """The token count per rank the config was tuned for (None for the default)."""
        return self.tuned_for.tokens_per_rank if self.tuned_for is not None else None

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


def _check_arguments(problem, device, db, configs_dir=None) -> None:
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
    if configs_dir is not None and not isinstance(configs_dir, (str, os.PathLike)):
        raise ArgumentError("configs_dir", configs_dir, "a folder path (str or Path) of files "
                            "written by flashmoe-tune export-configs, or None")


def lookup(problem: MoEProblem, world_size: int | None = None, device=None,
           db=None, configs_dir=None) -> TunedKernel:
    """Best known kernel for ``problem`` on ``device``.

    ``device``: a ``flashmoe_gen.db.Environment``, a GPU name (e.g. "NVIDIA H100 80GB
    HBM3", matched with any versions), or None to read the current GPU. ``db``: engine or
    SQLAlchemy URL (default: ``$FLASHMOE_DB`` or the user cache). A database that does not
    exist yet reads as empty; one that is not flashmoe_gen's raises ``DatabaseError``.
    A stored config that is not valid for ``problem`` is passed over with a warning.
    ``configs_dir``: a folder of config files (``flashmoe-tune export-configs``); with
    ``db=None`` no database is read. The result's ``tuned_tokens`` and ``origin`` say which
    token count and which database or file the config comes from.
    """
    from .db import Environment, find_nearest, find_winner, list_winners, make_engine
    from .db.repository import family_of, nearest_tokens

    _check_arguments(problem, device, db, configs_dir)
    if world_size is not None:
        problem = problem.replace(world_size=world_size)
    use_db = db is not None or configs_dir is None
    engine = (make_engine(db) if db is None or isinstance(db, str) else db) if use_db else None
    origin = engine.url.render_as_string(hide_password=True) if engine is not None else None
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
                           rec.environment, rec.trial_id, origin)

    if env is not None and engine is not None:
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
    if configs_dir is not None and gpu_name is not None:
        if (k := _from_configs_dir(problem, configs_dir, gpu_name, env)) is not None:
            return k
    if gpu_name is not None and engine is not None:
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


def _from_configs_dir(problem: MoEProblem, configs_dir, gpu_name: str,
                      env) -> TunedKernel | None:
    """The config files' entry for ``problem`` on ``gpu_name`` (warns when the token count
    is another one, or when an entry does not fit the problem); None when there is none."""
    from .configs_io import find_in_configs, read_configs_dir

    files = read_configs_dir(configs_dir)
    hit = find_in_configs(files, problem, gpu_name,
                          env.compute_capability if env is not None else None)
    if hit is None:
        return None
    f, entry = hit
    tuned_for = f.problem_for(entry.tokens)
    entry_env = f.entry_environment(entry)
    try:
        entry.config.validate(problem, entry_env.arch)
    except ConfigError as e:
        warnings.warn(f"{problem.name}: passing over the config in {f.path} for "
                      f"{entry.tokens} tokens ({entry.config.name}): {e}",
                      TuningFallbackWarning, stacklevel=3)
        return None
    exact = entry.tokens == problem.tokens_per_rank
    if not exact:
        warnings.warn(f"{problem.name}: no config for {problem.tokens_per_rank} tokens in "
                      f"{f.path}; using the one tuned for {entry.tokens} tokens (nearest in "
                      "log scale)", TuningFallbackWarning, stacklevel=3)
    return TunedKernel(problem, entry.config, "exact" if exact else "nearest-tokens",
                       entry.latency_ms, tuned_for, entry_env, None, str(f.path))
