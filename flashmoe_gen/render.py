"""Problem + config -> CUDA source. Every C++ spelling is computed here, not in templates."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import jinja2

from . import __version__
from .config import PERSISTENT_THREADS, KernelConfig
from .config_nvlink import (
    PRODUCER_REGS,
    PRODUCER_THREADS,
    WORKER_REGS,
    producer_ring_b_elems,
    store_kind,
    tma_row_tasks,
)
from .problem import MoEProblem
from .router_layout import (
    ROUTER_ITEMS,
    router_lanes,
    router_mma_experts,
    router_mma_pass_warps,
    router_mtiles,
    router_part_floats,
    router_slices_max,
    router_split,
)
from .router_staged import STAGED_KC, staged_plan
from .signatures import ALL as SIGNATURES
from .splitk import SplitK
from .tiles import SWIZZLE_ALIGN, TMA_MAX_GROUPS, TMA_SPIN_CYCLES, GemmTile

#: C++ spellings per dtype (CUTLASS-style tag tables).
DTYPE_TAG = {"bf16": "__nv_bfloat16"}
DTYPE_MMA = {"bf16": "bf16"}
DTYPE_TO_F32 = {"bf16": "__bfloat162float"}
DTYPE_FROM_F32 = {"bf16": "__float2bfloat16"}
DTYPE_FROM_F32X2 = {"bf16": "__floats2bfloat162_rn"}
CPP_BOOL = {True: "true", False: "false"}

#: Threads of the positions scan and warps per block of the copy kernels (not tuned: they
#: move a few MB and are bound by memory, not by their block shape).
POS_THREADS = 256
MOVE_WARPS = 8
#: Consecutive tokens each thread of the positions scan takes per chunk (two barriers a
#: chunk of POS_THREADS x this many tokens).
POS_TOKENS_PER_THREAD = 8

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("flashmoe_gen.templates", "."),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


@dataclass(frozen=True)
class KernelNames:
    """Entry points of one generated module (C names and C++ name expressions)."""

    router: str = "moe_router"
    positions: str = "moe_positions"
    permute: str = "moe_permute"
    combine: str = "moe_combine"
    slot_offsets: str = "moe_slot_offsets"
    gate_up: str = ""
    down: str = ""
    persistent: str = ""  # transport "nvlink" only

    @property
    def name_expressions(self) -> tuple[str, ...]:
        return (self.gate_up, self.down)

    def all(self) -> tuple[str, ...]:
        names = (self.router, self.positions, self.permute, self.combine, self.slot_offsets,
                 self.gate_up, self.down)
        return names + ((self.persistent,) if self.persistent else ())


@dataclass(frozen=True)
class GeneratedSource:
    problem: MoEProblem
    config: KernelConfig
    code: str
    kernels: KernelNames
    files: dict[str, str] = field(default_factory=dict)

    @property
    def source_hash(self) -> str:
        return hashlib.sha256(self.code.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """File stem: problem and config names joined."""
        return f"{self.problem.name}__{self.config.name}"

    @property
    def device_name(self) -> str:
        """The code's own name: ``name`` with the token count at 0 (``device_problem``), the
        compile cache's file stem, so every token count of a family shares one cubin."""
        return f"{device_problem(self.problem).name}__{self.config.name}"


def gemm_expression(tile: GemmTile, gated: bool) -> str:
    """C++ name expression of one expert GEMM instantiation."""
    if tile.mma == "wgmma":
        return f"fmoe::expert_gemm_wg<{tile.bm}, {tile.bn}, {tile.stages}, {CPP_BOOL[gated]}>"
    if tile.mma == "tma":
        return f"fmoe::expert_gemm_tma<{tile.bm}, {tile.bn}, {tile.stages}, {CPP_BOOL[gated]}>"
    if tile.mma == "ws":
        args = [tile.bm, tile.bn, tile.bk, tile.warps_m, tile.stages]
        return f"fmoe::expert_gemm_ws<{', '.join(map(str, args))}, {CPP_BOOL[gated]}>"
    args = [tile.bm, tile.bn, tile.bk, tile.warps_m, tile.warps_n, tile.stages]
    return f"fmoe::expert_gemm<{', '.join(map(str, args))}, {CPP_BOOL[gated]}>"


