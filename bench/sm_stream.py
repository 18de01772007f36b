"""How fast one block streams from HBM (one GPU): the question behind decode latency.

At decode the persistent kernel's critical path is a few blocks each streaming one weight
tile (2 x H200: ~27 GB/s per block with the weight-streaming tile's cp.async ring, whatever
its depth). This measures, for G blocks each streaming its own region into shared memory:
- ``cp.async``: every thread issues 16-byte cp.async into a ring of S stages (as ws_gemm),
- ``bulk``: one thread issues a 1D ``cp.async.bulk`` (TMA) per stage, completion counted by
  an mbarrier,
- ``ld``: plain 16-byte ``ld.global.nc`` into registers (no shared memory),
- ``tile-cp.async`` / ``tile-tma``: the weight-streaming tile's own pattern: 128 rows x 64
  columns (128 bytes of each row, rows ``--k`` elements apart) per stage, by cp.async as
  ``load_tile`` does, or by one 2D TMA box (128-byte swizzle, as the ``_tma`` kernel loads),
reporting GB/s per block and the total. CUDA events, median of ``--iters`` after a warm-up.

    python bench/sm_stream.py [--blocks 1,8,66,132] [--mb-per-block 1] [--out t.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import add_output_args, emit_rows, int_list, launch_seconds  # noqa: E402

THREADS = 256
#: (variant, stages, bytes per stage)
VARIANTS = (("cp.async", 4, 32768), ("cp.async", 8, 16384), ("cp.async", 3, 65536),
            ("bulk", 2, 32768), ("bulk", 4, 32768), ("bulk", 4, 49152), ("ld", 0, 0),
            ("tile-cp.async", 4, 16384), ("tile-cp.async", 8, 16384), ("tile-tma", 4, 16384),
            ("tile-tma", 8, 16384))
#: The tile variants: rows per stage (the tile's BN) and K elements per stage (its BK).
TILE_ROWS, TILE_K = 128, 64

SOURCE = r"""
extern "C" __device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Until the mbarrier at `bar` completes the phase of this parity.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}

// Every thread: 16-byte cp.async into a ring of STAGES stages of CHUNK bytes.
template <int STAGES, int CHUNK>
__device__ void stream_cp_async(const char* src, long long bytes, unsigned* sink) {
  extern __shared__ __align__(128) char ring[];
  constexpr int PER = CHUNK / 16 / 256;  // cp.async per thread per stage
  const long long n = bytes / CHUNK;
  unsigned acc = 0;
  auto issue = [&](long long c) {
    if (c < n) {
      const char* s = src + c * CHUNK;
      char* d = ring + (c % STAGES) * CHUNK;
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        const int off = (i * 256 + threadIdx.x) * 16;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(d + off)),
                     "l"(s + off));
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  for (int s = 0; s < STAGES - 1; ++s) issue(s);
  for (long long c = 0; c < n; ++c) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
    __syncthreads();
    issue(c + STAGES - 1);
    acc += reinterpret_cast<const unsigned*>(ring + (c % STAGES) * CHUNK)[threadIdx.x];
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  if (acc == 0x12345678u) *sink = acc;  // keeps the reads
}

// One thread: a 1D bulk copy (TMA) per stage; an mbarrier per stage counts its bytes.
template <int STAGES, int CHUNK>
__device__ void stream_bulk(const char* src, long long bytes, unsigned* sink) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) unsigned long long bar[STAGES];
  const long long n = bytes / CHUNK;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  }
  __syncthreads();
  auto issue = [&](long long c) {
    if (threadIdx.x == 0 && c < n) {
      const unsigned b = smem_u32(&bar[c % STAGES]);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b),
                   "r"(CHUNK));
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
          "[%3];\n" ::"r"(smem_u32(ring + (c % STAGES) * CHUNK)),
          "l"(src + c * CHUNK), "r"(CHUNK), "r"(b) : "memory");
    }
  };
  for (int s = 0; s < STAGES; ++s) issue(s);
  unsigned acc = 0;
  for (long long c = 0; c < n; ++c) {
    mbar_wait(smem_u32(&bar[c % STAGES]), static_cast<unsigned>((c / STAGES) & 1));
    acc += reinterpret_cast<const unsigned*>(ring + (c % STAGES) * CHUNK)[threadIdx.x];
    __syncthreads();  // every thread read stage c: it may be refilled
    issue(c + STAGES);
  }
  if (acc == 0x12345678u) *sink = acc;
}

