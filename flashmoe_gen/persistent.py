"""Transport "nvlink": the forward as one persistent kernel, over a symmetric heap of IPC
memory (one node; templates/persistent.cu.j2, docs/architecture.md "nvlink").

Every rank allocates the same heap — the symmetric layout ``L[P][2][2][E_local][C][H]`` at
the fixed capacity, then the rows each source sent ``[P][E_local]`` (int32), then the
dispatch and combine flags ``[2][P]`` (uint64) — exports it with ``cudaIpcGetMemHandle``,
gathers every rank's handle over MPI and opens the peers' heaps, so a kernel on rank r
stores straight into rank d's heap at the same offsets. A forward is one launch: no host
synchronisation, no NCCL; the layer's next call writes a peer's heap only after that peer's
combine flag of this call (the kernel's own back-pressure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import CommError, CommTimeout, ConfigError
from .layout import SymmetricLayout
from .render import (
    PERSISTENT_PHASES,
    PERSISTENT_ROUTE_CLOCKS,
    PERSISTENT_ROW_CLOCKS,
    PERSISTENT_ROW_GEMMS,
    PERSISTENT_STAT_END,
    PERSISTENT_STATS_WORDS,
    PERSISTENT_TASK_CLOCKS,
    persistent_counter_words,
    persistent_split_base,
    shared_down_tma,
)
from .router_layout import router_scratch_words
from .signatures import PERSISTENT
from .splitk import SplitK
from .task_trace import timeline
from .watchdog import allgather, comm_timeout  # allgather: with the collectives' deadline

if TYPE_CHECKING:
    from .config import KernelConfig
    from .problem import MoEProblem

#: The per-call arguments' positions in the persistent kernel's signature.
_X, _TOKENS, _OUT = (PERSISTENT.names.index(n) for n in ("x", "tokens", "out"))
#: Heap sections start on this boundary (flags need 8 bytes, vector stores 16).
ALIGN = 256


def state_words(problem: MoEProblem, config: KernelConfig) -> int:
    """The persistent kernel's state buffer in uint64 words: its counters, the router's
    partial logits (zeroed once), then the split tiles' scratch (flashmoe_gen.splitk) for
    up to ``problem.tokens_per_rank`` tokens."""
    sk = SplitK.of(problem, config)
    if not sk.splits:
        return (persistent_counter_words(problem, config)
                + router_scratch_words(problem, config.router_tokens_per_block))
    return persistent_split_base(problem, config) + sk.words


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class HeapLayout:
    """Byte offsets inside one rank's heap (the same on every rank)."""

    layout: SymmetricLayout

    @classmethod
    def of(cls, problem, capacity: int) -> HeapLayout:
        """The heap of ``problem``'s layer with ``capacity`` rows per (source, expert)."""
        return cls(SymmetricLayout(problem.world_size, problem.local_experts, capacity,
                                   problem.hidden))

    @property
    def counts_off(self) -> int:
        return _align(self.layout.elements * 2)

    @property
    def flags_off(self) -> int:
        lay = self.layout
        return self.counts_off + _align(lay.world_size * lay.local_experts * 4)

    @property
    def nbytes(self) -> int:
        return self.flags_off + _align(2 * self.layout.world_size * 8)


#: Heaps of collected multi-rank layers, released where every rank is (release_pending).
_PENDING: list[_Resources] = []


def release_pending(comm, collective: bool = True) -> None:
    """Free the heaps of the multi-rank layers collected so far.

    A collected layer's heap is not freed at the collection: cudaFree and cudaFreeHost wait
    for the whole device, and a collection can fall inside another layer's forward, where
    this rank's device waits on an NCCL transfer its peer issues only after this rank's host
    moves on (a known NCCL hang; a 2-rank pytest run stopped in graph mode after the nvlink
    tests). Collective (a new layer's heap): every rank collects, all are past issuing their
    earlier GPU work, close the peers' heaps, and only then free their own. Not collective
    (``Communicator.close``, which a rank may reach alone on an error): this rank's only.
    """
    import gc

    gc.collect()
    if collective:
        comm.barrier()
    pending, _PENDING[:] = list(_PENDING), []
    for res in pending:
        res.heap.close_imports()
    if collective:
        comm.barrier()
    for res in pending:
        res.close()


