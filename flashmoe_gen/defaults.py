"""The heuristic defaults: a sound config per problem before any tuning (transport "nccl"
and "nvlink"), and the rules and measured thresholds they follow."""

from __future__ import annotations

import math
from dataclasses import replace

from .arch import DEFAULT_ARCH, limits_for
from .config import K_SPLIT_CHOICES, PERSISTENT_THREADS, KernelConfig
from .errors import ConfigError
from .problem import ELEM_BYTES, MoEProblem
from .splitk import SplitK, default_splits
from .tiles import BK_CHOICES, BN_CHOICES, GemmTile, ws_token_tile, ws_weight_reads

#: The default streams weights when an expert's rows from all sources average at most this.
WS_MAX_ROWS = 32
#: ... and on several ranks up to this many, where per-source tiles would read each expert's
#: weights once per source that sends it rows (4 x H200, DeepSeek-V3-like T=512 = 64 rows:
#: 4 x 5.6 GB per rank, 0.53x PyTorch EP) while the fused weight-streaming launch reads them
#: ``ws_weight_reads`` times (1 x H200 GEMMs at 64 rows: the 64-token tile 3.77 TB/s, the
#: TMA kernel 3.96 TB/s for one source), if that saves at least WS_MIN_SAVING_S of reads at
#: WS_MODEL_BYTES_PER_S (an H100's copy bandwidth: the lower of the two cards).
WS_MAX_ROWS_FUSED = 64
WS_MIN_SAVING_S = 50e-6
WS_MODEL_BYTES_PER_S = 3.0e12

