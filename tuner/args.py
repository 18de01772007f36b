"""Command-line arguments shared by the subcommands: the problem flags, the kernel flags,
checked number types, and the way back from parsed flags to a problem, a target and a config.

Numbers a command only counts with (``--trials``, ``--iters`` …) are checked here, at parse
time (argparse then exits with code 2 and names the flag); problem sizes are checked by
``MoEProblem`` itself, so the CLI and the API refuse the same values with the same words.
"""

from __future__ import annotations

import argparse
import math
import shlex

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import FlashMoEError, UsageError
from flashmoe_gen.problem import SUPPORTED_DTYPES, MoEProblem

#: Seeds feed numpy's and Optuna's generators, which take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
#: The problem flags' defaults (also the example printed where nothing is tuned yet).
PROBLEM_DEFAULTS = dict(hidden=512, intermediate=2048, experts=8, top_k=2, tokens=256)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default that is a value (not the None/False of "unset")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _int_type(name: str, lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {name}, got {v}")
        return v
    parse.__name__ = name
    return parse


def _float_type(name: str, lo: float):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not math.isfinite(v) or v <= lo:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return v
    parse.__name__ = name
    return parse


#: Checked argparse types: each names what it accepts in its error.
positive_int = _int_type("a positive integer (1 or more)", 1)
non_negative_int = _int_type("a non-negative integer (0 or more)", 0)
seed_int = _int_type(f"an integer seed in 0..{MAX_SEED}", 0, MAX_SEED)
positive_seconds = _float_type("a finite number of seconds > 0", 0.0)


def add_problem_args(p: argparse.ArgumentParser) -> None:
    """The flags of one MoE layer (every subcommand that names a problem)."""
    d = PROBLEM_DEFAULTS
    g = p.add_argument_group("problem (one MoE layer)")
    g.add_argument("--hidden", type=int, default=d["hidden"], help="hidden size H (multiple of 8)")
    g.add_argument("--intermediate", type=int, default=d["intermediate"],
                   help="routed expert intermediate size I (multiple of 8)")
    g.add_argument("--experts", type=int, default=d["experts"],
                   help="routed experts E (divisible by P)")
    g.add_argument("--top-k", type=int, default=d["top_k"], help="experts per token k (1..E)")
    g.add_argument("--shared-experts", type=int, default=0, help="shared experts S (>= 0)")
    g.add_argument("--shared-intermediate", type=int, default=None,
                   help="intermediate size of each shared expert (default: --intermediate)")
    g.add_argument("--world-size", type=int, default=None,
                   help="expert-parallel ranks P (default: the job's ranks for run/tune, else 1)")
    g.add_argument("--tokens", type=int, default=d["tokens"], help="tokens per rank T")
    g.add_argument("--dtype", default=SUPPORTED_DTYPES[0],
                   help=f"activation/weight dtype (supported: {', '.join(SUPPORTED_DTYPES)})")
    g.add_argument("--capacity-factor", type=float, default=None,
                   help="drop tokens past ceil(c*T*k/E) per (rank, expert); default exact")
    g.add_argument("--no-normalize-topk", action="store_true",
                   help="do not renormalise the top-k weights to sum to 1")


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--arch``: the subcommands that build one kernel (not tune/show)."""
    p.add_argument("--config", default=None,
                   help="kernel config as JSON or as its name (default: the heuristic)")
    p.add_argument("--arch", default=None,
                   help="target, e.g. sm_90 / sm_90a (default: this GPU's, else sm_90)")


def problem_from_args(a: argparse.Namespace, world_size: int | None = None) -> MoEProblem:
    """The problem the flags name; ``world_size`` is the job's rank count, when known."""
    if world_size is not None and a.world_size is not None and a.world_size != world_size:
        raise UsageError("--world-size", a.world_size, f"this job has {world_size} rank(s) "
                         "(--gpus): drop --world-size or make the two equal")
    for p in (world_size, a.world_size, getattr(a, "gpus", None)):
        if p is not None:  # an explicit 0 is refused by MoEProblem, never read as "unset"
            break
    else:
        p = 1
    return MoEProblem(
        hidden=a.hidden, intermediate=a.intermediate, experts=a.experts, top_k=a.top_k,
        shared_experts=a.shared_experts, shared_intermediate=a.shared_intermediate,
        world_size=p, tokens_per_rank=a.tokens, dtype=a.dtype,
        capacity_factor=a.capacity_factor, normalize_topk=not a.no_normalize_topk)


def problem_flags(problem: MoEProblem) -> list[str]:
    """The flags that name ``problem`` (the inverse of ``problem_from_args``), P excluded."""
    out = ["--hidden", str(problem.hidden), "--intermediate", str(problem.intermediate),
           "--experts", str(problem.experts), "--top-k", str(problem.top_k)]
    if problem.shared_experts:
        out += ["--shared-experts", str(problem.shared_experts)]
        if problem.shared_intermediate != problem.intermediate:
            out += ["--shared-intermediate", str(problem.shared_intermediate)]
    out += ["--tokens", str(problem.tokens_per_rank)]
    if problem.dtype != SUPPORTED_DTYPES[0]:
        out += ["--dtype", problem.dtype]
    if problem.capacity_factor is not None:
        out += ["--capacity-factor", repr(float(problem.capacity_factor))]
    if not problem.normalize_topk:
        out.append("--no-normalize-topk")
    return out


def tune_command(problem: MoEProblem | None = None, db: str | None = None) -> str:
    """The exact command that tunes ``problem`` (the flags' defaults when None)."""
    if problem is None:
        d = PROBLEM_DEFAULTS
        problem = MoEProblem(d["hidden"], d["intermediate"], d["experts"], d["top_k"],
                             tokens_per_rank=d["tokens"])
    cmd = ["flashmoe-tune", "tune", "--gpus", str(problem.world_size), *problem_flags(problem)]
    if db:
        cmd += ["--db", db]
    return shlex.join(cmd)


def resolve_arch(a: argparse.Namespace) -> str:
    """``--arch`` (checked), else this GPU's, else the default target."""
    from flashmoe_gen.arch import DEFAULT_ARCH, current_device_limits, limits_for

    if a.arch:
        return limits_for(a.arch).arch  # an unknown target fails here, naming the known ones
    try:
        return current_device_limits().arch
    except FlashMoEError:
        return DEFAULT_ARCH


def config_from_args(a: argparse.Namespace, problem: MoEProblem, arch: str) -> KernelConfig:
    """``--config`` validated for the problem and target, else the heuristic default."""
    if a.config:
        cfg = KernelConfig.parse(a.config)
        cfg.validate(problem, arch)
        return cfg
    return KernelConfig.default(problem, arch)