def wgmma_asm(n: int, ab_type: str) -> str:
    """Inline-asm body of one ``wgmma.mma_async m64n{n}k16`` (A, B from shared memory).

    Operands: ``n / 2`` fp32 accumulators per thread, then the two matrix descriptors;
    scale-d is 1 (accumulate: the accumulators start at zero).
    """
    regs = n // 2
    acc = ", ".join(f"%{j}" for j in range(regs))
    outs = ", ".join(f'"+f"(d[{j}])' for j in range(regs))
    return (f'asm volatile("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab_type}.{ab_type} "\n'
            f'      "{{ {acc}}}, %{regs}, %{regs + 1}, 1, 1, 1, 0, 0;\\n"\n'
            f'      : {outs}\n      : "l"(desc_a), "l"(desc_b));')


def wgmma_ns(config: KernelConfig) -> list[int]:
    """The wgmma N each GEMM issues: its tile's BN, or for gate/up of BN <= 128 twice that
    (gate and up in one MMA, unless ``split_gated_mma``)."""
    gu, dn = config.gate_up, config.down
    ns = {2 * gu.bn if one_gated_mma(config) else gu.bn} if config.wgmma_tile(gu) else set()
    return sorted(ns | ({dn.bn} if config.wgmma_tile(dn) else set()))


def one_gated_mma(config: KernelConfig) -> bool:
    """Whether the gate/up tile computes gate and up in one wgmma of twice its BN
    (templates/gemm.cu.j2 ONE_GATED_MMA): a wgmma or tma tile whose doubled width is a
    valid N, unless ``split_gated_mma``."""
    gu = config.gate_up
    return config.wgmma_tile(gu) and 2 * gu.bn <= 256 and not config.split_gated_mma


