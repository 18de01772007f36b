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
        print(json.dumps({"problem": problem.name, "config": cfg.name, "arch": arch,
                          "nvrtc": mod.nvrtc_version, "cubin": mod.cubin_path,
                          "kernels": {k: {**vars(r), "dynamic_smem": mod.dynamic_smem.get(k, 0)}
                                      for k, r in mod.resources.items()}}, indent=1))
        return 0
    t = Table(title=f"{problem.name}\n{cfg.name}\n{arch}, NVRTC {mod.nvrtc_version}"
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
    cfg = config_from_args(a, problem, arch)
    path = a.output or f"{problem.name}.cu"
    export_cu(problem, cfg, path, with_main=a.with_main)
    print(f"wrote {path} ({problem.name}, {cfg.name})")
    return 0


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


def cmd_run(a: argparse.Namespace) -> int:
    from flashmoe_gen.tuner.run_layer import run_layer

    if a.gpus > 1 and not _under_mpirun():
        return relaunch_under_mpirun(a.gpus, sys.argv[1:])
    return run_layer(a)


def cmd_tune(a: argparse.Namespace) -> int:
    print("flashmoe-tune tune: the Optuna search and the winners database are not built yet "
          "(they arrive with the autotuning work). Today: `flashmoe-tune compile`, "
          "`flashmoe-tune export`, `flashmoe-tune run`.", file=sys.stderr)
    return 2


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

    t = sub.add_parser("tune", help="search configs (not available yet)")
    t.set_defaults(fn=cmd_tune)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FlashMoEError as e:
        print(f"flashmoe-tune: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
