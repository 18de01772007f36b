"""The MoE problem: every shape that specialises the generated code."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields

from .errors import ProblemError

#: dtypes the templates can emit. The C++ spelling lives in ``render.DTYPE_TAG``.
SUPPORTED_DTYPES = ("bf16",)
#: Bytes per element of every supported dtype (buffer, weight and shared-memory sizes).
ELEM_BYTES = 2
#: Hidden and intermediate sizes must be multiples of this (16-byte vectors of bf16).
VECTOR_WIDTH = 8
#: Smallest hidden/intermediate size: one 16-wide tensor-core tile.
MIN_WIDTH = 16
#: Upper bounds: every size the templates emit stays a 32-bit ``int`` constant (HIDDEN,
#: SHARED_WIDTH, FIXED_CAPACITY …) and every buffer's element count (experts x rows x
#: width, weights experts x H x I) stays far inside int64.
MAX_WIDTH = 1 << 20        # hidden, intermediate, shared_intermediate
MAX_EXPERTS = 1 << 16      # experts (world_size divides it), shared_experts
MAX_TOKENS = 1 << 24       # tokens_per_rank, and the rows of a fixed capacity
#: The fields a problem needs; the rest have defaults.
REQUIRED_FIELDS = ("hidden", "intermediate", "experts", "top_k")
#: Routing scores (docs/semantics.md, Routing): softmax over all experts or a sigmoid each.
SCORINGS = ("softmax", "sigmoid")
#: Most expert groups of a group-limited top-k: the router keeps one lane per group.
MAX_GROUPS = 32


@dataclass(frozen=True)
class MoEProblem:
    """One MoE layer forward on ``world_size`` ranks (see docs/semantics.md).

    ``tokens_per_rank`` is the nominal token count a rank sees per call: it fixes the
    capacity when ``capacity_factor`` is set and is the tuning key; a call may pass any
    other count (including 0).
    """

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    shared_experts: int = 0
    shared_intermediate: int | None = None
    world_size: int = 1
    tokens_per_rank: int = 256
    dtype: str = "bf16"
    capacity_factor: float | None = None
    normalize_topk: bool = True
    # Routing rule (docs/semantics.md, Routing); the defaults are plain softmax top-k.
    scoring: str = "softmax"
    expert_bias: bool = False       # DeepSeek-V3 e_score_correction_bias: choice only
    n_group: int = 1                # group-limited top-k: experts in n_group groups ...
    topk_group: int = 1             # ... of which the best topk_group are eligible
    routed_scaling: float = 1.0     # multiplies the final routed weights
    shared_gate: bool = False       # Qwen2-MoE: shared output x sigmoid(x . w_shared_gate)

    def __post_init__(self) -> None:
        if self.shared_experts and self.shared_intermediate is None:
            # DeepSeek convention: shared experts are as wide as routed ones unless told.
            object.__setattr__(self, "shared_intermediate", self.intermediate)
        if not self.shared_experts:
            object.__setattr__(self, "shared_intermediate", None)
        self.validate()

    # -- validation -------------------------------------------------------------------
    def validate(self) -> None:
        for f in ("hidden", "intermediate", "experts", "top_k", "world_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ProblemError(f, v, "must be a positive integer")
        for f in ("shared_experts", "tokens_per_rank"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ProblemError(f, v, "must be a non-negative integer")
        for f, limit, name in (("hidden", MAX_WIDTH, "MAX_WIDTH"),
                               ("intermediate", MAX_WIDTH, "MAX_WIDTH"),
                               ("experts", MAX_EXPERTS, "MAX_EXPERTS"),
                               ("shared_experts", MAX_EXPERTS, "MAX_EXPERTS"),
                               ("tokens_per_rank", MAX_TOKENS, "MAX_TOKENS")):
            if getattr(self, f) > limit:
                raise ProblemError(f, getattr(self, f), f"must be at most {limit} "
                                   f"(flashmoe_gen.problem.{name} = 2**{limit.bit_length() - 1}:"
                                   " sizes must fit the kernels' 32-bit ints)")
        for f in ("hidden", "intermediate"):
            v = getattr(self, f)
            if v < MIN_WIDTH:
                raise ProblemError(f, v, f"must be at least {MIN_WIDTH} (one tensor-core tile)")
            if v % VECTOR_WIDTH:
                lo = v // VECTOR_WIDTH * VECTOR_WIDTH
                raise ProblemError(
                    f, v, f"must be a multiple of the vector width {VECTOR_WIDTH} "
                    f"(e.g. {max(lo, VECTOR_WIDTH)} or {lo + VECTOR_WIDTH})")
        if self.shared_experts:
            si = self.shared_intermediate
            if not isinstance(si, int) or isinstance(si, bool) or si < MIN_WIDTH \
                    or si % VECTOR_WIDTH or si > MAX_WIDTH:
                raise ProblemError("shared_intermediate", si,
                                   f"must be a multiple of {VECTOR_WIDTH}, at least {MIN_WIDTH} "
                                   f"and at most {MAX_WIDTH} (MAX_WIDTH)")
            if self.shared_width > MAX_WIDTH:
                raise ProblemError("shared_experts", self.shared_experts,
                                   f"shared_experts x shared_intermediate = {self.shared_width}"
                                   f" exceeds MAX_WIDTH={MAX_WIDTH} (one fused GEMM width)")
        if self.top_k > self.experts:
            raise ProblemError("top_k", self.top_k,
                               f"must be between 1 and experts={self.experts}")
        if self.experts % self.world_size:
            divisors = [p for p in range(1, self.experts + 1) if self.experts % p == 0]
            raise ProblemError(
                "experts", self.experts,
                f"must be divisible by world_size={self.world_size} "
                f"(world sizes that divide it: {divisors})")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ProblemError("dtype", self.dtype, f"supported: {', '.join(SUPPORTED_DTYPES)}")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0 \
                    or not math.isfinite(cf):
                raise ProblemError("capacity_factor", cf,
                                   "must be None (exact, no drops) or a finite number > 0")
            rows = cf * self.tokens_per_rank * self.top_k / self.experts
            if not rows <= MAX_TOKENS:  # also catches an overflow to inf
                raise ProblemError(
                    "capacity_factor", cf,
                    f"gives {rows:.3g} rows per (rank, expert), more than "
                    f"MAX_TOKENS={MAX_TOKENS}; "
                    f"a rank never sends an expert more than tokens_per_rank rows, so "
                    f"{self.experts / self.top_k:g} (experts/top_k) already drops nothing")
        if not isinstance(self.normalize_topk, bool):
            raise ProblemError("normalize_topk", self.normalize_topk, "must be a bool")
        self._validate_routing()

    def _validate_routing(self) -> None:
        if self.scoring not in SCORINGS:
            raise ProblemError("scoring", self.scoring, f"supported: {', '.join(SCORINGS)}")
        for f in ("expert_bias", "shared_gate"):
            if not isinstance(getattr(self, f), bool):
                raise ProblemError(f, getattr(self, f), "must be a bool")
        for f in ("n_group", "topk_group"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ProblemError(f, v, "must be a positive integer")
        e, ng = self.experts, self.n_group
        if ng > 1:
            if ng > MAX_GROUPS:
                raise ProblemError("n_group", ng, f"must be at most {MAX_GROUPS} "
                                   "(flashmoe_gen.problem.MAX_GROUPS: one router lane per group)")
            if e % ng or e // ng < 2:
                divisors = [g for g in range(2, min(e // 2, MAX_GROUPS) + 1) if e % g == 0]
                raise ProblemError("n_group", ng,
                                   f"must divide experts={e} into groups of at least 2 experts "
                                   f"(a group scores by its top-2); valid: 1 (no groups) or "
                                   f"{divisors}")
        if self.topk_group > ng:
            raise ProblemError("topk_group", self.topk_group,
                               f"must be between 1 and n_group={ng}")
        eligible = self.topk_group * (e // ng)
        if self.top_k > eligible:
            raise ProblemError("top_k", self.top_k,
                               f"must be at most topk_group x experts/n_group = "
                               f"{self.topk_group} x {e // ng} = {eligible} (the experts of the "
                               "chosen groups)")
        rs = self.routed_scaling
        if isinstance(rs, bool) or not isinstance(rs, (int, float)) or not math.isfinite(rs) \
                or not rs > 0:
            raise ProblemError("routed_scaling", rs, "must be a finite number > 0 (1.0: none)")
        if self.shared_gate and not self.shared_experts:
            raise ProblemError("shared_gate", self.shared_gate,
                               "needs shared_experts >= 1 (it gates the shared experts' output)")

    @property
    def default_routing(self) -> bool:
        """True for plain softmax top-k (no bias, groups, scaling or shared gate)."""
        return (self.scoring, self.expert_bias, self.n_group, self.routed_scaling,
                self.shared_gate) == ("softmax", False, 1, 1.0, False)

    # -- derived sizes ----------------------------------------------------------------
    @property
    def local_experts(self) -> int:
        return self.experts // self.world_size

    @property
    def shared_width(self) -> int:
        """Intermediate width of all shared experts side by side (they sum, so they fuse)."""
        return self.shared_experts * (self.shared_intermediate or 0)

    def fixed_capacity(self, tile_m: int) -> int | None:
        """Capacity per (source rank, expert) when ``capacity_factor`` is set, else None."""
        if self.capacity_factor is None:
            return None
        raw = math.ceil(self.capacity_factor * self.tokens_per_rank * self.top_k / self.experts)
        return round_up(max(raw, 1), tile_m)

    def flops(self, tokens: int | None = None) -> int:
        """Useful FLOPs of one forward on one rank (router + routed + shared experts)."""
        t = self.tokens_per_rank if tokens is None else tokens
        routed = t * self.top_k * 3 * 2 * self.hidden * self.intermediate
        shared = t * 3 * 2 * self.hidden * self.shared_width
        return 2 * t * self.hidden * self.experts + routed + shared

    # -- naming and serialisation ------------------------------------------------------
    @property
    def name(self) -> str:
        """Stable readable key, e.g. ``moe_h2048_i1408_e64_k6_s2x1408_p2_t512_bf16``."""
        parts = [f"moe_h{self.hidden}", f"i{self.intermediate}", f"e{self.experts}",
                 f"k{self.top_k}"]
        if self.shared_experts:
            parts.append(f"s{self.shared_experts}x{self.shared_intermediate}")
        parts += [f"p{self.world_size}", f"t{self.tokens_per_rank}", self.dtype]
        if self.capacity_factor is not None:
            # repr keeps every digit: two factors that differ give two names.
            parts.append(f"cf{float(self.capacity_factor)!r}")
        if not self.normalize_topk:
            parts.append("nonorm")
        # Routing rule parts (docs/semantics.md); absent for the default rule.
        if self.scoring == "sigmoid":
            parts.append("sig")
        if self.expert_bias:
            parts.append("bias")
        if self.n_group > 1:
            parts.append(f"grp{self.topk_group}of{self.n_group}")
        if self.routed_scaling != 1.0:
            parts.append(f"rs{float(self.routed_scaling)!r}")
        if self.shared_gate:
            parts.append("sgate")
        return "_".join(parts)

    @classmethod
    def from_name(cls, name: str) -> MoEProblem:
        """The problem a ``name`` spells (``from_name(p.name) == p``)."""
        if not isinstance(name, str):
            raise ProblemError("name", name, "expected a problem name such as "
                               "moe_h2048_i1408_e64_k6_s2x1408_p2_t512_bf16")
        m = _NAME_RE.fullmatch(name)
        if m is None:
            raise ProblemError("name", name, "not a problem name: expected "
                               "moe_h<H>_i<I>_e<E>_k<k>[_s<S>x<Is>]_p<P>_t<T>_<dtype>[_cf<c>]"
                               "[_nonorm][_sig][_bias][_grp<g>of<n>][_rs<r>][_sgate]")
        g = m.groupdict()
        d: dict = {f: int(g[k]) for f, k in (("hidden", "h"), ("intermediate", "i"),
                                             ("experts", "e"), ("top_k", "k"),
                                             ("world_size", "p"), ("tokens_per_rank", "t"))}
        d["dtype"] = g["dtype"]
        if g["s"]:
            d["shared_experts"], d["shared_intermediate"] = int(g["s"]), int(g["si"])
        if g["cf"]:
            d["capacity_factor"] = float(g["cf"])
        d["normalize_topk"] = not g["nonorm"]
        d["scoring"] = "sigmoid" if g["sig"] else "softmax"
        d["expert_bias"] = bool(g["bias"])
        if g["ng"]:
            d["topk_group"], d["n_group"] = int(g["tg"]), int(g["ng"])
        if g["rs"]:
            d["routed_scaling"] = float(g["rs"])
        d["shared_gate"] = bool(g["sgate"])
        p = cls.from_dict(d)
        if p.name != name:  # e.g. a spelling the name never produces (cf1 for cf1.0)
            raise ProblemError("name", name, f"not in canonical form; did you mean {p.name}?")
        return p

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> MoEProblem:
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict):
            raise ProblemError("problem", d, f"expected a dict of fields {sorted(known)}")
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ProblemError(str(unknown[0]), d[unknown[0]],
                               f"unknown field; known fields: {sorted(known)}")
        missing = [f for f in REQUIRED_FIELDS if f not in d]
        if missing:
            raise ProblemError(missing[0], None, f"required field missing (missing: "
                               f"{', '.join(missing)}; required: {', '.join(REQUIRED_FIELDS)})")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> MoEProblem:
        if not isinstance(s, (str, bytes)):
            raise ProblemError("json", s, "expected JSON text (str)")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ProblemError("json", s[:80], f"not valid JSON ({e})") from None
        return cls.from_dict(d)

    def replace(self, **changes) -> MoEProblem:
        d = self.to_dict()
        d.update(changes)
        return MoEProblem.from_dict(d)


_FLOAT = r"[0-9][0-9.e+-]*"
_NAME_RE = re.compile(
    r"moe_h(?P<h>\d+)_i(?P<i>\d+)_e(?P<e>\d+)_k(?P<k>\d+)(?:_s(?P<s>\d+)x(?P<si>\d+))?"
    r"_p(?P<p>\d+)_t(?P<t>\d+)_(?P<dtype>[a-z0-9]+)(?:_cf(?P<cf>" + _FLOAT + r"))?"
    r"(?P<nonorm>_nonorm)?(?P<sig>_sig)?(?P<bias>_bias)?(?:_grp(?P<tg>\d+)of(?P<ng>\d+))?"
    r"(?:_rs(?P<rs>" + _FLOAT + r"))?(?P<sgate>_sgate)?")


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
