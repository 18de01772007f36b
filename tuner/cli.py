"""``flashmoe-tune``: compile, export, run, tune, list and show MoE kernels; list model
presets; export and import shippable config files.

The entry point only: it parses, calls the libraries and turns every expected failure into
one line on stderr and exit code 2. Argument helpers live in ``tuner.args``, rank set-up
and mpirun in ``tuner.launch``; nothing imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from flashmoe_gen import __version__
from flashmoe_gen.errors import RESUME_EXIT, ContextLost, FlashMoEError, UsageError
from flashmoe_gen.watchdog import exit_code

from .args import (
    HelpFormatter,
    add_kernel_args,
    add_problem_args,
    config_from_args,
    non_negative_int,
    positive_int,
    positive_seconds,
    preset_from_args,
    problem_from_args,
    resolve_arch,
    seed_int,
    tune_command,
)
from .launch import rank_from_env, relaunch_under_mpirun, resume_argv, under_mpirun
from .space import SPACES


# -- helpers ------------------------------------------------------------------------------
@contextlib.contextmanager
def _notes():
    """Warnings (lookup's fallbacks) as one readable ``note:`` line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)


def _console():
    from rich.console import Console
    return Console()  # the terminal's width (80 columns when piped; use --json there)


def _db_label(engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _output_path(path: Path) -> Path:
    """Refuse an ``-o`` that names a folder or sits in a missing one (a file is replaced)."""
    if path.is_dir():
        raise UsageError("-o/--output", str(path), "is a folder; name a file, e.g. "
                         f"{path / 'layer.cu'}")
    if not path.parent.is_dir():
        raise UsageError("-o/--output", str(path), f"its folder {path.parent} does not exist; "
                         "create it first or name a file in an existing folder")
    return path


def _provenance(k) -> str:
    """``exact``, or e.g. ``nearest-tokens: tuned for 128 tokens``, and where it came from."""
    text = k.provenance
    if k.tuned_tokens is not None and k.tuned_tokens != k.problem.tokens_per_rank:
        text += f": tuned for {k.tuned_tokens} tokens"
    if k.origin and k.provenance != "default":
        text += f" (from {k.origin})"
    return text


# -- subcommands ------------------------------------------------------------------------
def cmd_compile(a: argparse.Namespace) -> int:
    from rich.table import Table

    from flashmoe_gen.build import build

    problem = problem_from_args(a)
    arch = resolve_arch(a)
    cfg = config_from_args(a, problem, arch)
    mod = build(problem, cfg, arch).compiled
    if a.json:
        print(json.dumps({"problem": problem.name, "config": cfg.name, "arch": mod.arch,
                          "nvrtc": mod.nvrtc_version, "cubin": mod.cubin_path,
                          "kernels": {k: {**vars(r), "dynamic_smem": mod.dynamic_smem.get(k, 0)}
                                      for k, r in mod.resources.items()}}, indent=1))
        return 0
    t = Table(title=f"{problem.name}\n{cfg.name}\n{mod.arch}, NVRTC {mod.nvrtc_version}"
              f"{' (cached)' if mod.cache_hit else ''}")
    t.add_column("kernel", overflow="fold", ratio=1)
    # a column for ptxas's serialised wgmma only where a kernel has them (its reason below)
    serialised = {k: r.wgmma_serialized for k, r in mod.resources.items() if r.wgmma_serialized}
    for col in ("registers", "stack B", "spills st/ld B", "smem B", "dyn smem B",
                *(["wgmma"] if serialised else [])):
        t.add_column(col, justify="right", no_wrap=True)
    for k, r in mod.resources.items():
        t.add_row(k, str(r.registers), str(r.stack_bytes), f"{r.spill_stores}/{r.spill_loads}",
                  str(r.static_smem), str(mod.dynamic_smem.get(k, 0)),
                  *(["serialised" if k in serialised else ""] if serialised else []))
    _console().print(t)
    for k, why in serialised.items():
        print(f"ptxas serialised the wgmma of {k}: {why}")
    print(f"cubin: {mod.cubin_path}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from flashmoe_gen.export import export_cu

    problem = problem_from_args(a)
    path = _output_path(Path(a.output or f"{problem.name}.cu"))
    if a.best:
        from flashmoe_gen.api import lookup
        with _notes():
            k = lookup(problem, device=a.device, db=a.db, configs_dir=a.configs_dir)
        cfg = k.config
        print(f"best known config ({_provenance(k)}): {cfg.name}")
    else:
        cfg = config_from_args(a, problem, resolve_arch(a))
    export_cu(problem, cfg, str(path), with_main=a.with_main)
    print(f"wrote {path} ({problem.name}, {cfg.name})")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    if a.gpus > 1 and not under_mpirun():
        return relaunch_under_mpirun(a.gpus, a.argv)
    from .run_layer import run_layer
    return run_layer(a)


def cmd_tune(a: argparse.Namespace) -> int:
    """The tuning job: in this process (one GPU) or as ``--gpus`` ranks under mpirun; a job
    a candidate ended (RESUME_EXIT: the candidate is recorded as failed, the GPU or NCCL
    unusable in those processes) is resumed in fresh ones, at most ``--restarts`` times."""
    if under_mpirun():  # a rank of the job: its launcher restarts it
        from .tune_cmd import run_tune
        return run_tune(a)
    if a.gpus > 1:
        from .progress import LAUNCHER_TTY_ENV
        # mpirun gives its ranks a pseudo-terminal: tell rank 0 whether ours is a real one
        os.environ[LAUNCHER_TTY_ENV] = "1" if sys.stdout.isatty() else "0"
        rc = relaunch_under_mpirun(a.gpus, a.argv)
    else:
        from .tune_cmd import run_tune
        try:
            rc = run_tune(a)
        except ContextLost as e:
            rc = _fail(type(e).__name__, e, RESUME_EXIT)
    for restart in range(1, a.restarts + 1):
        if rc != RESUME_EXIT:
            break
        print(f"flashmoe-tune: resuming the study in fresh processes (restart {restart} of "
              f"{a.restarts})", file=sys.stderr, flush=True)
        argv = resume_argv(a.argv)
        rc = relaunch_under_mpirun(a.gpus, argv) if a.gpus > 1 else subprocess.call(
            [sys.executable, "-m", "flashmoe_gen.tuner.cli", *argv])
    return rc


def _record_dict(r) -> dict:
    """A trial or winner record as JSON values."""
    d = {"problem": r.problem.name, "gpu": r.environment.gpu_name,
         "world_size": r.environment.world_size, "status": r.status,
         "median_ms": r.median_ms, "p20_ms": r.p20_ms, "p80_ms": r.p80_ms,
         "rel_error": r.rel_error, "tflops": r.tflops, "tokens_per_s": r.tokens_per_s,
         "config": r.config_name, "failure_reason": r.failure_reason,
         "study": r.study_name, "created_at": r.created_at.isoformat()}
    if hasattr(r, "updated_at"):
        d["updated_at"] = r.updated_at.isoformat()
    return d


def cmd_list(a: argparse.Namespace) -> int:
    from rich.table import Table

    from flashmoe_gen.db import list_winners, make_engine

    engine = make_engine(a.db)
    winners = list_winners(engine)
    if a.json:
        print(json.dumps([_record_dict(w) for w in winners], indent=1))
        return 0
    if not winners:
        print(f"no tuned kernels in {_db_label(engine)} yet; tune one with: "
              f"{tune_command(db=a.db)}")
        return 0
    t = Table(title=f"tuned winners ({_db_label(engine)})")
    for col in ("problem", "GPU x P", "median ms", "TFLOP/s", "M tok/s", "config", "updated"):
        t.add_column(col, overflow="fold")
    for w in winners:
        t.add_row(w.problem.name, f"{w.environment.gpu_name} x {w.environment.world_size}",
                  f"{w.median_ms:.4f}", f"{w.tflops or 0:.1f}",
                  f"{(w.tokens_per_s or 0) / 1e6:.2f}", w.config_name,
                  w.updated_at.strftime("%Y-%m-%d %H:%M"))
    _console().print(t)
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from rich.table import Table

    from flashmoe_gen.api import lookup
    from flashmoe_gen.db import make_engine, trials_for

    problem = problem_from_args(a)
    engine = make_engine(a.db) if a.db is not None or a.configs_dir is None else None
    with _notes():
        k = lookup(problem, device=a.device, db=engine, configs_dir=a.configs_dir)
    trials = trials_for(engine, k.tuned_for or problem)[: a.limit] if engine else []
    if a.json:
        print(json.dumps({"problem": problem.name, "provenance": k.provenance,
                          "config": k.config.name, "config_fields": k.config.to_dict(),
                          "latency_ms": k.latency_ms,
                          "tuned_for": k.tuned_for.name if k.tuned_for else None,
                          "tuned_tokens": k.tuned_tokens, "origin": k.origin,
                          "trials": [_record_dict(t) for t in trials]}, indent=1))
        return 0
    console = _console()
    console.print(f"{problem.name}: {_provenance(k)}; config {k.config.name}"
                  + (f"; {k.latency_ms:.4f} ms" if k.latency_ms else ""), overflow="fold")
    if k.provenance == "default":
        print(f"not tuned yet; tune it with: {tune_command(problem, a.db)}")
    if not trials:
        return 0
    t = Table(title="trials")
    for col in ("status", "median ms", "p20", "p80", "GPU x P", "config", "reason"):
        t.add_column(col, overflow="fold")
    for tr in trials:
        t.add_row(tr.status, f"{tr.median_ms:.4f}" if tr.median_ms else "-",
                  f"{tr.p20_ms:.4f}" if tr.p20_ms else "-", f"{tr.p80_ms:.4f}" if tr.p80_ms
                  else "-", f"{tr.environment.gpu_name} x {tr.environment.world_size}",
                  tr.config_name, (tr.failure_reason or "")[:60])
    console.print(t)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from rich.table import Table

    from flashmoe_gen.presets import PRESETS

    if a.json:
        print(json.dumps([p.to_dict() for p in PRESETS.values()], indent=1))
        return 0
    t = Table(title="model presets (--model NAME; flags override a field; --gpus and --tokens "
              "give P and T)")
    for col in ("model", "MoE layer", "exact", "from"):
        t.add_column(col, overflow="fold")
    for p in PRESETS.values():
        t.add_row(p.name, p.summary(), "yes" if p.exact else f"no: {p.note}", p.hf_id)
    _console().print(t)
    return 0


def cmd_export_configs(a: argparse.Namespace) -> int:
    from flashmoe_gen.configs_io import export_configs
    from flashmoe_gen.db import make_engine

    engine = make_engine(a.db)
    paths = export_configs(engine, a.output, gpu=a.gpu, world_size=a.world_size)
    if not paths:
        print(f"no tuned winners in {_db_label(engine)}"
              + (f" for {a.gpu}" if a.gpu else "")
              + (f" x {a.world_size}" if a.world_size else "") + "; nothing written")
        return 0
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_import_configs(a: argparse.Namespace) -> int:
    from flashmoe_gen.configs_io import import_configs
    from flashmoe_gen.db import make_engine

    engine = make_engine(a.db)
    r = import_configs(engine, a.paths)
    print(f"imported {r.recorded} config(s) from {r.files} file(s) into {_db_label(engine)}"
          + (f"; {r.skipped} already there" if r.skipped else ""))
    return 0


# -- parser -------------------------------------------------------------------------------
def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None,
                   help="winners database URL (default: $FLASHMOE_DB or the user cache)")


def _configs_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-configs", dest="configs_dir", default=None, metavar="DIR",
                   help="also look in this folder of config files (export-configs'); "
                   "without --db no database is read")


def _gpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=positive_int, default=1,
                   help="ranks/GPUs; without mpirun, >1 launches mpirun itself")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flashmoe-tune", formatter_class=HelpFormatter,
        description="Generate, compile, export and run FlashMoE layers "
                    "(distributed MoE with NCCL dispatch/combine overlapped with experts).",
        epilog="Flags without a command run `tune` (flashmoe-tune --gpus 2 --hidden ...). "
               "`compile` and `export` need no GPU; `<command> --help` lists its flags.")
    ap.add_argument("--version", action="version", version=f"flashmoe_gen {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        p.set_defaults(fn=fn)
        return p

    c = command("compile", "compile only (NVRTC, no GPU needed); resource table", cmd_compile)
    add_problem_args(c)
    add_kernel_args(c)
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    e = command("export", "write one self-contained .cu for nvcc (no GPU needed)", cmd_export)
    add_problem_args(e)
    add_kernel_args(e)
    e.add_argument("-o", "--output", default=None, help="output file (default: <problem>.cu)")
    e.add_argument("--with-main", action="store_true",
                   help="add an MPI+NCCL harness main() that runs and times the layer")
    e.add_argument("--best", action="store_true",
                   help="use the best tuned config from the database (lookup) instead of --config")
    _db_arg(e)
    e.add_argument("--device", default=None,
                   help="GPU name to look up for --best (default: this GPU)")
    _configs_dir_arg(e)

    r = command("run", "build the layer on every rank, check it once, time it", cmd_run)
    add_problem_args(r)
    add_kernel_args(r)
    _gpus_arg(r)
    r.add_argument("--iters", type=positive_int, default=20,
                   help="timed iterations (median reported)")
    r.add_argument("--warmup", type=non_negative_int, default=5,
                   help="untimed warm-up iterations")
    r.add_argument("--seed", type=seed_int, default=0, help="seed of weights and tokens")
    r.add_argument("--no-check", action="store_true", help="skip the reference check")

    t = command("tune", "search configs with Optuna on every rank; store the winner", cmd_tune)
    add_problem_args(t)
    _gpus_arg(t)
    t.add_argument("--trials", type=positive_int, default=30,
                   help="candidates to evaluate (a resumed study counts its earlier ones)")
    t.add_argument("--timeout", type=positive_seconds, default=None,
                   help="stop after this many seconds (default: no limit)")
    t.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid", "cmaes"],
                   help="Optuna sampler (grid sweeps the whole space, use --space small; "
                   "every knob is categorical, so cmaes falls back to random sampling)")
    t.add_argument("--space", default="full", choices=sorted(SPACES),
                   help="search space: every knob (full), a small one for grid sweeps "
                   "(small), or a small schedule over tiles from far too small to the usual "
                   "(steep: a grid for judging samplers)")
    t.add_argument("--transport", default="auto", choices=["auto", "nccl", "nvlink"],
                   help="transports to choose between: auto = nccl, plus nvlink (one "
                   "persistent kernel per forward) where every rank opens every peer's memory "
                   "through CUDA IPC (one node)")
    t.add_argument("--study-name", default=None,
                   help="Optuna study name (default: problem, space and environment)")
    t.add_argument("--storage", default=None, help="Optuna storage URL (default: "
                   "$FLASHMOE_STUDIES or a SQLite file in the user cache)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted study")
    t.add_argument("--restarts", type=non_negative_int, default=3,
                   help="times a job is resumed in fresh processes after a candidate left "
                   "the GPU or NCCL unusable (that candidate recorded as failed)")
    _db_arg(t)
    t.add_argument("--plot", default=None,
                   help="write the optimization history: .html (plotly) or .png (matplotlib)")
    t.add_argument("--seed", type=seed_int, default=0, help="seed of sampler, weights and tokens")
    t.add_argument("--warmup", type=non_negative_int, default=3,
                   help="warm-up runs per candidate")
    t.add_argument("--iters", type=positive_int, default=15,
                   help="timed runs per candidate (median)")
    t.add_argument("--check", default="sampled", choices=["sampled", "full"],
                   help="correctness check of each candidate: 'sampled' generates the weights "
                   "on the GPU and checks --check-rows rows per rank against a float64 "
                   "reference of only the experts they use (scales with the rows, not the "
                   "model); 'full' draws every expert on the host and checks against the "
                   "host reference over the whole model (slow for large models)")
    t.add_argument("--check-rows", type=positive_int, default=64,
                   help="rows per rank the sampled check compares (fewer tokens: all)")
    t.add_argument("--compile-workers", type=non_negative_int, default=None,
                   help="processes on rank 0 compiling the next candidates while one is timed "
                   "(0: none; default: the CPUs less one, at most 3)")

    ls = command("list", "table of tuned winners", cmd_list)
    _db_arg(ls)
    ls.add_argument("--json", action="store_true", help="print the winners as JSON")

    sh = command("show", "best kernel for a problem, with its trials", cmd_show)
    add_problem_args(sh)
    _db_arg(sh)
    sh.add_argument("--device", default=None, help="GPU name (default: this GPU)")
    sh.add_argument("--limit", type=non_negative_int, default=20, help="trials to show")
    sh.add_argument("--json", action="store_true", help="print the kernel and trials as JSON")
    _configs_dir_arg(sh)

    m = command("models", "list the model presets (--model NAME)", cmd_models)
    m.add_argument("--json", action="store_true", help="print the presets as JSON")

    ex = command("export-configs", "write the winners as config files: one JSON per problem "
                 "family, GPU and world size, token counts -> config and latency",
                 cmd_export_configs)
    _db_arg(ex)
    ex.add_argument("-o", "--output", default="flashmoe_configs",
                    help="folder for the files (created if missing)")
    ex.add_argument("--gpu", default=None, help="only this GPU name (default: every GPU)")
    ex.add_argument("--world-size", type=positive_int, default=None,
                    help="only this world size (default: every one)")

    im = command("import-configs", "record config files (export-configs') into the database",
                 cmd_import_configs)
    im.add_argument("paths", nargs="+", help="config files, or folders of them")
    _db_arg(im)
    return ap