class PeerHeap:
    """This rank's heap and every peer's, opened through CUDA IPC (collective)."""

    def __init__(self, comm, nbytes: int):
        from cupy.cuda import runtime

        self.nbytes, self.rank = nbytes, comm.rank if comm is not None else 0
        self.shared = comm is not None
        if comm is not None:
            release_pending(comm)
        self.base = runtime.malloc(nbytes)  # its own allocation: IPC exports whole ones
        runtime.memset(self.base, 0, nbytes)  # flags start below every epoch
        runtime.deviceSynchronize()
        self._opened: list[int] = []
        if comm is None:
            self.peers = [self.base]
            return
        try:
            handle = runtime.ipcGetMemHandle(self.base)
            handles = allgather(comm.mpi, handle, "exchanging the IPC heap handles")
            opened = _open_peers(handles, self.rank)
        except (runtime.CUDARuntimeError, CommError) as e:
            self.close()
            raise CommError(f"rank {self.rank}: transport 'nvlink' needs CUDA IPC between "
                            f"the ranks' GPUs (one node, peer access): {e}; use transport "
                            "'nccl'") from None
        self._opened = list(opened.values())
        self.peers = [opened.get(d, self.base) for d in range(len(handles))]
        comm.barrier()  # every heap is open before any kernel writes into one

    def close_imports(self) -> None:
        """Close the peers' heaps this rank opened."""
        from cupy.cuda import runtime

        for ptr in self._opened:
            try:
                runtime.ipcCloseMemHandle(ptr)
            except runtime.CUDARuntimeError:
                pass
        self._opened = []

    def close(self) -> None:
        from cupy.cuda import runtime

        self.close_imports()
        if self.base:
            runtime.free(self.base)
            self.base = 0


def _open_peers(handles: list, rank: int) -> dict[int, int]:
    """Every other rank's memory from its IPC handle, by rank. On an error the ones opened
    are closed again and a CommError names the rank whose memory could not be opened."""
    from cupy.cuda import runtime

    opened: dict[int, int] = {}
    for d, h in enumerate(handles):
        if d == rank:
            continue
        try:
            opened[d] = runtime.ipcOpenMemHandle(h, runtime.cudaIpcMemLazyEnablePeerAccess)
        except runtime.CUDARuntimeError as e:
            for ptr in opened.values():
                runtime.ipcCloseMemHandle(ptr)
            raise CommError(f"rank {rank} cannot open rank {d}'s memory: {e}") from None
    return opened


def persistent_grid(per_sm: int, sms: int, blocks_per_sm: int) -> int:
    """The persistent kernel's grid: ``blocks_per_sm`` (0: all that fit, ``per_sm``) per SM,
    never more than fit (every block must be resident)."""
    return (min(per_sm, blocks_per_sm) if blocks_per_sm else per_sm) * sms


def probe_ipc(comm) -> str | None:
    """Collective: None when every rank can open every peer's memory through CUDA IPC (the
    nvlink transport's heap), else the first reason why not. Never raises on one rank only:
    every rank takes part in both exchanges whatever happened locally."""
    import socket

    from cupy.cuda import runtime

    hosts = allgather(comm.mpi, socket.gethostname(), "comparing the ranks' hosts")
    if len(set(hosts)) > 1:
        return f"the ranks span {len(set(hosts))} nodes (CUDA IPC works within one)"
    err, handle, opened, base = None, None, {}, 0
    try:
        base = runtime.malloc(ALIGN)
        handle = runtime.ipcGetMemHandle(base)
    except runtime.CUDARuntimeError as e:
        err = f"rank {comm.rank}: cudaIpcGetMemHandle: {e}"
    handles = allgather(comm.mpi, handle, "exchanging the IPC probe handles")
    if err is None and None not in handles:  # a rank without a handle says why itself
        try:
            opened = _open_peers(handles, comm.rank)
        except CommError as e:
            err = str(e)
    errs = allgather(comm.mpi, err, "comparing the IPC probe results")
    for ptr in opened.values():
        runtime.ipcCloseMemHandle(ptr)
    if base:
        runtime.free(base)
    return next((e for e in errs if e), None)


