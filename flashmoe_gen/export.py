"""Export one problem + config as a single self-contained ``.cu`` file.

The file holds the device code exactly as ``render`` produces it, explicit instantiations of
the two expert GEMMs, a host launcher (``templates/export_host.cu.j2``: the launch sequence of
``runtime.FlashMoE.forward`` at world size 1) and optionally an MPI + NCCL harness
(``templates/export_main.cu.j2``: the expert-parallel exchange, timed). It compiles with
``nvcc`` alone; flashmoe_gen is not needed to build or run it.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import __version__
from .compile import target_arch, write_if_changed
from .config import GemmTile, KernelConfig, expert_chunks
from .problem import MoEProblem
from .render import (
    CPP_BOOL,
    MOVE_WARPS,
    POS_THREADS,
    GeneratedSource,
    render,
    render_template,
    to_template_vars,
)

#: How to build an exported file (also written into its header comment); see ``nvcc_hint``.
EXPORT_NVCC_HINT = (
    "library (host launcher only):  nvcc {arch_flags} -O3 -c file.cu\n"
    "harness (export_cu(..., with_main=True)):\n"
    "  nvcc {arch_flags} -O3 -std=c++17 -ccbin mpicxx file.cu -lnccl -o flash_moe\n"
    "  mpirun -np P ./flash_moe [tokens_per_rank] [iters]"
)


def nvcc_hint(config: KernelConfig, arch: str = "sm_90") -> str:
    """Build commands for an exported file (wgmma tiles need the sm_90a target)."""
    return EXPORT_NVCC_HINT.format(arch_flags=nvcc_arch_flags(config, arch))


def nvcc_arch_flags(config: KernelConfig, arch: str = "sm_90") -> str:
    """nvcc's target flags. An "a" target is spelled with -gencode: nvcc 13's -arch=sm_90a
    also emits compute_90 PTX, which cannot hold wgmma."""
    target = target_arch(config, arch)
    if target.endswith("a"):
        return f"-gencode arch=compute_{target[3:]},code={target}"
    return f"-arch={target}"


#: Dynamic shared memory a kernel may use without ``cudaFuncSetAttribute``.
DEFAULT_DYNAMIC_SMEM = 48 * 1024
#: Parameter types of ``fmoe::expert_gemm`` (templates/gemm.cu.j2), for the instantiations.
GEMM_PARAMS = ("const fmoe::elem_t*, long long, const fmoe::elem_t*, const fmoe::elem_t*, "
               "long long, fmoe::elem_t*, long long, const int*, int, int, int, int, "
               "int, long long, long long, int, int, const int*, const int*")


def _tile_vars(tile: GemmTile, kernel: str, b_operands: int) -> dict:
    smem = tile.smem_bytes(b_operands)
    return {"kernel": kernel, "bm": tile.bm, "bn": tile.bn, "threads": tile.threads,
            "smem": smem, "smem_optin": smem > DEFAULT_DYNAMIC_SMEM}


def export_vars(gen: GeneratedSource) -> dict:
    """Template variables of the host launcher and harness: every constant computed here."""
    p, cfg = gen.problem, gen.config
    h, i, w = p.hidden, p.intermediate, p.shared_width
    tv = to_template_vars(p, cfg)
    tv.update(
        has_shared=CPP_BOOL[bool(w)],
        use_shared_stream=CPP_BOOL[cfg.shared_stream and cfg.overlap],
        router_tokens_per_block=cfg.router_tokens_per_block,
        router_threads=32 * cfg.router_tokens_per_block,
        pos_threads=POS_THREADS,
        move_warps=MOVE_WARPS,
        move_threads=32 * MOVE_WARPS,
        block_m=cfg.block_m,
        fixed_capacity=p.fixed_capacity(cfg.block_m) or 0,
        packed_slots=CPP_BOOL[cfg.packed_slots],
        gu=_tile_vars(cfg.gate_up, gen.kernels.gate_up, 2),
        dn=_tile_vars(cfg.down, gen.kernels.down, 1),
        chunks=expert_chunks(p, cfg),
        gate_elems=h * p.experts,
        w13_elems=i * h,
        w2_elems=h * i,
        sw_elems=w * h,
        scale_h=repr(1 / math.sqrt(h)),
        scale_i=repr(1 / math.sqrt(i)),
        scale_si=repr(1 / math.sqrt(p.shared_intermediate or 1)),
        comm_streams=cfg.comm_streams,
        overlap=CPP_BOOL[cfg.overlap],
        tokens_per_rank=p.tokens_per_rank,
        flops_per_token=repr(float(p.flops(1))),
    )
    return tv


def _header(gen: GeneratedSource, with_main: bool) -> str:
    p, cfg = gen.problem, gen.config
    lines = [
        f"// FlashMoE layer exported by flashmoe_gen {__version__} "
        "(flashmoe_gen.export.export_cu): do not edit.",
        f"// problem: {p.name}",
        f"// problem json: {p.to_json()}",
        f"// config: {cfg.name}",
        f"// config json: {cfg.to_json()}",
        f"// generator version: {__version__}",
        f"// source hash: {gen.source_hash} (sha256 of the device code, first 16 hex digits)",
        f"// contents: device code, GEMM instantiations, host launcher"
        f"{', harness (main)' if with_main else ''}",
        "// build:",
        *(f"//   {line}" for line in nvcc_hint(cfg).splitlines()),
    ]
    if cfg.fuse_sources:
        lines.append("// note: fuse_sources is not mirrored by this host code: it computes the "
                     "peers' tokens peer by peer (same results, other timing)")
    return "\n".join(lines) + "\n\n"


def gemm_instantiations(gen: GeneratedSource) -> str:
    """Explicit instantiations of both expert GEMMs (the render's name expressions)."""
    lines = ["// ---- explicit instantiations of the expert GEMMs of this config ----"]
    lines += [f"template __global__ void {expr}({GEMM_PARAMS});"
              for expr in gen.kernels.name_expressions]
    return "\n".join(lines) + "\n"


def export_cu(problem: MoEProblem, config: KernelConfig | None = None,
              path: str | Path | None = None, *, with_main: bool = False) -> str:
    """One self-contained ``.cu`` for ``problem`` and ``config`` (None: the default config).

    Written atomically to ``path`` when given, and only if its text changed. With
    ``with_main`` the file also holds an MPI + NCCL benchmark ``main`` (see
    ``nvcc_hint``).
    """
    config = config or KernelConfig.default(problem)
    gen = render(problem, config)
    tv = export_vars(gen)
    parts = [_header(gen, with_main), gen.code, "\n", gemm_instantiations(gen), "\n",
             render_template("export_host.cu.j2", **tv)]
    if with_main:
        parts += ["\n", render_template("export_main.cu.j2", **tv)]
    text = "".join(parts)
    if path is not None:
        write_if_changed(Path(path), text)
    return text
