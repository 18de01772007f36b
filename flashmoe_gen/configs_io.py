"""Shippable config files: one JSON per (problem family, GPU, world size).

Like vLLM's and SGLang's per-GPU MoE config files, a file maps token counts (per rank) to
the tuned config and its measured latency, so winners travel without a database:

```json
{"format": "flashmoe_gen.configs/1",
 "family": "moe_h2048_i1408_e64_k6_s2x1408_p2_t0_bf16_nonorm",
 "gpu": "NVIDIA H100 80GB HBM3", "world_size": 2, "package_version": "0.1.0",
 "date": "2026-11-26T12:00:00+00:00",
 "problem": {...every MoEProblem field but tokens_per_rank...},
 "environment": {...flashmoe_gen.db.Environment of the newest entry...},
 "configs": {"1": {"config": "gu_bm64_...", "latency_ms": 0.051, "p20_ms": ..., ...},
             "128": {...}}}
```

The family is the problem's name with the token count set to 0 (``db.repository.family_of``).
An entry measured in another environment than the header's (another package or template
version) carries its own ``environment``. ``export_configs`` writes files from the winners
database, ``import_configs`` records them into one, and ``read_configs_dir`` /
``find_in_configs`` serve ``lookup(..., configs_dir=...)`` with no database at all.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .config import KernelConfig
from .errors import ConfigError, FlashMoEError, ProblemError
from .problem import MoEProblem

#: The file format's name and version (the ``format`` key).
FORMAT = "flashmoe_gen.configs/1"


class ConfigFileError(FlashMoEError, ValueError):
    """A config file that cannot be read: names the file, the key and what is expected."""

    def __init__(self, path: object, key: str, expected: str):
        self.path, self.key, self.expected = path, key, expected
        super().__init__(f"config file {path}: {key}: {expected}")


@dataclass(frozen=True)
class ConfigEntry:
    """One token count's tuned config."""

    tokens: int
    config: KernelConfig
    latency_ms: float
    p20_ms: float | None = None
    p80_ms: float | None = None
    tuned_at: str | None = None
    environment: object | None = None   # db.Environment, when not the header's

    def to_dict(self) -> dict:
        d = {"config": self.config.name, "latency_ms": self.latency_ms}
        if self.p20_ms is not None:
            d["p20_ms"] = self.p20_ms
        if self.p80_ms is not None:
            d["p80_ms"] = self.p80_ms
        if self.tuned_at:
            d["tuned_at"] = self.tuned_at
        if self.environment is not None:
            d["environment"] = self.environment.to_dict()
        return d