def tile_map_specs(problem: MoEProblem, config: KernelConfig, capacity: int
                   ) -> list[tuple[str, int, int, int]]:
    """``ws_tma``: the tensor maps the kernel reads (``wmaps``, 128 bytes each, in this
    order) as (operand, rows, K, box rows), each a [rows, K] matrix read in boxes of box
    rows x 64 with the 128-byte swizzle: w1, w3, w2, sw1, sw3, sw2 in boxes of the tiles' BN
    rows (a routed expert e's gate/up tile n starts at row ``e I + n BN``, down ``e H + n
    BN``; without shared experts their maps repeat w1's); then, for wgmma row tiles, the A
    operands of a routed row task: ``heap`` (this rank's symmetric heap as rows of H: a
    source's dispatched rows) and ``act`` (rows of I), in boxes of the tiles' BM rows; then
    where the shared experts' down tiles are TMA row tasks (render.shared_down_tma) their A
    operand ``shared_act`` (the token bound's rows of the shared width)."""
    p = problem
    el, h, i, sw = p.local_experts, p.hidden, p.intermediate, p.shared_width
    gu, dn = config.gate_up, config.down
    specs = [("w1", el * i, h, gu.bn), ("w3", el * i, h, gu.bn), ("w2", el * h, i, dn.bn)]
    if sw:
        specs += [("sw1", sw, h, gu.bn), ("sw3", sw, h, gu.bn), ("sw2", h, sw, dn.bn)]
    else:
        specs += specs[:1] * 3
    if gu.mma == "wgmma":
        heap_rows = HeapLayout.of(p, capacity).layout.elements // h
        specs += [("heap", heap_rows, h, gu.bm),
                  ("act", p.world_size * el * capacity, i, dn.bm)]
    if shared_down_tma(p, config):
        specs.append(("shared_act", max(p.tokens_per_rank, 1), sw, dn.bm))
    return specs


def tile_maps(layer, addresses: dict[str, int], capacity: int):
    """The maps of ``tile_map_specs`` encoded over the layer's weights and the buffers in
    ``addresses`` (operand name -> device address), on the device."""
    import cupy

    from .runtime import _address
    from .tma import encode_map

    w = layer.weights
    maps = [encode_map(addresses[name] if name in addresses else _address(getattr(w, name)),
                       rows, k, box)
            for name, rows, k, box in tile_map_specs(layer.problem, layer.config, capacity)]
    return cupy.asarray(np.frombuffer(b"".join(maps), np.uint8))


