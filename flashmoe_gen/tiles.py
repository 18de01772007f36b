"""GEMM tiles: one grouped expert GEMM's block tile, tensor-core kind and pipeline, and the
checks that it fits a problem's GEMM and a GPU (registers, shared memory, divisibility)."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields

from .arch import DeviceLimits
from .errors import ConfigError

BK_CHOICES = (16, 32, 64)
BM_CHOICES = (16, 32, 64, 128, 256)
BN_CHOICES = (16, 32, 64, 128, 256)
STAGE_RANGE = range(2, 7)
WARP_CHOICES = (1, 2, 4, 8)
#: Tensor-core instruction of a GEMM: "sync" = mma.sync m16n8k16 (sm_80+), "wgmma" = Hopper
#: warpgroup MMA m64nNk16 from shared memory (sm_90a), 4 warps per 64 rows, BK 64 (one
#: 128-byte swizzle atom per row); "ws" = weight streaming for few rows per expert
#: (decode): mma.sync with the operands swapped, ``bm`` is the token tile, ``bn`` the weight
#: rows of a block split over ``warps_m`` warps, one block covers all rows of its expert
#: (of every source in the fused launch), so weights are read once.
#: "tma" = the persistent large-batch kernel (sm_90a): TMA loads into an mbarrier ring fed by
#: a producer warpgroup, two consumer warpgroups of wgmma (``bm`` = 128, ``warps_m`` = 8
#: consumer warps), one block per SM walking every (group, m-tile, n-tile) of a launch.
MMA_CHOICES = ("sync", "wgmma", "ws", "tma")
#: Name suffix of each tensor-core kind (mma.sync has none).
MMA_SUFFIX = {"sync": "", "wgmma": "_wg", "ws": "_ws", "tma": "_tma"}
#: Kinds that issue Hopper-only instructions (built for sm_90a).
HOPPER_KINDS = ("wgmma", "tma")
#: The tma kernel: producer warpgroup threads, groups one launch may have, static shared
#: memory (the groups' tile prefix and the ring's barriers) and the spin bound of a wait.
TMA_PRODUCER_THREADS = 128
TMA_MAX_GROUPS = 1024
TMA_STATIC_SMEM = 4 * (TMA_MAX_GROUPS + 1) + 16 * 8
TMA_SPIN_CYCLES = 1 << 34
#: Weight-streaming tiles: token tiles and K steps it takes. 128 (one pass where experts
#: get up to 128 rows: E=64 T=1024 on 4 ranks read weights ~2.5 times with 64) is a tuner
#: choice only until a GPU run gives its speed (WS_TILE_SPEED; the defaults pick among
#: the tiles there).
WS_TOKEN_CHOICES = (16, 32, 64, 128)
WS_BK_CHOICES = (32, 64)
#: Weight-streaming pipeline depths: deeper than the row tiles' (a block alone on its SM at
#: decode streams at about bytes in flight / memory latency).
WS_STAGE_RANGE = range(2, 9)
#: Weight bandwidth of one pass relative to the 16-token tile (1 x H200, GEMM bench at
#: 448dea2: 8 rows per expert 3.83 vs 3.61 TB/s for 16 vs 32 tokens, 32 rows 4.18 vs 3.68
#: TB/s for 32 vs 64 tokens).
WS_TILE_SPEED = {16: 1.0, 32: 0.94, 64: 0.83}
WGMMA_BK, WGMMA_ROWS_PER_WARPGROUP, WGMMA_MAX_N = 64, 64, 256
#: 128-byte-swizzled tiles (wgmma operands, TMA boxes) repeat every 8 rows x 128 B, so they
#: start on a boundary of this many bytes: the extra dynamic shared memory a wgmma kernel, or
#: the persistent kernel with TMA weight loads, takes to align them (common.cuh.j2
#: swizzle_aligned).
SWIZZLE_ALIGN = 1024
#: Rough per-thread register use besides accumulators and fragments (addresses, loop state).
REG_OVERHEAD = 40
#: mma.sync.m16n8k16: a warp's tile must be a multiple of 16 rows and 16 columns
#: (columns are loaded 16 at a time with ldmatrix.x4).
MMA_M, MMA_N_LOAD = 16, 16

@dataclass(frozen=True)
class GemmTile:
    """Tiling of one expert GEMM: block tile, warp grid, cp.async pipeline depth and the
    tensor-core instruction (``mma``; with "wgmma", ``warps_m`` = 4 per 64 rows; with "ws",
    ``bm`` tokens per pass and ``warps_m`` warps over the ``bn`` weight rows)."""

    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int
    mma: str = "sync"

    @property
    def threads(self) -> int:
        extra = TMA_PRODUCER_THREADS if self.mma == "tma" else 0
        return 32 * self.warps_m * self.warps_n + extra

    @property
    def name(self) -> str:
        return (f"bm{self.bm}_bn{self.bn}_bk{self.bk}_w{self.warps_m}x{self.warps_n}"
                f"_s{self.stages}{MMA_SUFFIX.get(self.mma, '')}")

    def smem_bytes(self, b_operands: int) -> int:
        """Dynamic shared memory: ``stages`` copies of the A tile and ``b_operands`` B tiles."""
        tiles = self.stages * (self.bm * self.bk + b_operands * self.bn * self.bk) * 2
        return tiles + (SWIZZLE_ALIGN if self.mma in HOPPER_KINDS else 0)

    def grid(self, n: int, rows: int, groups: int, inner_groups: int,
             sms: int = 132) -> tuple[int, int, int]:
        """Launch grid of a GEMM of ``N = n`` over ``rows`` rows (bound) and ``groups``
        groups (``inner_groups`` > 0: sources x inner groups, the fused launch); ``sms``:
        the GPU's multiprocessors (the persistent kernel takes one block per SM at most)."""
        if self.mma == "tma":
            tiles = -(-n // self.bn) * -(-rows // self.bm) * groups
            return (max(1, min(sms, tiles)), 1, 1)
        if self.mma == "ws":  # one block per (n-tile, expert) takes all rows of all sources
            return (-(-n // self.bn), 1, inner_groups if inner_groups > 0 else groups)
        return (-(-n // self.bn), -(-rows // self.bm), groups)

    def regs_estimate(self, b_operands: int) -> int:
        if self.mma in HOPPER_KINDS:  # a warpgroup's m64 x bn fp32 tile over 128 threads
            return self.bn // 2 * b_operands + REG_OVERHEAD
        if self.mma == "ws":  # weight rows of a warp x all tokens of a pass
            mi, nj = self.bn // self.warps_m // 16, self.bm // 8
            return mi * nj * 4 * b_operands + mi * 4 + nj * 2 + REG_OVERHEAD
        mi = self.bm // self.warps_m // 16
        ni = self.bn // self.warps_n // 8
        acc = mi * ni * 4 * b_operands
        frags = mi * 4 + ni * 2 * b_operands
        return acc + frags + REG_OVERHEAD

    def validate(self, which: str, n: int, k: int, b_operands: int, limits: DeviceLimits,
                 config_name: str | None) -> None:
        def err(field: str, value: object, expected: str) -> ConfigError:
            return ConfigError(f"{which}.{field}", value, expected, config_name)

        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "mma":
                if v not in MMA_CHOICES:
                    raise err("mma", v, f"choose one of {list(MMA_CHOICES)}")
            elif not isinstance(v, int) or isinstance(v, bool):
                raise err(f.name, v, "must be an integer")
        if self.mma == "wgmma":
            self._validate_wgmma(err, limits)
        if self.mma == "ws":
            self._validate_ws(err)
        elif self.mma == "tma":
            self._validate_tma(err, limits)
        else:
            self._validate_mma_grid(err)
        if self.threads > limits.max_threads_per_block:
            raise err("warps_m", self.warps_m,
                      f"{self.threads} threads exceed {limits.max_threads_per_block} per block")
        self._validate_fit(err, n, k, b_operands, limits)

    def _validate_mma_grid(self, err) -> None:
        for field, value, choices in (("bm", self.bm, BM_CHOICES), ("bn", self.bn, BN_CHOICES),
                                      ("bk", self.bk, BK_CHOICES),
                                      ("warps_m", self.warps_m, WARP_CHOICES),
                                      ("warps_n", self.warps_n, WARP_CHOICES)):
            if value not in choices:
                raise err(field, value, f"choose one of {list(choices)}")
        if self.stages not in STAGE_RANGE:
            raise err("stages", self.stages, f"choose {STAGE_RANGE.start}..{STAGE_RANGE.stop - 1}")
        if self.bm % (self.warps_m * MMA_M):
            raise err("warps_m", self.warps_m,
                      f"bm={self.bm} must split into warps_m tiles of a multiple of {MMA_M} rows; "
                      f"valid warps_m: {[w for w in WARP_CHOICES if self.bm % (w * MMA_M) == 0]}")
        if self.bn % (self.warps_n * MMA_N_LOAD):
            raise err("warps_n", self.warps_n,
                      f"bn={self.bn} must split into warps_n tiles of a multiple of "
                      f"{MMA_N_LOAD} columns; valid warps_n: "
                      f"{[w for w in WARP_CHOICES if self.bn % (w * MMA_N_LOAD) == 0]}")

    def _validate_ws(self, err) -> None:
        if self.bm not in WS_TOKEN_CHOICES:
            raise err("bm", self.bm, f"ws: tokens per pass, choose one of {list(WS_TOKEN_CHOICES)}")
        if self.bk not in WS_BK_CHOICES:
            raise err("bk", self.bk, f"ws: choose one of {list(WS_BK_CHOICES)}")
        if self.warps_n != 1:
            raise err("warps_n", self.warps_n, "ws: warps split only the weight rows; use 1")
        if self.warps_m not in WARP_CHOICES:
            raise err("warps_m", self.warps_m, f"choose one of {list(WARP_CHOICES)}")
        if self.bn not in BN_CHOICES or self.bn % (self.warps_m * MMA_M):
            raise err("bn", self.bn, f"ws: one of {list(BN_CHOICES)} and a multiple of "
                      f"16 x warps_m = {16 * self.warps_m}")
        if self.stages not in WS_STAGE_RANGE:
            raise err("stages", self.stages,
                      f"ws: choose {WS_STAGE_RANGE.start}..{WS_STAGE_RANGE.stop - 1}")

    def _validate_tma(self, err, limits: DeviceLimits) -> None:
        if limits.major_minor != (9, 0):
            raise err("mma", self.mma, f"tma needs sm_90 (Hopper), target is {limits.arch}; "
                      "use mma='sync'")
        if self.bm != 128 or self.warps_m != 8 or self.warps_n != 1:
            raise err("bm", self.bm, "tma: bm=128 over two consumer warpgroups: "
                      "bm128, warps 8x1 (e.g. bm128_bn128_bk64_w8x1_s4_tma)")
        if self.bk != WGMMA_BK:
            raise err("bk", self.bk, f"tma tiles use bk={WGMMA_BK} (one 128-byte row)")
        if self.bn not in (64, 128, 256):
            raise err("bn", self.bn, "tma: choose 64, 128 or 256")
        if not 2 <= self.stages <= 8:
            raise err("stages", self.stages, "tma: choose 2..8")

    def _validate_fit(self, err, n: int, k: int, b_operands: int,
                      limits: DeviceLimits) -> None:
        if self.bn > n:
            raise err("bn", self.bn, f"tile exceeds the GEMM's N={n}; use bn <= {n}")
        if self.bk > k:
            raise err("bk", self.bk, f"tile exceeds the GEMM's K={k}; use bk <= {k}")
        smem = self.smem_bytes(b_operands) + (TMA_STATIC_SMEM if self.mma == "tma" else 0)
        if smem > limits.smem_per_block_optin:
            raise err("stages", self.stages,
                      f"needs {smem} B of shared memory, {limits.arch} allows "
                      f"{limits.smem_per_block_optin} B per block: fewer stages or smaller tiles")
        regs = self.regs_estimate(b_operands)
        if self.mma == "tma":  # setmaxnreg gives consumers up to 232 registers
            if self.bn // 2 * b_operands > 128:
                raise err("bn", self.bn, f"tma: {b_operands} x bn/2 = "
                          f"{self.bn // 2 * b_operands} accumulators per thread, at most 128 "
                          f"(gated: bn <= 128)")
            return
        if regs > limits.regs_per_thread:
            raise err("bn", self.bn,
                      f"needs about {regs} registers per thread (limit {limits.regs_per_thread}): "
                      "more warps or smaller tiles")
        if regs * self.threads > limits.regs_per_block:
            raise err("warps_n", self.warps_n,
                      f"{self.threads} threads x ~{regs} registers exceed "
                      f"{limits.regs_per_block} per block: fewer warps")

    def _validate_wgmma(self, err, limits: DeviceLimits) -> None:
        if limits.major_minor != (9, 0):
            raise err("mma", self.mma, f"wgmma needs sm_90 (Hopper), target is {limits.arch}; "
                      "use mma='sync'")
        if self.stages < 3:
            raise err("stages", self.stages, "wgmma keeps one MMA group in flight: 3 or more")
        if self.bk != WGMMA_BK:
            raise err("bk", self.bk, f"wgmma tiles use bk={WGMMA_BK} (one 128-byte row)")
        if self.bm % WGMMA_ROWS_PER_WARPGROUP or self.warps_m != 4 * self.bm // 64:
            raise err("warps_m", self.warps_m, "wgmma: bm a multiple of 64 and warps_m = "
                      f"bm / 16 (4 warps per 64 rows), e.g. bm={self.bm} -> "
                      f"warps_m={4 * self.bm // 64}")
        if self.warps_n != 1:
            raise err("warps_n", self.warps_n, "wgmma: a warpgroup spans the whole bn; use 1")
        if not 8 <= self.bn <= WGMMA_MAX_N or self.bn % 8:
            raise err("bn", self.bn, f"wgmma: bn a multiple of 8 up to {WGMMA_MAX_N}")

    @classmethod
    def parse(cls, name: str) -> GemmTile:
        if not isinstance(name, str):
            raise ConfigError("tile", name, "expected a tile name (str) such as "
                              "bm128_bn64_bk64_w4x2_s3")
        m = re.fullmatch(r"bm(\d+)_bn(\d+)_bk(\d+)_w(\d+)x(\d+)_s(\d+)(_wg|_ws|_tma)?", name)
        if not m:
            raise ConfigError("tile", name, "expected e.g. bm128_bn64_bk64_w4x2_s3 "
                              "(suffix _wg for wgmma, _ws for weight streaming, _tma for the "
                              "persistent TMA kernel)")
        *ints, suffix = m.groups()
        mma = {v: k for k, v in MMA_SUFFIX.items()}[suffix or ""]
        return cls(*map(int, ints), mma=mma)


@functools.lru_cache(maxsize=256)  # a pure function the defaults call for every problem
def ws_token_tile(mean_rows: float, smallest: int = WS_TOKEN_CHOICES[0]) -> int:
    """The weight-streaming token tile for experts that get ``mean_rows`` rows on average
    (all sources together). Rows past the tile re-stream the expert's weights, and routed
    counts vary around their mean (2 x H200, DeepSeek-V3-like T=512: 32 rows on average, the
    32-token tile, expert tasks at 62% of the copy bandwidth), so the tile minimises the
    expected passes over a Poisson count divided by the tile's speed (``WS_TILE_SPEED``)."""
    tiles = [t for t in WS_TOKEN_CHOICES if t >= smallest and t in WS_TILE_SPEED]
    return min(tiles, key=lambda t: ws_weight_reads(t, mean_rows))


def ws_weight_reads(tile: int, mean_rows: float) -> float:
    """Expected passes over an expert's weights with the ``tile``-token weight-streaming
    tile at ``mean_rows`` Poisson rows, divided by the tile's relative speed: the cost of
    its weight reads in units of one pass at the 16-token tile's speed."""
    # Past mean + 12 standard deviations (+12) a Poisson tail is below 1e-12.
    last = mean_rows + 12 * math.sqrt(max(mean_rows, 0.0)) + 12
    passes = 1.0 + sum(_poisson_above(j * tile, mean_rows)
                       for j in range(1, int(last // tile) + 2))
    return passes / WS_TILE_SPEED[tile]


def _poisson_above(k: int, mean: float) -> float:
    """P(X > k) for X ~ Poisson(mean), summed in log space (exp(-mean) underflows for
    large means)."""
    if mean <= 0:
        return 0.0
    log_m = math.log(mean)
    below = sum(math.exp(i * log_m - mean - math.lgamma(i + 1)) for i in range(k + 1))
    return min(1.0, max(0.0, 1.0 - below))
