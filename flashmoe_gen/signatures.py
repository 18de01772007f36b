"""Kernel signatures, declared once.

Each generated kernel's parameter list lives here and nowhere else: the templates print the
declarations from it (``KernelSignature.declaration``), the export prints its explicit
instantiations and host wrappers from it, and the runtime packs its launch arguments by name
(``KernelSignature.pack``), so a parameter added here reaches every caller or fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Parameter kinds -> (C++ type in a kernel declaration, NumPy type a launch passes).
#: Pointers travel as 64-bit integers (device addresses); ``elem`` is the layer's dtype.
KINDS: dict[str, tuple[str, type]] = {
    "const elem*": ("const fmoe::elem_t* __restrict__", np.int64),
    "elem*": ("fmoe::elem_t* __restrict__", np.int64),
    "const int*": ("const int* __restrict__", np.int64),
    "int*": ("int* __restrict__", np.int64),
    "float*": ("float* __restrict__", np.int64),
    "const float*": ("const float* __restrict__", np.int64),
    "int": ("int", np.int32),
    "long long": ("long long", np.int64),
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str

    @property
    def is_pointer(self) -> bool:
        return self.kind.endswith("*")

    def cpp_type(self, restrict: bool = True) -> str:
        t = KINDS[self.kind][0]
        return t if restrict else t.replace(" __restrict__", "")


@dataclass(frozen=True)
class KernelSignature:
    """The parameters of one kernel, in order."""

    params: tuple[Param, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def declaration(self) -> str:
        """Parameter list for the kernel's definition in a template."""
        return ", ".join(f"{p.cpp_type()} {p.name}" for p in self.params)

    def types(self) -> str:
        """Parameter types only (explicit template instantiations)."""
        return ", ".join(p.cpp_type(restrict=False) for p in self.params)

    def host_declaration(self) -> str:
        """Parameter list of a host wrapper that forwards every argument."""
        return ", ".join(f"{p.cpp_type(restrict=False)} {p.name}" for p in self.params)

    def pack(self, args: dict) -> tuple:
        """Launch arguments in order, each as the NumPy type its parameter needs.

        ``args`` maps every parameter name to an int (pointers: a device address or 0) or a
        CuPy array (a pointer parameter); a missing or unknown name raises KeyError.
        """
        if len(args) != len(self.params):
            extra = set(args) - set(self.names)
            missing = set(self.names) - set(args)
            raise KeyError(f"kernel arguments: missing {sorted(missing)}, unknown {sorted(extra)}")
        out = []
        for p in self.params:
            v = args[p.name]
            if p.is_pointer and hasattr(v, "data"):  # a CuPy array
                v = v.data.ptr
            out.append(KINDS[p.kind][1](0 if v is None else v))
        return tuple(out)


def _sig(*pairs: tuple[str, str]) -> KernelSignature:
    return KernelSignature(tuple(Param(n, k) for n, k in pairs))


#: One warp per token: gate logits, softmax, top-k.
ROUTER = _sig(("x", "const elem*"), ("wg", "const elem*"), ("tokens", "int"),
              ("topk_idx", "int*"), ("topk_w", "float*"))
#: One block per expert: positions in token order and this rank's counts.
POSITIONS = _sig(("topk_idx", "const int*"), ("tokens", "int"), ("pos", "int*"),
                 ("counts", "int*"))
#: Copy each (token, choice) into its slot row of the symmetric layout.
PERMUTE = _sig(("x", "const elem*"), ("topk_idx", "const int*"), ("pos", "const int*"),
               ("tokens", "int"), ("capacity", "int"), ("self_rank", "int"),
               ("row_off", "const int*"), ("layout", "elem*"))
#: Weighted un-permute plus the shared experts' output.
COMBINE = _sig(("topk_idx", "const int*"), ("topk_w", "const float*"), ("pos", "const int*"),
               ("tokens", "int"), ("capacity", "int"), ("row_off", "const int*"),
               ("layout", "const elem*"), ("shared_out", "const elem*"), ("out", "elem*"))
#: Both expert GEMMs (mma.sync and wgmma tiles): grouped C[g] = A[g] x B[g]^T, gated or not.
#: Group g of outer source o reads rows ``row_off[o * counts_outer_stride + g]`` (or
#: ``g * group_stride``) and ``min(counts[...], count_cap)`` rows (or ``rows_fixed``).
GEMM = _sig(("A", "const elem*"), ("a_group_stride", "long long"), ("B0", "const elem*"),
            ("B1", "const elem*"), ("b_group_stride", "long long"), ("C", "elem*"),
            ("c_group_stride", "long long"), ("counts", "const int*"), ("count_cap", "int"),
            ("rows_fixed", "int"), ("N", "int"), ("K", "int"), ("inner_groups", "int"),
            ("a_outer_stride", "long long"), ("c_outer_stride", "long long"),
            ("counts_outer_stride", "int"), ("skip_outer", "int"),
            ("a_row_off", "const int*"), ("c_row_off", "const int*"))

ALL = {"router": ROUTER, "positions": POSITIONS, "permute": PERMUTE, "combine": COMBINE,
       "gemm": GEMM}