class PersistentForward:
    """The buffers and the launch of one layer's persistent kernel."""

    def __init__(self, layer, capacity: int):
        import cupy
        from cupy.cuda import runtime

        p, cfg = layer.problem, layer.config
        self.layer, self.capacity = layer, capacity
        self.heap_layout = HeapLayout.of(p, capacity)
        self.heap = PeerHeap(layer.comm, self.heap_layout.nbytes)
        self.peers = cupy.asarray(np.array(self.heap.peers, np.uint64))
        self.act = cupy.empty((p.world_size, p.local_experts, capacity, p.intermediate),
                              np.uint16)
        self.state = cupy.zeros(state_words(p, cfg), np.uint64)
        self.counts = cupy.zeros(p.experts, np.int32)
        # The watchdog's status word: mapped host memory, which the kernel addresses by the
        # same pointer (unified virtual addressing), readable after a trap.
        self._status_host = runtime.hostAlloc(4, runtime.hostAllocMapped)
        _int_at(self._status_host)[0] = -1  # no stall
        self.status_dev = self._status_host
        func = layer.module[layer.kernels.persistent]
        smem = layer.compiled.dynamic_smem[layer.kernels.persistent]
        per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            func.kernel.ptr, cfg.persistent_threads, smem)  # RawKernel -> CUfunction
        if per_sm < 1:
            raise ConfigError("transport", "nvlink", f"the persistent kernel does not fit one "
                              f"SM ({smem} B of shared memory, {cfg.persistent_threads} threads): "
                              "smaller tiles or fewer stages", cfg.name)
        # Every block resident: the kernel's grid barriers and spins rely on it.
        self.grid = persistent_grid(per_sm, layer._sms, cfg.blocks_per_sm)  # read at build
        self._launch = None  # (kernel, grid, block, shared memory), packed on first use
        self._static: list = []
        self.stats = None  # cupy [grid][PERSISTENT_STATS_WORDS] uint64 after enable_stats()
        timeout = layer.comm.timeout_s if layer.comm is not None else comm_timeout()
        # kHz -> cycles; CUDA 13 may not report the clock: 2 GHz bounds every current part.
        clock_khz = cupy.cuda.Device().attributes.get("ClockRate", 2_000_000)
        self.spin_limit = int(timeout * clock_khz * 1e3)
        # (shared_act: the token buffers, allocated for the token bound before this, which
        # no call outgrows: calls take at most tokens_per_rank)
        shared_act = layer._tok.shared_act
        self.wmaps = tile_maps(layer, {"heap": self.heap.base, "act": self.act.data.ptr,
                                       "shared_act": shared_act.data.ptr
                                       if shared_act is not None else 0},
                               capacity) if cfg.ws_tma else None

    def arguments(self, x, tokens: int, out) -> dict:
        """The kernel's arguments by name (``signatures.PERSISTENT``)."""
        layer = self.layer
        b, w = layer._tok, layer.weights
        return dict(
            x=x, wg=layer.w_gate, bias=w.expert_bias, tokens=tokens, topk_idx=b.topk_idx,
            topk_w=b.topk_w, pos=b.pos, counts=self.counts, w1=w.w1, w3=w.w3, w2=w.w2,
            sw1=w.sw1, sw3=w.sw3, sw2=w.sw2, sgate_w=w.shared_gate, act=self.act,
            shared_act=b.shared_act, shared_out=b.shared_out, out=out,
            layout=self.heap.base, peers=self.peers, counts_off=self.heap_layout.counts_off,
            flags_off=self.heap_layout.flags_off, state=self.state, capacity=self.capacity,
            self_rank=layer.rank, spin_limit=self.spin_limit, status=self.status_dev,
            stats=self.stats, wmaps=self.wmaps)

    def launch(self, x, tokens: int, out, stream) -> None:
        """One forward: one launch. Every argument but ``x``, ``tokens`` and ``out`` is fixed
        for the layer's life (buffers sized for the token bound at build), so they are packed
        once, as addresses; a call fills in three slots (host time is the decode latency's
        floor when calls are not graph-captured)."""
        if self._launch is None:
            import cupy

            layer = self.layer
            packed = PERSISTENT.pack(self.arguments(None, 0, None))
            self._static = [a.data.ptr if isinstance(a, cupy.ndarray) else a for a in packed]
            self._launch = (layer.module[layer.kernels.persistent], (self.grid,),
                            (layer.config.persistent_threads,),
                            layer.compiled.dynamic_smem[layer.kernels.persistent])
        fn, grid, block, smem = self._launch
        args = self._static.copy()
        args[_X], args[_TOKENS], args[_OUT] = x.data.ptr, np.int32(tokens), out.data.ptr
        with stream:
            fn(grid, block, tuple(args), shared_mem=smem)

    def enable_stats(self) -> None:
        """Have every following call record, per block, the cycles spent in GEMM tiles and
        in the whole kernel (``sm_busy``), and when each phase ended (``phase_us``)."""
        import cupy

        if self.stats is None:
            self.stats = cupy.zeros((self.grid, PERSISTENT_STATS_WORDS), np.uint64)
            self._launch = None  # the packed arguments now carry the buffer
            cache = getattr(self.layer, "_graph_cache", None)
            if cache is not None:  # graphs captured so far launch without it
                cache.release()

    def _stats(self, what: str) -> np.ndarray:
        if self.stats is None:
            raise ConfigError("stats", None, f"call enable_stats() before the forward whose "
                              f"{what} you want")
        return self.stats.get().astype(np.float64)

    def sm_busy(self) -> float:
        """The last call's share of the blocks' cycles spent in GEMM tiles (synchronises)."""
        return _sm_busy(self._stats("SM busy share"))

    def phase_us(self) -> dict[str, float]:
        """The last call's phases (render.PERSISTENT_PHASES, then "combine": the rest) in
        microseconds on the GPU's global timer: per phase, the latest block's end minus the
        latest block's end of the phase before (the route: minus the first block's start;
        each phase ends at a barrier or a wait every block passes, so that is the phase's
        length on the critical path)."""
        return _phase_us(self._stats("phase times"))

    def kernel_us(self) -> float:
        """The last call's time in the kernel on the GPU's global timer, from its first
        block's start to its last block's end (a forward's time minus this is launch and
        host time)."""
        return _kernel_us(self._stats("kernel time"))

    def measure(self, x, chain: int = 8, repeats: int = 5) -> dict:
        """SM busy, the SMs' clock (``sm_ghz``: under tensor-core load they run below the
        boost clock, and the peak a k-loop can reach with them), kernel time, phases, the
        TMA row tiles' anatomy (``row_*``) and the task timeline (``tl_*``,
        task_trace.timeline) of the
        last of ``chain`` forwards of ``x`` back to back, median over ``repeats`` chains
        (collective like any forward). One lone call would count the ranks' launch skew into
        the first wait on a peer; inside a chain the previous call's waits have lined the
        ranks up, as in steady decoding."""
        self.enable_stats()
        runs = []
        for _ in range(repeats):
            for _ in range(chain):
                self.layer.forward(x)
            st = self._stats("clocks")  # one copy per chain serves every figure
            runs.append({"sm_busy": _sm_busy(st), "sm_ghz": _sm_ghz(st),
                         "kernel_us": _kernel_us(st), **_phase_us(st), **_row_anatomy(st),
                         **timeline(st)})
        return {k: round(float(np.median([r[k] for r in runs])), 3) for k in runs[0]
                if all(k in r for r in runs)}  # (a kind of task some chain ran none of)

    def stall(self) -> CommTimeout | None:
        """What the watchdog recorded (after the kernel trapped), as the error to raise."""
        code = int(_int_at(self._status_host)[0])
        if code < 0:
            return None
        phase, peer = divmod(code, 1000)
        peer -= 1  # the kernel stores peer + 1 (-1: no peer)
        what = {1: "a grid barrier (a block of this rank)", 2: f"rank {peer}'s dispatch",
                3: "a gate/up tile this rank computes", 4: f"rank {peer}'s results"}
        return CommTimeout(f"rank {self.layer.rank}: the persistent kernel waited past its "
                           f"bound for {what.get(phase, f'phase {phase}')}")

    def dropped(self) -> int:
        c = self.counts.get()
        return int(np.maximum(c - self.capacity, 0).sum())

    def resources(self) -> _Resources:
        """What must be released with the layer (holds no reference back to it)."""
        return _Resources(self.heap, self._status_host)


