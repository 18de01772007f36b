"""Transport "nvlink"'s knobs: the persistent kernel's value sets and the checks
``KernelConfig.validate`` runs on them (each refusal a ConfigError saying what to use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .arch import DeviceLimits
from .errors import ConfigError
from .problem import MoEProblem
from .router_layout import ROUTER_MAX_MTILES, router_pairs_fit
from .tiles import SWIZZLE_ALIGN, GemmTile

if TYPE_CHECKING:
    from .config import KernelConfig

#: The persistent kernel's block (router, positions, combine and its GEMM tiles share it).
PERSISTENT_THREADS = 256
#: With ``task_producer`` its block has one more warpgroup, which only claims tasks and
#: issues their TMA loads (setmaxnreg moves registers a warpgroup at a time): the 384
#: threads' launch allocation of 168 registers each becomes 40 for the producer and 232
#: for the two MMA warpgroups (128 x 40 + 256 x 232 = 384 x 168).
PRODUCER_THREADS = 128
PRODUCER_REGS, WORKER_REGS = 40, 232
#: The schedule it runs, field -> value: one block of PERSISTENT_THREADS routes a token per
#: warp; no chunks, streams or packed slots (rows are stored straight into expert slots).
PERSISTENT_SCHEDULE = {"router_tokens_per_block": PERSISTENT_THREADS // 32,
                       "chunks_per_peer": 1, "comm_streams": 1, "packed_slots": False}
#: Its blocks per SM ("processors"): 0 = as many as fit (the occupancy); fewer cut the cost
#: of its grid barriers and task queue where tiles are small.
BLOCKS_PER_SM_CHOICES = (0, 1, 2, 4)
#: K splits of its fused weight-streaming tasks (``gu_splits``, ``dn_splits``): a tile's K
#: range over that many blocks, fp32 partials summed in a fixed order by the last to finish.
#: One block streams only ~27 GB/s (2 x H200, seed T=1: 768 KB of gate/up + down tile on
#: the critical path took 28 us, whatever the pipeline depth), so at decode, where tiles are
#: fewer than SMs, more blocks per tile shorten the critical path.
K_SPLIT_CHOICES = (1, 2, 4, 8)
#: Blocks that route, place and dispatch a call's tokens (``dispatch_blocks``): 1 = one
#: block while the others start on the shared experts (where the tokens fit one router
#: batch and one block reads the gate weights whole; else as 0), 0 = every block, with a
#: grid barrier after each phase.
DISPATCH_BLOCK_CHOICES = (1, 0)
#: Blocks that store the peers' rows over NVLink (``send_blocks``, several ranks, per-source
#: tasks): 0 = every block, then a grid barrier before any task; N = every block first
#: places its share of this rank's own rows (the last raises this rank's own dispatch flag),
#: then only the first N blocks send the peers' rows while the others start this rank's
#: own tasks: the NVLink-bound sends (~200 us of E=64 T=16384's forward) overlap GEMMs.
SEND_BLOCK_CHOICES = (0, 8, 16, 32, 64)
#: Token batches of the persistent kernel's router per split_logits call
#: (``router_batches``): 2 fills the m16 tile with two 8-token batches and reads the gate
#: weights once per 16 tokens; 4 takes two m16 tiles per weight fragment, once per 32
#: tokens, 8 four, once per 64 (where one pass of the tensor-core logits takes every
#: expert; 16 spilled 580 bytes at E=64).
ROUTER_BATCH_CHOICES = (1, 2, 4, 8)
#: Row tiles per routed row task fed by TMA (``task_tiles``): 2 runs two consecutive row
#: tiles of an (expert, n-tile) through one mbarrier ring, the second's first loads in
#: flight during the first's epilogue, and halves the task fetches.
TASK_TILE_CHOICES = (1, 2)
#: The TMA row tasks' results through the ring's shared memory (``stage_epilogue``): 0 none
#: (4-byte stores from the accumulators), 1 the down GEMM's (they go straight to the source
#: rank over NVLink) in 16-byte stores, 2 both GEMMs' so, 3 the down GEMM's so and the
#: gate/up GEMM's by TMA stores left in flight into the next task (its tile counted once
#: they are complete). Measured and dropped (2 x H200, E=64 T=16384): both GEMMs' or the
#: down GEMM's by one bulk copy per row from a buffer past the rings, 1.920 / 2.021 ms
#: against 1.891 with the same 3-stage rings (the rows' copies queue on the SM's TMA unit:
#: epilogues 5.5-6.3 us) and 1.777 with the default's 4 stages, which leave no room for it.
STAGE_EPILOGUE_CHOICES = (0, 1, 2, 3)


def persistent_takes(tile: GemmTile) -> bool:
    """Whether transport "nvlink"'s persistent kernel can compute with ``tile``: its
    block's warps as weight-streaming or mma.sync warps, or as two warpgroups of a
    128-row wgmma tile."""
    if tile.warps_m * tile.warps_n != PERSISTENT_THREADS // 32:
        return False
    return tile.mma in ("ws", "sync") or (tile.mma == "wgmma" and tile.bm == 128)


def check_persistent(cfg: KernelConfig, name: str) -> None:
    """Transport "nvlink" runs one persistent kernel whose blocks serve every phase."""
    warps = PERSISTENT_THREADS // 32
    for which in ("gate_up", "down"):
        t = getattr(cfg, which)
        if not persistent_takes(t):
            raise ConfigError(f"{which}.mma", t.mma, f"transport 'nvlink' computes with "
                              f"weight-streaming, mma.sync or 128-row wgmma tiles of "
                              f"{warps} warps (e.g. bm32_bn128_bk64_w{warps}x1_s4_ws for "
                              f"few rows per expert, bm128_bn128_bk64_w4x2_s3 or, on "
                              f"Hopper, bm128_bn128_bk64_w8x1_s4_wg for many)", name)
    for f, want in PERSISTENT_SCHEDULE.items():
        if getattr(cfg, f) == want:
            continue
        why = (f"transport 'nvlink': {want} (one block of {PERSISTENT_THREADS} threads "
               f"routes {want} tokens)" if f == "router_tokens_per_block" else
               f"transport 'nvlink' has no such schedule: use {want}")
        raise ConfigError(f, getattr(cfg, f), why, name)
    if cfg.fuse_sources and {"sync", "wgmma"} & {cfg.gate_up.mma, cfg.down.mma}:
        raise ConfigError("fuse_sources", True, "transport 'nvlink' fuses sources with "
                          "weight-streaming tiles only (_ws on both GEMMs)", name)


def check_ws_tma(cfg: KernelConfig, limits: DeviceLimits, name: str) -> None:
    """The persistent kernel's tiles loaded by TMA boxes: a weight-streaming tile's
    weights, a wgmma row task's rows and weights (the 128-byte swizzle is load_tile's
    layout at BK 64)."""
    kinds = {cfg.gate_up.mma, cfg.down.mma}
    if cfg.transport != "nvlink" or kinds not in ({"ws"}, {"wgmma"}):
        raise ConfigError("ws_tma", True, "TMA loads are for transport 'nvlink' with "
                          "weight-streaming tiles (_ws on both GEMMs) or wgmma row tiles "
                          "(_wg on both)", name)
    if cfg.gate_up.bk != 64 or cfg.down.bk != 64:
        raise ConfigError("ws_tma", True, "TMA loads take BK 64 (one 128-byte "
                          "swizzle atom per row): use bk64 tiles", name)
    if limits.major_minor != (9, 0):
        raise ConfigError("ws_tma", True, f"TMA needs sm_90 (Hopper), target is "
                          f"{limits.arch}", name)


def check_ws_wgmma(cfg: KernelConfig, limits: DeviceLimits, name: str) -> None:
    """Weight-streaming tasks on warpgroup MMAs (templates/gemm.cu.j2 ws_gemm WG): the
    tokens are the A side, 64 per warpgroup (128-token tiles over the block's 8 warps), the
    weights come by TMA boxes (``ws_tma``) as the B side, one K range per task (the gated
    tile's gate and up, bn <= 128 wherever its registers fit, are one MMA of 2 bn)."""
    gu, dn = cfg.gate_up, cfg.down
    why = ("only transport 'nvlink' runs weight-streaming tasks" if cfg.transport != "nvlink"
           else "both tiles must be _ws" if gu.mma != "ws" or dn.mma != "ws"
           else "needs the weights by TMA (ws_tma=True)" if not cfg.ws_tma
           else f"wgmma needs sm_90 (Hopper), target is {limits.arch}"
           if limits.major_minor != (9, 0)
           else "128 tokens per pass over two warpgroups: bm128 tiles of warps 8x1"
           if (gu.bm, gu.warps_m, dn.bm, dn.warps_m) != (128, 8, 128, 8)
           else "no K splits (gu_splits = dn_splits = 1)"
           if cfg.gu_splits != 1 or cfg.dn_splits != 1 else "")
    if why:
        raise ConfigError("ws_wgmma", True, why + ": use False", name)


def check_send_blocks(cfg: KernelConfig, problem: MoEProblem, name: str) -> None:
    """A subset of the persistent kernel's blocks sends the peers' rows while the
    others start this rank's own tasks."""
    v = cfg.send_blocks
    if v not in SEND_BLOCK_CHOICES:
        raise ConfigError("send_blocks", v, f"choose one of {list(SEND_BLOCK_CHOICES)} "
                          "(0: every block sends, then a grid barrier)", name)
    why = ("only transport 'nvlink' stores rows into peers' heaps"
           if cfg.transport != "nvlink" else
           "one rank has no peers to send to" if problem.world_size == 1 else
           "fused tasks wait for every source's rows, so nothing starts early"
           if cfg.fuse_sources else "")
    if why:
        raise ConfigError("send_blocks", v, why + ": use 0", name)


def check_router_batches(cfg: KernelConfig, problem: MoEProblem, name: str) -> None:
    """Two token batches per tensor-core logit tile in the persistent kernel's router."""
    v = cfg.router_batches
    if v not in ROUTER_BATCH_CHOICES:
        raise ConfigError("router_batches", v, f"choose one of "
                          f"{list(ROUTER_BATCH_CHOICES)}", name)
    why = ("only transport 'nvlink' has a router phase" if cfg.transport != "nvlink"
           else "" if router_pairs_fit(problem, cfg.router_tokens_per_block, v) else
           f"the router's tensor cores take {problem.experts} experts in one pass only "
           f"for 8, 32 or 64 experts (and a hidden size a multiple of 16), and {v} batches of "
           f"{cfg.router_tokens_per_block} tokens in at most {ROUTER_MAX_MTILES} 16-row "
           f"tiles")
    if why:
        raise ConfigError("router_batches", v, why + ": use 1", name)


#: The configs tma_row_tasks admits, as the errors of the knobs only they take name them.
_TMA_ROW_TASKS = ("only the persistent kernel's TMA row tasks (transport 'nvlink', wgmma "
                  "tiles, ws_tma)")


def tma_row_tasks(cfg: KernelConfig) -> bool:
    """Whether the persistent kernel's routed row tasks load both operands by TMA into an
    mbarrier ring (wt_gemm_tile): ``ws_tma`` on wgmma tiles."""
    return cfg.transport == "nvlink" and cfg.ws_tma and cfg.gate_up.mma == "wgmma"


def check_defer_refill(cfg: KernelConfig, name: str) -> None:
    """Refills that never block the k-loop: only the TMA row tasks have the ring whose
    thread 0 both computes and refills."""
    if not tma_row_tasks(cfg):
        raise ConfigError("defer_refill", True, f"{_TMA_ROW_TASKS} refill a ring from a "
                          "computing thread: use False", name)


def store_kind(cfg: KernelConfig, gated: bool) -> str:
    """How a TMA row task of the gate/up (``gated``) or down GEMM stores its results:
    "direct" (4-byte stores), "staged" (16-byte stores through the ring) or "tma" (TMA
    stores through the ring, left in flight)."""
    v = cfg.stage_epilogue
    if v == 3:
        return "tma" if gated else "staged"
    return "staged" if v >= (2 if gated else 1) else "direct"


def check_stage_epilogue(cfg: KernelConfig, name: str) -> None:
    """Results through the ring's shared memory (STAGE_EPILOGUE_CHOICES): it is free at the
    epilogue only with one row tile per task (with more, the next one's loads fly); TMA
    stores write the gate/up tile in boxes of the act map's (the down tile's BM rows x 64)."""
    v = cfg.stage_epilogue
    if v not in STAGE_EPILOGUE_CHOICES:
        raise ConfigError("stage_epilogue", v, f"choose one of {list(STAGE_EPILOGUE_CHOICES)}"
                          " (0 none, 1 the down GEMM, 2 both GEMMs, 3 the down GEMM and the "
                          "gate/up GEMM's by TMA stores)", name)
    why = (f"{_TMA_ROW_TASKS} stage their results" if not tma_row_tasks(cfg) else
           f"the ring still loads the next row tile with task_tiles {cfg.task_tiles}"
           if cfg.task_tiles != 1 else "")
    if why:
        raise ConfigError("stage_epilogue", v, why + ": use 0", name)
    gu, dn = cfg.gate_up, cfg.down
    if v == 3 and (gu.bm != dn.bm or gu.bn % 64 or gu.bn > 64 * gu.stages):
        raise ConfigError("stage_epilogue", v, f"TMA stores take the gate/up tile in boxes "
                          f"of the down tile's {dn.bm} rows x 64 columns, held in the ring's A "
                          f"tiles: gate/up bm {dn.bm}, bn a multiple of 64 up to 64 x stages "
                          f"(have bm{gu.bm} bn{gu.bn} s{gu.stages}); or stage_epilogue 1", name)


def check_phased_tasks(cfg: KernelConfig, problem: MoEProblem, name: str) -> None:
    """Every source's gate/up tasks before any down task: only the persistent kernel's
    per-source task lists (fused sources have one list), and only with several sources."""
    why = ("only transport 'nvlink' has a task queue" if cfg.transport != "nvlink" else
           "fused sources keep one list (every source's rows in each task)"
           if cfg.fuse_sources else
           "one rank has one source: its list is already phased" if problem.world_size < 2
           else "")
    if why:
        raise ConfigError("phased_tasks", True, why + ": use False", name)


def check_interleave_sources(cfg: KernelConfig, name: str) -> None:
    """One task list over every source, by (expert, n-tile): the phased per-source lists
    rearranged (fused sources have every source's rows in each task already); the task
    producer learns the sources' lists one by one."""
    why = ("it rearranges the phased per-source lists: set phased_tasks"
           if not cfg.phased_tasks else
           "the task producer learns the sources' lists one by one" if cfg.task_producer
           else "")
    if why:
        raise ConfigError("interleave_sources", True, why + ": use False", name)


def check_own_first(cfg: KernelConfig, problem: MoEProblem, name: str) -> None:
    """This rank's own rows ahead of the peers' one list: a split of interleave_sources'
    list, worth a knob from 3 ranks (with 2 the peers are one source, and the split is the
    phased per-source lists)."""
    why = ("it splits the one list over every source: set interleave_sources"
           if not cfg.interleave_sources else
           "with 2 ranks the peers' list is one source's: the phased per-source lists "
           "(interleave_sources False) are this list" if problem.world_size < 3 else "")
    if why:
        raise ConfigError("own_first", True, why + ": use False", name)


def check_own_down_last(cfg: KernelConfig, name: str) -> None:
    """This rank's own down tasks after the peers': a reordering of the phased per-source
    lists' down phase, or of own_first's (the one list alone mixes the sources' down tasks
    of an (expert, n-tile))."""
    why = ("it reorders the phased lists' down tasks: set phased_tasks"
           if not cfg.phased_tasks else
           "the one list mixes the sources' down tasks: set own_first, or "
           "interleave_sources False" if cfg.interleave_sources and not cfg.own_first
           else "")
    if why:
        raise ConfigError("own_down_last", True, why + ": use False", name)


def check_task_tiles(cfg: KernelConfig, name: str) -> None:
    """Several row tiles per task: only the TMA row tasks (``ws_tma`` on wgmma tiles) carry
    their ring from one row tile on to the next."""
    v = cfg.task_tiles
    if v not in TASK_TILE_CHOICES:
        raise ConfigError("task_tiles", v, f"choose one of {list(TASK_TILE_CHOICES)}", name)
    if not tma_row_tasks(cfg):
        raise ConfigError("task_tiles", v, f"{_TMA_ROW_TASKS} take several row tiles per "
                          "task: use 1", name)


def check_stream_down(cfg: KernelConfig, name: str) -> None:
    """Down TMA row tasks that read each k-tile once the gate/up n-tile writing it is
    complete, the gate/up tasks ordered n-tile-major: TMA row tasks on the down GEMM, the
    gate/up tiles counted as they are stored (not by TMA stores settled later), lists the
    kernel lays out (per source or one over every source; not the producer's)."""
    why = (f"{_TMA_ROW_TASKS} on the down GEMM (wgmma) stream their K range"
           if not (tma_row_tasks(cfg) and cfg.down.mma == "wgmma") else
           "the gate/up results by TMA stores are counted late (stage_epilogue 3): use 2"
           if cfg.stage_epilogue == 3 else
           "the producer's loop waits for a task's inputs before it starts: set "
           "task_producer False" if cfg.task_producer else "")
    if why:
        raise ConfigError("stream_down", True, why + ", or use False", name)


def check_early_down(cfg: KernelConfig, problem: MoEProblem, name: str) -> None:
    """The down tasks ahead of the gate/up tasks in the queue: streamed down tasks (their
    k-loops start as the first gate/up n-tiles end), over lists a block knows whole at its
    first routed task (one rank's, or the one list over every source without own_first's)."""
    why = ("the down tasks wait for whole groups without stream_down: set it True"
           if not cfg.stream_down else
           "own_first's lists are learned in two steps: set own_first False" if cfg.own_first
           else "several ranks' per-source lists are learned one by one: set "
           "interleave_sources True" if problem.world_size > 1 and not cfg.interleave_sources
           else "")
    if why:
        raise ConfigError("early_down", True, why + ", or use False", name)


def check_shared_front(cfg: KernelConfig, problem: MoEProblem, name: str) -> None:
    """The shared experts' gate/up tiles on blocks of their own beside the route and
    dispatch: the persistent kernel (transport nvlink) with shared experts, its blocks
    taking tasks themselves (not the producer's)."""
    why = ("only the persistent kernel (transport 'nvlink') routes in the forward's kernel"
           if cfg.transport != "nvlink" else
           "the problem has no shared experts" if not problem.shared_width else
           "the producer claims the tasks: set task_producer False" if cfg.task_producer
           else "")
    if why:
        raise ConfigError("shared_front", True, why + ", or use False", name)


def producer_ring_b_elems(cfg: KernelConfig) -> int:
    """B elements per stage of ``task_producer``'s ring: the larger of the two GEMMs' B
    tiles (the gated one holds two)."""
    return max(2 * cfg.gate_up.bn, cfg.down.bn) * cfg.gate_up.bk


def producer_ring_bytes(cfg: KernelConfig) -> int:
    """Shared memory of ``task_producer``'s ring, which every TMA row task of both GEMMs
    runs through (its stages and phases carry on from task to task): per stage the A tile
    and the larger B tile."""
    gu = cfg.gate_up
    return gu.stages * (gu.bm * gu.bk + producer_ring_b_elems(cfg)) * 2 + SWIZZLE_ALIGN


def check_task_producer(cfg: KernelConfig, name: str) -> None:
    """A producer warpgroup that claims the tasks, waits for their inputs and feeds one
    ring kept across tasks: TMA row tasks on both GEMMs (per-source lists: nvlink fuses
    sources with weight-streaming tiles only; a task's loads are the producer's alone: no
    deferred refills, no TMA stores holding ring stages across tasks) and one stage count for
    both GEMMs' tasks (a stage's phase runs on)."""
    gu, dn = cfg.gate_up, cfg.down
    why = (f"{_TMA_ROW_TASKS} on both GEMMs have a ring to feed"
           if not (tma_row_tasks(cfg) and dn.mma == "wgmma") else
           "deferred refills are a computing thread's (the producer computes nothing)"
           if cfg.defer_refill else
           "the TMA stores of stage_epilogue 3 hold ring stages across tasks"
           if cfg.stage_epilogue == 3 else
           f"the GEMMs' tasks share one ring: use the same stages (gate/up s{gu.stages}, "
           f"down s{dn.stages})" if gu.stages != dn.stages else "")
    if why:  # (the ring needs no more shared memory than the larger GEMM's own ring)
        raise ConfigError("task_producer", True, why + ": use False", name)


def check_persistent_knobs(cfg: KernelConfig, problem: MoEProblem, limits: DeviceLimits,
                           name: str) -> None:
    """Each of the persistent kernel's knobs that is set, checked by its check_* above (in
    this order: a refusal names the first knob at fault)."""
    p, lim = (problem,), (limits,)
    for on, check, args in ((cfg.ws_tma, check_ws_tma, lim),
                            (cfg.send_blocks, check_send_blocks, p),
                            (cfg.router_batches != 1, check_router_batches, p),
                            (cfg.task_tiles != 1, check_task_tiles, ()),
                            (cfg.defer_refill, check_defer_refill, ()),
                            (cfg.stage_epilogue, check_stage_epilogue, ()),
                            (cfg.phased_tasks, check_phased_tasks, p),
                            (cfg.task_producer, check_task_producer, ()),
                            (cfg.interleave_sources, check_interleave_sources, ()),
                            (cfg.own_first, check_own_first, p),
                            (cfg.own_down_last, check_own_down_last, ()),
                            (cfg.stream_down, check_stream_down, ()),
                            (cfg.early_down, check_early_down, p),
                            (cfg.shared_front, check_shared_front, p)):
        if on:
            check(cfg, *args, name)
    if cfg.atomic_front and cfg.transport != "nvlink":
        raise ConfigError("atomic_front", True, "only transport 'nvlink' routes and "
                          "dispatches in one kernel: use False", name)
