"""``flashmoe-tune``: compile, export, run (and, with the tuning work, tune) MoE kernels."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

from flashmoe_gen import __version__
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import FlashMoEError
from flashmoe_gen.problem import MoEProblem


def add_problem_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("problem (one MoE layer)")
    g.add_argument("--hidden", type=int, default=512, help="hidden size H (multiple of 8)")
    g.add_argument("--intermediate", type=int, default=2048,
                   help="routed expert intermediate size I (multiple of 8)")
    g.add_argument("--experts", type=int, default=8, help="routed experts E (divisible by P)")
    g.add_argument("--top-k", type=int, default=2, help="experts per token k (1..E)")
    g.add_argument("--shared-experts", type=int, default=0, help="shared experts S (>= 0)")
    g.add_argument("--shared-intermediate", type=int, default=None,
                   help="intermediate size of each shared expert (default: --intermediate)")
    g.add_argument("--world-size", type=int, default=None,
                   help="expert-parallel ranks P (default: --gpus, or the MPI world size)")
    g.add_argument("--tokens", type=int, default=256, help="tokens per rank T")
    g.add_argument("--dtype", default="bf16", help="activation/weight dtype (bf16)")
    g.add_argument("--capacity-factor", type=float, default=None,
                   help="drop tokens past ceil(c*T*k/E) per (rank, expert); default exact")
    g.add_argument("--no-normalize-topk", action="store_true",
                   help="do not renormalise the top-k weights to sum to 1")
    p.add_argument("--config", default=None,
                   help="kernel config as JSON or as its name (default: the heuristic)")
    p.add_argument("--arch", default=None,
                   help="target, e.g. sm_90 / sm_90a (default: this GPU's, else sm_90)")


def problem_from_args(a: argparse.Namespace, world_size: int | None = None) -> MoEProblem:
    return MoEProblem(
        hidden=a.hidden, intermediate=a.intermediate, experts=a.experts, top_k=a.top_k,
        shared_experts=a.shared_experts, shared_intermediate=a.shared_intermediate,
        world_size=world_size or a.world_size or getattr(a, "gpus", None) or 1,
        tokens_per_rank=a.tokens, dtype=a.dtype, capacity_factor=a.capacity_factor,
        normalize_topk=not a.no_normalize_topk)


def resolve_arch(a: argparse.Namespace) -> str:
    if a.arch:
        return a.arch
    try:
        from flashmoe_gen.arch import current_device_limits
        return current_device_limits().arch
    except FlashMoEError:
        return "sm_90"


def config_from_args(a: argparse.Namespace, problem: MoEProblem, arch: str) -> KernelConfig:
    if a.config:
        cfg = KernelConfig.parse(a.config)
        cfg.validate(problem, arch)
        return cfg
    return KernelConfig.default(problem, arch)


# -- subcommands ------------------------------------------------------------------------
def cmd_compile(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flashmoe_gen.compile import compile_source
    from flashmoe_gen.render import render

    problem = problem_from_args(a)
    arch = resolve_arch(a)
    cfg = config_from_args(a, problem, arch)
    mod = compile_source(render(problem, cfg, arch=arch), arch)
    if a.json:
        print(json.dumps({"problem": problem.name, "config": cfg.name, "arch": mod.arch,
                          "nvrtc": mod.nvrtc_version, "cubin": mod.cubin_path,
                          "kernels": {k: {**vars(r), "dynamic_smem": mod.dynamic_smem.get(k, 0)}
                                      for k, r in mod.resources.items()}}, indent=1))
        return 0
    t = Table(title=f"{problem.name}\n{cfg.name}\n{mod.arch}, NVRTC {mod.nvrtc_version}"
              f"{' (cached)' if mod.cache_hit else ''}")
    for col in ("kernel", "registers", "stack B", "spill st B", "spill ld B", "static smem B",
                "dynamic smem B"):
        t.add_column(col, justify="left" if col == "kernel" else "right")
    for k, r in mod.resources.items():
        t.add_row(k, str(r.registers), str(r.stack_bytes), str(r.spill_stores),
                  str(r.spill_loads), str(r.static_smem), str(mod.dynamic_smem.get(k, 0)))
    Console(width=160).print(t)
    print(f"cubin: {mod.cubin_path}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from flashmoe_gen.export import export_cu

    problem = problem_from_args(a)
    arch = resolve_arch(a)
    if a.best:
        from flashmoe_gen.api import lookup
        k = lookup(problem, device=a.device, db=a.db)
        cfg = k.config
        print(f"best known config ({k.provenance}): {cfg.name}")
    else:
        cfg = config_from_args(a, problem, arch)
    path = a.output or f"{problem.name}.cu"
    export_cu(problem, cfg, path, with_main=a.with_main)
    print(f"wrote {path} ({problem.name}, {cfg.name})")
    return 0


def mpi_ranks(gpus: int):
    """(MPI world, size, rank); a clear error when ``--gpus`` and the MPI size disagree."""
    from flashmoe_gen.comm import mpi_world
    from flashmoe_gen.errors import CommError

    world = mpi_world()
    size = world.Get_size()
    if gpus != size:
        raise CommError(f"--gpus {gpus} but {size} MPI rank(s): start with `mpirun -np {gpus}`"
                        " or without mpirun")
    return world, size, world.Get_rank()


def _under_mpirun() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def relaunch_under_mpirun(gpus: int, argv: list[str]) -> int:
    """Start ``gpus`` ranks of this same command under mpirun (one GPU each)."""
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        print("flashmoe-tune: --gpus > 1 needs mpirun on PATH (OpenMPI/MPICH)", file=sys.stderr)
        return 2
    cmd = [mpirun, "-np", str(gpus)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    for var in ("NCCL_NVLS_ENABLE",):  # NVLink multicast stays off (shared machines)
        cmd += ["-x", f"{var}=0"]
    cmd += [sys.executable, "-m", "flashmoe_gen.tuner.cli", *argv]
    print("launching:", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def _args_after(sub: str) -> list[str]:
    """This command's own flags (``flashmoe-tune [sub] FLAGS``), to relaunch under mpirun."""
    args = sys.argv[1:]
    return args[1:] if args and args[0] == sub else args


