"""How fast G blocks copy token rows into a peer GPU's memory over NVLink (one process, two
GPUs with peer access): the question behind the persistent kernel's senders.

The persistent kernel's dispatch stores each (token, choice)'s row of x into its slot in the
expert's rank (`send_row`: a warp per row, 16-byte loads then stores). On 2 x H200 its
32 sender blocks moved ~300 GB/s, 8 blocks ~145 GB/s (~18 GB/s per block;
bench/results/2026-11-27_sweep_send_blocks_2xH200_d6b4145.md), so 32 SMs spend ~215 us
of a T=16384 forward sending. This measures, for G blocks of 256 threads copying N rows of
``--hidden`` bf16 elements from device 0 into device 1 (or into device 0: ``local``), rows
scattered in the destination as dispatch scatters them:
- ``warpR``: each warp loads R rows (16 bytes per lane per load) before storing them
  (R = 1 is the kernel's copy_row),
- ``bulkS``: each warp's lane 0 keeps S rows in flight through shared memory: a 1D bulk
  copy (TMA) into a slot (an mbarrier counts its bytes), then a bulk store from the slot
  into the destination, the slot refilled once the store read it,
reporting GB/s per block and in all. CUDA events, median of ``--iters`` after a warm-up;
every variant's copy is checked against the source once (destination poisoned first).

    python bench/nvlink_copy.py [--blocks 4,8,16,32,132] [--rows 16384] [--out t.md]
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
WARPS = THREADS // 32
#: (kind, rows in flight per warp)
VARIANTS = (("warp", 1), ("warp", 2), ("warp", 4), ("bulk", 2), ("bulk", 4), ("bulk", 6))

SOURCE = r"""
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}

// Warp w of nw takes rows w R, w R + 1, ..., then (w + nw) R, ...: R rows' loads in flight
// before their stores.
template <int R>
__device__ void warp_rows(const uint4* __restrict__ src, uint4* dst, const int* perm,
                          int rows, int w, int nw) {
  constexpr int N = ROW_BYTES / 16, PER = N / 32;
  const int lane = threadIdx.x & 31;
  for (int r0 = w * R; r0 < rows; r0 += nw * R) {
    uint4 v[R][PER];
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (r0 + j < rows) {
        const uint4* s = src + static_cast<long long>(r0 + j) * N;
#pragma unroll
        for (int i = 0; i < PER; ++i) v[j][i] = s[lane + 32 * i];
      }
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (r0 + j < rows) {
        uint4* d = dst + static_cast<long long>(perm[r0 + j]) * N;
#pragma unroll
        for (int i = 0; i < PER; ++i) d[lane + 32 * i] = v[j][i];
      }
  }
}

