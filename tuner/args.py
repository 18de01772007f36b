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
from flashmoe_gen.problem import SCORINGS, SUPPORTED_DTYPES, MoEProblem

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


def token_counts(text: str) -> tuple[int, ...]:
    """``--tokens``: one count (``256``) or a sweep (``1,8,32,128``), in the order given."""
    parts = [t.strip() for t in text.split(",")]
    try:
        counts = tuple(int(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a token count or a comma-separated list such as 1,8,32,128, "
            f"got {text!r}") from None
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"a token count appears twice in {text!r}")
    return counts


token_counts.__name__ = "token count(s)"


def add_problem_args(p: argparse.ArgumentParser) -> None:
    """The flags of one MoE layer (every subcommand that names a problem).

    Every shape flag defaults to None ("not given"): ``problem_from_args`` takes a given flag,
    else the ``--model`` preset's value, else ``PROBLEM_DEFAULTS``.
    """
    d = PROBLEM_DEFAULTS
    g = p.add_argument_group("problem (one MoE layer)")
    g.add_argument("--model", default=None,
                   help="a model's MoE layer (flashmoe-tune models lists them); the flags "
                   "below override its fields")
    g.add_argument("--hidden", type=int, default=None,
                   help=f"hidden size H (multiple of 8) (default: {d['hidden']})")
    g.add_argument("--intermediate", type=int, default=None,
                   help=f"routed expert intermediate size I (multiple of 8) (default: "
                   f"{d['intermediate']})")
    g.add_argument("--experts", type=int, default=None,
                   help=f"routed experts E (divisible by P) (default: {d['experts']})")
    g.add_argument("--top-k", type=int, default=None,
                   help=f"experts per token k (1..E) (default: {d['top_k']})")
    g.add_argument("--shared-experts", type=int, default=None,
                   help="shared experts S (>= 0) (default: 0)")
    g.add_argument("--shared-intermediate", type=int, default=None,
                   help="intermediate size of each shared expert (default: --intermediate)")
    g.add_argument("--world-size", type=int, default=None,
                   help="expert-parallel ranks P (default: the job's ranks for run/tune, else 1)")
    g.add_argument("--tokens", type=token_counts, default=str(d["tokens"]),
                   help="tokens per rank T; tune also takes a sweep, e.g. "
                   "1,8,32,128,512,2048,8192 (one winner per count)")
    g.add_argument("--dtype", default=SUPPORTED_DTYPES[0],
                   help=f"activation/weight dtype (supported: {', '.join(SUPPORTED_DTYPES)})")
    g.add_argument("--capacity-factor", type=float, default=None,
                   help="drop tokens past ceil(c*T*k/E) per (rank, expert); default exact")
    r = p.add_argument_group("routing rule (docs/semantics.md; default plain softmax top-k)")
    r.add_argument("--normalize-topk", action=argparse.BooleanOptionalAction, default=None,
                   help="renormalise the top-k weights to sum to 1 (default on)")
    r.add_argument("--scoring", choices=SCORINGS, default=None,
                   help="softmax over all experts, or a sigmoid each (default softmax)")
    r.add_argument("--expert-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="a per-expert bias that only ranks (DeepSeek-V3; default off)")
    r.add_argument("--n-group", type=int, default=None,
                   help="expert groups of the group-limited top-k (default 1: none)")
    r.add_argument("--topk-group", type=int, default=None,
                   help="groups whose experts stay eligible (default 1)")
    r.add_argument("--routed-scaling", type=float, default=None,
                   help="factor on the routed weights (default 1.0)")
    r.add_argument("--shared-gate", action=argparse.BooleanOptionalAction, default=None,
                   help="sigmoid gate on the shared experts' output (Qwen2-MoE; default off)")


#: argparse dest -> MoEProblem field, for the flags a preset may set.
_FLAG_FIELDS = {"hidden": "hidden", "intermediate": "intermediate", "experts": "experts",
                "top_k": "top_k", "shared_experts": "shared_experts",
                "shared_intermediate": "shared_intermediate",
                "normalize_topk": "normalize_topk", "scoring": "scoring",
                "expert_bias": "expert_bias", "n_group": "n_group", "topk_group": "topk_group",
                "routed_scaling": "routed_scaling", "shared_gate": "shared_gate"}


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and ``--arch``: the subcommands that build one kernel (not tune/show)."""
    p.add_argument("--config", default=None,
                   help="kernel config as JSON or as its name (default: the heuristic)")
    p.add_argument("--arch", default=None,
                   help="target, e.g. sm_90 / sm_90a (default: this GPU's, else sm_90)")


def preset_from_args(a: argparse.Namespace):
    """The ``--model`` preset (``flashmoe_gen.presets.ModelPreset``), or None."""
    if getattr(a, "model", None) is None:
        return None
    from flashmoe_gen.presets import get_preset
    return get_preset(a.model)


def problem_from_args(a: argparse.Namespace, world_size: int | None = None,
                      tokens: int | None = None) -> MoEProblem:
    """The problem the flags name; ``world_size`` is the job's rank count, when known;
    ``tokens`` picks one count of a ``--tokens`` sweep (a command that takes one count
    refuses a list)."""
    if world_size is not None and a.world_size is not None and a.world_size != world_size:
        raise UsageError("--world-size", a.world_size, f"this job has {world_size} rank(s) "
                         "(--gpus): drop --world-size or make the two equal")
    for p in (world_size, a.world_size, getattr(a, "gpus", None)):
        if p is not None:  # an explicit 0 is refused by MoEProblem, never read as "unset"
            break
    else:
        p = 1
    counts = tuple(a.tokens) if isinstance(a.tokens, (tuple, list)) else (a.tokens,)
    if tokens is None:
        if len(counts) != 1:
            raise UsageError("--tokens", ",".join(map(str, counts)),
                             "this command takes one token count; a list (a sweep) is for "
                             "`flashmoe-tune tune`")
        tokens = counts[0]
    preset = preset_from_args(a)
    d = PROBLEM_DEFAULTS
    fields: dict = dict(hidden=d["hidden"], intermediate=d["intermediate"],
                        experts=d["experts"], top_k=d["top_k"])
    if preset is not None:
        fields.update(preset.fields)
    for dest, name in _FLAG_FIELDS.items():
        v = getattr(a, dest, None)
        if v is not None:
            fields[name] = v
    if fields.get("shared_experts") == 0:
        fields.pop("shared_intermediate", None)  # --shared-experts 0 drops a preset's width
    return MoEProblem(**fields, world_size=p, tokens_per_rank=tokens, dtype=a.dtype,
                      capacity_factor=a.capacity_factor)


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
    if problem.scoring != SCORINGS[0]:
        out += ["--scoring", problem.scoring]
    if problem.expert_bias:
        out.append("--expert-bias")
    if problem.n_group > 1:
        out += ["--n-group", str(problem.n_group), "--topk-group", str(problem.topk_group)]
    if problem.routed_scaling != 1.0:
        out += ["--routed-scaling", repr(float(problem.routed_scaling))]
    if problem.shared_gate:
        out.append("--shared-gate")
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