def cmd_run(a: argparse.Namespace) -> int:
    from flashmoe_gen.tuner.run_layer import run_layer

    if a.gpus > 1 and not _under_mpirun():
        return relaunch_under_mpirun(a.gpus, ["run", *_args_after("run")])
    return run_layer(a)


def cmd_tune(a: argparse.Namespace) -> int:
    from flashmoe_gen.tuner.tune_cmd import run_tune

    if a.gpus > 1 and not _under_mpirun():
        return relaunch_under_mpirun(a.gpus, ["tune", *_args_after("tune")])
    return run_tune(a)


def cmd_list(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flashmoe_gen.db import list_winners, make_engine

    t = Table(title="tuned winners")
    for col in ("problem", "GPU x P", "median ms", "TFLOP/s", "M tok/s", "config", "updated"):
        t.add_column(col)
    for w in list_winners(make_engine(a.db)):
        t.add_row(w.problem.name, f"{w.environment.gpu_name} x {w.environment.world_size}",
                  f"{w.median_ms:.4f}", f"{w.tflops or 0:.1f}",
                  f"{(w.tokens_per_s or 0) / 1e6:.2f}", w.config_name,
                  w.updated_at.strftime("%Y-%m-%d %H:%M"))
    Console(width=220).print(t)
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flashmoe_gen.api import lookup
    from flashmoe_gen.db import make_engine, trials_for

    problem = problem_from_args(a)
    engine = make_engine(a.db)
    k = lookup(problem, device=a.device, db=engine)
    console = Console(width=220)
    console.print(f"{problem.name}: {k.provenance}; config {k.config.name}"
                  + (f"; {k.latency_ms:.4f} ms" if k.latency_ms else ""))
    t = Table(title="trials")
    for col in ("status", "median ms", "p20", "p80", "GPU x P", "config", "reason"):
        t.add_column(col)
    for tr in trials_for(engine, k.tuned_for or problem)[: a.limit]:
        t.add_row(tr.status, f"{tr.median_ms:.4f}" if tr.median_ms else "-",
                  f"{tr.p20_ms:.4f}" if tr.p20_ms else "-", f"{tr.p80_ms:.4f}" if tr.p80_ms
                  else "-", f"{tr.environment.gpu_name} x {tr.environment.world_size}",
                  tr.config_name, (tr.failure_reason or "")[:60])
    console.print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flashmoe-tune",
        description="Generate, compile, export and run FlashMoE layers "
                    "(distributed MoE with NCCL dispatch/combine overlapped with experts).")
    ap.add_argument("--version", action="version", version=f"flashmoe_gen {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile only (NVRTC, no GPU needed); resource table")
    add_problem_args(c)
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("export", help="write one self-contained .cu for nvcc")
    add_problem_args(e)
    e.add_argument("-o", "--output", default=None, help="output path (default: <problem>.cu)")
    e.add_argument("--with-main", action="store_true",
                   help="add an MPI+NCCL harness main() that runs and times the layer")
    e.add_argument("--best", action="store_true",
                   help="use the best tuned config from the database (lookup) instead of --config")
    e.add_argument("--db", default=None, help="winners database URL (default $FLASHMOE_DB or "
                   "the user cache)")
    e.add_argument("--device", default=None,
                   help="GPU name to look up for --best (default: this GPU)")
    e.set_defaults(fn=cmd_export)

    r = sub.add_parser("run", help="build the layer on every rank, check it once, time it")
    add_problem_args(r)
    r.add_argument("--gpus", type=int, default=1,
                   help="ranks/GPUs; without mpirun, >1 launches mpirun itself")
    r.add_argument("--iters", type=int, default=20, help="timed iterations (median reported)")
    r.add_argument("--warmup", type=int, default=5, help="untimed warm-up iterations")
    r.add_argument("--seed", type=int, default=0, help="seed of weights and tokens")
    r.add_argument("--no-check", action="store_true", help="skip the reference check")
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("tune", help="search configs with Optuna on every rank; store the winner")
    add_problem_args(t)
    t.add_argument("--gpus", type=int, default=1,
                   help="ranks/GPUs; without mpirun, >1 launches mpirun itself")
    t.add_argument("--trials", type=int, default=30,
                   help="candidates to evaluate (a resumed study counts its earlier ones)")
    t.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    t.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid", "cmaes"],
                   help="Optuna sampler (grid sweeps the whole space, use --space small; "
                   "every knob is categorical, so cmaes falls back to random sampling)")
    t.add_argument("--space", default="full", choices=["full", "small"],
                   help="search space: every knob, or a small one for grid sweeps")
    t.add_argument("--study-name", default=None,
                   help="Optuna study name (default: problem, space and environment)")
    t.add_argument("--storage", default=None, help="Optuna storage URL (default "
                   "$FLASHMOE_STUDIES or a SQLite file in the user cache)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted study")
    t.add_argument("--db", default=None, help="winners database URL (default $FLASHMOE_DB "
                   "or the user cache)")
    t.add_argument("--plot", default=None,
                   help="write the optimization history: .html (plotly) or .png (matplotlib);"
                   " default <problem>__<sampler>.html when plotly is installed")
    t.add_argument("--seed", type=int, default=0, help="seed of sampler, weights and tokens")
    t.add_argument("--warmup", type=int, default=3, help="warm-up runs per candidate")
    t.add_argument("--iters", type=int, default=15, help="timed runs per candidate (median)")
    t.set_defaults(fn=cmd_tune)

    ls = sub.add_parser("list", help="table of tuned winners")
    ls.add_argument("--db", default=None, help="winners database URL")
    ls.set_defaults(fn=cmd_list)

    sh = sub.add_parser("show", help="best kernel for a problem, with its trials")
    add_problem_args(sh)
    sh.add_argument("--db", default=None, help="winners database URL")
    sh.add_argument("--device", default=None, help="GPU name (default: this GPU)")
    sh.add_argument("--limit", type=int, default=20, help="trials to show")
    sh.set_defaults(fn=cmd_show)
    return ap


SUBCOMMANDS = ("compile", "export", "run", "tune", "list", "show")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "tune")  # `flashmoe-tune --gpus 2 ...` is the tuning job itself
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FlashMoEError as e:
        print(f"flashmoe-tune: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