SUBCOMMANDS = ("compile", "export", "run", "tune", "list", "show", "models", "export-configs",
               "import-configs")


def _fail(kind: str, message: object, code: int = 2) -> int:
    rank = rank_from_env() if under_mpirun() else None
    where = f" (rank {rank})" if rank is not None else ""
    print(f"flashmoe-tune{where}: {kind}: {message}", file=sys.stderr)
    return code


def _preset_note(a: argparse.Namespace) -> None:
    """A ``--model`` preset the layer cannot express exactly says so (once, on rank 0)."""
    preset = preset_from_args(a)
    if preset is not None and not preset.exact and (not under_mpirun() or rank_from_env() == 0):
        print(f"note: --model {preset.name} is approximate: {preset.note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "tune")  # `flashmoe-tune --gpus 2 ...` is the tuning job itself
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a refused flag (2, already printed)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    args.argv = argv  # what `--gpus N` relaunches under mpirun
    try:
        _preset_note(args)
        return args.fn(args)
    except FlashMoEError as e:
        return _fail(type(e).__name__, e, exit_code(e))
    except json.JSONDecodeError as e:
        return _fail("invalid JSON", e)
    except OSError as e:  # the file system: permissions, a full disk, a vanished folder
        return _fail(type(e).__name__, e)
    except KeyboardInterrupt:
        print("flashmoe-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
