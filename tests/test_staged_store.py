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
            "constexpr int NB = GATED ? 2 : 1, LD = BN + 8;",
            "const int r = wg * 64 + warp * 16 + (lane >> 2) + half * 8;",
            "*reinterpret_cast<unsigned*>(s + r * LD + j * 8 + (lane & 3) * 2) = "
            "out_pair<GATED>(",
            "for (int i = threadIdx.x; i < BM * CHUNKS; i += THREADS) { const int r = i / "
            "CHUNKS, c = i % CHUNKS * 8; if (m0 + r < rows && n0 + c < N)",
            "if constexpr (STAGE) wg_store_staged<BM, BN, GATED>(acc, sA, C, m0, n0, rows, N);",
            "wt_gemm_tile<128, 256, 4, false, 1, false, true>(",  # 1: the down GEMM's only
            "wt_gemm_tile<128, 128, 4, true, 1, false, false>("):
        assert line in code, line
    both = " ".join(render(p, replace(cfg, stage_epilogue=2)).code.split())
    assert "wt_gemm_tile<128, 128, 4, true, 1, false, true>(" in both


@pytest.mark.parametrize("se", [3, 4])
def test_async_buffer_past_the_rings(se):
    """stage_epilogue 3 / 4: the results' buffer starts past the larger ring (the next
    task's loads land while the copies read it), 16-byte aligned, its rows (BN + 8
    elements) 16-byte aligned bulk-copy sources; the down tile (3) or both (4) take it, and
    the whole fits the kernel's dynamic shared memory. Four-stage rings leave it no room."""
    from dataclasses import replace

    from flashmoe_gen.config_nvlink import async_buffer, store_kind
    from flashmoe_gen.errors import ConfigError
    from flashmoe_gen.tiles import SWIZZLE_ALIGN

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    d = KernelConfig.persistent_default(p, "sm_90")
    with pytest.raises(ConfigError, match="3-stage rings"):
        replace(d, stage_epilogue=se).validate(p, "sm_90")
    cfg = replace(d, gate_up=replace(d.gate_up, stages=3), down=replace(d.down, stages=3),
                  stage_epilogue=se)
    cfg.validate(p, "sm_90")
    off, nbytes = async_buffer(cfg)
    rings = [cfg.gate_up.smem_bytes(2), cfg.down.smem_bytes(1)]
    assert off == max(rings) - SWIZZLE_ALIGN and off % 16 == 0
    assert nbytes == 128 * (256 + PAD) * 2  # the down tile's, the larger
    assert cfg.persistent_smem() >= off + nbytes + SWIZZLE_ALIGN  # (+ the aligning slack)
    assert all((r * (bn + PAD) * 2) % 16 == 0 for bn in (128, 256) for r in range(128))
    assert store_kind(cfg, False) == "async"
    assert store_kind(cfg, True) == ("async" if se == 4 else "direct")
    code = " ".join(render(p, cfg).code.split())
    elems = off // 2
    assert f"wt_gemm_tile<128, 256, 3, false, 1, false, false, {elems}>(" in code
    gu = f"wt_gemm_tile<128, 128, 3, true, 1, false, false{', ' + str(elems) if se == 4 else ''}>("
    assert gu in code
    assert ("constexpr bool GU_ASYNC = true" in code) == (se == 4)
    assert "constexpr bool GU_ASYNC = false, DN_ASYNC = true" in code or se == 4
    for line in ("bulk_store(C + static_cast<long long>(m0 + r) * N + n0, smem_u32(s + r * LD), "
                 "bytes);",
                 "const unsigned bytes = static_cast<unsigned>(min(BN, N - n0) * "
                 "sizeof(elem_t));",
                 "for (int r = threadIdx.x; r < BM && m0 + r < rows; r += 32)"):
        assert line in code, line
