"""flashmoe_gen: generate, compile and tune FlashMoE layers (distributed MoE on GPUs)."""

__version__ = "0.1.0"

from .config import GemmTile, KernelConfig  # noqa: E402
from .errors import (  # noqa: E402
    ArgumentError,
    CacheError,
    CommError,
    CommTimeout,
    CompileError,
    ConfigError,
    DatabaseError,
    DeviceError,
    FlashMoEError,
    ProblemError,
)
from .problem import MoEProblem  # noqa: E402


def lookup(problem, world_size=None, device=None, db=None, configs_dir=None):
    """Best known kernel for ``problem`` (see ``flashmoe_gen.api.lookup``)."""
    from .api import lookup as _lookup
    return _lookup(problem, world_size=world_size, device=device, db=db,
                   configs_dir=configs_dir)


__all__ = [
    "ArgumentError", "CacheError", "CommError", "CommTimeout", "CompileError", "ConfigError",
    "DatabaseError", "DeviceError", "FlashMoEError",
    "GemmTile", "KernelConfig", "MoEProblem", "ProblemError", "__version__", "lookup",
]
