"""The persistent kernel's TMA row tasks' mbarrier ring (templates/gemm.cu.j2, wt_gemm_tile),
model-checked on the CPU over random interleavings of the 8 warps and the TMA copies: thread
0 (warp 0's lane 0) fills STAGES - 1 k-tiles ahead and refills a stage once its empty
barrier says all 8 warps retired the wgmma group that read it; each warp waits a stage's
full barrier, issues its group, retires the previous one (wgmma_wait<1>) and arrives on that
stage's empty barrier; with several row tiles per task (task_tiles) the ring runs on from
one row tile into the next, each tile's last group retired and its stage released at its
epilogue. Barriers are initialised per task. Deferred refills (config defer_refill): thread
0 fills every k-tile up to STAGES - 1 ahead whose stage is already free (an mbarrier test,
no wait) and waits only for the next k-tile's stage when that k-tile was never requested.
A tile that holds at most 64 rows (``idle``): the second warpgroup's warps (4-7) issue no
MMAs but wait every k-tile and release its stage as the others do (wt_idle_half).
Checked: no deadlock, no stage refilled while a warp's unretired group reads it, no stage
read before its k-tile landed; and the model fails when the refill skips the empty wait, or
when the idle warps release stages without waiting for them."""

from __future__ import annotations

import random

import pytest

WARPS = 8


def passed(done: int, parity: int) -> bool:
    """mbarrier try_wait.parity: the phase of this parity completed (phases complete in
    order; the latest completed is done - 1; a fresh barrier's 'previous' phase, parity 1,
    counts as completed)."""
    return (done - 1) % 2 == parity if done > 0 else parity == 1


