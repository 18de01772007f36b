"""The build stage: (problem, config, target) -> ``CompiledLayer``, cached in the process.

One place does render -> validate (once) -> compile -> load: the runtime layer, the tuner's
evaluator, ``TunedKernel``, the export and the benches all take a ``CompiledLayer`` from
``build``. Rendering, the plan and the resource check happen when it is built; NVRTC runs on
first use of ``compiled`` (the export needs only the source and the plan), and the module is
loaded once per GPU on ``load()``.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

from .arch import DEFAULT_ARCH, DeviceLimits, limits_for
from .compile import CompiledModule, LoadedModule, compile_source, target_arch
from .config import KernelConfig
from .errors import ConfigError, PerformanceWarning
from .plan import ForwardPlan, build_plan
from .problem import MoEProblem
from .render import GeneratedSource, KernelNames, render


@dataclass(frozen=True)
class CompiledLayer:
    """Everything generated for one (problem, config, target): source, plan, cubin, module."""

    problem: MoEProblem
    config: KernelConfig
    limits: DeviceLimits
    source: GeneratedSource
    plan: ForwardPlan
    _state: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def arch(self) -> str:
        """The NVRTC target (sm_90 becomes sm_90a for wgmma tiles)."""
        return target_arch(self.config, self.limits.arch)

    @property
    def kernels(self) -> KernelNames:
        return self.source.kernels

    @property
    def compiled(self) -> CompiledModule:
        """NVRTC's cubin and resource report (compiled on first use; no GPU needed)."""
        with _lock:
            mod = self._state.get("compiled")
            if mod is None:
                mod = compile_source(self.source, self.limits.arch)
                _check_resources(self, mod)
                self._state["compiled"] = mod
            return mod

    def load(self) -> LoadedModule:
        """The module loaded on the current GPU (once per device)."""
        import cupy

        dev = cupy.cuda.Device().id
        compiled = self.compiled
        with _lock:
            loaded = self._state.setdefault("loaded", {})
            if dev not in loaded:
                loaded[dev] = LoadedModule(compiled)
            return loaded[dev]


#: Built layers kept in the process (a tuning run builds one per candidate; the cubins stay
#: in the disk cache when they leave this one).
CACHE_SIZE = 256
_cache: OrderedDict[tuple, CompiledLayer] = OrderedDict()
_lock = threading.RLock()


def build(problem: MoEProblem, config: KernelConfig | None = None,
          limits: DeviceLimits | str | None = None) -> CompiledLayer:
    """The layer for ``problem`` and ``config`` (None: the default for the target).

    ``limits``: the GPU's (``arch.current_device_limits()``), an arch name such as "sm_90",
    or None for ``sm_90``. Raises ``ConfigError`` when the config does not fit.
    """
    if limits is None or isinstance(limits, str):
        limits = limits_for(limits or DEFAULT_ARCH)
    if not isinstance(problem, MoEProblem):
        raise ConfigError("problem", type(problem).__name__, "expected a MoEProblem")
    config = config if config is not None else KernelConfig.default(problem, limits.arch)
    if not isinstance(config, KernelConfig):
        raise ConfigError("config", type(config).__name__, "expected a KernelConfig")
    key = (problem.name, config.name, limits)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    config.validate(problem, limits)
    layer = CompiledLayer(problem, config, limits,
                          render(problem, config, validate=False, arch=limits.arch),
                          build_plan(problem, config))
    with _lock:
        layer = _cache.setdefault(key, layer)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return layer


def _check_resources(layer: CompiledLayer, mod: CompiledModule) -> None:
    """What ptxas reports must fit a block (the config's estimate can be off: registers,
    and the static shared memory beside the dynamic bytes the config sizes); a kernel whose
    wgmma ptxas serialised is named in a ``PerformanceWarning``."""
    cfg, limits = layer.config, layer.limits
    for name, res in mod.resources.items():
        if res.wgmma_serialized:
            warnings.warn(PerformanceWarning(name, cfg.name, res.wgmma_serialized),
                          stacklevel=3)
        dynamic = mod.dynamic_smem.get(name, 0)
        if res.static_smem + dynamic > limits.smem_per_block_optin:
            # (the launch would fail with a bare "too many resources requested")
            raise ConfigError("gate_up.stages", cfg.gate_up.stages,
                              f"{name} needs {dynamic} B of dynamic and {res.static_smem} B "
                              f"of static shared memory, {limits.arch} allows "
                              f"{limits.smem_per_block_optin} B per block: fewer stages or "
                              "smaller tiles", cfg.name)
    for which, name, tile in (("gate_up", layer.kernels.gate_up, cfg.gate_up),
                              ("down", layer.kernels.down, cfg.down)):
        res = mod.resources.get(name)
        if res is not None and res.registers * tile.threads > limits.regs_per_block:
            raise ConfigError(f"{which}.warps_n", tile.warps_n,
                              f"{tile.threads} threads x {res.registers} registers exceed "
                              f"{limits.regs_per_block} per block", cfg.name)
