"""Transport "nvlink"'s cross-rank protocol, model-checked on the CPU
(templates/persistent.cu.j2): P ranks run N forwards each, interleaved at random; every
remote write and every flag is an event. Checked: no deadlock; a rank reads a source's rows
and its results only once they are this call's; no rank writes into a peer's heap while
that peer still reads the previous call's contents there (the back-pressure the epochs and
the combine flags give). Each rank is one sequential process: its grid barriers make the
blocks' phases a sequence, and the tasks inside a rank wait only on earlier tasks or flags.
"""

from __future__ import annotations

import random

import pytest


class Rank:
    """One rank's forwards as a list of steps; ``pc`` is the next step, blocked on a wait."""

    def __init__(self, r: int, world: int, calls: int, heap, fused: bool = False,
                 senders: bool = False):
        self.r, self.world, self.calls, self.heap = r, world, calls, heap
        self.marks: dict[str, int] = {}  # this rank's blocks' counters (send_blocks)
        self.steps = []
        ring = [(r + q) % world for q in range(world)]
        for n in range(1, calls + 1):
            if senders:  # send_blocks: own rows and flag; the peers' are the Senders'
                self.steps += [("write_rows", n, r), ("flag", "dispatch", n, r),
                               ("mark", "own", n)]
            else:  # dispatch: rows and counts into every rank's heap, then the flags
                self.steps += [("write_rows", n, d) for d in range(world)]
                self.steps += [("flag", "dispatch", n, d) for d in range(world)]
            if fused:  # gate/up tiles wait every source's flag, read all; then down tiles
                self.steps += [("wait", "dispatch", n, s) for s in ring]
                self.steps += [("read_rows", n, s) for s in ring]
                self.steps += [("write_back", n, s) for s in ring]
            else:  # per source in ring order: wait its flag, read its rows, write back
                for s in ring:
                    self.steps += [("wait", "dispatch", n, s), ("read_rows", n, s),
                                   ("write_back", n, s)]
            if senders:  # the senders join the task loop: the last block out is after them
                self.steps.append(("await", "sent", n))
            self.steps += [("flag", "combine", n, d) for d in range(world)]
            self.steps += [("wait", "combine", n, d) for d in range(world)]
            self.steps += [("read_back", n, d) for d in range(world)]
            self.steps.append(("end", n))
        self.pc = 0
        # what this rank is still reading in its heap: rows[s] / back[d] of call n
        self.reading_rows = {s: 0 for s in range(world)}
        self.reading_back = {d: 0 for d in range(world)}

    def done(self) -> bool:
        return self.pc == len(self.steps)

    def step(self, ranks) -> bool:
        """Take the next step if it can run; False when blocked."""
        st = self.steps[self.pc]
        h = self.heap
        if st[0] == "wait":
            _, kind, n, peer = st
            if h[self.r]["flags"][kind][peer] < n:
                return False
        elif st[0] == "write_rows":  # into rank d's slot for source r
            _, n, d = st
            assert ranks[d].reading_rows[self.r] in (0, n), (
                f"rank {self.r} call {n} overwrites rows rank {d} still reads for call "
                f"{ranks[d].reading_rows[self.r]}")
            h[d]["rows"][self.r] = n
        elif st[0] == "flag":
            _, kind, n, d = st
            h[d]["flags"][kind][self.r] = n
        elif st[0] == "read_rows":
            _, n, s = st
            assert h[self.r]["rows"][s] == n, f"rank {self.r} reads stale rows from {s}"
            self.reading_rows[s] = 0  # the tiles of this source are done
        elif st[0] == "write_back":  # results into source s's heap, slot of expert rank r
            _, n, s = st
            assert ranks[s].reading_back[self.r] in (0, n), (
                f"rank {self.r} call {n} overwrites results rank {s} still reads")
            h[s]["back"][self.r] = n
        elif st[0] == "read_back":
            _, n, d = st
            assert h[self.r]["back"][d] == n, f"rank {self.r} reads stale results from {d}"
            self.reading_back[d] = 0
        elif st[0] == "mark":
            self.marks[st[1]] = st[2]
        elif st[0] == "await":
            if self.marks.get(st[1], 0) < st[2]:
                return False
        elif st[0] == "end":
            pass
        # reading spans: from the flag's wait until the read step
        if st[0] == "wait" and st[1] == "dispatch":
            self.reading_rows[st[3]] = st[2]
        if st[0] == "wait" and st[1] == "combine":
            self.reading_back[st[3]] = st[2]
        self.pc += 1
        return True