// Plain 16-byte non-coherent loads into registers.
__device__ void stream_ld(const char* src, long long bytes, unsigned* sink) {
  const uint4* p = reinterpret_cast<const uint4*>(src);
  const long long n = bytes / 16;
  unsigned acc = 0;
#pragma unroll 8
  for (long long i = threadIdx.x; i < n; i += 256) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

// The weight-streaming tile's pattern: block b reads rows [128 b, 128 b + 128) of a
// [rows, k] bf16 matrix, 64 columns (128 bytes of each row) per stage.
template <int STAGES>
__device__ void tile_cp_async(const char* m, int k, unsigned* sink) {
  extern __shared__ __align__(128) char ring[];
  const char* rows = m + static_cast<long long>(blockIdx.x) * 128 * k * 2;
  const int n = k / 64;
  unsigned acc = 0;
  auto issue = [&](int c) {
    if (c < n) {
      char* d = ring + (c % STAGES) * 16384;
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // 1024 chunks of 16 bytes: 128 rows x 8
        const int chunk = i * 256 + threadIdx.x, r = chunk / 8, ch = chunk % 8;
        const char* s = rows + (static_cast<long long>(r) * k + c * 64) * 2 + ch * 16;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                         smem_u32(d + r * 128 + ((ch ^ (r % 8)) * 16))), "l"(s));
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  for (int s = 0; s < STAGES - 1; ++s) issue(s);
  for (int c = 0; c < n; ++c) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 2));
    __syncthreads();
    issue(c + STAGES - 1);
    acc += reinterpret_cast<const unsigned*>(ring + (c % STAGES) * 16384)[threadIdx.x];
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  if (acc == 0x12345678u) *sink = acc;
}

// The same tiles by one 2D TMA box each (map: the matrix, box 64 x 128, 128-byte swizzle).
template <int STAGES>
__device__ void tile_tma(const void* map, int k, unsigned* sink) {
  extern __shared__ __align__(1024) char ring_raw[];
  char* ring = ring_raw + ((1024 - (smem_u32(ring_raw) & 1023)) & 1023);  // swizzle atoms
  __shared__ __align__(8) unsigned long long bar[STAGES];
  const int n = k / 64, row0 = blockIdx.x * 128;
  if (threadIdx.x == 0) {
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(map)
                 : "memory");
    for (int s = 0; s < STAGES; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  }
  __syncthreads();
  auto issue = [&](int c) {
    if (threadIdx.x == 0 && c < n) {
      const unsigned b = smem_u32(&bar[c % STAGES]);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b),
                   "r"(16384));
      asm volatile(
          "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
          "[%0], [%1, { %3, %4 }], [%2];\n" ::"r"(smem_u32(ring + (c % STAGES) * 16384)),
          "l"(map), "r"(b), "r"(c * 64), "r"(row0) : "memory");
    }
  };
  for (int s = 0; s < STAGES; ++s) issue(s);
  unsigned acc = 0;
  for (int c = 0; c < n; ++c) {
    mbar_wait(smem_u32(&bar[c % STAGES]), static_cast<unsigned>((c / STAGES) & 1));
    acc += reinterpret_cast<const unsigned*>(ring + (c % STAGES) * 16384)[threadIdx.x];
    __syncthreads();
    issue(c + STAGES);
  }
  if (acc == 0x12345678u) *sink = acc;
}

