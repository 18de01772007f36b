"""Symbolic integers and device addresses of the forward plan (``flashmoe_gen.plan``).

An expression is known only when a forward runs (the capacity, the source rank); it prints
as Python (the runtime compiles it once into a launcher) and as C++ (the export prints it),
so both evaluate the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass


class Expr:
    """An integer known when the forward runs; prints as Python and as C++."""

    def __add__(self, other) -> Expr:
        return _binary("+", self, lift(other))

    def __radd__(self, other) -> Expr:
        return _binary("+", lift(other), self)

    def __mul__(self, other) -> Expr:
        return _binary("*", self, lift(other))

    def __rmul__(self, other) -> Expr:
        return _binary("*", lift(other), self)

    def py(self) -> str:
        raise NotImplementedError

    def cpp(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.py()


@dataclass(frozen=True)
class Lit(Expr):
    value: int

    def py(self) -> str:
        return str(self.value)

    def cpp(self) -> str:
        # Literals past int32 would overflow C++'s int arithmetic: make them long long.
        return f"{self.value}LL" if abs(self.value) >= 2**31 else str(self.value)


@dataclass(frozen=True)
class Var(Expr):
    name: str

    def py(self) -> str:
        return self.name

    def cpp(self) -> str:
        return self.name  # the generated C++ declares it as long long


@dataclass(frozen=True)
class Bin(Expr):
    op: str
    a: Expr
    b: Expr

    def py(self) -> str:
        return f"({self.a.py()} {self.op} {self.b.py()})"

    def cpp(self) -> str:
        return f"({self.a.cpp()} {self.op} {self.b.cpp()})"


@dataclass(frozen=True)
class Call(Expr):
    """A host helper of the count tables (its C++ twin takes the layer first)."""

    fn: str
    args: tuple[Expr, ...] = ()

    def py(self) -> str:
        return f"{self.fn}({', '.join(a.py() for a in self.args)})"

    def cpp(self) -> str:
        return f"{self.fn}({', '.join(['L', *(a.cpp() for a in self.args)])})"


def lift(v) -> Expr:
    return v if isinstance(v, Expr) else Lit(int(v))


def _binary(op: str, a: Expr, b: Expr) -> Expr:
    """Fold constants and neutral elements so the printed code stays readable."""
    if isinstance(a, Lit) and isinstance(b, Lit):
        return Lit(a.value + b.value if op == "+" else a.value * b.value)
    if op == "+":
        if isinstance(a, Lit) and a.value == 0:
            return b
        if isinstance(b, Lit) and b.value == 0:
            return a
    if op == "*":
        for x, y in ((a, b), (b, a)):
            if isinstance(x, Lit) and x.value == 0:
                return Lit(0)
            if isinstance(x, Lit) and x.value == 1:
                return y
    return Bin(op, a, b)


@dataclass(frozen=True)
class Ptr:
    """A device address: ``buffer`` plus ``offset`` elements of that buffer's type.

    Buffers: ``layout`` (symmetric tensor), ``act`` (expert activations), ``w1``/``w3``/``w2``
    (this rank's experts), ``sw1``/``sw3``/``sw2`` (fused shared experts), ``x``,
    ``shared_act``/``shared_out`` (per token), ``counts``/``row_off`` (int32 ``[P][E]``),
    ``gathered``/``gcounts`` (``gather_experts``: each local expert's peer rows, int32
    ``[E_local]`` of them), ``null``.
    """

    buffer: str
    offset: Expr = Lit(0)

    def py(self) -> str:
        if self.buffer == "null":
            return "0"
        size = 4 if self.buffer in ("counts", "row_off", "gcounts") else 2
        return f"({self.buffer} + {size} * {self.offset.py()})"

    def cpp(self) -> str:
        if self.buffer == "null":
            return "nullptr"
        off = self.offset.cpp()
        return self.buffer if off == "0" else f"{self.buffer} + {off}"

    def __str__(self) -> str:
        return "nullptr" if self.buffer == "null" else f"{self.buffer}[{self.offset}]"


NULL = Ptr("null")