def _sm_busy(st: np.ndarray) -> float:
    busy, total = st[:, :2].sum(axis=0)
    return float(busy / total) if total else 0.0


def _phase_us(st: np.ndarray) -> dict[str, float]:
    """Each phase's span in us: from the previous phase's last block (the first block's
    start for the route) to this phase's last block, on the global ns timer."""
    t = st[:, 2:PERSISTENT_STAT_END + 1].astype(np.int64)  # start, the phase marks, end
    ends = t[:, 1:].max(axis=0) - t[:, 0].min()
    spans = np.diff(np.concatenate([[0], ends])) / 1e3
    return dict(zip((*PERSISTENT_PHASES, "combine"), spans.round(2).tolist(), strict=True))


def _kernel_us(st: np.ndarray) -> float:
    """From the first block's start to the last block's end, in us."""
    return round(float(st[:, PERSISTENT_STAT_END].astype(np.int64).max()
                       - st[:, 2].astype(np.int64).min()) / 1e3, 2)


def _block_ghz(st: np.ndarray) -> np.ndarray:
    """Each block's clock rate in GHz: its cycles over its span on the ns timer."""
    span_ns = st[:, PERSISTENT_STAT_END].astype(np.int64) - st[:, 2].astype(np.int64)
    return np.divide(st[:, 1].astype(np.float64), span_ns, out=np.zeros(len(st)),
                     where=span_ns > 0)