class Senders(Rank):
    """send_blocks: the blocks of rank ``owner`` that store the peers' rows, a process beside
    its other blocks: after every block placed this rank's own rows (mark "own") they write
    each peer's rows and raise its dispatch flag, then join the task loop (mark "sent"). The
    next call's senders start only once that call's own rows are placed, i.e. after this
    call's kernel ended (one stream)."""

    def __init__(self, owner: Rank, calls: int):
        r, world = owner.r, owner.world
        self.r, self.world, self.calls, self.heap = r, world, calls, owner.heap
        self.marks = owner.marks  # the same rank's counters
        self.reading_rows, self.reading_back = {}, {}  # senders read nothing
        self.steps = []
        for n in range(1, calls + 1):
            self.steps.append(("await", "own", n))
            self.steps += [("write_rows", n, d) for d in range(world) if d != r]
            self.steps += [("flag", "dispatch", n, d) for d in range(world) if d != r]
            self.steps.append(("mark", "sent", n))
        self.pc = 0


def run(world: int, calls: int, seed: int, combine_wait: bool = True,
        fused: bool = False, senders: bool = False) -> None:
    """All ranks' calls interleaved at random (``combine_wait=False``: the model without the
    back-pressure, to show the checks can fail; ``senders``: send_blocks, each rank's
    senders a process of their own)."""
    rng = random.Random(seed)
    heap = [{"rows": [0] * world, "back": [0] * world,
             "flags": {"dispatch": [0] * world, "combine": [0] * world}}
            for _ in range(world)]
    ranks = [Rank(r, world, calls, heap, fused, senders) for r in range(world)]
    procs = ranks + ([Senders(r, calls) for r in ranks] if senders else [])
    if not combine_wait:
        for r in ranks:
            r.steps = [s for s in r.steps if not (s[0] == "wait" and s[1] == "combine")]
    while not all(r.done() for r in procs):
        live = [r for r in procs if not r.done()]
        rng.shuffle(live)
        assert any(r.step(ranks) for r in live), "deadlock"


