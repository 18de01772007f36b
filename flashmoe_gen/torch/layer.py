"""``FlashMoELayer``: the FlashMoE layer as an inference-only ``torch.nn.Module``.

Its parameters are bf16 tensors in the layout the kernels read (``tensors.NAMES``; the
expert matrices are ``nn.Linear``'s ``[out, in]``), and the kernels read them in place:
``DeviceWeights`` holds CuPy views of the parameters (DLPack), never a second copy. A call
runs as the custom op ``flashmoe::moe_forward`` on the current torch stream: the layer's
internal streams wait for it at entry and it waits for them at exit. Several ranks (one GPU
each, ``comm``) must all call ``forward``, as with any collective.
"""

from __future__ import annotations

import torch
from torch import nn

from flashmoe_gen.config import KernelConfig
from flashmoe_gen.errors import (
    ArgumentError,
    CommError,
    DeviceError,
    FlashMoEError,
    ProblemError,
)
from flashmoe_gen.problem import MoEProblem
from flashmoe_gen.torch import op as _op
from flashmoe_gen.torch import tensors as _tensors
from flashmoe_gen.weights import MoEWeights


class InferenceOnlyError(FlashMoEError, RuntimeError):
    """A forward with autograd recording: the layer has no backward."""


class FlashMoELayer(nn.Module):
    """One rank's share of a FlashMoE layer, as a torch module (inference only).

    ``problem``: the ``MoEProblem`` (its ``world_size`` must equal ``comm``'s).
    ``config``: a ``KernelConfig`` (or its name); None: ``flashmoe_gen.lookup(problem)`` on rank 0
    (broadcast to the others) when the layer is built. ``comm``: a
    ``flashmoe_gen.comm.Communicator`` (``Communicator.from_torch()`` under torchrun),
    required when ``world_size > 1``. ``weights``: host ``MoEWeights`` (all experts or this
    rank's), a dict of kernel-layout tensors (``tensors.kernel_shapes``; used as they are,
    sharing their storage), or None: ``MoEWeights.random(problem, seed)``. ``device``: where
    new parameters go (default: the current CUDA device, else the CPU). ``build``: compile
    and set up the runtime now (default: when the parameters are on a GPU); otherwise at the
    first call.

    ``forward(x)``: ``x`` bf16 ``[..., H]`` on the parameters' GPU; returns bf16, same
    shape. A non-contiguous ``x`` is copied to a contiguous one first.
    """

    def __init__(self, problem: MoEProblem, config=None, *, comm=None, weights=None,
                 rank: int | None = None, seed: int = 0, device=None,
                 build: bool | None = None):
        super().__init__()
        if not isinstance(problem, MoEProblem):
            raise ArgumentError("problem", problem, "a flashmoe_gen.MoEProblem")
        if comm is not None and comm.world_size != problem.world_size:
            raise ArgumentError("comm", f"{comm.world_size} ranks",
                                f"the problem's world_size is {problem.world_size}")
        if comm is not None and rank is not None and rank != comm.rank:
            raise ArgumentError("rank", rank, f"this process is rank {comm.rank} of comm")
        if rank is None:
            rank = comm.rank if comm is not None else 0
        if isinstance(rank, bool) or not isinstance(rank, int) \
                or not 0 <= rank < problem.world_size:
            raise ArgumentError("rank", rank, f"an integer in 0..{problem.world_size - 1} "
                                "(the problem's world_size)")
        if isinstance(config, str):
            config = KernelConfig.parse(config)
        if config is not None and not isinstance(config, KernelConfig):
            raise ArgumentError("config", config, "a flashmoe_gen.KernelConfig, its name or "
                                "JSON, or None to look the best one up")
        self.problem, self.kernel_config, self.comm = problem, config, comm
        self.rank = rank
        self.tuned = None  # the TunedKernel lookup() gave, when config was None
        if weights is None or isinstance(weights, MoEWeights):
            if weights is None:
                el = problem.local_experts
                weights = MoEWeights.random(problem, seed,
                                            range(self.rank * el, (self.rank + 1) * el))
            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) \
                    if torch.cuda.is_available() else torch.device("cpu")
            tensors = {k: v.to(device) for k, v in
                       _tensors.from_moe_weights(problem, weights, self.rank).items()}
        elif isinstance(weights, dict):
            tensors = weights
        else:
            raise ArgumentError("weights", type(weights).__name__, "MoEWeights, a dict of "
                                "kernel-layout tensors (flashmoe_gen.torch.tensors), or None")
        _tensors.check_tensors(problem, tensors)
        for name in _tensors.NAMES:
            if name == "expert_bias" and name in tensors:
                self.register_buffer(name, tensors[name].detach())
            elif name in tensors:
                self.register_parameter(name, nn.Parameter(tensors[name].detach(),
                                                           requires_grad=False))
            else:
                setattr(self, name, None)
        self._runtime = None
        self._ptrs: tuple = ()
        self._agreed = False
        self._handle = _op.register(self)
        if build if build is not None else self.w1.is_cuda:
            self.build()

    # -- construction from Hugging Face ---------------------------------------------------
    @classmethod
    def from_hf(cls, block, world_size: int = 1, rank: int | None = None, comm=None,
                config=None, *, tokens_per_rank: int = 256, build: bool | None = None):
        """The layer of a transformers MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE,
        DeepSeek-V3), holding rank ``rank``'s ``E/world_size`` experts.

        The rank's expert and shared weights are views of the block's parameters where the
        layout allows (``down_proj``, the shared MLP, the bias and shared gate), else one
        copy (``gate_up_proj`` is split into ``w1``/``w3``; the router is transposed; a
        dtype other than bf16 is converted). ``config`` None: looked up at build time.
        ``tokens_per_rank``: the tokens per call (the tuning key; for a config of mode
        "graph", the most one call may pass).
        """
        from flashmoe_gen.torch import hf

        if rank is None:
            rank = comm.rank if comm is not None else 0
        problem = hf.hf_problem(block, world_size, tokens_per_rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ArgumentError("rank", rank, f"an integer in 0..{world_size - 1} (world_size)")
        return cls(problem, config, comm=comm, rank=rank,
                   weights=hf.hf_tensors(block, problem, rank), build=build)

    # -- runtime ---------------------------------------------------------------------------
    def _op_tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in _tensors.NAMES) if t is not None]

    def _lookup(self):
        """rank 0 looks the config up, every rank gets the same one."""
        from flashmoe_gen.api import TunedKernel, lookup

        found = failure = None
        if self.rank == 0:
            try:
                t = lookup(self.problem)
                found = (t.config.name, t.provenance, t.latency_ms)
            except Exception as e:  # the other ranks wait for the answer: tell them
                failure = e
        if self.comm is not None and self.problem.world_size > 1:
            found = self.comm.mpi.bcast(
                found if failure is None else f"{type(failure).__name__}: {failure}", root=0)
            if isinstance(found, str) and failure is None:
                raise CommError(f"rank {self.rank}: rank 0 could not look the config up "
                                f"({found}); pass config= to the layer")
        if failure is not None:
            raise failure
        name, provenance, latency = found
        return TunedKernel(self.problem, KernelConfig.parse(name), provenance, latency)

    def build(self) -> None:
        """Compile (or take from the cache) and set up the runtime on the parameters' GPU;
        collective when ``world_size > 1``. Runs again by itself when the parameters move."""
        import cupy

        from flashmoe_gen.device_weights import DeviceWeights, as_bits, as_f32
        from flashmoe_gen.runtime import FlashMoE

        if self.problem.world_size > 1 and self.comm is None:
            raise CommError(f"world_size={self.problem.world_size} needs comm: a "
                            "flashmoe_gen.comm.Communicator (Communicator.from_torch() under "
                            "torchrun, Communicator() under mpirun)")
        dev = self.w1.device
        for name, t in zip(_tensors.NAMES, (getattr(self, n) for n in _tensors.NAMES),
                           strict=True):
            if t is None:
                continue
            if t.dtype != _tensors.dtype_of(name):  # e.g. after layer.half()
                raise ProblemError(name, str(t.dtype), f"must stay {_tensors.dtype_of(name)} "
                                   "(the kernels read bf16 weights in place)")
            if t.device != dev or not t.is_contiguous():
                raise DeviceError(f"parameter {name} is on {t.device}"
                                  f"{'' if t.is_contiguous() else ', not contiguous'}: every "
                                  f"tensor of the layer must be contiguous on {dev}")
        if dev.type != "cuda":
            raise DeviceError(f"the layer's parameters are on {dev}: move it to a GPU "
                              "(layer.cuda()) before building or calling it")
        with torch.cuda.device(dev), cupy.cuda.Device(dev.index):
            if self.kernel_config is None:
                self.tuned = self._lookup()
                self.kernel_config = self.tuned.config
            s = torch.cuda.current_stream(dev)
            with cupy.cuda.ExternalStream(s.cuda_stream, dev.index):
                # Views of the parameters (DLPack): the kernels read them in place.
                dw = DeviceWeights(*(as_bits(getattr(self, n), n) for n in ("gate", "w1",
                                                                             "w3", "w2")))
                if self.problem.shared_experts:
                    dw.sw1, dw.sw3, dw.sw2 = (as_bits(getattr(self, n), n) for n in (
                        "shared_w1", "shared_w3", "shared_w2"))
                if self.problem.expert_bias:
                    dw.expert_bias = as_f32(self.expert_bias, "expert_bias")
                if self.problem.shared_gate:
                    dw.shared_gate = as_bits(self.shared_gate, "shared_gate")
            self._runtime = FlashMoE(self.problem, self.kernel_config, weights=dw,
                                     comm=self.comm, agree=not self._agreed)
        self._agreed = True
        self._ptrs = tuple(t.data_ptr() for t in self._op_tensors())

    @property
    def runtime(self):
        """The ``flashmoe_gen.runtime.FlashMoE`` executing this layer (None before build)."""
        return self._runtime

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The custom op's implementation: ``x`` bf16 ``[T, H]`` contiguous."""
        import cupy

        from flashmoe_gen.device_weights import as_bits

        dev = self.w1.device
        if not x.is_cuda or x.device != dev:
            raise ArgumentError("x", f"a tensor on {x.device}", f"a CUDA tensor on the "
                                f"layer's device ({dev}); move x or the layer (layer.to(...))")
        if self._runtime is None or self._ptrs != tuple(t.data_ptr()
                                                        for t in self._op_tensors()):
            self.build()  # first call, or the parameters moved (.to(), .cuda(), load)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        stream = torch.cuda.current_stream(dev)
        with cupy.cuda.Device(dev.index), cupy.cuda.ExternalStream(stream.cuda_stream,
                                                                   dev.index):
            # FlashMoE.forward orders its streams after cupy's current one (this torch
            # stream) at entry and this stream after them at exit.
            self._runtime.forward(as_bits(x, "x"), out=as_bits(out, "out"))
        return out

    # -- forward ---------------------------------------------------------------------------
    def check_input(self, x) -> None:
        """Typed errors for an input the layer cannot take (dtype, shape, autograd)."""
        h = self.problem.hidden
        if not isinstance(x, torch.Tensor):
            raise ArgumentError("x", type(x).__name__, f"a torch.bfloat16 tensor [tokens, {h}]")
        if x.dtype != torch.bfloat16:
            raise ArgumentError("x", f"dtype {x.dtype}", f"torch.bfloat16 (convert with "
                                f"x.to(torch.bfloat16)); shape [tokens, {h}]")
        if x.dim() < 2 or x.shape[-1] != h:
            raise ArgumentError("x", f"shape {tuple(x.shape)}",
                                f"[tokens, {h}] (or [..., {h}]): the last dim is hidden={h}")
        if torch.is_grad_enabled() and (x.requires_grad or any(
                t.requires_grad for t in self._op_tensors())):
            raise InferenceOnlyError(
                "FlashMoELayer is inference only (no backward): call it under "
                "torch.no_grad() or torch.inference_mode(), with x and the layer's "
                "parameters at requires_grad=False")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = torch.ops.flashmoe.moe_forward(x2, self._op_tensors(), self._handle)
        return out.view(shape)

    def extra_repr(self) -> str:
        cfg = self.kernel_config.name if self.kernel_config is not None else "lookup"
        return f"problem={self.problem.name}, rank={self.rank}, config={cfg}"

    def last_routing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids ``[T, k]`` int32, weights ``[T, k]`` float32) the last call chose for
        this rank's tokens: views of the runtime's buffers, valid until the next call."""
        if self._runtime is None:
            raise RuntimeError("the layer has not run yet")
        idx, w, _ = self._runtime.last_routing()
        return torch.from_dlpack(idx), torch.from_dlpack(w)

    def dropped_tokens(self) -> int:
        """Assignments the last call dropped (capacity factor mode), 0 otherwise."""
        return 0 if self._runtime is None else int(self._runtime.dropped_tokens)


