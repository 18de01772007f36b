"""The benchmark scripts' shared table and file writer (bench/report.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from report import emit, md_table  # noqa: E402


def test_md_table_rows_and_header():
    text = md_table(["a", "b"], [[1, 2.5], ["x", None]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.5 |", "| x | None |"]


def test_emit_writes_markdown_and_json(tmp_path, capsys):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    emit("# title\n", [{"k": 1}], str(md), str(js))
    assert md.read_text() == "# title\n" and json.loads(js.read_text()) == [{"k": 1}]
    assert "# title" in capsys.readouterr().out
    emit("only printed\n", [], None, None)
    assert "only printed" in capsys.readouterr().out


def test_nvlink_sweep_variants_cover_every_combination():
    import dataclasses

    import pytest
    from nvlink_sweep import variants

    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem

    p = MoEProblem(512, 2048, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=1)
    base = dataclasses.replace(KernelConfig.persistent_default(p), gu_splits=1, dn_splits=1)
    assert variants(base, "") == [base]
    got = variants(base, "dn_s=4,8;gu_bk=32,64")
    assert len(got) == 4 and base in got
    assert {(c.down.stages, c.gate_up.bk) for c in got} == {(4, 32), (4, 64), (8, 32), (8, 64)}
    assert {c.dispatch_blocks for c in variants(base, "d=0,1")} == {0, 1}
    assert {c.ws_tma for c in variants(base, "wt=0,1")} == {False, True}
    got = variants(base, "b=1,2;ks=1x1,2x8")
    assert {(c.blocks_per_sm, c.gu_splits, c.dn_splits) for c in got} == \
        {(1, 1, 1), (2, 1, 1), (1, 2, 8), (2, 2, 8)}
    with pytest.raises(SystemExit, match="gu_|dn_"):
        variants(base, "xx_s=4")
    # two row tiles per task on a default with a staged epilogue (Mixtral's): the variant
    # drops the staging, which needs the ring free at a tile's end, unless se is varied too
    mix = MoEProblem(4096, 14336, 8, 2, world_size=4, tokens_per_rank=4096)
    staged = KernelConfig.persistent_default(mix, "sm_90")
    assert staged.stage_epilogue
    got = variants(staged, "tt=1,2")
    assert {(c.task_tiles, c.stage_epilogue) for c in got} == {(1, staged.stage_epilogue),
                                                                (2, 0)}
    for c in got:
        c.validate(mix, "sm_90")
    assert len(variants(staged, "tt=1,2;se=0,1")) == 4


def test_sm_stream_kernels_compile_for_hopper():
    """bench/sm_stream.py's kernels (cp.async ring, 1D bulk copies with mbarriers, plain
    loads) build for sm_90, and every variant's ring fits an H100's shared memory."""
    import sm_stream
    from cupy.cuda import nvrtc

    from flashmoe_gen.compile import cuda_include_dirs

    prog = nvrtc.createProgram(sm_stream.SOURCE, "sm_stream.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["--std=c++17", "-arch=sm_90",
                                    *(f"-I{d}" for d in cuda_include_dirs())])
        assert nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    assert max(sm_stream.smem_bytes(v) for v in sm_stream.VARIANTS) <= 227 * 1024
    assert len(sm_stream.VARIANTS) == sm_stream.SOURCE.count("case ") + 1  # + default


def test_kernel_breakdown_takes_each_kernels_slowest_rank_largest_first():
    import kernel_breakdown as kb

    ranks = [{"gemm": {"calls": 2.0, "us": 4000.0}, "nccl": {"calls": 6.0, "us": 900.0}},
             {"gemm": {"calls": 2.0, "us": 4100.0}}]
    row = {"problem": "p", "config": "c",
           "parts": {"all": {"forward_ms": 6.5, "ranks": ranks}}}
    lines = kb.table(row).splitlines()
    assert lines[0].startswith("### p, all: forward 6.5000 ms, kernels 4.9000 ms")
    assert lines[-2:] == ["| gemm | 2.0 | 4100.0 | 63.1 |", "| nccl | 6.0 | 900.0 | 13.8 |"]
    assert len(kb.short("k" * 100)) == kb.NAME_CHARS and kb.short("a  b") == "a b"

    class Avg:  # torch renamed the attribute: either is read
        cuda_time_total = 7.0

    assert kb.device_us(Avg()) == 7.0


def test_kernel_breakdown_measures_how_long_some_kernel_ran():
    import types

    import kernel_breakdown as kb

    # Two streams overlapping (0-4 and 2-6), a gap, one more kernel (8-9): busy 7 of 9.
    assert kb.coverage([(8.0, 9.0), (0.0, 4.0), (2.0, 6.0)]) == (7.0, 9.0)
    assert kb.coverage([]) == (0.0, 0.0)
    assert kb.coverage([(1.0, 3.0), (3.0, 4.0)]) == (3.0, 3.0)  # touching: no gap

    def ev(name, device, start, end):
        return types.SimpleNamespace(name=name, device_type=f"DeviceType.{device}",
                                     time_range=types.SimpleNamespace(start=start, end=end))

    events = [ev("gemm", "CUDA", 0, 4), ev("aten::mm", "CPU", 0, 50),
              ev("Memcpy DtoH", "CUDA", 4, 40), ev("nccl", "CUDA", 2, 6), ev("x", "CUDA", 5, 5)]
    assert kb.kernel_intervals(events) == [(0.0, 4.0), (2.0, 6.0)]
    cover = [{"busy_us": 5000.0, "span_us": 5500.0}, {"busy_us": 4000.0, "span_us": 5600.0}]
    assert kb.cover_text(cover) == ("; some kernel running 4.00 of 5.60 ms per forward "
                                    "(idle 29%, the idlest rank)")
    row = {"problem": "p", "config": "c",
           "parts": {"all": {"forward_ms": 6.0, "ranks": [{"g": {"calls": 1, "us": 1.0}}],
                             "cover": cover}}}
    assert kb.table(row).splitlines()[0].endswith("(idle 29%, the idlest rank)")


def test_overlap_rounds_give_each_ratio_and_the_text_names_them():
    from overlap import round_rows, rounds_text

    from flashmoe_gen.tuner.bench import Timing

    rounds = [(Timing(6.39, 5.98, 6.74, 30, (6.1, 6.4)),
               {"torch_ep_ms": 7.09, "torch_ep_is": "sync"}),
              (Timing(5.50, 5.40, 5.60, 30, (5.5, 5.4)),
               {"torch_ep_ms": 6.88, "torch_ep_is": "graph"})]
    rows = round_rows(rounds)
    assert [r["vs_torch"] for r in rows] == [0.901, 0.799]
    assert rows[0]["a_rank_medians"] == [6.1, 6.4] and rows[1]["a_p20_p80"] == (5.4, 5.6)
    text = rounds_text({"rounds": rows})
    assert text == "r1 6.39 (5.98-6.74) / 7.09 sync = 0.901; r2 5.5 (5.4-5.6) / 6.88 graph = 0.799"
    assert rounds_text({}) == ""  # rows of older JSON files have no rounds


def test_phases_text_adds_the_task_loops_clocks():
    """A sweep row's phase line: the phases, then (where the config has TMA row tiles) the
    time per tile, then the waits per block."""
    from overlap import phases_text

    row = {"phases_us_nvlink": {"route": 160.0, "combine": 60.0},
           "tasks_us_nvlink": {"tiles": 4000.0, "prologue_us": 1.2, "loop_us": 22.0,
                               "epilogue_us": 2.5, "dep_wait_us": 30.0, "flag_wait_us": 5.0}}
    assert phases_text(row) == ("route 160.0, combine 60.0; per TMA row tile (4000): "
                                "prologue_us 1.2, loop_us 22.0, epilogue_us 2.5; waits per "
                                "block: dep_wait_us 30.0, flag_wait_us 5.0")
    row["tasks_us_nvlink"] = {"tiles": 0, "prologue_us": 0.0, "loop_us": 0.0,
                              "epilogue_us": 0.0, "dep_wait_us": 3.0, "flag_wait_us": 1.0}
    assert phases_text(row) == ("route 160.0, combine 60.0; waits per block: dep_wait_us 3.0, "
                                "flag_wait_us 1.0")
    assert phases_text({"phases_us_nvlink": {"route": 1.0}}) == "route 1.0"
    # per GEMM (newer rows) and the barrier waits
    row["tasks_us_nvlink"] = {"tiles": 3, "prologue_us": 2.0, "loop_us": 21.0,
                              "epilogue_us": 4.0, "gu_tiles": 2, "gu_prologue_us": 2.1,
                              "gu_loop_us": 20.0, "gu_epilogue_us": 4.5, "dn_tiles": 1,
                              "dn_prologue_us": 1.8, "dn_loop_us": 23.0,
                              "dn_epilogue_us": 3.0, "dep_wait_us": 3.0,
                              "flag_wait_us": 1.0, "barrier_wait_us": 40.0}
    assert phases_text(row) == (
        "route 160.0, combine 60.0; per TMA row tile (3): prologue_us 2.0, loop_us 21.0, "
        "epilogue_us 4.0 (prologue / loop / epilogue: gate/up (2) 2.1 / 20.0 / 4.5, down (1) "
        "1.8 / 23.0 / 3.0); waits per block: dep_wait_us 3.0, flag_wait_us 1.0, "
        "barrier_wait_us 40.0")
    row["sm_ghz_nvlink"] = 1.755
    assert phases_text(row).endswith("barrier_wait_us 40.0; SM clock 1.755 GHz")
    # the router's clocks (newer rows; zero where its loop did not run)
    row["tasks_us_nvlink"] |= {"route_logits_us": 90.0, "route_select_us": 12.5}
    assert phases_text(row).endswith("barrier_wait_us 40.0; router per block: logits_us "
                                     "90.0, select_us 12.5; SM clock 1.755 GHz")
    row["tasks_us_nvlink"] |= {"route_logits_us": 0.0, "route_select_us": 0.0}
    assert phases_text(row).endswith("barrier_wait_us 40.0; SM clock 1.755 GHz")


def test_scaling_weak_scaling_growth_from_fewest_to_most_gpus():
    from scaling import weak_scaling

    def row(g, e, t, ms, nvl=None):
        return {"gpus": g, "experts": e, "tokens_per_gpu": t, "ours_ms": ms,
                "ours_nvlink_ms": nvl}

    rows = [row(2, 8, 1024, 1.0, 0.20), row(4, 8, 1024, 1.5, 0.22),
            row(2, 64, 1024, 2.0), row(4, 64, 1024, 1.8, 0.3),  # nvlink on one count only
            row(4, 32, 1024, 1.0, 0.2)]  # one GPU count: no weak-scaling row
    got = weak_scaling(rows)
    assert [(w["experts"], w["timing"], w["growth"]) for w in got] == [
        (8, "ours_nvlink_ms", "+10.0%"), (64, "ours_ms", "-10.0%")]
    assert got[0]["ms_2gpus"] == 0.20 and got[0]["ms_4gpus"] == 0.22


def test_nvlink_sweep_one_list_is_moot_on_fused_sources():
    """--vary il=0,1 on a fused default: the one list has no per-source lists to rearrange,
    so that variant is the default itself (one row, not a refused build); on phased
    per-source row tasks both variants stay."""
    import dataclasses

    from nvlink_sweep import variants

    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=1024)
    fused = KernelConfig.persistent_default(p)
    assert fused.fuse_sources
    assert variants(fused, "il=0,1") == [fused]
    rows = KernelConfig.persistent_default(p.replace(tokens_per_rank=16384))
    assert rows.phased_tasks and not rows.fuse_sources
    got = variants(rows, "il=0,1")
    assert [c.interleave_sources for c in got] == [False, True]
    # (the default's own rows first, moot without the one list, goes with it)
    assert got[0] == dataclasses.replace(rows, interleave_sources=False, own_first=False)
    # the own down tasks last go with own_first off over the one list alone (moot there)
    last = dataclasses.replace(rows, own_down_last=True)
    assert variants(last, "of=0,1") == [dataclasses.replace(rows, own_first=False), last]


def test_tile_waste_tail_costs_and_groupings():
    from tile_waste import tile_cost, waste

    assert tile_cost([0, 1, 64, 65, 128, 129, 200]).tolist() == [0, 0.5, 0.5, 1, 1, 1.5, 2]
    w = waste(4, 64, 16384, 2)
    assert w["need"] == 256  # 16384 x 2 rows per rank on average, 128 per tile
    assert w["merged"] <= w["own_and_peers"] <= w["per_source"]
    assert w["per_source"] / w["need"] > 1.04  # E=64: ~6% in ragged tails
