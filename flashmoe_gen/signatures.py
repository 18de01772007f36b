"""Kernel signatures, declared once.

Each generated kernel's parameter list lives here and nowhere else: the templates print the
declarations from it (``KernelSignature.declaration``), the export prints its explicit
instantiations and host wrappers from it, and the runtime packs its launch arguments by name
(``KernelSignature.pack``), so a parameter added here reaches every caller or fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Parameter kinds -> (C++ type in a kernel declaration, how a launch passes the value).
#: CuPy passes a Python int as a 64-bit value, so pointers (device addresses or CuPy arrays)
#: and ``long long`` go as they are; ``int`` must be narrowed to ``numpy.int32``.
KINDS: dict[str, tuple[str, type | None]] = {
    "const elem*": ("const fmoe::elem_t* __restrict__", None),
    "elem*": ("fmoe::elem_t* __restrict__", None),
    "const int*": ("const int* __restrict__", None),
    "int*": ("int* __restrict__", None),
    "float*": ("float* __restrict__", None),
    "const float*": ("const float* __restrict__", None),
    "int": ("int", np.int32),
    "long long": ("long long", None),
    "const void*": ("const void* __restrict__", None),
    "u64*": ("unsigned long long* __restrict__", None),
    "const u64*": ("const unsigned long long* __restrict__", None),
    "u32*": ("unsigned int* __restrict__", None),
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
        """Launch arguments in order, each as its parameter needs it (``int`` narrowed to
        ``numpy.int32``; pointers as CuPy arrays or addresses, None for null).

        ``args`` maps every parameter name to its value; a missing or unknown name raises
        TypeError naming it.
        """
        try:
            return self.packer(**args)
        except TypeError as e:  # a missing or unknown name: say which kernel's parameters
            raise TypeError(f"kernel arguments {sorted(args)} do not match the parameters "
                            f"{list(self.names)}: {e}") from None

    @property
    def packer(self):
        """``packer(**args) -> tuple``, generated once per signature: it runs on every
        launch of the forward, so it does no more than build the tuple."""
        fn = self.__dict__.get("_packer")
        if fn is None:
            names = ", ".join(self.names)
            items = ", ".join(f"_i32({p.name})" if KINDS[p.kind][1] is np.int32 else
                              f"(0 if {p.name} is None else {p.name})" if p.is_pointer else
                              p.name for p in self.params)
            scope = {"_i32": np.int32}
            exec(f"def pack(*, {names}):\n    return ({items},)\n", scope)  # noqa: S102
            fn = scope["pack"]
            object.__setattr__(self, "_packer", fn)  # frozen: cached beside the fields
        return fn


def _sig(*pairs: tuple[str, str]) -> KernelSignature:
    return KernelSignature(tuple(Param(n, k) for n, k in pairs))


#: One warp per token: gate logits, scores, top-k (``bias``: the expert bias or null).
#: ``part``/``done``: where the hidden dimension is split over blocks (few tokens), the
#: partial logits and each token batch's count of finished slices (router_layout.router_grid).
ROUTER = _sig(("x", "const elem*"), ("wg", "const elem*"), ("bias", "const float*"),
              ("tokens", "int"), ("topk_idx", "int*"), ("topk_w", "float*"),
              ("part", "float*"), ("done", "u32*"))
#: One block per expert: positions in token order and this rank's counts.
POSITIONS = _sig(("topk_idx", "const int*"), ("tokens", "int"), ("pos", "int*"),
                 ("counts", "int*"))
#: Copy each (token, choice) into its slot row of the symmetric layout.
PERMUTE = _sig(("x", "const elem*"), ("topk_idx", "const int*"), ("pos", "const int*"),
               ("tokens", "int"), ("capacity", "int"), ("self_rank", "int"),
               ("row_off", "const int*"), ("layout", "elem*"))
#: Weighted un-permute plus the shared experts' output (gated by sigmoid(x . sgate_w) when
#: the problem has a shared gate; ``sgate_w`` null otherwise).
COMBINE = _sig(("topk_idx", "const int*"), ("topk_w", "const float*"), ("pos", "const int*"),
               ("tokens", "int"), ("capacity", "int"), ("row_off", "const int*"),
               ("layout", "const elem*"), ("shared_out", "const elem*"), ("x", "const elem*"),
               ("sgate_w", "const elem*"), ("out", "elem*"))
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
#: The persistent TMA kernel: GEMM's parameters plus ``tma``, the launch's tensor maps and
#: group count in global memory (``flashmoe_gen.tma.TmaLaunch``).
GEMM_TMA = KernelSignature((*GEMM.params, Param("tma", "const void*")))

#: Mode "graph": row offsets and this rank's drops from the exchanged counts, on the device.
SLOT_OFFSETS = _sig(("counts", "const int*"), ("world", "int"), ("capacity", "int"),
                    ("region", "const int*"), ("packed", "int"), ("self_rank", "int"),
                    ("row_off", "int*"), ("dropped", "int*"))

#: Transport "nvlink": the whole forward as one persistent kernel (templates/persistent.cu.j2).
#: ``layout``: this rank's symmetric heap (the layout first, then ``counts_off`` bytes in the
#: rows each source sent ``[P][E_local]``, then ``flags_off`` the dispatch and combine flags
#: ``[2][P]``); ``peers[d]``: rank d's heap opened here; ``state``: this rank's epoch, grid
#: barrier, task counter and dependency counters; ``status``: where a watchdog names a stall;
#: ``stats`` (null: off): per block, cycles in GEMM tiles and in the whole kernel (SM busy).
PERSISTENT = _sig(("x", "const elem*"), ("wg", "const elem*"), ("bias", "const float*"),
                  ("tokens", "int"), ("topk_idx", "int*"), ("topk_w", "float*"), ("pos", "int*"),
                  ("counts", "int*"), ("w1", "const elem*"), ("w3", "const elem*"),
                  ("w2", "const elem*"), ("sw1", "const elem*"), ("sw3", "const elem*"),
                  ("sw2", "const elem*"), ("sgate_w", "const elem*"), ("act", "elem*"),
                  ("shared_act", "elem*"), ("shared_out", "elem*"), ("out", "elem*"),
                  ("layout", "elem*"), ("peers", "const u64*"), ("counts_off", "long long"),
                  ("flags_off", "long long"), ("state", "u64*"), ("capacity", "int"),
                  ("self_rank", "int"), ("spin_limit", "long long"), ("status", "int*"),
                  ("stats", "u64*"), ("wmaps", "const void*"))

ALL = {"router": ROUTER, "positions": POSITIONS, "permute": PERMUTE, "combine": COMBINE,
       "slot_offsets": SLOT_OFFSETS, "gemm": GEMM, "gemm_tma": GEMM_TMA,
       "persistent": PERSISTENT}
