"""The FlashMoE layer on one rank: executes a built kernel's forward plan.

``build.build`` renders, validates and compiles the layer (``CompiledLayer``) and
``plan.build_plan`` lays out the forward as data; this module holds the weights, buffers and
streams and runs the plan's operations in order (see docs/architecture.md). Per call: route
-> count exchange (capacity C, row offsets) -> permute -> dispatch (grouped NCCL send/recv
per peer step and chunk on the communication streams) while the local and shared experts
compute -> each peer's chunk computes as it lands and its combine send is posted at once ->
weighted un-permute (docs/symmetric-layout.md).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from .arch import current_device_limits
from .build import CompiledLayer, build
from .config import KernelConfig
from .device_weights import DeviceWeights
from .errors import CommError, ConfigError, ProblemError
from .executor import Run, python_launcher
from .graphs import GraphCache
from .layout import (
    SymmetricLayout,
)
from .persistent import PersistentForward
from .plan import (
    Gemms,
    act_slots,
    fixed_slots,
    gathered_shape,
)
from .problem import ELEM_BYTES, MoEProblem
from .router_layout import router_part_floats
from .signatures import GEMM
from .tma import Operand, TmaMaps
from .weights import MoEWeights

#: Mode "graph" takes its fixed buffers only when they fit this share of the free memory.
GRAPH_MEMORY_SHARE = 0.9
#: The kernels read x and store out rows as vectors of this many bytes (permute, combine).
VECTOR_BYTES = 16
#: Positions in a packed GEMM launch that the launch grid and the tma kernel's maps need.
_INNER_GROUPS = GEMM.names.index("inner_groups")
_A, _B0, _B1, _K = (GEMM.names.index(n) for n in ("A", "B0", "B1", "K"))


def graph_memory_bytes(problem: MoEProblem, config: KernelConfig) -> int:
    """GPU memory mode "graph" takes for its fixed-size buffers (the symmetric tensor at the
    fixed capacity, expert activations, per-token buffers and the graphs' input/output)."""
    p, cap = problem, fixed_slots(problem, config).capacity
    el, t = p.local_experts, max(p.tokens_per_rank, 1)
    slots = SymmetricLayout(p.world_size, el, cap, p.hidden).elements * ELEM_BYTES
    act = act_slots(p, config) * el * cap * p.intermediate * ELEM_BYTES
    per_token = 3 * 4 * p.top_k + ((p.shared_width + p.hidden) * ELEM_BYTES
                                   if p.shared_experts else 0) + 2 * p.hidden * ELEM_BYTES
    return slots + act + t * per_token


@dataclass
class _TokenBuffers:
    """Per-token buffers, sized by the largest call so far."""

    tokens: int
    topk_idx: object
    topk_w: object
    pos: object
    shared_act: object
    shared_out: object


@dataclass
class _SlotBuffers:
    """The symmetric tensor and the expert activations, sized by capacity C.

    C only grows, and every rank grows it the same way (all see the same counts), so the
    layout's shape stays identical on every rank; a call uses the first rows of each slot.
    """

    lay: SymmetricLayout  # index arithmetic of ``tensor`` (built once per capacity)
    tensor: object  # L[P][2][2][E_local][C][H], bf16 bits
    act: object
    gathered: object = None  # gather_experts: [E_local][P x C][H], bf16 bits

    @property
    def capacity(self) -> int:
        return self.lay.capacity


def _address(arg) -> int:
    """A kernel pointer argument's address: CuPy arrays (as the benches pass) or an int."""
    data = getattr(arg, "data", None)
    return int(data.ptr) if data is not None else int(arg)


def gemm_sms(sms: int, config: KernelConfig) -> int:
    """SMs the tma kernel's grid may take: all but ``config.comm_sms`` (left to NCCL's
    kernels); ConfigError where that leaves fewer than half of the GPU's ``sms``."""
    left = sms - config.comm_sms
    if left < sms // 2 or left < 1:
        raise ConfigError("comm_sms", config.comm_sms, f"this GPU has {sms} SMs; leave at "
                          f"most half of them to NCCL", config.name)
    return left


class FlashMoE:
    """One rank's share of a distributed MoE layer (expert parallel, symmetric layout).

    ``kernel``: a ``CompiledLayer`` from ``build.build``, or a ``MoEProblem`` (then the layer
    is built for ``config``, None: the default, on this GPU). ``weights``: host
    ``MoEWeights`` holding all experts or exactly this rank's, or ``DeviceWeights`` (e.g.
    ``DeviceWeights.from_arrays`` on user/torch tensors, or another layer's ``.weights`` to
    share them); ``None`` draws random ones from ``seed`` (each expert from (seed, expert
    id), so every rank agrees with a host reference built from the same seed). ``comm`` is
    required when ``problem.world_size > 1``. ``agree=False`` skips the ranks' agreement
    check on problem and config (the tuner agrees by broadcasting them).

    Mode "graph" (``config.mode``): every call may pass at most ``problem.tokens_per_rank``
    tokens; buffers for that bound are taken here (``memory_bytes``; refused with the token
    count that would fit when they do not fit the GPU), and the forward is captured as a
    CUDA graph once per token count and replayed; ``graphs=False`` runs the same
    host-free schedule without capturing it.
    """

    def __init__(self, kernel: CompiledLayer | MoEProblem, config: KernelConfig | None = None,
                 weights: MoEWeights | DeviceWeights | None = None, comm=None, seed: int = 0,
                 agree: bool = True, graphs: bool = True):
        import cupy

        if isinstance(kernel, CompiledLayer):
            if config is not None and config != kernel.config:
                raise ConfigError("config", config.name, f"the built kernel has "
                                  f"{kernel.config.name}; pass one or the other")
            problem, config = kernel.problem, kernel.config
        elif isinstance(kernel, MoEProblem):
            problem = kernel
        else:
            raise ProblemError("kernel", type(kernel).__name__,
                               "expected a CompiledLayer (flashmoe_gen.build.build) or a "
                               "MoEProblem")
        self.comm = comm
        self.rank = comm.rank if comm is not None else 0
        if problem.world_size > 1 or comm is not None:
            if comm is None:
                raise CommError(f"world_size={problem.world_size} needs a Communicator "
                                "(flashmoe_gen.comm.Communicator under mpirun)")
            if comm.world_size != problem.world_size:
                raise ProblemError("world_size", problem.world_size,
                                   f"must equal the number of MPI ranks ({comm.world_size})")
            if agree:
                comm.agree("problem", problem.name)
        if not isinstance(kernel, CompiledLayer):
            limits = current_device_limits()
            config = config or KernelConfig.default(problem, limits.arch)
            if comm is not None and agree:  # before building: a bad config fails everywhere
                comm.agree("config", config.name)
            kernel = build(problem, config, limits)
        elif comm is not None and agree:
            comm.agree("config", config.name)
        if comm is not None and len(comm.streams) < config.comm_streams:
            raise CommError(f"config wants {config.comm_streams} communication "
                            f"streams, the Communicator has {len(comm.streams)}")
        self.kernel, self.problem, self.config = kernel, problem, config
        self.plan = kernel.plan
        self.kernels = kernel.kernels
        self.compiled = kernel.compiled
        self.module = kernel.load()
        self._launchers = {id(g): python_launcher(g) for op in self.plan.ops
                           if isinstance(op, Gemms) for g in op.launches}
        self.memory_bytes = 0
        fixed_buffers = config.mode == "graph" or config.transport == "nvlink"
        if fixed_buffers:  # before the weights: a refusal should cost nothing
            # weights still to be uploaded take their share of the free memory too
            p = problem
            upload = 0 if isinstance(weights, DeviceWeights) else 2 * (
                3 * p.local_experts * p.hidden * p.intermediate + 3 * p.hidden * p.shared_width
                + p.hidden * p.experts)
            self.memory_bytes = self._graph_memory_fits(upload)

        el = problem.local_experts
        self.local_range = range(self.rank * el, (self.rank + 1) * el)
        if weights is None:
            weights = MoEWeights.random(problem, seed, self.local_range)
        if not isinstance(weights, DeviceWeights):
            weights = DeviceWeights.from_host(problem, weights, self.rank)
        weights.check_routing(problem)  # the rule's bias / shared gate, or a null read
        self.weights = weights
        w = weights
        self.w_gate, self.w1, self.w3, self.w2 = w.gate, w.w1, w.w3, w.w2
        self.sw1, self.sw3, self.sw2 = w.sw1, w.sw3, w.sw2
        # Plan symbols that never change between calls (device addresses of the weights).
        self._weight_ptrs = {n: (0 if a is None else a.data.ptr) for n, a in (
            ("w1", w.w1), ("w3", w.w3), ("w2", w.w2), ("sw1", w.sw1), ("sw3", w.sw3),
            ("sw2", w.sw2))}

        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.shared_stream = cupy.cuda.Stream(non_blocking=True)
        self._sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self._gemm_sms = gemm_sms(self._sms, config)
        # The tma kernel's tensor maps, and (mode "host") a static copy of x so the shared
        # experts' map does not change with every caller's array.
        self._tma = TmaMaps() if config.uses_tma else None
        self._weight_ops: dict[tuple[int, int], Operand] = {}
        self._x_static = None
        # The split router's partial logits and per-batch counters (zero; the kernel resets
        # them), for any token count (router_layout.router_part_floats). Transport "nvlink" routes
        # in the persistent kernel, which has its own scratch.
        part, batches = ((0, 0) if config.transport == "nvlink" else
                         router_part_floats(problem, config.router_tokens_per_block))
        self._router_part = cupy.empty(max(part, 1), np.float32)
        self._router_done = cupy.zeros(max(batches, 1), np.uint32)
        self.counts = cupy.zeros((problem.world_size, problem.experts), np.int32)
        self._counts_host = cupy.cuda.alloc_pinned_memory(self.counts.nbytes)
        # row_off[s][e]: first row of global expert e in source s's slot (layout.row_offsets)
        self.row_off = cupy.zeros((problem.world_size, problem.experts), np.int32)
        self._row_off_host = cupy.cuda.alloc_pinned_memory(self.row_off.nbytes)
        gather, el = config.gather_experts, problem.local_experts  # its run lengths, only then
        self.gcounts = cupy.zeros(el, np.int32) if gather else None
        self._gcounts_host = cupy.cuda.alloc_pinned_memory(4 * el) if gather else None
        self._tok: _TokenBuffers | None = None
        self._buf: _SlotBuffers | None = None
        self._dropped_host = 0
        self.capacity = 0
        self._last: int | None = None  # token count of the last call
        self._graph_cache = None
        self._persistent = None
        # The caller's stream -> the layer's and back, events reused by every call (creating
        # one per call costs host time a decode step should not pay).
        self._ev_in = cupy.cuda.Event(disable_timing=True)
        self._ev_out = cupy.cuda.Event(disable_timing=True)
        if config.transport == "nvlink":
            self._setup_nvlink(graphs)
        elif config.mode == "graph":
            self._setup_graph_mode(graphs)

    def _graph_memory_fits(self, upload: int) -> int:
        """The bytes mode "graph" takes; ConfigError (on every rank alike) naming the token
        count that would fit when they and ``upload`` exceed the GPU's free memory."""
        import cupy

        p, cfg = self.problem, self.config
        need = graph_memory_bytes(p, cfg)
        free = cupy.cuda.runtime.memGetInfo()[0] - upload
        fits = need <= free * GRAPH_MEMORY_SHARE
        if self.comm is not None:  # refuse on every rank alike, before any collective
            fits = all(self.comm.mpi.allgather(fits))
        if not fits:
            t = p.tokens_per_rank
            while t > 1 and graph_memory_bytes(p.replace(tokens_per_rank=t), cfg) > \
                    free * GRAPH_MEMORY_SHARE:
                t //= 2
            nvlink = cfg.transport == "nvlink"
            field, value, other = (("transport", "nvlink", "transport 'nccl' in mode 'host'")
                                   if nvlink else ("mode", "graph", "mode 'host'"))
            raise ConfigError(field, value, f"fixed-size buffers for {p.tokens_per_rank} "
                              f"tokens per rank take {need / 2**30:.2f} GiB, this GPU has "
                              f"{free / 2**30:.2f} GiB free: at most ~{t} tokens per rank fit "
                              f"(MoEProblem.tokens_per_rank), or use {other}", cfg.name)
        return need

    def _setup_graph_mode(self, graphs: bool) -> None:
        """Fixed capacity and regions, every buffer for the token bound, the region table
        and the drop counter on the device (nothing is sized per call)."""
        import cupy

        p, cfg = self.problem, self.config
        self.fixed = fixed_slots(p, cfg)
        self._token_buffers(p.tokens_per_rank)
        self._slot_buffers(self.fixed.capacity)
        self.capacity = self.fixed.capacity
        self._region = cupy.asarray(np.array(self.fixed.region, np.int32).ravel())
        self._dropped = cupy.zeros(1, np.int32)
        if graphs:
            self._graph_cache = GraphCache(self, p.tokens_per_rank)

    def _setup_nvlink(self, graphs: bool) -> None:
        """Transport "nvlink": the fixed capacity, token buffers for the bound, the IPC heap
        shared with the peers and the persistent kernel's launch (flashmoe_gen.persistent)."""
        p = self.problem
        self.fixed = fixed_slots(p, self.config)
        self._token_buffers(p.tokens_per_rank)
        self.capacity = self.fixed.capacity
        self._persistent = PersistentForward(self, self.fixed.capacity)
        # The IPC heap and the status word go with the layer (the callback holds no
        # reference back to it; a shared heap is freed at the next collective point).
        weakref.finalize(self, self._persistent.resources().collected)
        if graphs and self.config.mode == "graph":
            self._graph_cache = GraphCache(self, p.tokens_per_rank)

    @property
    def dropped_tokens(self) -> int:
        """This rank's (token, expert) pairs past the capacity in the last call (mode
        "graph" and transport "nvlink": counted on the device, read here)."""
        if self._persistent is not None:
            self.stream.synchronize()
            return self._persistent.dropped()
        if self.config.mode == "graph":
            self.stream.synchronize()
            return int(self._dropped.get()[0])
        return self._dropped_host

    # -- buffers --------------------------------------------------------------------------
    def _token_buffers(self, tokens: int) -> _TokenBuffers:
        import cupy

        b, p = self._tok, self.problem
        if b is not None and b.tokens >= tokens:
            return b
        t = max(tokens, 1)
        self._tok = _TokenBuffers(
            tokens=t,
            topk_idx=cupy.empty((t, p.top_k), np.int32),
            topk_w=cupy.empty((t, p.top_k), np.float32),
            pos=cupy.empty((t, p.top_k), np.int32),
            shared_act=cupy.empty((t, p.shared_width), np.uint16) if p.shared_experts else None,
            shared_out=cupy.empty((t, p.hidden), np.uint16) if p.shared_experts else None,
        )
        return self._tok

    def _slot_buffers(self, capacity: int) -> _SlotBuffers:
        import cupy

        b, p = self._buf, self.problem
        if b is not None and b.capacity >= capacity:
            return b
        self._buf = None  # free the old slots before taking the larger ones
        lay = SymmetricLayout(p.world_size, p.local_experts, capacity, p.hidden)
        self._buf = _SlotBuffers(
            lay=lay,
            tensor=cupy.empty(lay.shape, np.uint16),
            act=cupy.empty((act_slots(p, self.config), p.local_experts, capacity,
                            p.intermediate), np.uint16),
            gathered=cupy.empty(gathered_shape(p, capacity), np.uint16)
            if self.config.gather_experts else None,
        )
        return self._buf

    # -- kernels --------------------------------------------------------------------------
    def gemm(self, gated: bool, rows: int, groups: int, stream=None, **args) -> None:
        """One grouped expert GEMM launch with named arguments (``signatures.GEMM``)."""
        import cupy
        self._launch_gemm(gated, rows, groups, int(args["N"]), GEMM.pack(args),
                          stream or cupy.cuda.get_current_stream())

    def _launch_gemm(self, gated: bool, rows: int, groups: int, n: int, args: tuple,
                     stream) -> None:
        if rows <= 0 or groups <= 0:
            return
        tile = self.config.gate_up if gated else self.config.down
        name = self.kernels.gate_up if gated else self.kernels.down
        grid = tile.grid(n, rows, groups, int(args[_INNER_GROUPS]), self._gemm_sms)
        if tile.mma == "tma":
            k = int(args[_K])
            b1 = self._weight_operand(_address(args[_B1]), k) if gated else None
            args = (*args, self._tma.launch(Operand.at(_address(args[_A]), k),
                                            self._weight_operand(_address(args[_B0]), k), b1,
                                            groups, tile.bm, tile.bn, stream))
        with stream:
            self.module[name](grid, (tile.threads,), args,
                              shared_mem=self.compiled.dynamic_smem[name])

    def _weight_operand(self, ptr: int, k: int) -> Operand:
        """A weight's tensor-map operand: B operands are the layer's own weights, which live
        and stay put as long as it does, so their allocation is looked up once (the A
        operand, a buffer that may be reallocated, is looked up every launch)."""
        op = self._weight_ops.get((ptr, k))
        if op is None:
            op = self._weight_ops[(ptr, k)] = Operand.at(ptr, k)
        return op

    def _copy(self, dst: int, src: int, nbytes: int, stream) -> None:
        """Device-to-device copy of ``nbytes`` on ``stream`` (a forward's own rows)."""
        import cupy

        rt = cupy.cuda.runtime
        rt.memcpyAsync(dst, src, nbytes, rt.memcpyDeviceToDevice, stream.ptr)

    def _launch(self, kernel: str, signature, grid: int, threads: int, stream, **args) -> None:
        with stream:
            self.module[kernel]((grid,), (threads,), signature.packer(**args))

    # -- forward --------------------------------------------------------------------------
    def forward(self, x, out=None, *, parts: str = "all"):
        """``x``: uint16 (bf16 bits) cupy array ``[T_r, H]``; returns ``out``, same shape.

        ``out`` may be given (e.g. poisoned by a test to prove every element is written).
        ``parts`` is for benchmarks that split the layer's time: ``"comm"`` skips the expert
        and shared GEMMs, ``"compute"`` skips the token exchange; both give wrong outputs.
        """
        if parts not in ("all", "comm", "compute"):
            raise ValueError(f"parts={parts!r}: choose 'all', 'comm' or 'compute'")
        import cupy

        p = self.problem
        if x.dtype != np.uint16 or x.ndim != 2 or x.shape[1] != p.hidden:
            raise ProblemError("x", f"{x.dtype}{tuple(x.shape)}",
                               f"expected uint16 (bf16 bits) [tokens, {p.hidden}]")
        if not x.flags.c_contiguous or x.data.ptr % VECTOR_BYTES:
            x = x.copy()  # contiguous, on a fresh (aligned) allocation
        tokens = x.shape[0]
        if out is None:
            out = cupy.empty((tokens, p.hidden), np.uint16)
        elif out.dtype != np.uint16 or tuple(out.shape) != (tokens, p.hidden):
            raise ProblemError("out", f"{out.dtype}{tuple(out.shape)}",
                               f"expected uint16 [{tokens}, {p.hidden}]")
        elif not out.flags.c_contiguous or out.data.ptr % VECTOR_BYTES:
            raise ProblemError("out", f"address {out.data.ptr:#x}, contiguous "
                               f"{out.flags.c_contiguous}", f"the combine stores rows as "
                               f"{VECTOR_BYTES}-byte vectors: pass a contiguous array that "
                               f"starts on a {VECTOR_BYTES}-byte boundary (a fresh one does)")
        if (self.config.mode == "graph" or self._persistent is not None) and \
                tokens > p.tokens_per_rank:
            raise ProblemError("tokens", tokens, f"mode 'graph' and transport 'nvlink' were "
                               f"built for at most "
                               f"{p.tokens_per_rank} tokens per rank (the fixed transfer "
                               "sizes); build the layer with a larger tokens_per_rank")
        s, caller = self.stream, cupy.cuda.get_current_stream()
        direct = self._graph_cache.captured_direct(x, out) \
            if self._graph_cache is not None and parts == "all" else None
        if direct is not None:  # transport nvlink's steady decode step: on the caller's stream
            direct.launch(stream=caller)
            self._last = tokens
            return out
        # The layer's stream runs after the caller's, and the caller's after it.
        self._ev_in.record(caller)
        s.wait_event(self._ev_in)
        if self._graph_cache is not None and parts == "all":
            self._graph_cache.forward(self._run_plan, x, out)
        else:
            if self._tma is not None and tokens:
                x = self._static_input(x, s)
            self._run_plan(x, tokens, out, parts)
        self._ev_out.record(s)
        caller.wait_event(self._ev_out)
        self._last = tokens  # last_routing() slices on demand: a replay should not pay it
        return out

    def _static_input(self, x, stream):
        """``x`` copied (on ``stream``) into a buffer the layer keeps: the tma kernel's map
        of the shared experts' input then stays valid from call to call."""
        import cupy

        b = self._x_static
        if b is None or b.shape[0] < x.shape[0]:
            stream.synchronize()  # the old buffer may still be read
            b = self._x_static = cupy.empty((x.shape[0], x.shape[1]), np.uint16)
        xs = b[:x.shape[0]]
        cupy.cuda.runtime.memcpyAsync(xs.data.ptr, x.data.ptr, x.nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
        return xs

    def _run_plan(self, x, tokens: int, out, parts: str = "all") -> None:
        """Issue every operation of the plan on the layer's streams (transport "nvlink":
        the one persistent kernel instead)."""
        if self._persistent is not None:
            if parts != "all":
                raise ConfigError("transport", "nvlink", f"parts={parts!r}: the persistent "
                                  "kernel runs the whole forward; use parts='all'",
                                  self.config.name)
            self._persistent.launch(x, tokens, out, self.stream)
            return
        run = Run(self, x, tokens, out, parts)
        for op in self.plan.ops:
            run.step(op)

    __call__ = forward

    # -- inspection -----------------------------------------------------------------------
    def poison(self, bits: int = 0xFFFF) -> None:
        """Fill every internal buffer with a NaN pattern (tests: stale data cannot pass)."""
        for bufs in (self._tok, self._buf):
            if bufs is None:
                continue
            for v in vars(bufs).values():
                if not hasattr(v, "dtype"):  # sizes, absent shared-expert buffers
                    continue
                if v.dtype.itemsize == 2:
                    v.fill(bits)
                else:  # indices and weights: -1 is never a valid value here
                    v.fill(-1)
        # Counts and row offsets are rewritten by every forward before they are read.
        self.counts.fill(-1)
        self.row_off.fill(-1)
        if self._graph_cache is not None:  # the graphs' static input and output
            self._graph_cache.poison(bits)
        if self.config.mode == "graph" and self._persistent is None:
            self._dropped.fill(-1)
        if self._persistent is not None:
            # Local buffers only: the IPC heap holds the flags, and a peer ahead of this rank
            # may already be writing its next call's rows into it.
            self._persistent.act.fill(bits)
            self._persistent.counts.fill(-1)

    def last_routing(self):
        """(topk_idx [T, k] int32, topk_w [T, k] float32, pos [T, k] int32) of the last call."""
        if self._last is None:
            raise RuntimeError("forward() has not run yet")
        b, t = self._tok, self._last
        return b.topk_idx[:t], b.topk_w[:t], b.pos[:t]
