"""Lane-exact emulation, on the CPU, of the index arithmetic of the mma.sync GEMMs in
templates/gemm.cu.j2: the swizzled shared-memory tiles, ldmatrix.x4, mma.m16n8k16 fragments
and the epilogues, transcribed statement by statement with the PTX ISA's fragment layouts.

The control is ``expert_gemm`` (mma.sync tiles), which has passed its GPU tests: if the
emulator is right, it computes the right product. The subject is the weight-streaming
``ws_gemm`` (operands swapped, rows gathered from several sources, the shuffle epilogue),
which has not run on a GPU yet. Both are compared with a float64 matmul.
"""

from __future__ import annotations

import numpy as np
import pytest

VEC = 8


def swz(bk: int, row: int, chunk: int) -> int:
    cpr = bk // VEC
    rows_per_128b = 8 // cpr
    return row * bk + ((chunk ^ ((row // rows_per_128b) % cpr)) * VEC)


def load_tile(smem: np.ndarray, src: np.ndarray, row0: int, row_limit: int, k0: int,
              rows: int, bk: int) -> None:
    """load_tile<ROWS, BK>: 16-byte chunks of rows [row0, row0 + rows), zero past the end."""
    cpr = bk // VEC
    for c in range(rows * cpr):
        r, ch = divmod(c, cpr)
        gr, gk = row0 + r, k0 + ch * VEC
        dst = swz(bk, r, ch)
        if gr < row_limit and gk < src.shape[1]:
            smem[dst:dst + VEC] = src[gr, gk:gk + VEC]
        else:
            smem[dst:dst + VEC] = 0


def ldmatrix_x4(smem: np.ndarray, addr: list[int]) -> list[list[np.ndarray]]:
    """ldmatrix.sync.aligned.m8n8.x4.b16: lane t gives the address of row t % 8 of matrix
    t // 8; lane t receives, from each matrix i, row t // 4, elements 2 (t % 4) and + 1."""
    out = []
    for t in range(32):
        regs = []
        for i in range(4):
            row_addr = addr[i * 8 + t // 4]
            regs.append(smem[row_addr + 2 * (t % 4): row_addr + 2 * (t % 4) + 2].copy())
        out.append(regs)
    return out


def mma_16816(d: np.ndarray, a: list[list[np.ndarray]], b0: list[np.ndarray],
              b1: list[np.ndarray]) -> None:
    """mma.m16n8k16.row.col: rebuild A (16 x 16), B (16 x 8) from the lanes' fragments
    (PTX ISA layouts), multiply, scatter D back (d: [32 lanes][4])."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for t in range(32):
        g, c = t // 4, t % 4
        A[g, 2 * c:2 * c + 2] = a[t][0]
        A[g + 8, 2 * c:2 * c + 2] = a[t][1]
        A[g, 2 * c + 8:2 * c + 10] = a[t][2]
        A[g + 8, 2 * c + 8:2 * c + 10] = a[t][3]
        B[2 * c:2 * c + 2, g] = b0[t]
        B[2 * c + 8:2 * c + 10, g] = b1[t]
    D = A @ B
    for t in range(32):
        g, c = t // 4, t % 4
        d[t] += [D[g, 2 * c], D[g, 2 * c + 1], D[g + 8, 2 * c], D[g + 8, 2 * c + 1]]


def silu_mul(v, u):
    return v / (1 + np.exp(-v)) * u


def sync_tile(A, B0, B1, rows, bm, bn, bk, wm, wn, m_block, n_block, C):
    """expert_gemm's body for one block (one group, no offsets)."""
    gated = B1 is not None
    nb = 2 if gated else 1
    wtm, wtn = bm // wm, bn // wn
    mi_n, ni_n = wtm // 16, wtn // 8
    K, N = A.shape[1], B0.shape[0]
    m0, n0 = m_block * bm, n_block * bn
    acc = np.zeros((wm * wn, nb, mi_n, ni_n, 32, 4))
    for kt in range((K + bk - 1) // bk):
        sa = np.zeros(bm * bk)
        sb = [np.zeros(bn * bk) for _ in range(nb)]
        load_tile(sa, A, m0, rows, kt * bk, bm, bk)
        for b, Bm in enumerate([B0, B1][:nb]):
            load_tile(sb[b], Bm, n0, N, kt * bk, bn, bk)
        for warp in range(wm * wn):
            wmi, wni = divmod(warp, wn)
            for kk in range(bk // 16):
                af = []
                for i in range(mi_n):
                    addr = [swz(bk, wmi * wtm + i * 16 + (lane & 15), kk * 2 + (lane >> 4))
                            for lane in range(32)]
                    af.append(ldmatrix_x4(sa, addr))
                for b in range(nb):
                    bfr = [None] * ni_n
                    for j in range(ni_n // 2):
                        addr = [swz(bk, wni * wtn + j * 16 + (lane & 7) + ((lane >> 4) << 3),
                                    kk * 2 + ((lane >> 3) & 1)) for lane in range(32)]
                        r4 = ldmatrix_x4(sb[b], addr)
                        bfr[2 * j] = ([r4[t][0] for t in range(32)], [r4[t][1] for t in range(32)])
                        bfr[2 * j + 1] = ([r4[t][2] for t in range(32)],
                                          [r4[t][3] for t in range(32)])
                    for i in range(mi_n):
                        for j in range(ni_n):
                            mma_16816(acc[warp, b, i, j], af[i], *bfr[j])
    for warp in range(wm * wn):
        wmi, wni = divmod(warp, wn)
        for lane in range(32):
            for i in range(mi_n):
                for half in range(2):
                    r = m0 + wmi * wtm + i * 16 + (lane >> 2) + half * 8
                    if r >= rows:
                        continue
                    for j in range(ni_n):
                        n = n0 + wni * wtn + j * 8 + (lane & 3) * 2
                        if n >= N:
                            continue
                        v = acc[warp, 0, i, j, lane, half * 2:half * 2 + 2]
                        if gated:
                            v = silu_mul(v, acc[warp, 1, i, j, lane, half * 2:half * 2 + 2])
                        C[r, n:n + 2] = v


def ws_block(sources, B0, B1, tt, bn, bk, warps, n_block, C_rows):
    """ws_gemm's body for one block: ``sources`` = [(A rows of that source, row count)],
    ``C_rows``: the output row arrays of each source (written in place)."""
    gated = B1 is not None
    nb = 2 if gated else 1
    wrows = bn // warps
    mi_n, nj_n = wrows // 16, tt // 8
    N, K = B0.shape
    n0 = n_block * bn
    first = np.cumsum([0] + [n for _, n in sources])
    rows = int(first[-1])
    for t0 in range(0, rows, tt):
        row_src, row_dst = [], []
        for tid in range(tt):
            r = t0 + tid
            if r < rows:
                o = int(np.searchsorted(first, r, side="right") - 1)
                row_src.append(sources[o][0][r - first[o]])
                row_dst.append((o, r - int(first[o])))
            else:
                row_src.append(None)
                row_dst.append(None)
        X = np.stack([s if s is not None else np.zeros(K) for s in row_src])
        acc = np.zeros((warps, nb, mi_n, nj_n, 32, 4))
        for kt in range((K + bk - 1) // bk):
            k0 = kt * bk
            sw = [np.zeros(bn * bk) for _ in range(nb)]
            for b, Bm in enumerate([B0, B1][:nb]):
                load_tile(sw[b], Bm, n0, N, k0, bn, bk)
            sx = np.zeros(tt * bk)
            cpr = bk // VEC
            for c in range(tt * cpr):  # the gathered token tile
                r, ch = divmod(c, cpr)
                gk = k0 + ch * VEC
                dst = swz(bk, r, ch)
                ok = row_src[r] is not None and gk < K
                sx[dst:dst + VEC] = X[r, gk:gk + VEC] if ok else 0
            for warp in range(warps):
                for kk in range(bk // 16):
                    xf = [None] * nj_n
                    for j in range(nj_n // 2):
                        addr = [swz(bk, j * 16 + (lane & 7) + ((lane >> 4) << 3),
                                    kk * 2 + ((lane >> 3) & 1)) for lane in range(32)]
                        r4 = ldmatrix_x4(sx, addr)
                        xf[2 * j] = ([r4[t][0] for t in range(32)], [r4[t][1] for t in range(32)])
                        xf[2 * j + 1] = ([r4[t][2] for t in range(32)],
                                         [r4[t][3] for t in range(32)])
                    for b in range(nb):
                        for i in range(mi_n):
                            addr = [swz(bk, warp * wrows + i * 16 + (lane & 15),
                                        kk * 2 + (lane >> 4)) for lane in range(32)]
                            wf = ldmatrix_x4(sw[b], addr)
                            for j in range(nj_n):
                                mma_16816(acc[warp, b, i, j], wf, *xf[j])
        for warp in range(warps):  # the epilogue, with __shfl_down_sync(v, 4)
            for i in range(mi_n):
                for half in range(2):
                    for j in range(nj_n):
                        for c in range(2):
                            v = acc[warp, 0, i, j, :, half * 2 + c].copy()
                            if gated:
                                v = silu_mul(v, acc[warp, 1, i, j, :, half * 2 + c])
                            w = np.array([v[lane + 4] if lane + 4 < 32 else v[lane]
                                          for lane in range(32)])
                            for lane in range(32):
                                n = n0 + warp * wrows + i * 16 + (lane >> 2) + half * 8
                                t = j * 8 + (lane & 3) * 2 + c
                                dst = row_dst[t]
                                if ((lane >> 2) & 1) == 0 and dst is not None and n < N:
                                    o, lr = dst
                                    C_rows[o][lr, n] = v[lane]
                                    C_rows[o][lr, n + 1] = w[lane]


def _ref(A, B0, B1):
    h = A @ B0.T
    return silu_mul(h, A @ B1.T) if B1 is not None else h


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_control_sync_tile_computes_the_product(gated):
    """The GPU-verified kernel's fragment code, through the emulator: the right product
    (so the emulated ldmatrix/mma layouts are the hardware's)."""
    rng = np.random.default_rng(1)
    K, N, rows = 48, 40, 21
    A = rng.standard_normal((rows, K))
    B0 = rng.standard_normal((N, K))
    B1 = rng.standard_normal((N, K)) if gated else None
    C = np.full((rows, N), np.nan)
    bm, bn, bk, wm, wn = 32, 32, 32, 2, 1
    for m in range(-(-rows // bm)):
        for n in range(-(-N // bn)):
            sync_tile(A, B0, B1, rows, bm, bn, bk, wm, wn, m, n, C)
    np.testing.assert_allclose(C, _ref(A, B0, B1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("counts", [(5, 0, 9), (20,), (1, 1, 1)], ids=lambda c: f"rows{c}")
def test_weight_streaming_block_gathers_sources_and_swaps_operands(gated, counts):
    """ws_gemm: rows of several sources gathered into token passes (more rows than a pass,
    an empty source, K and N not multiples of the tile), weights on the MMA's row side,
    the shuffle epilogue writing each token's two adjacent columns."""
    rng = np.random.default_rng(2)
    K, N = 40, 52
    B0 = rng.standard_normal((N, K))
    B1 = rng.standard_normal((N, K)) if gated else None
    sources = [(rng.standard_normal((c, K)), c) for c in counts]
    outs = [np.full((c, N), np.nan) for c in counts]
    tt, bn, bk, warps = 16, 32, 32, 2
    for n in range(-(-N // bn)):
        ws_block(sources, B0, B1, tt, bn, bk, warps, n, outs)
    for (a, _), got in zip(sources, outs, strict=True):
        np.testing.assert_allclose(got, _ref(a, B0, B1), rtol=1e-10, atol=1e-10)


def test_weight_streaming_block_with_64_token_passes():
    """The 64-token tile the defaults now take at ~28-32 rows per expert (tiles.ws_token_tile):
    eight token groups per pass, a second pass past 64 rows."""
    rng = np.random.default_rng(3)
    K, N = 72, 64
    B0, B1 = rng.standard_normal((N, K)), rng.standard_normal((N, K))
    counts = (70, 3)
    sources = [(rng.standard_normal((c, K)), c) for c in counts]
    outs = [np.full((c, N), np.nan) for c in counts]
    for n in range(N // 32):
        ws_block(sources, B0, B1, 64, 32, 32, 2, n, outs)
    for (a, _), got in zip(sources, outs, strict=True):
        np.testing.assert_allclose(got, _ref(a, B0, B1), rtol=1e-10, atol=1e-10)