def run_task(stages: int, kt: int, rng: random.Random, skip_empty_wait: bool = False,
             m_tiles: int = 1, defer: bool = False, idle: str = "") -> int:
    """One task: ``m_tiles`` row tiles of ``kt`` k-tiles each through one ring. Returns how
    often a deferred refill found its stage busy and moved on. ``idle``: "wait" as
    wt_idle_half, "nowait" a broken variant that releases without waiting."""
    kt_per_tile, kt_total = kt, kt * m_tiles
    full_done, empty_done, arrivals = [0] * stages, [0] * stages, [0] * stages
    landed: list[int | None] = [None] * stages  # the k-tile whose bytes are in a stage
    inflight: list[tuple[int, int]] = []        # TMA copies issued, not landed: (stage, f)
    readers: list[set[int]] = [set() for _ in range(stages)]  # unretired groups' warps

    def issue(f: int) -> None:
        s = f % stages
        assert not readers[s], f"k-tile {f} refills stage {s} while {readers[s]} read it"
        inflight.append((s, f))

    for f in range(min(stages - 1, kt_total)):  # thread 0's first fills (no waits: f < S)
        issue(f)
    nf, deferred = min(stages - 1, kt_total), 0  # defer: thread 0's next k-tile to fill
    # per warp: the next k-tile, and where it is in the iteration
    warps = [{"kt": 0, "at": "wait_full"} for _ in range(WARPS)]
    steps = 0
    while any(w["at"] != "done" for w in warps) or inflight:
        steps += 1
        assert steps < 100_000, "deadlock"
        actors = list(range(WARPS)) + (["tma"] if inflight else [])
        rng.shuffle(actors)
        moved = False
        for a in actors:  # the first that can take a step takes one: any warp may run ahead
            if moved:
                break
            if a == "tma":  # one copy lands: its bytes complete the stage's full phase
                s, f = inflight.pop(rng.randrange(len(inflight)))
                assert not readers[s], f"k-tile {f} landed in stage {s} while it was read"
                landed[s] = f
                full_done[s] += 1
                moved = True
                continue
            w = warps[a]
            if w["at"] == "done":
                continue
            kt = w["kt"]
            s = kt % stages
            idler = bool(idle) and a >= WARPS // 2
            if w["at"] == "wait_full":
                if idle != "nowait" or not idler:
                    if not passed(full_done[s], (kt // stages) & 1):
                        continue
                if not idler:
                    assert landed[s] == kt, f"warp {a} reads stage {s} before k-tile {kt}"
                    readers[s].add(a)  # the group of k-tile kt, in flight
                if kt % kt_per_tile:  # wgmma_wait<1>: k-tile kt - 1's group retired; arrive
                    p = (kt - 1) % stages
                    readers[p].discard(a)
                    arrivals[p] += 1
                    if arrivals[p] == WARPS:
                        arrivals[p], empty_done[p] = 0, empty_done[p] + 1
                w["at"] = "fill" if a == 0 else "next"
                moved = True
            elif w["at"] == "fill" and defer:  # thread 0: each free stage, up to S - 1 ahead
                blocked = False
                while nf < kt_total and nf < kt + stages:
                    free = nf < stages or skip_empty_wait or \
                        passed(empty_done[nf % stages], (nf // stages - 1) & 1)
                    if not free:
                        if nf > kt + 1:  # k-tile kt + 1 is in flight: try at the next k-tile
                            deferred += 1
                            break
                        blocked = True  # the next k-tile's stage: wait for it
                        break
                    issue(nf)
                    nf += 1
                if blocked:
                    continue
                w["at"] = "next"
                moved = True
            elif w["at"] == "fill":  # thread 0: k-tile kt + S - 1 into the stage of kt - 1
                f = kt + stages - 1
                if f < kt_total:
                    if f >= stages and not skip_empty_wait and \
                            not passed(empty_done[f % stages], (f // stages - 1) & 1):
                        continue
                    issue(f)
                w["at"] = "next"
                moved = True
            else:  # "next"
                if kt % kt_per_tile == kt_per_tile - 1:  # the row tile's epilogue:
                    readers[s].discard(a)  # wgmma_retire, then the stage released
                    if kt + 1 < kt_total:
                        arrivals[s] += 1
                        if arrivals[s] == WARPS:
                            arrivals[s], empty_done[s] = 0, empty_done[s] + 1
                w["kt"] += 1
                w["at"] = "done" if w["kt"] == kt_total else "wait_full"
                moved = True
        assert moved, "deadlock: nobody can move"
    return deferred


def run(stages: int, tasks: list[int], seed: int, skip_empty_wait: bool = False,
        m_tiles: int = 1, defer: bool = False, idle: str = "") -> int:
    """Tasks one after another (barriers re-initialised: the block barrier at a task's end
    orders it after every warp's last group); the deferred refills' count."""
    rng = random.Random(seed)
    return sum(run_task(stages, kt, rng, skip_empty_wait, m_tiles, defer, idle)
               for kt in tasks)


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("m_tiles", [1, 2, 3])
@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", range(8))
def test_ring_never_deadlocks_or_races(stages, seed, m_tiles, defer):
    rng = random.Random(100 * stages + seed)
    tasks = [rng.choice([1, 2, 3, 5, 8, 32]) for _ in range(rng.randint(1, 4))]
    run(stages, tasks, seed, m_tiles=m_tiles, defer=defer)


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", range(8))
def test_ring_with_an_idle_warpgroup(stages, seed, defer):
    """A part-empty tile (one row task, at most 64 rows): warps 4-7 wait and release only."""
    rng = random.Random(300 * stages + seed)
    tasks = [rng.choice([1, 2, 3, 5, 8, 32]) for _ in range(rng.randint(1, 4))]
    run(stages, tasks, seed, defer=defer, idle="wait")


@pytest.mark.parametrize("defer", [False, True])
def test_the_model_catches_idle_warps_that_release_unwaited(defer):
    failures = 0
    for seed in range(100):
        try:
            run(3, [16], seed, defer=defer, idle="nowait")
        except AssertionError:
            failures += 1
    assert failures > 0


def test_deferred_refills_do_move_on():
    """The deferred path is exercised: a busy stage past the next k-tile is left for later
    (otherwise the model would only ever check the blocking path)."""
    assert sum(run(4, [32], seed, defer=True) for seed in range(20)) > 0


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("m_tiles", [1, 2])
def test_the_model_catches_a_refill_without_the_empty_wait(m_tiles, defer):
    failures = 0
    for seed in range(100):
        try:
            run(3, [16], seed, skip_empty_wait=True, m_tiles=m_tiles, defer=defer)
        except AssertionError:
            failures += 1
    assert failures > 0


def test_the_template_spells_the_modelled_waits():
    """The lines the model mirrors, as the generated code spells them."""
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import render

    p = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)
    code = " ".join(render(p, KernelConfig.persistent_default(p, "sm_90")).code.split())
    for line in (
            "if (f >= STAGES && !waited) mbar_wait(smem_u32(&empty[s]), (f / STAGES - 1) & "
            "1);",
            "for (int f = 0; f < STAGES - 1 && f < KK; ++f) fill(f);",
            "mbar_wait(smem_u32(&full[stage]), (kt / STAGES) & 1);",
            "const int kt = i * KT + k, stage = kt % STAGES;",
            "if (k > 0 && (threadIdx.x & 31) == 0) mbar_arrive(smem_u32(&empty[(kt - 1) % "
            "STAGES]));",
            "if (!DEFER && threadIdx.x == 0 && kt + STAGES - 1 < KK) fill(kt + STAGES - 1);",
            "wgmma_retire<BN, GATED>(acc); if (i + 1 < m_tiles) { // the ring runs on into the "
            "next row tile: release this stage if ((threadIdx.x & 31) == 0) "
            "mbar_arrive(smem_u32(&empty[((i + 1) * KT - 1) % STAGES])); }",
            "mbar_init(smem_u32(&empty[s]), WARPS);"):
        assert line in code, line
    assert "false>(" in code and "wt_gemm_tile<128, 128, 4, true, 1, false, true>" in code
    # deferred refills (defer_refill): the loop the model's defer branch mirrors
    from dataclasses import replace
    deferred = " ".join(render(p, replace(KernelConfig.persistent_default(p, "sm_90"),
                                          defer_refill=True)).code.split())
    assert "wt_gemm_tile<128, 128, 4, true, 1, true, true>" in deferred
    for line in (
            "int nf = min(STAGES - 1, KK);",
            "for (; nf < KK && nf < kt + STAGES; ++nf) { const bool free = nf < STAGES || "
            "mbar_test(smem_u32(&empty[nf % STAGES]), (nf / STAGES - 1) & 1); if (!free && nf "
            "> kt + 1) break;",
            "fill(nf, free);"):
        assert line in deferred, line


def _body(code: str, name: str) -> str:
    """The body of device function ``name`` in ``code`` (its first definition)."""
    start = code.index("{", code.index(f"void {name}("))
    depth = 0
    for i in range(start, len(code)):
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            return code[start:i + 1]
    raise AssertionError(f"{name}: unbalanced braces")


def test_the_idle_warpgroup_meets_the_epilogues_block_barriers():
    """wt_idle_half's warps meet as many block barriers as the computing warps' epilogue
    (staged: wg_store_staged, TMA stores: wg_store_tma), then the task's last one: a count
    off by one would pair barriers of different tasks (or hang)."""
    from flashmoe_gen.config import KernelConfig
    from flashmoe_gen.problem import MoEProblem
    from flashmoe_gen.render import render

    p = MoEProblem(2048, 2048, 64, 2, world_size=2, tokens_per_rank=16384)
    code = render(p, KernelConfig.persistent_default(p, "sm_90")).code
    idle = _body(code, "wt_idle_half")
    assert "wgmma" not in idle and "if constexpr (STAGE || TSTORE) {" in idle
    for epilogue in ("wg_store_staged", "wg_store_tma"):
        assert _body(code, epilogue).count("block_sync();") == 2 == idle.count("block_sync();")
    assert "wg_staged_out<BM, BN>(s, C, m0, n0, rows, N);" in _body(code, "wg_store_staged")
    assert "if constexpr (STAGE) wg_staged_out<BM, BN>(s, C, m0, n0, rows, N);" in idle
    # the second warpgroup of a 128-row tile, where the tile holds at most 64 rows
    helper = code[code.index("bool second_wg_idle(int rows, int m0) {"):]
    assert helper[:helper.index("}")].split("{")[1].strip() == (
        "return BM == 128 && threadIdx.x / 128 == 1 && rows - m0 <= 64;")
    # both callers return from the idle path after the task's closing barrier
    for caller, cond in (("wt_gemm_tile", "MT == 1"), ("wt_consume_tile", "m_tiles == 1")):
        body = _body(code, caller)
        branch = body[body.index(f"if ({cond} && second_wg_idle<BM>(rows, m0))"):]
        branch = branch[:branch.index("return;")]
        assert "wt_idle_half<" in branch and branch.count("block_sync();") == 1, caller
        assert body.rstrip("}").rstrip().count("block_sync();") >= 2