@pytest.mark.parametrize("fused,senders", [(False, False), (True, False), (False, True)],
                         ids=["per_source", "fused", "per_source_send_blocks"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(25))
def test_epochs_and_back_pressure(world, seed, fused, senders):
    run(world, calls=4, seed=seed, fused=fused, senders=senders)


def test_the_model_catches_a_missing_back_pressure():
    """Without the combine wait (a rank racing ahead into its next call), a peer's rows or
    results get overwritten while it reads them, for some interleaving."""
    for fused, senders in ((False, False), (True, False), (False, True)):
        failures = 0
        for seed in range(200):
            try:
                run(2, 3, seed, combine_wait=False, fused=fused, senders=senders)
            except AssertionError:
                failures += 1
        assert failures > 0, (fused, senders)


def run_tasks(world: int, el: int, ngu: int, ndn: int, shared: bool, blocks: int,
              seed: int, fused: bool = False, parts: tuple[int, int] = (1, 1),
              solo_front: int = 0) -> None:
    """Inside one rank: ``blocks`` resident blocks take tasks from the queue in its fixed
    order (shared gate/up, shared down, then per source in ring order gate/up then down), a
    source's tiles wait for its dispatch flag (raised at a random moment), a down tile for
    every gate/up tile of its (source, expert). Fused: one gate/up then one down tile list
    over all sources ("all"), a gate/up tile waiting for every flag. Split K (``parts``,
    fused only): each tile is that many consecutive tasks, and a gate/up tile counts as done
    for its down tiles once its last part is. Solo front (``solo_front`` steps): block 0
    routes and dispatches first, this rank's own flag rises only then, and the other blocks
    take tasks from the start (no barrier). No deadlock; every down tile runs after all its
    gate/up tiles."""
    rng = random.Random(seed)
    me = rng.randrange(world)
    gp, dp = parts
    tasks = []
    if shared:
        tasks += [("gu", "shared", 0, n) for n in range(ngu) for _ in range(gp)]
        tasks += [("dn", "shared", 0, n) for n in range(ndn) for _ in range(dp)]
    for s in ["all"] if fused else [(me + q) % world for q in range(world)]:
        tasks += [("gu", s, e, n) for e in range(el) for n in range(ngu) for _ in range(gp)]
        tasks += [("dn", s, e, n) for e in range(el) for n in range(ndn) for _ in range(dp)]
    arrived: dict = {}  # parts of a gate/up tile finished so far
    # this rank's own flag is set before the tasks, or by block 0's solo front
    flags = {s: s == me and not solo_front for s in range(world)}
    front = solo_front
    dep = {}
    queue = 0
    held = [None] * blocks  # the task a block waits on
    done = 0
    steps = 0
    while done < len(tasks):
        steps += 1
        assert steps < 100000, "deadlock"
        for s in flags:  # peers' dispatch flags arrive at random moments
            if not flags[s] and rng.random() < 0.05:
                flags[s] = True
        b = rng.randrange(blocks)
        if b == 0 and front:  # block 0 still routing and dispatching
            front -= 1
            flags[me] = front == 0
            continue
        if held[b] is None:
            if queue == len(tasks):
                continue
            held[b] = tasks[queue]
            queue += 1
        kind, s, e, n = held[b]
        if kind == "gu":
            if s == "all" and not all(flags.values()):
                continue
            if s not in ("shared", "all") and not flags[s]:
                continue
            arrived[(s, e, n)] = arrived.get((s, e, n), 0) + 1
            if arrived[(s, e, n)] == gp:  # the tile's last part: its results are in
                dep[(s, e)] = dep.get((s, e), 0) + 1
        else:
            if dep.get((s, e), 0) < ngu:
                continue
        held[b] = None
        done += 1


@pytest.mark.parametrize("seed", range(30))
def test_task_queue_never_deadlocks(seed):
    rng = random.Random(seed)
    run_tasks(world=rng.choice([1, 2, 4]), el=rng.choice([1, 2, 8]), ngu=rng.choice([1, 3]),
              ndn=rng.choice([1, 2]), shared=rng.random() < 0.5,
              blocks=rng.choice([1, 2, 7, 132]), seed=seed, fused=rng.random() < 0.5)


@pytest.mark.parametrize("seed", range(30))
def test_split_tiles_never_deadlock(seed):
    """Split K: a tile's parts are held by different blocks (or one block, one after the
    other); the last part to finish completes it."""
    rng = random.Random(seed)
    run_tasks(world=rng.choice([1, 2, 4]), el=rng.choice([1, 2, 8]), ngu=rng.choice([1, 3]),
              ndn=rng.choice([1, 2]), shared=rng.random() < 0.5,
              blocks=rng.choice([1, 2, 7, 132]), seed=seed, fused=True,
              parts=(rng.choice([1, 2, 4]), rng.choice([1, 4, 8])))


@pytest.mark.parametrize("seed", range(30))
def test_solo_front_never_deadlocks(seed):
    """Few tokens: block 0 routes and dispatches while the others already take tasks; every
    block may end up waiting on this rank's flag, which block 0 alone raises."""
    rng = random.Random(seed)
    run_tasks(world=rng.choice([1, 2, 4]), el=rng.choice([1, 2, 8]), ngu=rng.choice([1, 3]),
              ndn=rng.choice([1, 2]), shared=rng.random() < 0.5,
              blocks=rng.choice([1, 2, 7, 132]), seed=seed, fused=rng.random() < 0.5,
              parts=(1, rng.choice([1, 4])), solo_front=rng.choice([1, 5, 50]))