#: The heuristic default's comm_sms for the tma kernel on several ranks (8 beat 0 and 16).
DEFAULT_COMM_SMS = 8
#: Local expert weights from which the persistent default streams them through a 6-stage
#: ring of TMA boxes (``ws_tma``) instead of 4 stages of cp.async.
DEEP_RING_MIN_BYTES = 1 << 30
#: The default takes 128 x 128 wgmma tiles only when one source's gate/up launch has this
#: many blocks (one wave on an H100's 132 SMs); with fewer, larger blocks SMs sit idle.
WGMMA_MIN_BLOCKS = 132
#: The TMA row tasks take one list over every source (``interleave_sources``: each weight
#: read from HBM once, not once per source) where that saves at least this many times the
#: wait it costs (every source's rows in before the first routed task; the shared experts'
#: tasks need none and fill it): interleave_pays. Per forward, per-source lists -> one list
#: (bench/results/2026-11-28_gpu_checks_session29.md), H=I=2048 k=2 on 2 x H200: E=32
#: T=1024 (128 rows per expert) 0.2622 -> 0.2158 ms (fused wgmma tasks 0.2666), T=2048
#: 0.3357 -> 0.3179, T=4096 0.4693 -> 0.4745 (saves 1.8x its wait: left out); E=64 T=2048
#: 0.4972 -> 0.4118 (fused 0.4541), T=4096 0.6201 -> 0.5761; E=8 T=512 0.1175 -> 0.1154;
#: DeepSeek-V2-Lite T=1024 / 2048 / 4096 / 16384 -16 / -7 / -4 / -1.6%; lost where the
#: wait exceeds the saving: E=8 T=4096 0.3961 -> 0.4255, T=16384 E=8 / 32 / 64 +12 / +5 /
#: +1%. On 4 x H200: E=32 T=1024 0.2686 -> 0.2184, E=64 T=4096 kernel 620 -> 590 us; E=8
#: T=1024 +5%, E=64 T=16384 +1.7% (both below the gain). Where the rule took it on 4 ranks
#: unmeasured (session 30, bench/results/2026-11-28_gpu_checks_session30.md, 4 x H200):
#: DeepSeek-V2-Lite T=1024 0.455 -> 0.369 ms, T=2048 0.769 -> 0.679, T=4096 kernel 1312 ->
#: 1256 us; E=64 T=2048 0.490 -> 0.391, T=4096 kernel 648 -> 583 us.
INTERLEAVE_MIN_GAIN = 2.0
#: ... and only where an expert's rows per source stay at most this many: more rows per
#: weight byte, and its reads hide under the MMAs (Mixtral T=4096 on 4 x H200, 1024 rows per
#: source: 4.995 -> 5.237 ms, where the bandwidth model alone would take the list).
INTERLEAVE_MAX_SOURCE_ROWS = 512
#: On 3+ ranks, this rank's own rows in a list of their own ahead of the peers' one list
#: (``own_first``: its tasks start on this rank's flag while the peers' rows arrive; the own
#: experts' weights are read twice, not P times) where an expert's rows per source lie in
#: [OWN_FIRST_MIN_SOURCE_ROWS, OWN_FIRST_MAX_SOURCE_ROWS] and no shared experts run
#: (their tasks already fill the one list's wait: DeepSeek-V2-Lite lost 8-10% at T=1024 /
#: 4096 against the one list alone): own_first_pays. On 4 x H200, H=I=2048 k=2, ms per
#: forward, default -> own first (bench/results/2026-11-28_gpu_checks_session31.md): E=64
#: T=16384 (512 rows per source) 1.839 / 1.897 -> 1.748 / 1.754 (both orders), T=8192
#: 1.030 / 1.013 -> 0.942 / 0.932, T=4096 (128) 0.640 -> 0.573 (one list 0.597); E=32
#: T=16384 (1024) 1.679 / 1.710 -> 1.647 / 1.592, T=8192 0.846 / 0.848 -> 0.821 / 0.824,
#: T=4096 0.487 -> 0.469, T=2048 (128) 0.339 -> 0.308 (one list 0.325). Below: E=64
#: T=2048 (64 rows) one list 0.386, own first 0.408; E=32 T=1024 0.218 both. Above: E=8
#: T=16384 (4096 rows) 1.618 -> 1.741 (one list 1.900); E=8 T=4096 (1024) 0.428 -> 0.420.
OWN_FIRST_MIN_SOURCE_ROWS = 128
OWN_FIRST_MAX_SOURCE_ROWS = 1024
#: ... the rates of that model (H200): weights from HBM, the senders' rows over NVLink
#: (bench/nvlink_copy.py, ~300 GB/s), the shared experts' tasks on the tensor cores.
HBM_BYTES_PER_US = 4.0e6
NVLINK_BYTES_PER_US = 0.3e6
TENSOR_FLOPS_PER_US = 6.0e8
#: ... and where the list pays with the 128-row wgmma tiles (WGMMA_PERSISTENT_MIN_ROWS per
#: source), the fused weight-streaming tasks keep experts of at most this many rows (not
#: PERSISTENT_WS_MAX_ROWS): 2 x H200, fused -> row tiles in one list, E=32 T=768 (96 rows)
#: 0.1761 -> 0.2029, E=64 T=1536 (96) 0.3446 -> 0.3855, T=1024 (64) 0.2811 -> 0.3615; at
#: 128 rows the list won (above). On 4 ranks 128 rows are 32 per source: fused stays (E=64
#: T=1024 fused 0.282 vs 0.332).
INTERLEAVED_WS_MAX_ROWS = 96
#: The persistent default takes 128-row wgmma row tiles on Hopper when an expert averages
#: at least this many rows per source: H=I=2048 E=64 on 4 x H200 at T=4096 (128 rows) 2.10
#: -> 1.49 ms, T=16384 4.63 -> 3.44 ms over the mma.sync row tiles
#: (bench/results/2026-11-27_scaling_wgmma_rows_4xH200_adbc4c8.md); at T=2048 (64 rows, the
#: tile half padding, TMA rows) 0.774 -> 0.524 ms (fused weight-streaming 0.669;
#: bench/results/2026-11-27_sweep_small_batches_4xH200_ba92653.md). Below, the mma.sync
#: tiles keep 64 rows.
WGMMA_PERSISTENT_MIN_ROWS = 64
#: On several ranks the persistent default fuses every source's rows into weight-streaming
#: tasks up to this many rows per expert, past the NCCL path's ``WS_MAX_ROWS_FUSED``: its
#: tasks need no launch per source. H=I=2048 E=64, same runs: 4 x H200 T=1024 (128 rows,
#: 32 per source) 0.592 ms with mma.sync rows per source -> 0.409 fused (wgmma rows per
#: source 0.501); 2 x H200 T=1024 (64 rows) fused 0.452 vs wgmma rows 0.496. Not measured
#: on 2 ranks between 64 and 128 rows (there a source sends 64-128 rows, wgmma's regime).
PERSISTENT_WS_MAX_ROWS = 128
#: ... unless those fused tasks are too few to fill the GPU (an expert's gate/up tasks are
#: its intermediate size / 128, fused_tasks): with fewer than this many, from
#: FEW_TASKS_MIN_ROWS rows per expert, the 128-row wgmma tiles in one list over every source
#: (interleave_pays) fill their rows from all sources and the peers' rows spread over more
#: tasks. The seed example (H=512, I=2048, E=8, one shared expert) at T=128 on 4 x H200
#: (128 rows, 2 local experts: 32 fused tasks), same runs: fused 0.1453 / 0.1322 ms, row
#: tiles in one list 0.0648 (down tiles 128 wide, 6 stages: 0.0575), PyTorch EP 0.312 /
#: 0.314 (bench/results/2026-11-28_gpu_checks_session32.md). E=64 T=1024 (16 local experts,
#: 256 tasks) stays fused (0.282 vs row tiles 0.332, above). Narrower down tiles where the
#: 256-wide ones are few were mixed (2 and 4 x H200, seed T=256 / 512, E=8 T=256 / 512:
#: -7.5% to +7.5%), not taken.
FUSED_MIN_TASKS = 64
FEW_TASKS_MIN_ROWS = 128
#: ... and that 64-token weight-streaming tile takes its weights by TMA boxes (``ws_tma``, 4
#: stages), same runs: 4 x H200 T=1024 0.409 -> 0.401 ms, T=2048 0.692 -> 0.669; 2 x H200
#: T=1024 0.452 -> 0.451. (Narrower decode tiles keep cp.async below DEEP_RING_MIN_BYTES.)
PERSISTENT_WS_TMA_TOKENS = 64
#: On Hopper those fused tasks run on warpgroup MMAs (``ws_wgmma``: 128-token tiles, the
#: tokens the wgmma A side, gate and up one MMA; a 256-wide down tile) from this many rows
#: per expert, where 64-token mma.sync tiles take two passes on most experts and are
#: compute-bound. 4 x H200, H=I=2048 E=64 T=1024 (128 rows), same run (bench/results/
#: 2026-11-27_sweep_ws_wgmma_4xH200_a877941.md): 0.3933 -> 0.2823 ms (down 128 wide 0.2902),
#: 3.99x PyTorch EP's 1.1271. At E=32 T=1024 (256 rows) wgmma row tasks per source beat them
#: (0.2656 vs 0.2942), so the regime stays capped by PERSISTENT_WS_MAX_ROWS. Below 64
#: rows the second warpgroup skips its MMAs (its tokens hold no rows) and the tile still
#: wins: 2 x H200, same runs (bench/results/2026-11-28_sweep_ws_wgmma_rows_2xH200_ac65586.md),
#: rows per expert 16 / 24 / 32 / 48 / 64: E=64 T=256 / 384 / 512 / 768 / 1024 0.261 ->
#: 0.256, 0.265 -> 0.261, 0.290 -> 0.259, 0.303 -> 0.266, 0.430 -> 0.289 ms; E=32 T=256 /
#: 384 / 512 0.167 -> 0.154, 0.195 -> 0.162, 0.238 -> 0.166; DeepSeek-V2-Lite T=128 / 256
#: 0.254 -> 0.214, 0.304 -> 0.242; DeepSeek-V3-like T=1024 6.00 -> 3.76. From 24: at 16
#: rows the gain was 2% (E=64) and DeepSeek-V3-like decode on 4 ranks (16 rows) keeps its
#: measured 6-stage ring (DEEP_RING_MIN_BYTES), not compared with these tiles.
WS_WGMMA_MIN_ROWS = 24
#: The persistent router takes two token batches per tensor-core logit tile
#: (``router_batches`` 2, where the experts fit one pass) from this many tokens per rank:
#: 4 x H200, E=64, route phase / forward: T=2048 31.7 -> 21.0 us / 0.774 -> 0.749 ms,
#: T=4096 0.747 -> 0.737 ms, T=16384 255 -> 169 us / 2.344 -> 2.233 ms; at T=1024 it lost
#: (17 -> 20 us; bench/results/2026-11-27_sweep_router_pairs_4xH200_b017160.md and the
#: small-batch sweep above). Four batches (two m16 token tiles per gate-weight fragment)
#: where they fit, same machine kind, two runs each: route 42.5 -> 38.7 us and 164 -> 146
#: us, T=4096 0.7273 -> 0.7200 and 0.7284 -> 0.7219 ms, T=16384 2.2605 -> 2.2377 and
#: 2.2623 -> 2.2368 ms (bench/results/2026-11-27_sweep_anatomy_4xH200_f73b9ac.md,
#: ..._sweep_staged_epilogue_4xH200_56a872c.md). Pairs only with shared experts: there
#: quads spill 16 bytes (NVRTC 13.0, DeepSeek-V2-Lite's shape), unmeasured.
ROUTER_PAIRS_MIN_TOKENS = 2048
#: ... and eight (``router_batches`` 8, 64-token calls: the gate weights read half as often)
#: from this many: 1 x H200, E=64, both orders, route / kernel kcycles: T=16384 85 -> 76 us
#: / 2657 -> 2635, T=8192 45 -> 39 us / 1477 -> 1463; E=32 T=16384 70 -> 56 us / 2515 ->
#: 2481; at T=4096 only 64 of 132 blocks route: 22 -> 35 us, the forward 612 -> 628 us
#: (bench/results/2026-11-28_gpu_checks_session26.md).
ROUTER_EIGHTS_MIN_TOKENS = 8192
#: The TMA row tasks' down results, which go straight to the source rank, leave through the
#: ring's shared memory in 16-byte stores (``stage_epilogue`` 1; the gate/up results, local,
#: keep their 4-byte stores: staging both lost). 4 x H200, H=I=2048 k=2, per forward, same
#: run (bench/results/2026-11-27_sweep_staged_epilogue_4xH200_44b77eb.md): T=16384 E=8
#: 2.071 -> 1.819 ms, E=32 2.080 -> 1.895, E=64 2.224 -> 2.061 (the tiles' epilogue 8.7 ->
#: 4.5 us), E=64 T=4096 0.721 -> 0.716; Mixtral T=4096 5.492 -> 5.431. The gate/up results
#: by TMA stores (3) won only at E=64 (2 x H200, T=16384, E = 64 / 32 / 8: 1.827 / 1.674 /
#: 1.703 -> 1.751 / 1.701 / 1.703 ms; bench/results/2026-11-28_sweep_tma_store_2xH200_8c3a866.md):
#: the tuner's to choose. With silu by tanh the gate/up results staged too (2) won on
#: 1 x H200, both orders (bench/results/2026-11-28_gpu_checks_session26.md): the gate/up
#: epilogue 2.21 -> 1.51 us, kernel cycles E=64 T=16384 -0.8%, E=32 -0.9%, E=64 T=4096
#: 612 -> 599 us (-2.2%); on 4 ranks (session 19, exact silu) staging both had lost at
#: T=4096 (0.716 -> 0.743 ms): not yet A/B'd there again.
PERSISTENT_STAGE_EPILOGUE = 2
#: The TMA row tasks' gate/up epilogues take silu by one tanh.approx (``tanh_silu``): its
#: two special-function ops per element (ex2, rcp) were over a third of the epilogue (2.90
#: us, 1.69 with no silu at all). 1 x H200, E=64 T=16384,
#: both orders (bench/results/2026-11-28_gpu_checks_session26.md): epilogue 2.90 -> 2.21 us
#: per tile, the kernel 2628 -> 2589 kcycles; staged as well (``stage_epilogue`` 2) 1.58 us.
PERSISTENT_TANH_SILU = True
#: ... and on several ranks their per-source task lists hold every source's gate/up tasks
#: before any down task (``phased_tasks``): in source order a block's first wave held a
#: source's gate/up and down tasks, and the down tasks waited on their gate/up tiles. 4 x
#: H200, H=I=2048 k=2, T=1024, same run (bench/results/
#: 2026-11-27_sweep_phased_4xH200_6b86047.md): E=8 0.2037 -> 0.1688 ms, E=32 0.2959 ->
#: 0.2749 (dependency waits 20.0 -> 0.4 and 16.6 -> 0.7 us per block). Within 1% either
#: way at the large batches (..._sweep_phased_large_4xH200_79a9dda.md): E=64 T=4096
#: 0.6932 -> 0.7005, T=16384 2.0205 -> 2.0230, Mixtral T=4096 5.2578 -> 5.2201.
PERSISTENT_PHASED_TASKS = True
#: ... with both operands of a routed row task loaded by TMA (``ws_tma``) into a ring of this
#: many stages. 2 x H200, H=I=2048 E=64, per forward (cp.async 3 stages -> TMA 4 stages):
#: T=4096 1.362 -> 1.036 ms, T=16384 2.971 -> 2.523 ms (cp.async 4 stages 1.229 / 2.829, TMA
#: 3 stages 1.127 / 2.598; bench/results/2026-11-27_sweep_row_tma_2xH200_454f460.md).
WGMMA_PERSISTENT_STAGES = 4
#: ... and on several ranks this many blocks send the peers' rows (``send_blocks``) while the
#: others start this rank's own tasks. 2 x H200, E=64, per forward (0 / 8 / 16 / 32 blocks):
#: T=4096 1.037 / 0.989 / 0.996 / 1.004 ms, T=16384 2.520 / 2.416 / 2.430 / 2.409 ms
#: (bench/results/2026-11-27_sweep_send_blocks_2xH200_d6b4145.md). 32, not 8: on P ranks the
#: peers' share of the rows is (P - 1) / P, and 8 blocks move ~150 GB/s where NVLink takes
#: ~350, so on 4 ranks 8 senders would leave the own tasks (a quarter) done long before the
#: peers' rows are in.
DEFAULT_SEND_BLOCKS = 32
#: The large-batch default gathers each local expert's peer rows into one group
#: (``gather_experts``) with at most this many local experts. 4 x H200, two rounds each
#: beside the same config without it: Mixtral T=4096 (2 local experts) 5.56 -> 5.22 and
#: 5.51 -> 5.39 ms; with 16 or 32 local experts it lost every round (DeepSeek-V2-Lite T=4096
#: 2.65/2.91 -> 2.88/2.96, H=I=2048 E=64 T=16384 3.27/3.36 -> 3.82/3.87, Qwen3-30B-A3B T=512
#: 1.25/1.26 -> 2.46/2.12 ms): its NCCL operations are one per (peer, expert), and those
#: rows are few (bench/results/2026-11-27_gather_experts_4xH200_8649e86.md).
GATHER_MAX_LOCAL_EXPERTS = 2
#: The TMA row tasks' down tiles stream their K range (``stream_down``) where the gate/up
#: tasks take more than one wave of STREAM_DOWN_SMS blocks and the down tasks (routed and
#: shared) at most half a wave: the down tiles then close the forward, each a K range long,
#: and start as the gate/up n-tiles of their K range end (1 x H200, both orders: the seed
#: example T=256 -5.7 / -6.6%, T=1000 -4.3 / -5.0%, without its shared expert T=1000
#: -6.6%; where the gate/up tasks fit one wave (it without its shared expert T=256) +2.3%,
#: where the down tasks fill a wave (e8 T=1024: 128) +4.3%, (e16 T=1024) +8.3%, (the seed
#: example T=2048: 96) +0.9 / +2.8%; bench/results/2026-11-29_gpu_checks_session34.md).
STREAM_DOWN_SMS = 132
#: Ranks up to which the default takes it: its lists on several ranks have not run on a
#: GPU yet (bench/device_next.sh s34). With it the down tasks come first in the queue
#: (``early_down``: 1 x H200, both orders, the seed example T=256 -1.5 / -1.7%, T=1000 -1.7
#: / -2.7%, without its shared expert T=1000 -5.0 / -4.9%). 128-wide down tiles are left to
#: the tuner: with the early order they won at T=256 in one order only and lost at T=512
#: (+4%) and without the shared expert T=1000 (+3%; call 6 of the file above).
STREAM_DOWN_MAX_RANKS = 1
#: The TMA row tasks' shared experts' gate/up tiles beside the front (``shared_front``) up
#: to this many ranks (1 x H200, both orders: the seed example T=512 -7.5 / -6.6%, T=1000
#: -8.3 / -4.8%, T=256 +1.9 / -1.6%; DeepSeek-V2-Lite T=1024 -3.0 / -2.8%; several ranks'
#: send blocks beside them have not run on a GPU yet)
SHARED_FRONT_MAX_RANKS = 1


