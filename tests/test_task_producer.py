"""config task_producer on the CPU: the knob's checks, what it renders, the tuner's space, and
the producer / worker protocol of templates/persistent.cu.j2 (the ring kept across tasks,
the descriptors' double buffer, the staged epilogue's and the shared-experts tasks' hold on
the ring's memory, the idle second warpgroup of a tile of at most 64 rows) ported to Python
and run under random interleavings with mbarrier semantics: every k-tile a worker
multiplies is the one it expects, no load lands in memory a worker still reads, nothing
deadlocks. The port is tied to the template's text."""
import random
from dataclasses import dataclass, replace

import pytest

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.config_nvlink import PRODUCER_REGS, PRODUCER_THREADS, WORKER_REGS
from flashmoe_gen.errors import ConfigError
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.render import render
from flashmoe_gen.tiles import GemmTile

BIG = MoEProblem(2048, 2048, 64, 2, world_size=4, tokens_per_rank=16384)


def _producer(problem=BIG, **knobs):
    """The persistent default with a producer, on per-source lists (it learns the sources'
    lists one by one: not the default's one list)."""
    return replace(KernelConfig.persistent_default(problem, "sm_90"), task_producer=True,
                   interleave_sources=False, own_first=False, **knobs)


def test_registers_split_the_launch_allocation():
    # 384 threads launched at 168 registers each: the producer's and the workers' shares
    assert PRODUCER_THREADS * PRODUCER_REGS + 256 * WORKER_REGS <= 384 * 168
    assert PRODUCER_REGS % 8 == 0 and WORKER_REGS % 8 == 0


def test_default_tiles_take_a_producer():
    cfg = _producer()
    cfg.validate(BIG, "sm_90")
    assert cfg.name.endswith("__pr__ts") and KernelConfig.from_name(cfg.name) == cfg
    assert cfg.persistent_threads == 256 + PRODUCER_THREADS
    # 4 stages of the A tile (128 x 64) and the larger B tile (the down GEMM's 256 x 64)
    assert cfg.persistent_smem() == 4 * (128 * 64 + 256 * 64) * 2 + 1024
    assert KernelConfig.persistent_default(BIG, "sm_90").persistent_threads == 256


@pytest.mark.parametrize("change,words", [
    (dict(ws_tma=False, stage_epilogue=0, task_tiles=1), "TMA row tasks"),
    (dict(defer_refill=True), "deferred refills"),
    (dict(stage_epilogue=3), "TMA stores"),
    (dict(down=GemmTile(128, 256, 64, 8, 1, 3, "wgmma")), "same stages"),
])
def test_refusals_say_what_to_change(change, words):
    cfg = replace(_producer(), **change)
    with pytest.raises(ConfigError) as e:
        cfg.validate(BIG, "sm_90")
    assert e.value.field == "task_producer" and words in str(e.value), str(e.value)


def test_render_feeds_the_tasks_from_the_producer():
    code = render(BIG, _producer()).code
    flat = " ".join(code.split())
    for text in ("constexpr bool TASK_PRODUCER = true;",
                 "__launch_bounds__(fmoe::P_THREADS + 128, 1)",
                 f"regs_dec<{PRODUCER_REGS}>();", f"regs_inc<{WORKER_REGS}>();",
                 "wt_consume_tile<128, 128, 4, 16384, true, true>(",
                 "wt_consume_tile<128, 256, 4, 16384, false, true>(",
                 'asm volatile("bar.sync 1, %0;\\n" ::"n"(WORKERS) : "memory");'):
        assert text in code, text
    assert "wt_gemm_tile<" not in flat.split("The workers: each task")[1].split("settle();")[0]
    plain = render(BIG, KernelConfig.persistent_default(BIG, "sm_90")).code
    assert "constexpr bool TASK_PRODUCER = false;" in plain
    assert "wt_consume_tile<1" not in plain and "regs_dec<" not in plain.split("moe_persistent")[1]


def test_the_search_space_carries_the_producer_where_it_means_something():
    from flashmoe_gen.tuner.space import SearchSpace

    space = SearchSpace.for_problem(BIG, "sm_90", "full", ("nccl", "nvlink"))
    assert space.choices["task_producer"] == (False, True)
    cfg = _producer()
    params = space.params_from_config(cfg)
    assert space.config_from_params(params) == cfg and space.canonical(params)["task_producer"]
    for moot in ({"fuse": True}, {"transport": "nccl"}, {"ws_tma": False},
                 {"gu_mma": "sync", "dn_mma": "sync"}):
        assert space.canonical(params | moot)["task_producer"] is False, moot
    assert space.check(params | {"defer_refill": True}) is not None