extern "C" __global__ void __launch_bounds__(256)
stream_kernel(const char* src, long long bytes_per_block, unsigned* sink, int variant,
              const void* map, int k) {
  const char* mine = src + blockIdx.x * bytes_per_block;
  switch (variant) {
    case 0: stream_cp_async<4, 32768>(mine, bytes_per_block, sink); break;
    case 1: stream_cp_async<8, 16384>(mine, bytes_per_block, sink); break;
    case 2: stream_cp_async<3, 65536>(mine, bytes_per_block, sink); break;
    case 3: stream_bulk<2, 32768>(mine, bytes_per_block, sink); break;
    case 4: stream_bulk<4, 32768>(mine, bytes_per_block, sink); break;
    case 5: stream_bulk<4, 49152>(mine, bytes_per_block, sink); break;
    case 6: stream_ld(mine, bytes_per_block, sink); break;
    case 7: tile_cp_async<4>(src, k, sink); break;
    case 8: tile_cp_async<8>(src, k, sink); break;
    case 9: tile_tma<4>(map, k, sink); break;
    default: tile_tma<8>(map, k, sink); break;
  }
}
"""


def smem_bytes(variant: tuple[str, int, int]) -> int:
    kind, stages, chunk = variant
    return stages * chunk + (1024 if kind == "tile-tma" else 0)  # TMA: 1024-byte alignment


def run(a) -> list[dict]:
    import cupy

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    card = props["name"].decode()
    mod = cupy.RawModule(code=SOURCE, options=("--std=c++17",), backend="nvrtc",
                         name_expressions=None)
    kernel = mod.get_function("stream_kernel")
    kernel.max_dynamic_shared_size_bytes = max(smem_bytes(v) for v in VARIANTS)
    per_block = a.mb_per_block << 20
    blocks_max = max(a.blocks)
    src = cupy.ones(blocks_max * per_block // 4, np.uint32)
    sink = cupy.zeros(1, np.uint32)
    # The tile variants read a [blocks x 128, k] bf16 matrix in src: per block 128 rows.
    k = per_block // (TILE_ROWS * 2)
    tile_map = None
    try:
        from flashmoe_gen.tma import encode_map

        tile_map = cupy.asarray(np.frombuffer(
            encode_map(src.data.ptr, blocks_max * TILE_ROWS, k, TILE_ROWS), np.uint8))
    except Exception as e:  # no driver entry point: the TMA rows are skipped
        print(f"tile-tma skipped: {e}", flush=True)
    rows = []
    for vi, v in enumerate(VARIANTS):
        smem = smem_bytes(v)
        if v[0] == "tile-tma" and tile_map is None:
            continue
        for g in a.blocks:
            args = (src, np.int64(per_block), sink, np.int32(vi),
                    tile_map if tile_map is not None else src, np.int32(k))

            def launch(g=g, args=args, smem=smem):
                kernel((g,), (THREADS,), args, shared_mem=smem)

            t = launch_seconds(launch, a.iters, warmup=3)
            rows.append(dict(variant=v[0], stages=v[1], stage_kb=v[2] >> 10, blocks=g,
                             us=round(t * 1e6, 1),
                             gbs_per_block=round(per_block / t / 1e9, 1),
                             total_tbs=round(g * per_block / t / 1e12, 2), card=card,
                             commit=a.commit, date=str(datetime.date.today())))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int_list, default=[1, 8, 66, 132])
    ap.add_argument("--mb-per-block", type=int, default=1)
    add_output_args(ap, iters=20)
    a = ap.parse_args()
    rows = run(a)
    cols = ["variant", "stages", "stage_kb", "blocks", "us", "gbs_per_block", "total_tbs"]
    r0 = rows[0]
    emit_rows(f"# One block's stream: 1 x {r0['card']}, {r0['date']}, commit {a.commit}\n\n"
              f"Each of G blocks ({THREADS} threads) streams its own {a.mb_per_block} MiB "
              "into shared memory (cp.async ring; 1D bulk copies with an mbarrier per stage) "
              f"or registers (ld); median of {a.iters} launches (CUDA events).\n\n",
              cols, rows, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