def expert_rows(problem: MoEProblem) -> float:
    """Rows an expert gets from all sources on average (the defaults' decode measure)."""
    return problem.world_size * problem.tokens_per_rank * problem.top_k / problem.experts


def source_rows(problem: MoEProblem) -> float:
    """Rows an expert gets from one source on average (one per-source launch's groups)."""
    return problem.tokens_per_rank * problem.top_k / problem.experts


def fused_tasks(problem: MoEProblem) -> int:
    """Gate/up tasks of the fused weight-streaming tiles (128 columns each) on one rank."""
    return problem.local_experts * -(-problem.intermediate // 128)


def row_tasks(problem: MoEProblem, cfg: KernelConfig) -> tuple[int, int]:
    """Gate/up and down row tasks (one row tile each) on one rank, the rows spread evenly:
    each (source, local expert) its row tiles, the shared experts this rank's tokens'."""
    p, gu, dn = problem, cfg.gate_up, cfg.down
    tiles = p.world_size * p.local_experts * -(-math.ceil(source_rows(p)) // gu.bm)
    shared = -(-p.tokens_per_rank // gu.bm) if p.shared_width else 0
    return (tiles * -(-p.intermediate // gu.bn) + shared * -(-p.shared_width // gu.bn),
            (tiles + shared) * -(-p.hidden // dn.bn))


def stream_down_pays(problem: MoEProblem, cfg: KernelConfig) -> bool:
    """Whether ``cfg``'s TMA row tasks' down tiles stream their K range (``stream_down``):
    more gate/up tasks than STREAM_DOWN_SMS, at most half as many down tasks."""
    gu, dn = row_tasks(problem, cfg)
    return (problem.world_size <= STREAM_DOWN_MAX_RANKS and gu > STREAM_DOWN_SMS
            and 2 * dn <= STREAM_DOWN_SMS)


def local_weight_bytes(problem: MoEProblem) -> int:
    """Bytes of this rank's routed experts' weights (gate, up and down)."""
    return problem.local_experts * 3 * problem.hidden * problem.intermediate * ELEM_BYTES


def streams_weights(problem: MoEProblem) -> bool:
    """Whether the defaults stream weights (every source fused, each byte read about
    once): an expert averages at most ``WS_MAX_ROWS`` rows from all sources, or at most
    ``WS_MAX_ROWS_FUSED`` on several ranks where that saves enough weight reads."""
    p, rows = problem, expert_rows(problem)
    if rows <= WS_MAX_ROWS:
        return True
    if p.world_size == 1 or rows > WS_MAX_ROWS_FUSED:
        return False
    # Sources that send an expert at least one row (Poisson rows per source).
    sources = p.world_size * (1.0 - math.exp(-rows / p.world_size))
    fused = ws_weight_reads(ws_token_tile(rows, 32), rows)
    weight_bytes = local_weight_bytes(p)
    return weight_bytes * (sources - fused) / WS_MODEL_BYTES_PER_S >= WS_MIN_SAVING_S


def heuristic_default(problem: MoEProblem, arch: str = DEFAULT_ARCH) -> KernelConfig:
    """A sound starting point: weight-streaming tiles when experts get few rows (decode),
    the persistent TMA kernel (else wgmma) with 128 x 128 tiles on Hopper when one launch
    fills the GPU, else mma.sync tiles sized by the rows an expert gets on average
    (smaller tiles, more blocks)."""
    # Packed slots: one NCCL op per peer instead of one per (peer, expert).
    knobs = dict(router_tokens_per_block=8, chunks_per_peer=1, comm_streams=1,
                 shared_stream=True, packed_slots=problem.world_size > 1)
    slot_rows = source_rows(problem)
    n_gu = KernelConfig.gemm_shapes(problem)["gate_up"][0]
    ws = _weight_streaming(problem, knobs, arch)
    if ws is not None:
        return ws
    blocks = problem.local_experts * -(-n_gu // 128) * max(1, -(-int(slot_rows) // 128))
    if limits_for(arch).major_minor == (9, 0) and blocks >= WGMMA_MIN_BLOCKS:
        # The persistent TMA kernel first (1.07-1.16x torch._grouped_mm where wgmma
        # 128 x 128 reaches 0.64-0.90x, 1 x H200, bench/results 2026-11-26_gemm_decode);
        # wgmma where it does not fit (too many groups per launch). The tma kernel holds
        # every SM until it ends, so NCCL's transfers of the next source wait for it:
        # leaving DEFAULT_COMM_SMS to NCCL took Mixtral T=4096 on 4 x H200 from 6.29 to
        # 5.75 ms and H=I=2048 E=64 T=16384 from 4.22 to 3.70 ms (bench/results
        # 2026-11-27_comm_sms_4xH200_11eaab5).
        for cfg in _hopper_candidates(problem, knobs):
            try:
                cfg.validate(problem, arch)
                return cfg
            except ConfigError:  # a dimension below the tiles: the next, mma.sync below
                pass
    rows = expert_rows(problem)
    bm = 64 if rows <= 96 else 128

    def fit(limit: int, cap: int, choices=BN_CHOICES) -> int:
        return max(c for c in choices if c <= min(limit, cap))

    bn_gu, bk_gu = fit(n_gu, 64), fit(problem.hidden, 64, BK_CHOICES)
    bn_dn, bk_dn = fit(problem.hidden, 128), fit(n_gu, 64, BK_CHOICES)
    gate_up = GemmTile(bm, bn_gu, bk_gu, warps_m=bm // 32, warps_n=min(2, bn_gu // 16),
                       stages=3)
    down = GemmTile(bm, bn_dn, bk_dn, warps_m=2, warps_n=min(4, bn_dn // 16), stages=3)
    cfg = KernelConfig(gate_up, down, **knobs)
    cfg.validate(problem, arch)
    return cfg


def _hopper_candidates(problem: MoEProblem, knobs: dict) -> list[KernelConfig]:
    """The large-batch defaults on Hopper, best first. The tma kernel's down tile 256 wide
    (3 stages fit shared memory) ran 1.5-3.7% faster than 128 at every large-batch GEMM
    shape on 1 x H200 (bench/results/2026-11-27_gemm_{mixtral,e64}_layer_shapes_*). On
    several ranks with two or more local experts: fused sources with ``own_split`` (this
    rank's tokens hide the dispatch and the combine); 4 x H200, same machine, two rounds:
    Mixtral T=4096 5.66-5.75 vs 5.84-5.98 ms per source with comm_sms 8, DeepSeek-V2-Lite
    T=4096 2.52-2.63 vs 2.97-3.04 (bench/results/2026-11-27_own_split_4xH200_75d16d0.md);
    with at most GATHER_MAX_LOCAL_EXPERTS local experts, gathered as well. Otherwise per
    source, leaving DEFAULT_COMM_SMS to NCCL (it moves the next source while the tma kernel
    holds the SMs)."""
    tma, tma_dn = GemmTile(128, 128, 64, 8, 1, 4, "tma"), GemmTile(128, 256, 64, 8, 1, 3, "tma")
    if problem.world_size > 1 and problem.local_experts >= 2:
        tma_knobs = dict(fuse_sources=True, own_split=True)
    else:
        tma_knobs = dict(comm_sms=DEFAULT_COMM_SMS if problem.world_size > 1 else 0)
    wg = GemmTile(128, 128, 64, 8, 1, 4, "wgmma")
    gathered = []
    if tma_knobs.get("fuse_sources") and problem.local_experts <= GATHER_MAX_LOCAL_EXPERTS:
        # Mode "graph" refuses gathering: the candidate after it is the same without.
        gathered = [KernelConfig(tma, tma_dn, **knobs, **tma_knobs, gather_experts=True)]
    return [*gathered, KernelConfig(tma, tma_dn, **knobs, **tma_knobs),
            KernelConfig(tma, tma, **knobs, **tma_knobs),
            KernelConfig(wg, wg, **knobs)]


def _weight_streaming(problem: MoEProblem, knobs: dict, arch: str) -> KernelConfig | None:
    """Weight-streaming tiles when an expert gets at most ``WS_MAX_ROWS`` rows from all
    sources together (decode): the GEMMs are bound by reading the weights, so each is
    read once (all sources in one launch) with the tokens on the MMA's narrow side.
    None when rows are more or a dimension is below the tiles."""
    if not streams_weights(problem):
        return None
    smallest = 32 if problem.shared_experts else 16  # shared experts: T rows per pass
    tt = ws_token_tile(expert_rows(problem), smallest)
    cfg = KernelConfig(GemmTile(tt, 64, 64, 4, 1, 4, "ws"),
                       GemmTile(tt, 128, 64, 4, 1, 4, "ws"),
                       fuse_sources=problem.world_size > 1, **knobs)
    try:
        cfg.validate(problem, arch)
    except ConfigError:
        return None
    return cfg


def interleave_pays(problem: MoEProblem) -> bool:
    """Whether one task list over every source (``interleave_sources``) pays on ``problem``:
    an expert's rows per source at most INTERLEAVE_MAX_SOURCE_ROWS, and the HBM time of the
    weight reads it saves ((P - 1) x this rank's experts' weights) at least
    INTERLEAVE_MIN_GAIN x the wait it adds (the peers' rows over NVLink, less the shared
    experts' tasks, which run meanwhile)."""
    p = problem
    if p.world_size < 2 or source_rows(p) > INTERLEAVE_MAX_SOURCE_ROWS:
        return False
    saved = (p.world_size - 1) * local_weight_bytes(p) / HBM_BYTES_PER_US
    peer_rows = p.tokens_per_rank * p.top_k * (p.world_size - 1) / p.world_size
    wait = peer_rows * p.hidden * ELEM_BYTES / NVLINK_BYTES_PER_US
    shared = 6 * p.tokens_per_rank * p.hidden * p.shared_width / TENSOR_FLOPS_PER_US
    return saved >= INTERLEAVE_MIN_GAIN * max(wait - shared, 0.0)


def own_first_pays(problem: MoEProblem) -> bool:
    """Whether the one list with this rank's own rows ahead of it (``own_first``) pays on
    ``problem``: 3+ ranks, no shared experts, an expert's rows per source within
    [OWN_FIRST_MIN_SOURCE_ROWS, OWN_FIRST_MAX_SOURCE_ROWS] (fewer: the second read of the
    own weights costs more than the own tasks hide; more: the reads already hide under the
    MMAs and the list's order costs)."""
    p = problem
    return (p.world_size >= 3 and not p.shared_experts
            and OWN_FIRST_MIN_SOURCE_ROWS <= source_rows(p) <= OWN_FIRST_MAX_SOURCE_ROWS)


def persistent_default(problem: MoEProblem, arch: str = DEFAULT_ARCH) -> KernelConfig:
    """A transport "nvlink" config: 8-warp weight-streaming tiles with fused sources when an expert
    averages at most ``PERSISTENT_WS_MAX_ROWS`` rows from all sources on several ranks (unless
    they would be fewer than ``FUSED_MIN_TASKS`` tasks from ``FEW_TASKS_MIN_ROWS`` rows on
    Hopper: row tiles in one list over every source)
    (``INTERLEAVED_WS_MAX_ROWS`` where one list over every source pays: interleave_pays;
    ``streams_weights`` on one rank; K split where the active experts' tiles are fewer than
    SMs: splitk.default_splits), else row tiles per source: 128-row wgmma on Hopper from
    ``WGMMA_PERSISTENT_MIN_ROWS`` rows per source, 8-warp mma.sync otherwise; the router's
    batch quads (pairs with shared experts or where quads don't fit) from
    ``ROUTER_PAIRS_MIN_TOKENS``; fused tasks on warpgroup MMAs from ``WS_WGMMA_MIN_ROWS``
    rows on Hopper; the TMA row tasks' results staged (``PERSISTENT_STAGE_EPILOGUE``), their
    silu by tanh and, on several ranks, their lists phased (``PERSISTENT_PHASED_TASKS``), in
    one list over every source where that pays (interleave_pays), with this rank's own rows
    in a list ahead of it where that pays (own_first_pays), their down tiles streaming their
    K range where that pays (stream_down_pays), ahead of the gate/up tasks in the queue, the
    shared experts' gate/up tiles beside the front (SHARED_FRONT_MAX_RANKS)."""
    warps = PERSISTENT_THREADS // 32
    rows = expert_rows(problem)
    interleave = interleave_pays(problem)
    ws_max = (INTERLEAVED_WS_MAX_ROWS
              if interleave and source_rows(problem) >= WGMMA_PERSISTENT_MIN_ROWS
              else PERSISTENT_WS_MAX_ROWS)
    hopper = limits_for(arch).major_minor == (9, 0)
    # too few fused tasks for the SMs: the row tiles in one list over every source instead
    few = (hopper and interleave and rows >= FEW_TASKS_MIN_ROWS
           and fused_tasks(problem) < FUSED_MIN_TASKS)
    fused = rows <= ws_max and not few if problem.world_size > 1 else streams_weights(problem)
    if fused:  # every source's rows in one task: each weight byte read once
        gu = dn = GemmTile(ws_token_tile(rows, 32), 128, 64, warps, 1, 4, "ws")
    else:  # the winners' tiles of the DeepSeek-V2-Lite and Qwen3-30B-A3B preset tunes
        # at T=512 (2 x H200, bench/results/2026-11-26_gpu_checks_2xH200_session8.md)
        gu, dn = GemmTile(64, 128, 64, 2, 4, 4), GemmTile(128, 128, 64, 2, 4, 4)
    cfg = KernelConfig(gu, dn, router_tokens_per_block=warps, transport="nvlink",
                       fuse_sources=fused and problem.world_size > 1)
    if not fused and hopper and (few or source_rows(problem) >= WGMMA_PERSISTENT_MIN_ROWS):
        # Two warpgroups per 128-row tile, a 256-wide down tile, both operands of a routed
        # task by TMA into a 4-stage ring (WGMMA_PERSISTENT_STAGES)
        wg = replace(cfg, gate_up=GemmTile(128, 128, 64, warps, 1, WGMMA_PERSISTENT_STAGES,
                                           "wgmma"),
                     down=GemmTile(128, 256, 64, warps, 1, WGMMA_PERSISTENT_STAGES, "wgmma"),
                     ws_tma=True, send_blocks=DEFAULT_SEND_BLOCKS if problem.world_size > 1
                     else 0, stage_epilogue=PERSISTENT_STAGE_EPILOGUE,
                     tanh_silu=PERSISTENT_TANH_SILU)
        cfg = _if_valid(wg, cfg, problem, arch)  # a dimension below 128/256: mma.sync rows
        if cfg.ws_tma and problem.world_size > 1:
            cfg = replace(cfg, phased_tasks=PERSISTENT_PHASED_TASKS)
            if own_first_pays(problem):
                cfg = _if_valid(replace(cfg, interleave_sources=True, own_first=True), cfg,
                                problem, arch)
            elif interleave:
                cfg = _if_valid(replace(cfg, interleave_sources=True), cfg, problem, arch)
        if cfg.ws_tma and stream_down_pays(problem, cfg):
            cfg = _if_valid(replace(cfg, stream_down=True), cfg, problem, arch)
            cfg = _if_valid(replace(cfg, early_down=True), cfg, problem, arch)
        if cfg.ws_tma and problem.shared_width and problem.world_size <= SHARED_FRONT_MAX_RANKS:
            cfg = _if_valid(replace(cfg, shared_front=True), cfg, problem, arch)
    if cfg.fuses_own_tokens:  # fewer tiles than SMs at decode: split their K ranges
        gs, ds = default_splits(problem, dn, K_SPLIT_CHOICES)
        split = replace(cfg, gu_splits=gs, dn_splits=ds)
        if SplitK.of(problem, split).fits:
            cfg = split
    if cfg.fuse_sources and cfg.gate_up.bm == PERSISTENT_WS_TMA_TOKENS and not cfg.ws_tma:
        cfg = _if_valid(replace(cfg, ws_tma=True), cfg, problem, arch)
    if cfg.fuse_sources and rows >= WS_WGMMA_MIN_ROWS and cfg.gu_splits == cfg.dn_splits == 1:
        # (split tiles: fewer tiles than SMs, where halving the tasks would idle more SMs)
        wsg = replace(cfg, gate_up=GemmTile(128, 128, 64, warps, 1, 4, "ws"),
                      down=GemmTile(128, 256, 64, warps, 1, 4, "ws"), ws_tma=True,
                      ws_wgmma=True)
        cfg = _if_valid(wsg, cfg, problem, arch)
    if problem.tokens_per_rank >= ROUTER_PAIRS_MIN_TOKENS:  # where the experts fit one pass
        pairs = _if_valid(replace(cfg, router_batches=2), cfg, problem, arch)
        cfg = pairs if problem.shared_experts else \
            _if_valid(replace(cfg, router_batches=4), pairs, problem, arch)
        if cfg.router_batches == 4 and problem.tokens_per_rank >= ROUTER_EIGHTS_MIN_TOKENS:
            cfg = _if_valid(replace(cfg, router_batches=8), cfg, problem, arch)
    if fused and local_weight_bytes(problem) >= DEEP_RING_MIN_BYTES:
        # HBM-bound on GBs of weights: a 6-deep ring fed by TMA boxes keeps more bytes in
        # flight (DeepSeek-V3-like T=128, 4 x H200: 1.734 -> 1.658 ms, 0.609x -> 0.582x
        # PyTorch EP; bench/results/2026-11-27_sweep_dsv3_4xH200_746ceec.md)
        # (wider token tiles: the ring may not fit shared memory)
        cfg = _if_valid(replace(cfg, gate_up=replace(cfg.gate_up, stages=6),
                                down=replace(cfg.down, stages=6), ws_tma=True),
                        cfg, problem, arch)
    cfg.validate(problem, arch)
    return cfg


def _if_valid(cfg: KernelConfig, otherwise: KernelConfig, problem: MoEProblem,
              arch: str) -> KernelConfig:
    """``cfg`` where the build takes it on ``problem``, else ``otherwise``."""
    try:
        cfg.validate(problem, arch)
    except ConfigError:
        return otherwise
    return cfg