def _sm_ghz(st: np.ndarray) -> float:
    """The blocks' mean clock rate in GHz (blocks that ran at all)."""
    ghz = _block_ghz(st)
    return round(float(ghz[ghz > 0].mean()), 3) if (ghz > 0).any() else 0.0


def _task_clocks_us(st: np.ndarray) -> dict[str, np.ndarray]:
    """Per block, the task loop's words (render.PERSISTENT_TASK_CLOCKS) in us, each block's
    cycles at its own clock rate (_block_ghz); the row tile count as is."""
    w = st[:, PERSISTENT_STAT_END + 1:PERSISTENT_STAT_END + 1 + len(PERSISTENT_TASK_CLOCKS)]
    ghz = _block_ghz(st)
    out = {}
    for i, k in enumerate(PERSISTENT_TASK_CLOCKS):
        v = w[:, i].astype(np.float64)
        out[k] = v if k.endswith("row_tiles") else np.divide(
            v, ghz * 1e3, out=np.zeros(len(st)), where=ghz > 0)
    return out


def _row_anatomy(st: np.ndarray) -> dict[str, float]:
    """The TMA row tiles' time per tile in us (mean over the grid's tiles): prologue, loop,
    epilogue (render.PERSISTENT_ROW_CLOCKS), over both GEMMs and per GEMM (``row_gu_*``,
    ``row_dn_*``), zeros where the config has none; and the task loop's waits per block in
    us (mean over blocks): on dependencies (a down tile's gate/up tiles), on sources'
    dispatch flags and in grid barriers; and the router's logits and choices per block."""
    c = _task_clocks_us(st)
    tiles = {g: float(c[f"{g}_row_tiles"].sum()) for g in PERSISTENT_ROW_GEMMS}
    total = sum(tiles.values())

    def per_tile(n: float, keys: list[str]) -> float:
        return round(sum(float(c[k].sum()) for k in keys) / n, 3) if n else 0.0

    out = {"row_tiles": int(total)}
    out |= {f"row_{k}_us": per_tile(total, [f"{g}_{k}" for g in PERSISTENT_ROW_GEMMS])
            for k in PERSISTENT_ROW_CLOCKS}
    for g in PERSISTENT_ROW_GEMMS:
        out[f"row_{g}_tiles"] = int(tiles[g])
        out |= {f"row_{g}_{k}_us": per_tile(tiles[g], [f"{g}_{k}"])
                for k in PERSISTENT_ROW_CLOCKS}
    return out | {f"row_{k}_us": round(float(c[k].mean()), 3)
                  for k in ("dep_wait", "flag_wait", "barrier_wait", *PERSISTENT_ROUTE_CLOCKS)}


class _Resources:
    def __init__(self, heap: PeerHeap, status_host: int):
        self.heap, self.status_host = heap, status_host

    def collected(self) -> None:
        """The layer's finalizer: a one-rank heap goes now, a shared one waits for
        release_pending (freeing it here could hang the ranks, see there)."""
        if self.heap.shared:
            _PENDING.append(self)
        else:
            self.close()

    def close(self) -> None:
        from cupy.cuda import runtime

        self.heap.close()
        if self.status_host:
            runtime.freeHost(self.status_host)
            self.status_host = 0


def _int_at(ptr: int):
    import ctypes
    return (ctypes.c_int32 * 1).from_address(ptr)