// Lane 0 of warp w (of nw): its rows w, w + nw, ... through S slots of shared memory.
template <int S>
__device__ void bulk_rows(const char* src, char* dst, const int* perm, int rows, int w,
                          int nw) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) unsigned long long bar[WARPS][S];
  if ((threadIdx.x & 31) != 0) return;
  const int wb = threadIdx.x / 32;
  char* slots = ring + wb * S * ROW_BYTES;
  for (int s = 0; s < S; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(&bar[wb][s])));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  const int n = rows > w ? (rows - w + nw - 1) / nw : 0;  // this warp's rows
  auto load = [&](int i) {
    const int s = i % S;
    const unsigned b = smem_u32(&bar[wb][s]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b),
                 "r"(ROW_BYTES) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
        "[%3];\n" ::"r"(smem_u32(slots + s * ROW_BYTES)),
        "l"(src + static_cast<long long>(w + i * nw) * ROW_BYTES), "r"(ROW_BYTES), "r"(b)
        : "memory");
  };
  for (int i = 0; i < S && i < n; ++i) load(i);
  for (int i = 0; i < n; ++i) {
    const int s = i % S;
    mbar_wait(smem_u32(&bar[wb][s]), static_cast<unsigned>((i / S) & 1));
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n"
                 ::"l"(dst + static_cast<long long>(perm[w + i * nw]) * ROW_BYTES),
                 "r"(smem_u32(slots + s * ROW_BYTES)), "r"(ROW_BYTES) : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    if (i >= 1 && i - 1 + S < n) {  // store i - 1 has read its slot: refill it
      asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");
      load(i - 1 + S);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

extern "C" __global__ void __launch_bounds__(THREADS)
copy_kernel(const char* src, char* dst, const int* perm, int rows, int variant) {
  const int w = blockIdx.x * WARPS + threadIdx.x / 32, nw = gridDim.x * WARPS;
  const uint4* s4 = reinterpret_cast<const uint4*>(src);
  uint4* d4 = reinterpret_cast<uint4*>(dst);
  switch (variant) {
    case 0: warp_rows<1>(s4, d4, perm, rows, w, nw); break;
    case 1: warp_rows<2>(s4, d4, perm, rows, w, nw); break;
    case 2: warp_rows<4>(s4, d4, perm, rows, w, nw); break;
    case 3: bulk_rows<2>(src, dst, perm, rows, w, nw); break;
    case 4: bulk_rows<4>(src, dst, perm, rows, w, nw); break;
    default: bulk_rows<6>(src, dst, perm, rows, w, nw); break;
  }
}
"""


def smem_bytes(variant: tuple[str, int], row_bytes: int) -> int:
    return WARPS * variant[1] * row_bytes if variant[0] == "bulk" else 0


def run(a) -> list[dict]:
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2 and "peer" in a.targets:
        raise SystemExit("peer copies need two GPUs")
    card = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    row_bytes = a.hidden * 2
    rng = np.random.default_rng(0)
    perm_h = rng.permutation(a.rows).astype(np.int32)
    rows_out = []
    with cupy.cuda.Device(0):
        if "peer" in a.targets:
            cupy.cuda.runtime.deviceEnablePeerAccess(1)
        mod = cupy.RawModule(
            code=SOURCE, backend="nvrtc",
            options=("--std=c++17", f"-DROW_BYTES={row_bytes}", f"-DTHREADS={THREADS}",
                     f"-DWARPS={WARPS}"))
        kernel = mod.get_function("copy_kernel")
        kernel.max_dynamic_shared_size_bytes = max(smem_bytes(v, row_bytes) for v in VARIANTS)
        src_h = rng.integers(0, 2**31, a.rows * row_bytes // 4, dtype=np.int64).astype(np.uint32)
        want_h = np.empty_like(src_h)  # source row r at destination row perm[r]
        want_h.reshape(a.rows, -1)[perm_h] = src_h.reshape(a.rows, -1)
        src, perm = cupy.asarray(src_h), cupy.asarray(perm_h)
        for target in a.targets:
            dev = 1 if target == "peer" else 0
            with cupy.cuda.Device(dev):
                dst, want = cupy.empty(src_h.shape, src_h.dtype), cupy.asarray(want_h)
            for vi, v in enumerate(VARIANTS):
                smem = smem_bytes(v, row_bytes)
                for g in a.blocks:
                    args = (src, np.uint64(dst.data.ptr), perm, np.int32(a.rows),
                            np.int32(vi))

                    def launch(g=g, args=args, smem=smem):
                        kernel((g,), (THREADS,), args, shared_mem=smem)

                    with cupy.cuda.Device(dev):
                        dst.fill(0xFFFFFFFF)  # poison
                        cupy.cuda.Device(dev).synchronize()
                    launch()
                    cupy.cuda.Device(0).synchronize()
                    with cupy.cuda.Device(dev):
                        ok = bool((dst == want).all())
                    t = launch_seconds(launch, a.iters)
                    total = a.rows * row_bytes
                    rows_out.append(dict(
                        target=target, variant=f"{v[0]}{v[1]}", blocks=g, us=round(t * 1e6, 1),
                        gbs_per_block=round(total / t / 1e9 / g, 1),
                        total_gbs=round(total / t / 1e9, 1), correct=ok, card=card,
                        commit=a.commit, date=str(datetime.date.today())))
                    print(json.dumps(rows_out[-1]), flush=True)
    return rows_out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int_list, default=[4, 8, 16, 32, 132])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--targets", type=lambda s: s.split(","), default=["peer", "local"])
    add_output_args(ap, iters=10)
    a = ap.parse_args()
    rows = run(a)
    cols = ["target", "variant", "blocks", "us", "gbs_per_block", "total_gbs", "correct"]
    r0 = rows[0]
    emit_rows(f"# Row copies into a peer over NVLink: {r0['card']}, {r0['date']}, commit "
              f"{a.commit}\n\nG blocks ({THREADS} threads) copy {a.rows} rows of "
              f"{a.hidden} bf16 elements from GPU 0 into GPU 1 (peer) or GPU 0 (local), rows "
              "scattered by a permutation; warpR: R rows' 16-byte loads per warp before their "
              "stores; bulkS: S rows per warp in flight through shared memory by 1D bulk "
              f"copies (TMA) in and bulk stores out. Median of {a.iters} launches (CUDA "
              "events).\n\n", cols, rows, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
