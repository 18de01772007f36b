"""Export one problem + config as a single self-contained ``.cu`` file.

The file holds the device code exactly as ``render`` produces it, explicit instantiations of
the two expert GEMMs, a host launcher (``templates/export_host.cu.j2``) and optionally an
MPI + NCCL harness (``templates/export_main.cu.j2``, timed). The forward in either is
generated from the layer's ``ForwardPlan`` (``plan_cpp``), the plan ``runtime.FlashMoE``
executes, and the header embeds that plan as JSON. It compiles with ``nvcc`` alone;
flashmoe_gen is not needed to build or run it.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import __version__
from .build import CompiledLayer, build
from .compile import target_arch, write_if_changed
from .config import KernelConfig, expert_chunks
from .persistent import HeapLayout, state_words, tile_map_specs
from .plan import act_slots, fixed_slots
from .plan_cpp import call_args, forward_lines
from .problem import MoEProblem
from .render import (
    CPP_BOOL,
    MOVE_WARPS,
    POS_THREADS,
    render_template,
    to_template_vars,
)
from .router_layout import router_part_floats
from .signatures import (
    COMBINE,
    GEMM,
    GEMM_TMA,
    PERMUTE,
    PERSISTENT,
    POSITIONS,
    ROUTER,
    SLOT_OFFSETS,
)
from .tiles import GemmTile
from .tma import BOX_K, MAP_BYTES
from .watchdog import comm_timeout

#: How to build an exported file (also written into its header comment); see ``nvcc_hint``.
EXPORT_NVCC_HINT = (
    "library (host launcher only):  nvcc {arch_flags} -O3 -c file.cu\n"
    "harness (export_cu(..., with_main=True)):\n"
    "  nvcc {arch_flags} -O3 -std=c++17 -ccbin mpicxx file.cu -lnccl{libs} -o flash_moe\n"
    "  mpirun -np P ./flash_moe [tokens_per_rank] [iters]"
)


def nvcc_hint(config: KernelConfig, arch: str = "sm_90") -> str:
    """Build commands for an exported file (wgmma tiles need the sm_90a target)."""
    # tma tiles encode their tensor maps through the driver API.
    libs = " -lcuda" if config.encodes_tensor_maps else ""
    return EXPORT_NVCC_HINT.format(arch_flags=nvcc_arch_flags(config, arch), libs=libs)


def nvcc_arch_flags(config: KernelConfig, arch: str = "sm_90") -> str:
    """nvcc's target flags. An "a" target is spelled with -gencode: nvcc 13's -arch=sm_90a
    also emits compute_90 PTX, which cannot hold wgmma."""
    target = target_arch(config, arch)
    if target.endswith("a"):
        return f"-gencode arch=compute_{target[3:]},code={target}"
    return f"-arch={target}"


def grid_cpp(tile: GemmTile, prefix: str, comm_sms: int = 0) -> str:
    """The C++ launch grid of a GEMM wrapper (``GemmTile.grid`` spelled over the wrapper's
    ``N``, ``rows``, ``groups``, ``inner_groups`` and the tile constants ``{prefix}_BN/BM``;
    the tma kernel's leaves ``comm_sms`` SMs to NCCL)."""
    if tile.mma == "tma":
        return (f"dim3(fmoe_host::tma_grid(N, rows, groups, {prefix}_BM, {prefix}_BN, "
                f"{comm_sms}), 1, 1)")
    if tile.mma == "ws":
        return f"dim3(ceil_div(N, {prefix}_BN), 1, inner_groups > 0 ? inner_groups : groups)"
    return f"dim3(ceil_div(N, {prefix}_BN), ceil_div(rows, {prefix}_BM), groups)"


def _tile_vars(tile: GemmTile, kernel: str, b_operands: int, prefix: str,
               comm_sms: int = 0) -> dict:
    smem = tile.smem_bytes(b_operands)
    # The tma kernel takes one more argument: its launch's tensor maps (made on first use).
    b1 = "B1" if b_operands == 2 else "nullptr"
    prologue = ("void* tma = nullptr;\n  FMOE_CHECK(fmoe_host::tma_launch(A, B0, "
                f"{b1}, K, groups, {prefix}_BM, {prefix}_BN, &tma));\n  "
                if tile.mma == "tma" else "")
    return {"kernel": kernel, "bm": tile.bm, "bn": tile.bn, "threads": tile.threads,
            "smem": smem,
            "grid": grid_cpp(tile, prefix, comm_sms), "prologue": prologue,
            "extra_args": ", tma" if tile.mma == "tma" else ""}


def export_vars(layer: CompiledLayer) -> dict:
    """Template variables of the host launcher and harness: every constant computed here."""
    gen, p, cfg = layer.source, layer.problem, layer.config
    h, i, w = p.hidden, p.intermediate, p.shared_width
    fixed = fixed_slots(p, cfg)
    tv = to_template_vars(p, cfg)
    part_floats, part_batches = router_part_floats(p, cfg.router_tokens_per_block)
    tv.update(
        has_shared=CPP_BOOL[bool(w)],
        router_tokens_per_block=cfg.router_tokens_per_block,
        router_threads=32 * cfg.router_tokens_per_block,
        router_part_floats=max(1, part_floats),
        router_done=max(1, part_batches),
        pos_threads=POS_THREADS,
        move_warps=MOVE_WARPS,
        move_threads=32 * MOVE_WARPS,
        block_m=cfg.block_m,
        fixed_capacity=p.fixed_capacity(cfg.block_m) or 0,
        packed_slots=CPP_BOOL[cfg.packed_slots],
        gu=_tile_vars(cfg.gate_up, gen.kernels.gate_up, 2, "GU", cfg.comm_sms),
        dn=_tile_vars(cfg.down, gen.kernels.down, 1, "DN", cfg.comm_sms),
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
        fuse_sources=CPP_BOOL[cfg.fuse_sources],
        act_sources=act_slots(p, cfg),
        gather_experts=CPP_BOOL[cfg.gather_experts],
        graph_mode=CPP_BOOL[cfg.mode == "graph"],
        graph_capacity=fixed.capacity if cfg.mode == "graph" else 0,
        graph_region=", ".join(f"{first}, {row}" for first, row in fixed.region),
        slot_offsets_args=call_args(SLOT_OFFSETS, counts="L->counts", world="L->world",
                                    capacity="L->capacity", region="L->region",
                                    packed="PACKED_SLOTS", self_rank="L->rank",
                                    row_off="L->row_off", dropped="L->dropped_dev"),
        num_events=max(1, len(layer.plan.events)),
        event_names=", ".join(layer.plan.events) or "none",
        forward_lines=forward_lines(layer.plan),
        gemm_params=GEMM.host_declaration(),
        gemm_args=", ".join(GEMM.names),
        router_args=call_args(ROUTER, x="x", wg="L->gate", bias="L->expert_bias",
                              tokens="tokens", topk_idx="L->topk_idx", topk_w="L->topk_w",
                              part="L->router_part", done="L->router_done"),
        positions_args=call_args(POSITIONS, topk_idx="L->topk_idx", tokens="tokens",
                                 pos="L->pos", counts="L->counts + L->rank * EXPERTS"),
        permute_args=call_args(PERMUTE, x="x", topk_idx="L->topk_idx", pos="L->pos",
                               tokens="tokens", capacity="L->capacity", self_rank="L->rank",
                               row_off="L->row_off + L->rank * EXPERTS", layout="L->layout"),
        combine_args=call_args(COMBINE, topk_idx="L->topk_idx", topk_w="L->topk_w",
                               pos="L->pos", tokens="tokens", capacity="L->capacity",
                               row_off="L->row_off + L->rank * EXPERTS", layout="L->layout",
                               shared_out="HAS_SHARED ? L->shared_out : nullptr",
                               x="L->x", sgate_w="L->shared_gate", out="out"),
        bias_scale=repr(0.1 if p.scoring == "sigmoid" else 1 / p.experts),
        nvlink=CPP_BOOL[cfg.transport == "nvlink"],
        tma_export=cfg.encodes_tensor_maps,
        tma_map_bytes=MAP_BYTES,
        tma_box_k=BOX_K,
        nvl=_nvlink_vars(layer) if cfg.transport == "nvlink" else {},
    )
    return tv


def _nvlink_vars(layer: CompiledLayer) -> dict:
    """Constants and the launch of transport "nvlink"'s persistent kernel (the heap's
    offsets as flashmoe_gen.persistent lays them out)."""
    p, cfg = layer.problem, layer.config
    capacity = fixed_slots(p, cfg).capacity
    heap = HeapLayout.of(p, capacity)
    args = call_args(
        PERSISTENT, x="x", wg="L->gate", bias="L->expert_bias", tokens="tokens",
        topk_idx="L->topk_idx", topk_w="L->topk_w", pos="L->pos", counts="L->pcounts",
        w1="L->w1t", w3="L->w3t", w2="L->w2t", sw1="L->sw1t", sw3="L->sw3t", sw2="L->sw2t",
        sgate_w="L->shared_gate", act="L->pact", shared_act="L->shared_act",
        shared_out="L->shared_out", out="out", layout="reinterpret_cast<elem*>(L->heap)",
        peers="L->peers", counts_off="NVL_COUNTS_OFF", flags_off="NVL_FLAGS_OFF",
        state="L->pstate", capacity="NVL_CAPACITY", self_rank="L->rank",
        spin_limit="L->spin_limit", status="L->status_host", stats="nullptr",
        wmaps="L->wmaps" if cfg.ws_tma else "nullptr")
    return {"capacity": capacity, "threads": cfg.persistent_threads, "smem": cfg.persistent_smem(),
            "blocks_per_sm": cfg.blocks_per_sm,
            "heap_bytes": heap.nbytes, "counts_off": heap.counts_off,
            "flags_off": heap.flags_off, "state_words": state_words(p, cfg),
            "timeout_s": repr(float(comm_timeout())), "kernel": layer.kernels.persistent,
            "args": args, "wmaps": _tile_maps_cpp(p, cfg, capacity) if cfg.ws_tma else []}


def _tile_maps_cpp(p: MoEProblem, cfg: KernelConfig, capacity: int) -> list[dict]:
    """``ws_tma``: persistent.tile_map_specs as the harness spells them (its weights are
    the N x K copies ``L->w1t`` ...; its heap and act buffers ``L->heap``, ``L->pact``, its
    shared experts' activations ``L->shared_act``)."""
    where = {"heap": "reinterpret_cast<elem*>(L->heap)", "act": "L->pact",
             "shared_act": "L->shared_act"}
    return [{"ptr": where.get(name, f"L->{name}t"), "rows": f"{rows}ull", "k": k, "box": box}
            for name, rows, k, box in tile_map_specs(p, cfg, capacity)]


def _header(layer: CompiledLayer, with_main: bool) -> str:
    gen, p, cfg = layer.source, layer.problem, layer.config
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
    lines.append(f"// plan: {layer.plan.to_json()}")
    text = "\n".join(lines) + "\n\n"
    if target_arch(cfg, "sm_90").endswith("a"):  # a wgmma tile: only the sm_90a target has it
        text += ("#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)\n"
                 f'#error "this layer uses wgmma tiles: build with {nvcc_arch_flags(cfg)}"\n'
                 "#endif\n\n")
    return text


def _signature(tile: GemmTile):
    return GEMM_TMA if tile.mma == "tma" else GEMM


def gemm_instantiations(layer: CompiledLayer) -> str:
    """Explicit instantiations of both expert GEMMs (the render's name expressions)."""
    lines = ["// ---- explicit instantiations of the expert GEMMs of this config ----"]
    lines += [f"template __global__ void {expr}({sig.types()});"
              for expr, sig in zip(layer.kernels.name_expressions,
                                   (_signature(layer.config.gate_up),
                                    _signature(layer.config.down)), strict=True)]
    return "\n".join(lines) + "\n"


def export_cu(problem: MoEProblem, config: KernelConfig | None = None,
              path: str | Path | None = None, *, with_main: bool = False) -> str:
    """One self-contained ``.cu`` for ``problem`` and ``config`` (None: the default config).

    Written atomically to ``path`` when given, and only if its text changed. With
    ``with_main`` the file also holds an MPI + NCCL benchmark ``main`` (see
    ``nvcc_hint``).
    """
    layer = build(problem, config)  # render and plan only: NVRTC runs on first use
    tv = export_vars(layer)
    parts = [_header(layer, with_main), layer.source.code, "\n", gemm_instantiations(layer),
             "\n", render_template("export_host.cu.j2", **tv)]
    if with_main:
        parts += ["\n", render_template("export_main.cu.j2", **tv)]
    text = "".join(parts)
    if path is not None:
        write_if_changed(Path(path), text)
    return text
