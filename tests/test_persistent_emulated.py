"""Transport "nvlink"'s data flow on the CPU: the persistent kernel's dispatch stores, task
arguments (per source and fused over sources) and combine, mirrored from
templates/persistent.cu.j2 over NumPy heaps of P simulated ranks, with ``ws_gemm``'s
row gathering and output addressing ported from templates/gemm.cu.j2. The outputs must
match the float64 reference; the template must spell the arguments mirrored here.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flashmoe_gen import bf16
from flashmoe_gen.config import KernelConfig
from flashmoe_gen.plan import fixed_slots
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.reference import moe_reference, relative_error, route
from flashmoe_gen.render import render
from flashmoe_gen.splitk import SplitK
from flashmoe_gen.tiles import GemmTile
from flashmoe_gen.weights import MoEWeights, random_tokens


def f64(bits):
    return bf16.from_bits(bits).astype(np.float64)


class Ptr:
    """A device pointer: an array and an element offset into it."""

    def __init__(self, a: np.ndarray, off: int = 0):
        self.a, self.off = a, off

    def __add__(self, k: int) -> Ptr:
        return Ptr(self.a, self.off + int(k))

    def rows(self, n: int, width: int) -> np.ndarray:
        return self.a[self.off:self.off + n * width].reshape(n, width)


def ws_gemm(gated, bn, n_block, g, A, a_group_stride, B0, B1, b_group_stride, C,
            c_group_stride, counts, count_cap, rows_fixed, N, K, inner_groups, a_outer_stride,
            c_outer_stride, counts_outer_stride, skip_outer, a_row_off, c_row_off,
            c_bases=None, c_base_off=0, split=0, splits=1, scratch=None, sources=1, tt=32,
            bk=64, bm=None):
    """templates/gemm.cu.j2 ws_gemm: output columns [bn n_block, bn n_block + bn) of group g
    over the rows of every outer group (source) it gathers. Split K: part ``split`` of the
    K steps when the rows fit one pass; ``scratch`` (a list) collects the parts, the last to
    arrive sums them in part order. Returns whether this call completed the tile."""
    n_outer = sources if inner_groups > 0 else 1
    cols = slice(n_block * bn, min((n_block + 1) * bn, N))
    b0 = f64(B0.rows(N, K)[cols])  # g = 0 here: B0 and B1 point at the expert already
    b1 = f64(B1.rows(N, K)[cols]) if gated else None
    row_n = [0 if (inner_groups > 0 and o == skip_outer) else
             (min(int(counts.a[counts.off + o * counts_outer_stride + g]), count_cap)
              if counts is not None else rows_fixed) for o in range(n_outer)]
    rows = sum(max(n, 0) for n in row_n)
    if rows == 0:
        return split == 0
    split_k = splits > 1 and rows <= tt
    if not split_k and split != 0:
        return False
    kt = -(-K // bk)
    ks = slice(split * kt // splits * bk, (split + 1) * kt // splits * bk) if split_k \
        else slice(0, K)
    if split_k:  # this part's K range; the last arrival sums every part in order
        scratch.append((split, ks))
        if len(scratch) < splits:
            return False
        parts = [k for _, k in sorted(scratch)]
        scratch.clear()
    else:
        parts = [ks]
    for o in range(n_outer):
        gi = o * counts_outer_stride + g
        n = 0 if (inner_groups > 0 and o == skip_outer) else \
            (min(int(counts.a[counts.off + gi]), count_cap) if counts is not None else rows_fixed)
        for lr in range(n):
            src = A + o * a_outer_stride + (a_row_off[gi] * K if a_row_off is not None
                                            else g * a_group_stride) + lr * K
            c_o = (c_bases[o] + c_base_off) if c_bases is not None else C + o * c_outer_stride
            dst = c_o + (c_row_off[gi] * N if c_row_off is not None else g * c_group_stride) \
                + lr * N
            x = f64(src.rows(1, K)[0])
            v = sum(b0[:, k] @ x[k] for k in parts)
            if gated:
                v = v / (1 + np.exp(-v)) * sum(b1[:, k] @ x[k] for k in parts)
            dst.a[dst.off + cols.start:dst.off + cols.stop] = bf16.to_bits(v.astype(np.float32))
    return True


def sync_rows(gated, bn, n_block, g, A, a_group_stride, B0, B1, b_group_stride, C,
              c_group_stride, counts, count_cap, rows_fixed, N, K, inner_groups, a_outer_stride,
              c_outer_stride, counts_outer_stride, skip_outer, a_row_off, c_row_off,
              c_bases=None, c_base_off=0, part=0, parts=1, scratch=None, bm=64):
    """templates/gemm.cu.j2 sync_gemm_rows (one group, expert slots): with ``parts`` > 1 row
    tile ``part`` alone, else every row; returns whether it computed rows."""
    rows = min(int(counts.a[counts.off]), count_cap) if counts is not None else rows_fixed
    lo, hi = (part * bm, min((part + 1) * bm, rows)) if parts > 1 else (0, rows)
    if lo >= hi:
        return False
    cols = slice(n_block * bn, min((n_block + 1) * bn, N))
    b0 = f64(B0.rows(N, K)[cols])
    b1 = f64(B1.rows(N, K)[cols]) if gated else None
    for lr in range(lo, hi):
        x = f64((A + lr * K).rows(1, K)[0])
        v = b0 @ x
        if gated:
            v = v / (1 + np.exp(-v)) * (b1 @ x)
        dst = C + lr * N
        dst.a[dst.off + cols.start:dst.off + cols.stop] = bf16.to_bits(v.astype(np.float32))
    return True


def run(p: MoEProblem, cfg: KernelConfig, w: MoEWeights, xs: list[np.ndarray]):
    P, el, H, I, k = p.world_size, p.local_experts, p.hidden, p.intermediate, p.top_k  # noqa: E741
    cap = fixed_slots(p, cfg).capacity

    def slot_row(peer, rnd, buf, row):
        return (((peer * 2 + rnd) * 2 + buf) * el * cap + row) * H

    heaps = [np.full(P * 4 * el * cap * H, 0xFFFF, np.uint16) for _ in range(P)]
    heap_counts = [np.full(P * el, -1, np.int32) for _ in range(P)]
    acts = [np.full(P * el * cap * I, 0xFFFF, np.uint16) for _ in range(P)]
    routing = []
    for r, x in enumerate(xs):  # route, positions (token order), dispatch, counts rows
        idx = route(p, x, w.gate).topk_idx.astype(np.int64) if len(x) else \
            np.zeros((0, k), np.int64)
        counts = np.zeros(p.experts, np.int64)
        pos = np.zeros_like(idx)
        for a, e in enumerate(idx.ravel()):
            pos.flat[a] = counts[e]
            counts[e] += 1
        routing.append((idx, pos))
        for a, e in enumerate(idx.ravel()):
            q = int(pos.flat[a])
            if q >= cap:
                continue
            d = int(e) // el
            o = slot_row(r, 0, 1, (int(e) % el) * cap + q)
            heaps[d][o:o + H] = x[a // k]
        for i in range(P * el):
            heap_counts[i // el][r * el + i % el] = min(counts[i], cap)
    w1 = [np.ascontiguousarray(w.w1[d * el:(d + 1) * el].transpose(0, 2, 1)).ravel()
          for d in range(P)]
    w3 = [np.ascontiguousarray(w.w3[d * el:(d + 1) * el].transpose(0, 2, 1)).ravel()
          for d in range(P)]
    w2 = [np.ascontiguousarray(w.w2[d * el:(d + 1) * el].transpose(0, 2, 1)).ravel()
          for d in range(P)]
    ngu, ndn = -(-I // cfg.gate_up.bn), -(-H // cfg.down.bn)
    sk = SplitK.of(p, cfg)
    rng = np.random.default_rng(7)
    for me in range(P):  # tasks, in queue order (their dependencies hold in this order)
        layout, act, my_counts = Ptr(heaps[me]), Ptr(acts[me]), Ptr(heap_counts[me])
        peers = [Ptr(h) for h in heaps]
        if cfg.fuse_sources:  # mirrored from the template's fused branch
            a_outer = slot_row(1, 0, 1, 0) - slot_row(0, 0, 1, 0)
            act_outer = el * cap * I
            active = [e for e in range(el) if sum(heap_counts[me][s * el + e]
                                                  for s in range(P)) > 0]
            na = len(active)
            gs, ds = sk.gu_splits, sk.dn_splits
            gu_tasks = na * ngu * gs
            scratch: dict = {}
            # Parts of a tile finish in any order: the gate/up tasks in a random order, then
            # the down tasks (which wait for their expert's gate/up tiles) likewise.
            order = [*rng.permutation(gu_tasks),
                     *(gu_tasks + rng.permutation(na * (ndn * ds)))]
            for r in order:
                r = int(r)
                gate_up = r < gu_tasks
                q = r if gate_up else r - gu_tasks
                per, parts = (ngu * gs, gs) if gate_up else (ndn * ds, ds)
                a = q // per
                e = active[a]
                n, part = q % per // parts, q % per % parts
                acc = scratch.setdefault((a, gate_up, n), [])
                act_e = act + e * cap * I
                if gate_up:
                    ws_gemm(True, cfg.gate_up.bn, n, 0, layout + slot_row(0, 0, 1, e * cap), 0,
                            Ptr(w1[me]) + e * I * H, Ptr(w3[me]) + e * I * H, 0, act_e, 0,
                            my_counts + e, cap, 0, I, H, 1, a_outer, act_outer, el, -1, None,
                            None, None, 0, part, gs, acc, sources=P, tt=cfg.gate_up.bm,
                            bk=cfg.gate_up.bk)
                else:
                    ws_gemm(False, cfg.down.bn, n, 0, act_e, 0, Ptr(w2[me]) + e * H * I, None,
                            0, None, 0, my_counts + e, cap, 0, H, I, 1, act_outer, 0, el, -1,
                            None, None, peers, slot_row(me, 1, 1, e * cap), part, ds, acc,
                            sources=P, tt=cfg.down.bm, bk=cfg.down.bk)
            continue
        # Per source (mirrored): row tasks (mma.sync tiles) are one (n-tile, row tile) each,
        # weight-streaming tasks one n-tile over all rows; tasks run in a random order that
        # respects the kernel's waits (a down task waits for gu_completions of its group),
        # so a target that is too low lets a down tile read unwritten rows (poison).
        gu_rows, dn_rows = cfg.gate_up.mma != "ws", cfg.down.mma != "ws"

        def gu_completions(rows, tiles, gu_rows=gu_rows):
            return tiles * -(-rows // cfg.gate_up.bm) if gu_rows else tiles

        def n_parts(rows, bm, row_tasks):  # the kernel's gu_parts / dn_parts
            return 0 if rows <= 0 else -(-rows // bm) if row_tasks else 1

        # The dense lists (learn): per ring source, each expert's gate/up tasks, then each
        # expert's down tasks, only as many as its rows need; every index is a real task.
        tasks = []
        for q in range(P):
            s = (me + q) % P
            rows_of = [min(int(heap_counts[me][s * el + e]), cap) for e in range(el)]
            for gate_up, nt, bm, rt in ((True, ngu, cfg.gate_up.bm, gu_rows),
                                        (False, ndn, cfg.down.bm, dn_rows)):
                for e in range(el):
                    parts = n_parts(rows_of[e], bm, rt)
                    tasks += [(s, e, i // parts, i % parts, parts, gate_up)
                              for i in range(nt * parts)]
        pending = list(range(len(tasks)))
        dep: dict = {}
        while pending:
            runnable = []
            for r in pending:
                s, e, n, part, parts, gate_up = tasks[r]
                n_rows = min(int(heap_counts[me][s * el + e]), cap)
                assert n_rows > part * (cfg.gate_up.bm if gate_up else cfg.down.bm) or \
                    not (gu_rows if gate_up else dn_rows), "an empty row task in the list"
                if gate_up or dep.get((s, e), 0) >= gu_completions(n_rows, ngu):
                    runnable.append((r, s, e, n, part, parts, gate_up))
            assert runnable, "deadlock: down tasks wait for completions that never come"
            r, s, e, n, part, parts, gate_up = runnable[rng.integers(len(runnable))]
            pending.remove(r)
            rows = my_counts + s * el + e
            act_se = act + (s * el + e) * cap * I
            tile = cfg.gate_up if gate_up else cfg.down
            gemm = ws_gemm if tile.mma == "ws" else sync_rows
            if gate_up:
                done = gemm(True, tile.bn, n, 0, layout + slot_row(s, 0, 1, e * cap), 0,
                            Ptr(w1[me]) + e * I * H, Ptr(w3[me]) + e * I * H, 0, act_se, 0,
                            rows, cap, 0, I, H, 0, 0, 0, 0, -1, None, None, None, 0, part,
                            parts, None, bm=tile.bm)
                dep[(s, e)] = dep.get((s, e), 0) + bool(done)
            else:
                back = peers[s] + slot_row(me, 1, 1, e * cap)
                gemm(False, tile.bn, n, 0, act_se, 0, Ptr(w2[me]) + e * H * I, None, 0, back, 0,
                     rows, cap, 0, H, I, 0, 0, 0, 0, -1, None, None, None, 0, part, parts, None,
                     bm=tile.bm)
    outs = []
    for r, x in enumerate(xs):  # combine (expert slots: row_off null)
        idx, pos = routing[r]
        rt = route(p, x, w.gate) if len(x) else None
        out = np.zeros((len(x), H))
        for t in range(len(x)):
            for j in range(k):
                e, q = int(idx[t, j]), int(pos[t, j])
                if q >= cap:
                    continue
                o = slot_row(e // el, 1, 1, (e % el) * cap + q)
                out[t] += rt.topk_w[t, j] * f64(heaps[r][o:o + H])
        outs.append(out)
    return outs, cap


TILE = GemmTile(32, 128, 64, 8, 1, 4, "ws")  # two n-tiles of each GEMM below


@pytest.mark.parametrize("fused,splits", [(False, (1, 1)), (True, (1, 1)), (True, (2, 4)),
                                          (False, "rows")],
                         ids=["per_source", "fused", "fused_split_k", "per_source_row_tasks"])
@pytest.mark.parametrize("capacity_factor,tokens", [(None, (24, 9, 0, 17)),
                                                    (1.0, (24, 9, 0, 17)), (None, (1, 0, 2, 0))],
                         ids=["exact", "capped", "decode_most_experts_idle"])
def test_persistent_data_flow_matches_the_reference(fused, splits, capacity_factor, tokens):
    # Split K with 24 tokens per rank: tiles with up to 32 rows split, larger ones (several
    # passes) run whole in part 0.
    p = MoEProblem(256, 256, 16, 2, world_size=4, tokens_per_rank=24,
                   capacity_factor=capacity_factor)
    if splits == "rows":  # mma.sync row tiles of 16 rows: several row tasks per group
        p = MoEProblem(256, 256, 4, 2, world_size=4, tokens_per_rank=48,
                       capacity_factor=capacity_factor)
        tokens = tuple(2 * t for t in tokens)  # ~24 rows per (source, expert)
        cfg = KernelConfig(GemmTile(16, 128, 64, 1, 8, 3), GemmTile(32, 128, 64, 1, 8, 3),
                           router_tokens_per_block=8, transport="nvlink")
    else:
        cfg = KernelConfig(TILE, TILE, router_tokens_per_block=8, transport="nvlink",
                           fuse_sources=fused, gu_splits=splits[0], dn_splits=splits[1])
    w = MoEWeights.random(p, 5)
    xs = [random_tokens(t, p.hidden, seed=60 + r) for r, t in enumerate(tokens)]
    outs, cap = run(p, cfg, w, xs)
    ref = moe_reference(p, xs, w, capacity=cap if capacity_factor else None)
    for r, (out, want) in enumerate(zip(outs, ref.out, strict=True)):
        if len(want):
            assert relative_error(out, want) < 2e-2, (fused, r)


def test_the_template_passes_the_mirrored_arguments():
    p = MoEProblem(256, 256, 8, 2, world_size=4, tokens_per_rank=24)
    cfg = KernelConfig(TILE, TILE, router_tokens_per_block=8, transport="nvlink",
                       fuse_sources=True)
    per_source = dataclasses.replace(cfg, fuse_sources=False)  # the per-source lists' code
    code = " ".join((render(p, cfg).code + render(p, per_source).code).split())
    for text in (
            "for (int s = 0; s < SOURCES; ++s) rows += my_counts[s * el + e]; "
            "if (rows > 0) active[na++] = e;",
            "const bool gate_up = i < groups * NGU * pgu; const int q = gate_up ? i : i - "
            "groups * NGU * pgu; const int per = gate_up ? NGU * pgu : NDN * pdn, parts = "
            "gate_up ? pgu : pdn; return {gate_up, q / per, q % per / parts, q % per % parts, "
            "parts};",
            "const TaskPos tp = task_pos(r, n_active, GU_S, DN_S); const bool gate_up = "
            "tp.gate_up; const int a = tp.group, e = active[a], n = tp.n, part = tp.part;",
            "const long long a_outer = slot_row(1, 0, 1, 0, capacity) - slot_row(0, 0, 1, 0, "
            "capacity);",
            "const long long act_outer = static_cast<long long>(el) * capacity * INTERMEDIATE;",
            "n, 0, layout + slot_row(0, 0, 1, static_cast<long long>(e) * capacity, capacity), "
            "0, w1 + static_cast<long long>(e) * INTERMEDIATE * HIDDEN, w3 + static_cast<long "
            "long>(e) * INTERMEDIATE * HIDDEN, 0, act_e, 0, my_counts + e, capacity, 0, "
            "INTERMEDIATE, HIDDEN, 1, a_outer, act_outer, el, -1, nullptr, nullptr, nullptr, 0, "
            "part, GU_S, st.scratch, st.arrivals, epoch, wm(0), wm(1), e * INTERMEDIATE);",
            "n, 0, act_e, 0, w2 + static_cast<long long>(e) * HIDDEN * INTERMEDIATE, nullptr, 0,"
            " nullptr, 0, my_counts + e, capacity, 0, HIDDEN, INTERMEDIATE, 1, act_outer, 0, el,"
            " -1, nullptr, nullptr, peers, slot_row(self_rank, 1, 1, static_cast<long long>(e) *"
            " capacity, capacity), part, DN_S, st.scratch, st.arrivals, epoch, wm(2), nullptr, "
            "e * HIDDEN);",
            "const SplitTile st = split_tile(state, a, gate_up, n);",
            # per source: the dense lists, row tasks, completions
            "return rows <= 0 ? 0 : ROWS ? (row_tiles<BM>(rows) + TASK_TILES - 1) / TASK_TILES "
            ": S;",
            "auto gu_parts = [](int rows) { return task_parts<GU_BM, GU_ROWS, GU_S>(rows); };",
            "auto dn_parts = [](int rows) { return task_parts<DN_BM, DN_ROWS, DN_S>(rows); };",
            "__device__ __forceinline__ int row_tiles(int rows) { return (rows + BM - 1) / BM; }",
            "constexpr int TASK_TILES = 1;",  # mma.sync row tasks: one row tile each
            "return GU_ROWS ? tiles * row_tiles<GU_BM>(rows) : tiles;",
            "for (int e = 0; e < el; ++e) { first[e] = i; const int rows = min(my_counts[s * "
            "el + e], capacity); i += gd == 0 ? NGU * gu_parts(rows) : NDN * dn_parts(rows); }",
            "int i = source_list(gu_first[q], s, 0, q > 0 ? list_end[q - 1] : 0);",
            "for (int e = 0; e <= el; ++e) { dn_first[q][e] = i; if (e < el) i += NDN * "
            "dn_parts(min(my_counts[s * el + e], capacity)); }",
            "const int parts = d.gate_up ? gu_parts(d.n_rows) : dn_parts(d.n_rows); d.n = (r "
            "- first[e]) / parts, d.part = (r - first[e]) % parts;",
            "const unsigned long long need = gu_completions(n_rows, NGU);",
            "if (parts > 1) { if (part * BM >= rows) return false;",
            "const bool split_k = !WG && splits > 1 && rows <= TT; if (!split_k && split != 0) "
            "return false;",
            "const int kt_lo = split_k ? split * KT / splits : 0;",
            "const int NK = (split_k ? (split + 1) * KT / splits : KT) - kt_lo;",
            "elem_t* const c_o = c_bases != nullptr ? reinterpret_cast<elem_t*>(c_bases[o]) + "
            "c_base_off : C + o * c_outer_stride;"):
        assert text in code, text


def test_task_loop_runs_every_task_once_with_the_active_list_built_late():
    """The fused loop's head, ported: a block builds the active list (and so learns how many
    routed tasks there are) on its first routed task; before that no bound on the routed
    tasks exists, and no shared task may be cut off (the first solo-front run ended the loop
    one shared task early: a bound read as shared_tasks - 1)."""
    p = MoEProblem(256, 256, 8, 2, shared_experts=1, world_size=2, tokens_per_rank=4)
    cfg = KernelConfig(TILE, TILE, router_tokens_per_block=8, transport="nvlink",
                       fuse_sources=True)
    code = " ".join(render(p, cfg).code.split())
    for text in ("if (t >= shared_tasks) {",
                 "if (routed_tasks < 0) load_active();",
                 "if (t >= shared_tasks + routed_tasks) break; }",
                 "routed_tasks = n_active * (NGU * GU_S + NDN * DN_S);"):
        assert text in code, text
    rng = np.random.default_rng(3)
    for shared_tasks, routed in ((3, 0), (3, 5), (0, 4), (20, 17)):
        queue, seen = iter(range(10**6)), []
        for _ in range(int(rng.integers(1, 6))):  # blocks, one after the other
            routed_tasks = -1
            for t in queue:  # the atomic counter
                if t >= shared_tasks:
                    if routed_tasks < 0:
                        routed_tasks = routed
                    if t >= shared_tasks + routed_tasks:
                        break
                seen.append(t)
        assert sorted(seen) == list(range(shared_tasks + routed))