# -- the protocol, ported -------------------------------------------------------------------
class Bar:
    """An mbarrier: `count` arrivals and the expected bytes complete a phase."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def arrive(self, tx=0):
        assert self.pending > 0
        self.pending -= 1
        self.tx += tx
        self._maybe_complete()

    def landed(self, tx):
        self.tx -= tx
        self._maybe_complete()

    def done(self, parity):  # try_wait.parity: the phase of this parity completed
        return (self.phase & 1) != parity


@dataclass
class Task:
    kind: str  # "shared", "gu", "dn"
    kt: int = 0  # k-tiles per row tile
    m_tiles: int = 1  # row tiles (task_tiles; staged results take one)
    staged: bool = False
    short: bool = False  # at most 64 rows (one row tile): warps 4-7 idle (wt_idle_half)

    @property
    def kk(self) -> int:  # the ring's k-tiles of the task
        return self.kt * self.m_tiles


def _run(tasks, stages, seed, warps=8, idle_waits=True):
    """Producer thread and `warps` MMA warps step by step in a random order; TMA boxes land
    at random later steps. Returns the k-tiles each warp multiplied. `idle_waits` False: a
    broken idle warpgroup that releases stages without waiting for them."""
    rng = random.Random(seed)
    full = [Bar(1) for _ in range(stages)]
    empty = [Bar(warps) for _ in range(stages)]
    desc_full, desc_empty = [Bar(1), Bar(1)], [Bar(warps), Bar(warps)]
    staged, ring_free = Bar(1), Bar(1)
    desc = [None, None]
    ring = [None] * stages  # what each stage holds
    held = [set() for _ in range(stages)]  # warps still reading a stage
    memory_busy = set()  # warps using the ring's memory whole (staged epilogue, cp.async)
    landing = []  # (stage, content)
    seen = {w: [] for w in range(warps)}
    sync_count = [0, 0]  # block_sync: arrivals of the current generation, generation

    def producer():
        g, shared_waits, staged_waits, owed = 0, 0, 0, False
        for i, task in enumerate([*tasks, None]):
            slot = i % 2
            if i >= 2:
                while not desc_empty[slot].done((i // 2 - 1) & 1):
                    yield
            desc[slot] = (i, task, g)
            desc_full[slot].arrive()
            if task is None:
                return
            if task.kind == "shared":
                while not ring_free.done(shared_waits & 1):
                    yield
                shared_waits += 1
                continue
            if owed:
                while not staged.done(staged_waits & 1):
                    yield
                staged_waits += 1
            owed = task.staged
            for f in range(task.kk):
                st = g % stages
                if g >= stages:
                    while not empty[st].done((g // stages - 1) & 1):
                        yield
                full[st].arrive(tx=1)
                landing.append((st, (i, f)))
                g += 1
                yield

    def block_sync():
        gen = sync_count[1]
        sync_count[0] += 1
        if sync_count[0] == warps:
            sync_count[0], sync_count[1] = 0, gen + 1
        while sync_count[1] == gen:
            yield

    def worker(w):
        i = 0
        while True:
            slot = i % 2
            while not desc_full[slot].done((i // 2) & 1):
                yield
            j, task, g0 = desc[slot]
            desc_empty[slot].arrive()
            i += 1
            if task is None:
                return
            if task.kind == "shared":  # cp.async through the ring's memory
                memory_busy.add(w)
                yield
                memory_busy.discard(w)
                yield from block_sync()
                if w == 0:
                    ring_free.arrive()
                continue
            if task.short and w >= warps // 2:  # wt_idle_half: no MMAs, every stage released
                for k in range(task.kt):
                    g = g0 + k
                    st = g % stages
                    while idle_waits and not full[st].done((g // stages) & 1):
                        yield
                    if k > 0:
                        empty[(g - 1) % stages].arrive()
                    yield
                empty[(g0 + task.kt - 1) % stages].arrive()  # release_last
                if task.staged:  # the epilogue's barrier, then its share of the stores
                    yield from block_sync()
                    memory_busy.add(w)
                    yield
                    memory_busy.discard(w)
                yield from block_sync()
                continue
            for r in range(task.m_tiles):  # row tile r: its k-tiles, then its stores
                for k in range(task.kt):
                    g = g0 + r * task.kt + k
                    st = g % stages
                    while not full[st].done((g // stages) & 1):
                        yield
                    assert ring[st] == (j, r * task.kt + k), (w, ring[st], (j, k))
                    held[st].add(w)
                    seen[w].append((j, r * task.kt + k))
                    yield  # wgmma_wait<1>: k-tile g - 1 retired
                    if k > 0:
                        prev = (g - 1) % stages
                        held[prev].discard(w)
                        empty[prev].arrive()
                yield  # wgmma_retire: the row tile's last stage back to the producer
                last = (g0 + (r + 1) * task.kt - 1) % stages
                held[last].discard(w)
                empty[last].arrive()
                yield  # its stores (registers to global memory)
            if task.staged:  # the results through the ring's A tiles
                yield from block_sync()
                memory_busy.add(w)
                yield
                memory_busy.discard(w)
            yield from block_sync()
            if task.staged and w == 0:
                staged.arrive()

    actors = [producer()] + [worker(w) for w in range(warps)]
    live = list(actors)
    for _ in range(200_000):
        if not live and not landing:
            return seen
        if landing and (not live or rng.random() < 0.3):
            st, content = landing.pop(rng.randrange(len(landing)))
            assert not held[st] and not memory_busy, (st, held[st], memory_busy)
            ring[st] = content
            full[st].landed(1)
            continue
        a = rng.choice(live)
        try:
            next(a)
        except StopIteration:
            live.remove(a)
    raise AssertionError("deadlock or livelock")


@pytest.mark.parametrize("seed", range(30))
def test_protocol_under_random_interleavings(seed):
    rng = random.Random(1000 + seed)
    stages = rng.choice([2, 3, 4])
    tasks = [Task("shared") for _ in range(rng.randrange(3))]
    for _ in range(rng.randrange(1, 9)):
        gu = rng.random() < 0.5
        staged = rng.random() < 0.5
        tasks.append(Task("gu" if gu else "dn", kt=rng.choice([1, 2, 3, 5, 8, 32]),
                          m_tiles=1 if staged else rng.choice([1, 2]), staged=staged))
    seen = _run(tasks, stages, seed)
    want = [(j, k) for j, t in enumerate(tasks) if t.kind != "shared" for k in range(t.kk)]
    assert all(s == want for s in seen.values())


def _short_tasks(rng):
    """Tasks of one row tile, some of at most 64 rows (the second warpgroup idle)."""
    return [Task("gu" if rng.random() < 0.5 else "dn", kt=rng.choice([1, 2, 3, 5, 8, 32]),
                 staged=rng.random() < 0.5, short=rng.random() < 0.5)
            for _ in range(rng.randrange(1, 9))]


@pytest.mark.parametrize("seed", range(30))
def test_protocol_with_an_idle_warpgroup(seed):
    rng = random.Random(2000 + seed)
    stages = rng.choice([2, 3, 4])
    tasks = [Task("shared") for _ in range(rng.randrange(2))] + _short_tasks(rng)
    seen = _run(tasks, stages, seed)
    for w, got in seen.items():  # warps 4-7 multiply nothing of a short task
        assert got == [(j, k) for j, t in enumerate(tasks) if t.kind != "shared"
                       and not (t.short and w >= 4) for k in range(t.kk)], w


def test_the_model_catches_idle_warps_that_release_unwaited():
    failures = 0
    for seed in range(60):
        rng = random.Random(3000 + seed)
        tasks = [replace(t, short=True, kt=max(t.kt, 5)) for t in _short_tasks(rng)]
        try:
            _run(tasks, 2, seed, idle_waits=False)
        except AssertionError:
            failures += 1
    assert failures > 0


def test_the_port_is_the_templates():
    code = " ".join(render(BIG, _producer()).code.split())
    for line in (
            "if (i >= 2) mbar_wait(smem_u32(&desc_empty[slot]), (i / 2 - 1) & 1, hand_limit);",
            "desc[slot] = d; mbar_arrive(smem_u32(&desc_full[slot])); if (d.t < 0) break;",
            "mbar_wait(smem_u32(&ring_free), shared_waits++ & 1, hand_limit); continue;",
            "if (staged_owed) mbar_wait(smem_u32(&ring_staged), staged_waits++ & 1, hand_limit);"
            " staged_owed = d.gate_up ? GU_STAGED : DN_STAGED;",
            "if (g >= RING_STAGES) mbar_wait(smem_u32(&ring_empty[st]), (g / RING_STAGES - 1) "
            "& 1); const unsigned bar = smem_u32(&ring_full[st]); mbar_expect_tx(bar, bytes);",
            "mbar_wait(smem_u32(&desc_full[slot]), (i / 2) & 1, 2 * hand_limit); const TaskDesc "
            "d = desc[slot]; __syncwarp(); if (lane == 0) "
            "mbar_arrive(smem_u32(&desc_empty[slot]));",
            "block_sync(); // every worker done with the ring's memory if (threadIdx.x == 0) "
            "mbar_arrive(smem_u32(&ring_free));",
            "mbar_wait(smem_u32(&full[stage]), (g / STAGES) & 1);",
            "if (k > 0 && lane == 0) mbar_arrive(smem_u32(&empty[(g - 1) % STAGES]));",
            "if (lane == 0) mbar_arrive(smem_u32(&empty[(G + (i + 1) * KT - 1) % STAGES]));",
            "block_sync(); // every warp's stores (and STAGE: reads) before thread 0's signals "
            "if (threadIdx.x == 0) { if constexpr (STAGE) mbar_arrive(smem_u32(staged));",
            # the idle second warpgroup (a tile of at most 64 rows)
            "if (m_tiles == 1 && second_wg_idle<BM>(rows, m0)) { // no rows for "
            "this warpgroup wt_idle_half<BM, BN, STAGES, STAGE, false>(full, empty, G, KT, "
            "true, sA, C, m0, n0, rows, N);",
            "mbar_wait(smem_u32(&full[g % STAGES]), (g / STAGES) & 1); if (k > 0 && lane == 0) "
            "mbar_arrive(smem_u32(&empty[(g - 1) % STAGES]));",
            "if (release_last && lane == 0) mbar_arrive(smem_u32(&empty[(G + KT - 1) % "
            "STAGES]));"):
        assert line in code, line