def wgmma_variants(config: KernelConfig, ab_type: str) -> list[dict]:
    """One wrapper per distinct wgmma N of this config (the template defines each once)."""
    return [{"n": n, "regs": n // 2, "asm": wgmma_asm(n, ab_type)} for n in wgmma_ns(config)]


def cpp_float(v: float) -> str:
    """A C++ float literal of ``v`` (repr keeps every digit of the double; the compiler
    rounds it to float once)."""
    return f"{float(v)!r}f"


#: The persistent kernel's phase marks in its stats (after each phase, per block, the GPU's
#: global nanosecond timer): route, positions, dispatch (its barrier and flags), this
#: block's tasks, the tasks' barrier (every block's), the wait for every combine flag.
PERSISTENT_PHASES = ("route", "positions", "dispatch", "own_tasks", "all_tasks",
                     "combine_wait")
#: Stats words per block: GEMM cycles, all cycles (their ratio: SM busy), the block's start
#: (ns), the phase marks (ns), its end (ns) (word PERSISTENT_STAT_END); then the task loop's
#: clocks (PERSISTENT_TASK_CLOCKS: the TMA row tiles' cycles summed over the block's tiles
#: and their count, the cycles waiting on dependencies and flags). Times in ns, not cycles
#: over the nominal clock: under tensor-core load the SMs clock below it, and cycles /
#: ClockRate read ~10% short (E=64 T=16384 on 4 x H200: kernel 2015 "us" in a 2249 us
#: forward); the task loop's cycles convert at each block's own rate (its cycles over its
#: ns).
PERSISTENT_STAT_END = 3 + len(PERSISTENT_PHASES)
#: A TMA row tile (wt_gemm_tile, thread 0's clock): entry to its first k-tile landed
#: (barrier set-up, the ring's first loads), the k-loop, the epilogues (stores, and the
#: block barrier after the last).
PERSISTENT_ROW_CLOCKS = ("prologue", "loop", "epilogue")
#: ... kept apart for the gate/up GEMM's row tiles and the down GEMM's (their epilogues
#: differ: local and gated, or stored to the source rank).
PERSISTENT_ROW_GEMMS = ("gu", "dn")
#: The task loop's words after the block's end: per GEMM the row tiles' clocks and count,
#: then thread 0's cycles waiting on a dependency (a down tile's gate/up tiles), on sources'
#: dispatch flags and in grid barriers (after the route and positions phases: a block that
#: routed fast waits there for the slowest), then in the router's tensor-core logits and in
#: its tokens' scores and choices (the route phase grew with T: 150 us at E=64 T=16384).
PERSISTENT_ROUTE_CLOCKS = ("route_logits", "route_select")
PERSISTENT_TASK_CLOCKS = (*(f"{g}_{k}" for g in PERSISTENT_ROW_GEMMS
                            for k in (*PERSISTENT_ROW_CLOCKS, "row_tiles")),
                          "dep_wait", "flag_wait", "barrier_wait", *PERSISTENT_ROUTE_CLOCKS)
#: Then the task trace (flashmoe_gen.task_trace): per block its entry count, then a ring of
#: its last PERSISTENT_TRACE_TASKS task GEMMs, 2 words each (fetch and GEMM start; GEMM end
#: and descriptor: ns since the block's start, 32 bits each).
PERSISTENT_TRACE_AT = PERSISTENT_STAT_END + 1 + len(PERSISTENT_TASK_CLOCKS)
PERSISTENT_TRACE_TASKS = 64
PERSISTENT_STATS_WORDS = PERSISTENT_TRACE_AT + 1 + 2 * PERSISTENT_TRACE_TASKS


def device_problem(problem: MoEProblem) -> MoEProblem:
    """The problem as the device code sees it: ``tokens_per_rank`` never reaches the kernels
    (a call passes its own count; capacities are planned on the host), so it is 0 here and
    the code of two token counts is the same text (one cubin; a test checks it)."""
    return problem.replace(tokens_per_rank=0)


def to_template_vars(problem: MoEProblem, config: KernelConfig) -> dict:
    lanes_e, lanes_h, epl = router_lanes(problem.experts)
    split = router_split(problem.experts, config.router_tokens_per_block)
    mma_experts = router_mma_experts(problem, config.router_tokens_per_block)
    mtiles = router_mtiles(config.router_batches, config.router_tokens_per_block)
    staged = staged_plan(problem, config, mtiles, mma_experts, split is not None)
    dt = problem.dtype
    return {
        "version": __version__,
        "problem_name": device_problem(problem).name,
        "config_name": config.name,
        "elem_tag": DTYPE_TAG[dt],
        "elem_to_f32": DTYPE_TO_F32[dt],
        "f32_to_elem": DTYPE_FROM_F32[dt],
        "swizzle_align": SWIZZLE_ALIGN,
        "f32x2_to_elem2": DTYPE_FROM_F32X2[dt],
        "mma_ab_type": DTYPE_MMA[dt],
        "hidden": problem.hidden,
        "intermediate": problem.intermediate,
        "experts": problem.experts,
        "top_k": problem.top_k,
        "world_size": problem.world_size,
        "local_experts": problem.local_experts,
        "shared_width": problem.shared_width,
        "normalize_topk": CPP_BOOL[problem.normalize_topk],
        "router_sigmoid": CPP_BOOL[problem.scoring == "sigmoid"],
        "router_expert_bias": CPP_BOOL[problem.expert_bias],
        "router_n_group": problem.n_group,
        "router_topk_group": problem.topk_group,
        "router_group_size": problem.experts // problem.n_group,
        "routed_scaling": cpp_float(problem.routed_scaling),
        "shared_gate": CPP_BOOL[problem.shared_gate],
        "router_warps": config.router_tokens_per_block,
        "router_split_h": CPP_BOOL[split is not None],
        "router_items": ROUTER_ITEMS,
        "router_slices_max": router_slices_max(problem.hidden, problem.experts),
        "router_mma": CPP_BOOL[mma_experts > 0],
        "router_mma_experts": mma_experts,
        "router_mma_pass_warps": max(1, router_mma_pass_warps(
            problem, config.router_tokens_per_block)),
        # Several passes: the k-step loop rolled (unrolled, the standalone router spilled 64
        # bytes at E=256; rolled: 78 registers, no spills). One pass keeps the unrolled
        # loop measured in session 15.
        "router_mma_ks_serial": CPP_BOOL[mma_experts not in (0, problem.experts)],
        "router_logit_batches": config.router_batches,
        "router_mma_mtiles": mtiles,
        # the persistent router's logits through a shared-memory ring (0: split_logits)
        "router_staged_stages": staged.stages if staged else 0,
        "router_staged_unit": staged.unit if staged else 0,
        "router_staged_block": staged.block if staged else 0,
        "router_staged_kc": STAGED_KC,
        "router_staged_rotate": CPP_BOOL[bool(staged and staged.rotate)],
        # k steps unrolled: four for one m16 tile (E=64 T=16384 route 226 -> 217 us over
        # one); two m16 tiles keep as many loads in flight with two (and spilled 16 bytes
        # with shared experts at four)
        "router_mma_unroll": 4 // mtiles,
        **(split or {"router_vec_lanes_e": 0, "router_vec_per_lane": 0,
                     "router_token_batch": 0}),
        "router_lanes_e": lanes_e,
        "router_lanes_h": lanes_h,
        "router_experts_per_lane": epl,
        "pos_threads": POS_THREADS,
        "pos_tokens_per_thread": POS_TOKENS_PER_THREAD,
        "move_warps": MOVE_WARPS,
        "kernels": kernel_names(config),
        "signatures": {k: sig.declaration() for k, sig in SIGNATURES.items()},
        "signature_args": {k: ", ".join(sig.names) for k, sig in SIGNATURES.items()},
        "wgmma_variants": wgmma_variants(config, DTYPE_MMA[dt]),
        "wgmma_n_test": " || ".join(f"BN == {n}" for n in wgmma_ns(config)) or "false",
        "one_gated_mma": CPP_BOOL[one_gated_mma(config)],
        "tanh_silu": CPP_BOOL[config.tanh_silu],
        # The persistent TMA kernel's code: only in modules that launch it.
        "tma_template": "gemm_tma.cu.j2" if config.uses_tma else "",
        "tma_max_groups": TMA_MAX_GROUPS,
        "tma_spin_cycles": TMA_SPIN_CYCLES,
        # Transport "nvlink": the persistent kernel and the tiles it computes with.
        "persistent_template": "persistent.cu.j2" if config.transport == "nvlink" else "",
        "persistent_threads": PERSISTENT_THREADS,
        # ws_tma: at most one block per SM, or ptxas caps the kernel at 128 registers and
        # spills (NVRTC 13.0, DeepSeek-V3's tiles); 163 registers without the cap.
        "persistent_bounds": (f"fmoe::P_THREADS + {PRODUCER_THREADS}, 1"
                              if config.task_producer else
                              "fmoe::P_THREADS, 1" if config.ws_tma else "fmoe::P_THREADS"),
        **_producer_vars(config),
        "persistent_stats_words": PERSISTENT_STATS_WORDS,
        "persistent_trace_at": PERSISTENT_TRACE_AT,
        "persistent_trace_tasks": PERSISTENT_TRACE_TASKS,
        "persistent_stat_end": PERSISTENT_STAT_END,
        "persistent_task_clocks": len(PERSISTENT_TASK_CLOCKS),
        "persistent_dep_wait": PERSISTENT_TASK_CLOCKS.index("dep_wait"),
        "persistent_flag_wait": PERSISTENT_TASK_CLOCKS.index("flag_wait"),
        "persistent_barrier_wait": PERSISTENT_TASK_CLOCKS.index("barrier_wait"),
        "persistent_route_clk": PERSISTENT_TASK_CLOCKS.index("route_logits"),
        "persistent_tile_maps": persistent_tile_maps(problem, config),
        "shared_down_tma": CPP_BOOL[shared_down_tma(problem, config)],
        "persistent_gu_clk": PERSISTENT_TASK_CLOCKS.index("gu_prologue"),
        "persistent_dn_clk": PERSISTENT_TASK_CLOCKS.index("dn_prologue"),
        "persistent_st_dep": PERSISTENT_ST_DEP,
        "persistent_fused": CPP_BOOL[config.transport == "nvlink" and config.fuse_sources],
        "pgu": _task_gemm(config.gate_up, True, config),
        "pdn": _task_gemm(config.down, False, config),
        **_split_vars(problem, config),
        "solo_front": CPP_BOOL[config.dispatch_blocks == 1],
        "send_blocks": config.send_blocks,
        "task_tiles": config.task_tiles,
        "phased_tasks": CPP_BOOL[config.phased_tasks],
        "interleave_sources": CPP_BOOL[config.interleave_sources],
        "own_first": CPP_BOOL[config.own_first],
        "own_down_last": CPP_BOOL[config.own_down_last],
        "stream_down": CPP_BOOL[config.stream_down],
        "early_down": CPP_BOOL[config.early_down],
        "shared_front": CPP_BOOL[config.shared_front],
        "atomic_front": CPP_BOOL[config.atomic_front],
        "place_rows": place_rows(config),
    }


def place_rows(config: KernelConfig) -> int:
    """Rows a warp of the persistent kernel's dispatch copies at once (their loads in
    flight together): two, but one with mma.sync row tiles, where two spilled 16 bytes
    (NVRTC 13.0, H=I=2048 E=64 on 4 ranks). 2 x H200, E=64 T=16384, the senders' phase
    with one -> two rows: 16 blocks 310 -> 237 us, 32 blocks 237 -> 225 us (forwards within
    noise; bench/results/2026-11-28_gpu_checks_session29.md)."""
    sync_rows = config.gate_up.mma == "sync" and not config.fuse_sources
    return 1 if sync_rows else 2


#: The persistent kernel's state[] before its dependency counters: epoch, barrier count and
#: generation, task counter, blocks out of the task loop, send_blocks' two dispatch counters
#: (templates/persistent.cu.j2 ST_DEP).
PERSISTENT_ST_DEP = 7


#: The shared experts' down tiles as TMA row tasks (their A operand, shared_act, by its own
#: tensor map) where the routed down tiles are: the seed example's 4 shared down tiles (128
#: x 256, K = 2048) took 31.6 us each by cp.async, the routed ones 19.9 by TMA, and closed
#: the forward (one H200, the task trace: bench/results/2026-11-29_gpu_checks_session33.md).
#: Off: by cp.async as the shared gate/up tiles (bench/nvlink_sweep.py --no-shared-tma).
SHARED_DOWN_TMA = True


def shared_down_tma(problem: MoEProblem, config: KernelConfig) -> bool:
    """Whether the persistent kernel runs the shared experts' down tiles as TMA row tasks
    (SHARED_DOWN_TMA): shared experts, TMA row tasks on the down GEMM (wgmma row tiles with
    ``ws_tma``), not the producer's loop (its ring feeds the routed tasks alone)."""
    return (SHARED_DOWN_TMA and problem.shared_experts > 0 and tma_row_tasks(config)
            and config.down.mma == "wgmma" and not config.task_producer)


def persistent_tile_maps(problem: MoEProblem, config: KernelConfig) -> int:
    """How many tensor maps the persistent kernel reads with ``ws_tma`` (the order of
    persistent.tile_map_specs: w1, w3, w2, sw1, sw3, sw2, then with wgmma row tiles the
    heap's rows and act's, then with shared_down_tma shared_act's), 0 without."""
    if not config.ws_tma:
        return 0
    return 6 + 2 * (config.gate_up.mma == "wgmma") + shared_down_tma(problem, config)


def persistent_counter_words(problem: MoEProblem, config: KernelConfig | None = None) -> int:
    """The persistent kernel's counter words (templates/persistent.cu.j2 ST_WORDS): epoch,
    barrier, queue, exits, one dependency counter per (source, local expert), the shared
    experts', with ``atomic_front`` one slot counter per expert, with ``stream_down`` one
    per (source, local expert, gate/up n-tile)."""
    slots = problem.experts if config is not None and config.atomic_front else 0
    # stream_down: a counter per (source, local expert, gate/up n-tile)
    n_tiles = (problem.world_size * problem.local_experts
               * -(-problem.intermediate // config.gate_up.bn)
               if config is not None and config.stream_down else 0)
    return PERSISTENT_ST_DEP + problem.world_size * problem.local_experts + 1 + slots + n_tiles


def persistent_split_base(problem: MoEProblem, config: KernelConfig) -> int:
    """uint64 word of the persistent kernel's state where the split tiles' scratch starts:
    after its counters (ST_WORDS) and the router's partial logits at any token count."""
    return (persistent_counter_words(problem, config)
            + -(-router_part_floats(problem, config.router_tokens_per_block)[0] // 2))


def _split_vars(problem: MoEProblem, config: KernelConfig) -> dict[str, int]:
    """The split tiles' constants (flashmoe_gen.splitk; independent of tokens_per_rank)."""
    sk = SplitK.of(problem, config)
    return {"split_gu": sk.gu_splits, "split_dn": sk.dn_splits, "split_gu_area": sk.gu_area,
            "split_dn_area": sk.dn_area, "split_shared_words": sk.shared_words,
            "split_slot_words": sk.slot_words,
            "split_base": persistent_split_base(problem, config) if sk.splits else 0}


def _producer_vars(config: KernelConfig) -> dict[str, int | str]:
    """``task_producer``'s constants: its registers and the worker warpgroups' after
    setmaxnreg, its ring's stages and B elements per stage (the larger GEMM's)."""
    on = config.task_producer
    return {"task_producer": CPP_BOOL[on], "producer_threads": PRODUCER_THREADS,
            "producer_regs": PRODUCER_REGS, "worker_regs": WORKER_REGS,
            "ring_stages": config.gate_up.stages if on else 0,
            "ring_b_elems": producer_ring_b_elems(config) if on else 0}


def _task_gemm(tile: GemmTile, gated: bool, config: KernelConfig) -> dict[str, int | str]:
    """The persistent kernel's GEMM of one task: the weight-streaming device function (one
    n-tile of a group over all its rows; ``ws_tma``: weights by TMA boxes) or row tiles,
    mma.sync or warpgroup MMA (one n-tile of one row tile: ``row_tasks``; ``ws_tma``: a
    routed task's rows and weights by TMA boxes, ``tma_fn``, with the config's task tiles,
    deferred refills and results' stores (config_nvlink.store_kind; with TMA stores in the
    kernel, every TMA row task waits for and settles them); ``task_producer``: the workers'
    side, ``consume_fn``, fed from the producer's ring))."""
    tma, tma_fn, consume_fn, kind = config.ws_tma, "", "", "direct"
    if tile.mma == "ws":
        args = [tile.bm, tile.bn, tile.bk, tile.warps_m, tile.stages, CPP_BOOL[gated],
                CPP_BOOL[tma], *([CPP_BOOL[True]] if config.ws_wgmma else [])]
        fn = "ws_gemm"
    elif tile.mma == "wgmma":  # two warpgroups: one (n-tile, 128-row tile) per task
        args = [tile.bm, tile.bn, tile.stages, CPP_BOOL[gated]]
        fn = "wg_gemm_rows"
        if tma:  # routed row tasks read both operands by TMA (the shared experts' stay)
            kind = store_kind(config, gated)
            # TSTORE, BULK: with gate/up TMA stores every TMA row task settles them
            bulk = store_kind(config, True) == "tma"
            extra = [CPP_BOOL[kind == "tma"], CPP_BOOL[True]] if bulk else []
            tma_fn = "wt_gemm_tile<{}>".format(", ".join(map(str, [
                *args, config.task_tiles, CPP_BOOL[config.defer_refill],
                CPP_BOOL[kind == "staged"], *extra])))
            if config.task_producer:  # fed by the producer's ring (stages of ring_b_elems)
                consume_fn = "wt_consume_tile<{}>".format(", ".join(map(str, [
                    tile.bm, tile.bn, tile.stages, producer_ring_b_elems(config),
                    CPP_BOOL[gated], CPP_BOOL[kind == "staged"]])))
    else:
        args = [tile.bm, tile.bn, tile.bk, tile.warps_m, tile.warps_n, tile.stages,
                CPP_BOOL[gated]]
        fn = "sync_gemm_rows"
    return {"bn": tile.bn, "bm": tile.bm, "row_tasks": CPP_BOOL[tile.mma != "ws"],
            "fn": f"{fn}<{', '.join(map(str, args))}>", "tma_fn": tma_fn,
            "consume_fn": consume_fn, "staged": CPP_BOOL[kind == "staged"],
            "tma_store": CPP_BOOL[kind == "tma"]}


def kernel_names(config: KernelConfig) -> KernelNames:
    return KernelNames(gate_up=gemm_expression(config.gate_up, True),
                       down=gemm_expression(config.down, False),
                       persistent="moe_persistent" if config.transport == "nvlink" else "")


def render(problem: MoEProblem, config: KernelConfig, *, validate: bool = True,
           arch: str = "sm_90") -> GeneratedSource:
    """Render the device code of the layer for one problem and config."""
    if validate:
        config.validate(problem, arch)
    tv = to_template_vars(problem, config)
    code = _ENV.get_template("moe_module.cu.j2").render(**tv)
    return GeneratedSource(problem, config, code, tv["kernels"],
                           files={"moe_module.cu": code})


def template_hash() -> str:
    """Hash of every template file: part of a tuning environment's identity."""
    h = hashlib.sha256()
    for name in sorted(_ENV.list_templates(extensions=["j2"])):
        h.update(name.encode() + b"\0" + _ENV.loader.get_source(_ENV, name)[0].encode())
    return h.hexdigest()[:16]


def render_template(name: str, **variables) -> str:
    """Render another template of the package (export host code)."""
    return _ENV.get_template(name).render(**variables)