@dataclass(frozen=True)
class ConfigFile:
    """The winners of one problem family on one GPU model and world size."""

    problem: MoEProblem                    # tokens_per_rank = 0: the family
    environment: object                    # db.Environment of the header
    entries: dict[int, ConfigEntry]        # tokens per rank -> entry
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    path: str | None = None                # where it was read from

    @property
    def family(self) -> str:
        return self.problem.name

    @property
    def gpu_name(self) -> str:
        return self.environment.gpu_name

    @property
    def world_size(self) -> int:
        return self.problem.world_size

    @property
    def file_name(self) -> str:
        """``<family without the token part>__<GPU>.json``, e.g.
        ``moe_h512_i2048_e8_k2_p2_bf16__NVIDIA_H100_80GB_HBM3.json``."""
        stem = self.family.replace("_t0_", "_", 1)
        return f"{stem}__{re.sub(r'[^A-Za-z0-9.-]+', '_', self.gpu_name).strip('_')}.json"

    def entry_environment(self, entry: ConfigEntry):
        return entry.environment if entry.environment is not None else self.environment

    def problem_for(self, tokens: int) -> MoEProblem:
        return self.problem.replace(tokens_per_rank=tokens)

    def to_dict(self) -> dict:
        problem = self.problem.to_dict()
        problem.pop("tokens_per_rank")
        return {"format": FORMAT, "family": self.family, "gpu": self.gpu_name,
                "world_size": self.world_size, "package_version": __version__,
                "date": self.date, "problem": problem,
                "environment": self.environment.to_dict(),
                "configs": {str(t): self.entries[t].to_dict() for t in sorted(self.entries)}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: object, path: object = "<dict>") -> ConfigFile:
        """Parse and check every part; ``ConfigFileError`` names the first bad key."""
        from .db import Environment

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ConfigFileError(path, "format", f"expected {FORMAT!r}, got {got!r} (files "
                                  "written by flashmoe-tune export-configs)")
        for key in ("problem", "environment", "configs"):
            if not isinstance(d.get(key), dict):
                raise ConfigFileError(path, key, "missing or not a JSON object")
        try:
            problem = MoEProblem.from_dict({**d["problem"], "tokens_per_rank": 0})
        except ProblemError as e:
            raise ConfigFileError(path, "problem", str(e)) from None
        env = _environment(d["environment"], path, "environment")
        if env.world_size != problem.world_size:
            raise ConfigFileError(path, "environment.world_size", f"{env.world_size} differs "
                                  f"from problem.world_size {problem.world_size}")
        entries = {}
        for key, raw in d["configs"].items():
            where = f"configs[{key!r}]"
            try:
                tokens = int(key)
                if tokens < 0 or str(tokens) != key:
                    raise ValueError
            except ValueError:
                raise ConfigFileError(path, where, "keys are token counts per rank, written "
                                      "as non-negative integers such as \"128\"") from None
            if not isinstance(raw, dict) or not isinstance(raw.get("config"), str):
                raise ConfigFileError(path, where, 'expected {"config": NAME, "latency_ms": '
                                      "MS, ...}")
            try:
                cfg = KernelConfig.parse(raw["config"])
            except ConfigError as e:
                raise ConfigFileError(path, where + ".config", str(e)) from None
            ms = raw.get("latency_ms")
            if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms > 0 \
                    or ms == float("inf"):
                raise ConfigFileError(path, where + ".latency_ms",
                                      f"expected a positive finite number, got {ms!r}")
            entry_env = (_environment(raw["environment"], path, where + ".environment")
                         if raw.get("environment") is not None else None)
            entries[tokens] = ConfigEntry(tokens, cfg, float(ms), _opt_float(raw, "p20_ms"),
                                          _opt_float(raw, "p80_ms"), raw.get("tuned_at"),
                                          entry_env)
        if not entries:
            raise ConfigFileError(path, "configs", "holds no token count")
        if d.get("family") not in (None, problem.name):
            raise ConfigFileError(path, "family", f"{d['family']!r} does not match the problem "
                                  f"fields, which spell {problem.name!r}")
        assert isinstance(env, Environment)
        return cls(problem, env, entries, str(d.get("date") or ""),
                   str(path) if path != "<dict>" else None)

    @classmethod
    def read(cls, path: str | Path) -> ConfigFile:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigFileError(path, "JSON", f"not valid JSON ({e})") from None
        return cls.from_dict(d, path)


def _opt_float(raw: dict, key: str) -> float | None:
    v = raw.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _environment(d: object, path: object, key: str):
    from .db import Environment
    need = ("gpu_name", "compute_capability", "world_size", "template_hash")
    if not isinstance(d, dict) or any(k not in d for k in need):
        raise ConfigFileError(path, key, f"expected an object with at least {', '.join(need)}")
    try:
        return Environment.from_dict(d)
    except TypeError as e:
        raise ConfigFileError(path, key, str(e)) from None


# -- the database <-> files ---------------------------------------------------------------
def files_from_winners(winners, gpu: str | None = None,
                       world_size: int | None = None) -> list[ConfigFile]:
    """Group winner records (``db.list_winners``) into files: one per (family, GPU, world
    size). Where a token count has winners in several environments (package or template
    versions) the newest wins; the header carries the newest entry's environment."""
    from .db.repository import family_of

    groups: dict[tuple, dict[int, object]] = {}
    for w in winners:
        if gpu is not None and w.environment.gpu_name != gpu:
            continue
        if world_size is not None and w.environment.world_size != world_size:
            continue
        key = (family_of(w.problem), w.environment.gpu_name, w.environment.world_size)
        per_count = groups.setdefault(key, {})
        t = w.problem.tokens_per_rank
        if t not in per_count or w.updated_at > per_count[t].updated_at:
            per_count[t] = w
    out = []
    for (family, _, _), per_count in sorted(groups.items()):
        newest = max(per_count.values(), key=lambda w: w.updated_at)
        header = newest.environment
        entries = {t: ConfigEntry(t, w.config, w.median_ms, w.p20_ms, w.p80_ms,
                                  w.updated_at.isoformat(timespec="seconds"),
                                  None if w.environment.key == header.key else w.environment)
                   for t, w in per_count.items()}
        out.append(ConfigFile(MoEProblem.from_name(family), header, entries))
    return out


