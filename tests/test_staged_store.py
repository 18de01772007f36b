"""The staged epilogue (config stage_epilogue, templates/gemm.cu.j2 wg_store_staged) on the
CPU: a mirror of its index arithmetic, tied to the template's text, checks that the
accumulator pairs of every thread fill the BM x BN tile once, that a warp's 4-byte writes
fall on 32 different banks (the 8-element padding), and that the 16-byte copy reads every
chunk once, a warp instruction covering whole-row runs of 512 bytes."""
import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render

PAD = 8  # elements of padding per row (STAGED_ELEMS)


def _pairs(bm: int, bn: int):
    """(thread, row, column) of every 32-bit pair write, as wg_store_staged's first loop."""
    for t in range(bm // 64 * 128):
        wg, warp, lane = t // 128, t % 128 // 32, t & 31
        for half in range(2):
            r = wg * 64 + warp * 16 + (lane >> 2) + half * 8
            for j in range(bn // 8):
                yield t, r, j * 8 + (lane & 3) * 2, (half, j)


@pytest.mark.parametrize("bm,bn", [(64, 128), (128, 128), (64, 256), (128, 256)])
def test_staged_writes_fill_the_tile_without_bank_conflicts(bm, bn):
    ld = bn + PAD
    seen, banks = set(), {}
    for t, r, c, step in _pairs(bm, bn):
        assert (r, c) not in seen
        seen.add((r, c))
        banks.setdefault((t // 32, step), []).append((r * ld + c) * 2 // 4 % 32)
    assert len(seen) * 2 == bm * bn
    assert all(len(set(b)) == 32 for b in banks.values())  # one bank per lane
    chunks = bn // 8
    threads = bm // 64 * 128
    read = [(i // chunks, i % chunks * 8) for i in range(bm * chunks)]
    assert len(set(read)) == bm * chunks and len(read) % threads == 0
    for w in range(0, len(read), 32):  # a warp instruction: contiguous in the output rows
        rows = {r for r, _ in read[w:w + 32]}
        assert len(rows) * bn * 2 == 512
    assert all((r * ld + c) * 2 % 16 == 0 for r, c in read)  # 16-byte aligned smem reads


def test_template_matches_the_mirror():
    p = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=4096)
    cfg = KernelConfig.persistent_default(p, "sm_90")
    from dataclasses import replace
    code = " ".join(render(p, replace(cfg, stage_epilogue=1)).code.split())
    for line in (
            "constexpr int STAGED_ELEMS = BM * (BN + 8);",
            "constexpr int LD = BN + 8, THREADS = BM / 64 * 128, CHUNKS = BN / 8;",
            "constexpr int LD = BN + 8; const int q = threadIdx.x & 3;",
            "const int r = wg * 64 + warp * 16 + (lane >> 2) + half * 8;",
            "put(r, j, out_pair<GATED>(acc[0][4 * j + 2 * half], acc[0][4 * j + 2 * half + 1],",
            "*reinterpret_cast<unsigned*>(s + r * LD + j * 8 + q * 2) = v;",
            "for (int i = threadIdx.x; i < BM * CHUNKS; i += THREADS) { const int r = i / "
            "CHUNKS, c = i % CHUNKS * 8; if (m0 + r < rows && n0 + c < N)",
            "if constexpr (STAGE) wg_store_staged<BM, BN, GATED>(acc, sA, C, m0, n0, rows, N);",
            "wt_gemm_tile<128, 256, 4, false, 1, false, true>(",  # 1: the down GEMM's only
            "wt_gemm_tile<128, 128, 4, true, 1, false, false>("):
        assert line in code, line
    both = " ".join(render(p, replace(cfg, stage_epilogue=2)).code.split())
    assert "wt_gemm_tile<128, 128, 4, true, 1, false, true>(" in both


def _swizzled(bm: int, bn: int):
    """(thread, element offset) of every pair write of wg_store_tma, as the template forms
    its byte address (row r's swizzled chunk 0, XOR chunk j % 8 x 16, plus box j // 8),
    checked against the layout's definition: box j // 8 of BM rows x 64, row r's 16-byte
    chunk j % 8 at chunk (j % 8) ^ (r % 8)."""
    for t, r, c, (half, j) in _pairs(bm, bn):
        lane = t & 31
        row = (r * 64 + (r % 8) * 8 + (lane & 3) * 2) * 2  # from a 1024-byte aligned base
        addr = (row ^ (j % 8) * 16) + j // 8 * bm * 64 * 2
        off = j // 8 * bm * 64 + r * 64 + ((j % 8) ^ (r % 8)) * 8 + c % 8
        assert addr == off * 2
        yield t, (half, j), off, (r, c)


@pytest.mark.parametrize("bm,bn", [(128, 64), (128, 128), (128, 256)])
def test_tma_store_boxes_fill_once_without_bank_conflicts(bm, bn):
    """wg_store_tma's pairs fill BN / 64 boxes in the 128-byte swizzle (the act map's layout,
    which the down tasks' TMA loads read) once each, a warp's writes on 32 banks."""
    seen, banks = {}, {}
    for t, step, off, (r, c) in _swizzled(bm, bn):
        assert off not in seen
        seen[off] = (r, c)
        banks.setdefault((t // 32, step), []).append(off * 2 // 4 % 32)
    assert sorted(seen) == list(range(0, bm * bn, 2))
    assert all(len(set(b)) == 32 for b in banks.values())
    for off, (r, c) in seen.items():  # the swizzle TMA undoes: box, row, chunk back
        box, rest = divmod(off, bm * 64)
        row, col = divmod(rest, 64)
        assert (box, row) == (c // 64, r)
        assert (col // 8) ^ (row % 8) == c % 64 // 8 and col % 8 == c % 8


def test_tma_store_template_matches_the_mirror():
    """stage_epilogue 3: the gate/up row tasks store by the act map (wmaps[7]) from their
    group's first row, every TMA row task waits for and settles them; the mirror's lines."""
    from dataclasses import replace

    from flashmoe_gen.config_nvlink import store_kind
    from flashmoe_gen.errors import ConfigError

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    cfg = replace(KernelConfig.persistent_default(p, "sm_90"), stage_epilogue=3)
    cfg.validate(p, "sm_90")
    assert (store_kind(cfg, True), store_kind(cfg, False)) == ("tma", "staged")
    code = " ".join(render(p, cfg).code.split())
    for line in (
            "wt_gemm_tile<128, 256, 4, false, 1, false, true, false, true>(",
            "wt_gemm_tile<128, 128, 4, true, 1, false, false, true, true>(",
            "task_clk + GU_CLK, &pend, wm(7), act_row(s, e)); });",
            "task_clk + DN_CLK, &pend); });",
            "constexpr bool GU_TSTORE = true;",
            "const unsigned row = smem_u32(s + r * 64 + (r % 8) * 8 + q * 2);",
            "st_shared_u32((row ^ (j % 8) * 16) + j / 8 * BOX * sizeof(elem_t),",
            "tma_store_2d(*cmap, smem_u32(s + b * BOX), n0 + b * 64, *c_row0 + m0);"):
        assert line in code, line
    assert "constexpr bool GU_TSTORE = false;" in " ".join(
        render(p, replace(cfg, stage_epilogue=1)).code.split())
    bad = replace(cfg, gate_up=replace(cfg.gate_up, bn=32))
    with pytest.raises(ConfigError, match="boxes of the down tile's 128 rows"):
        bad.validate(p, "sm_90")