def export_configs(db, out_dir: str | Path, gpu: str | None = None,
                   world_size: int | None = None) -> list[Path]:
    """Write one file per (family, GPU, world size) of the database's winners into
    ``out_dir`` (created if missing); returns the paths written."""
    from .db import list_winners

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigFileError(out_dir, "output", "is a file; name a folder for the config "
                              "files")
    files = files_from_winners(list_winners(db), gpu, world_size)
    if files:  # nothing to write: no empty folder appears
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        path = out_dir / f.file_name
        path.write_text(f.to_json())
        written.append(path)
    return written


def config_paths(paths) -> list[Path]:
    """Files named, and the ``*.json`` files of folders named (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.glob("*.json"))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigFileError(p, "path", "no such file or folder")
    return out


@dataclass(frozen=True)
class ImportReport:
    recorded: int
    skipped: int            # already in the database (same config, latency and origin)
    files: int


def import_configs(db, paths) -> ImportReport:
    """Record every entry of the files (or folders of files) into the winners database as
    an ``ok`` trial of study ``import:<file name>``; the winner of each problem x
    environment becomes the faster of the stored one and the imported one. Every file is
    read and checked before anything is written; importing a file twice records it once."""
    from .db import record_trial, trials_for

    files = [ConfigFile.read(p) for p in config_paths(paths)]
    plans = []
    for f in files:
        for t, e in sorted(f.entries.items()):
            problem, env = f.problem_for(t), f.entry_environment(e)
            try:
                e.config.validate(problem, env.arch)
            except ConfigError as err:
                raise ConfigFileError(f.path, f"configs['{t}'].config", str(err)) from None
            plans.append((f, problem, env, e))
    recorded = skipped = 0
    for f, problem, env, e in plans:
        study = f"import:{Path(f.path).name}"
        if any(r.config_name == e.config.name and r.median_ms == e.latency_ms
               for r in trials_for(db, problem, env, study_name=study)):
            skipped += 1
            continue
        record_trial(db, problem, env, e.config, status="ok", median_ms=e.latency_ms,
                     p20_ms=e.p20_ms, p80_ms=e.p80_ms, study_name=study)
        recorded += 1
    return ImportReport(recorded, skipped, len(files))


# -- lookup without a database --------------------------------------------------------------
def read_configs_dir(configs_dir: str | Path) -> list[ConfigFile]:
    """Every config file in the folder; a JSON file that is not one is skipped with a
    warning (a folder may hold other files), a damaged one of ours raises."""
    folder = Path(configs_dir)
    if not folder.is_dir():
        raise ConfigFileError(folder, "configs_dir", "is not a folder of config files "
                              "(flashmoe-tune export-configs -o FOLDER writes one)")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            d = None
        if not isinstance(d, dict) or "format" not in d:
            warnings.warn(f"{path}: not a flashmoe_gen config file (no \"format\" key); "
                          "skipped", UserWarning, stacklevel=2)
            continue
        out.append(ConfigFile.from_dict(d, path))
    return out


def find_in_configs(files: list[ConfigFile], problem: MoEProblem, gpu_name: str,
                    compute_capability: str | None = None
                    ) -> tuple[ConfigFile, ConfigEntry] | None:
    """The entry for ``problem`` on ``gpu_name``: its token count, else the nearest one (log
    scale, the database's rule); None when no file holds the family on that GPU."""
    from .db.repository import family_of, nearest_count

    family = family_of(problem)
    hits = [f for f in files if f.family == family and f.gpu_name == gpu_name
            and (compute_capability is None
                 or f.environment.compute_capability == compute_capability)]
    if not hits:
        return None
    by_count = {}
    for f in sorted(hits, key=lambda f: f.date):  # a newer file's entry wins a tie
        for t, e in f.entries.items():
            by_count[t] = (f, e)
    return by_count[nearest_count(by_count, problem.tokens_per_rank)]
