"""The tuning environment: GPU, world size, toolchain versions and template hash.

A winner is only valid in the environment it was measured in, so lookups match on
``Environment.key`` exactly and never return another environment's winner.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from flashmoe_gen.errors import DeviceError


@dataclass(frozen=True)
class Environment:
    """Everything besides the problem that can change which config is fastest."""

    gpu_name: str
    compute_capability: str
    world_size: int
    template_hash: str
    arch: str = ""
    cuda_driver: str = ""
    nvrtc_version: str = ""
    nccl_version: str | None = None
    cupy_version: str = ""
    package_version: str = ""

    def __post_init__(self) -> None:
        if not self.arch:
            # "9.0" -> "sm_90": derived, so callers that only know the capability agree.
            object.__setattr__(self, "arch", "sm_" + self.compute_capability.replace(".", ""))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """Stable 16-hex-digit hash of every field."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> Environment:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def detect(cls, world_size: int, template_hash: str) -> Environment:
        """The environment of the current CUDA device (raises DeviceError without one)."""
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - cupy is a dependency
            raise DeviceError(f"cupy is not importable: {e}") from e
        import flashmoe_gen

        rt = cupy.cuda.runtime
        try:
            if rt.getDeviceCount() < 1:
                raise DeviceError("no CUDA GPU visible")
            dev = cupy.cuda.Device().id
            props = rt.getDeviceProperties(dev)
            driver = rt.driverGetVersion()
        except rt.CUDARuntimeError as e:
            raise DeviceError(f"no usable CUDA GPU: {e}") from e
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        major, minor = cupy.cuda.nvrtc.getVersion()
        return cls(
            gpu_name=name,
            compute_capability=f"{props['major']}.{props['minor']}",
            world_size=world_size,
            template_hash=template_hash,
            cuda_driver=f"{driver // 1000}.{driver % 1000 // 10}",
            nvrtc_version=f"{major}.{minor}",
            nccl_version=_nccl_version(),
            cupy_version=cupy.__version__,
            package_version=flashmoe_gen.__version__,
        )


def _nccl_version() -> str | None:
    """NCCL's version as "2.27.3", or None when CuPy was built without NCCL."""
    try:
        from cupy.cuda import nccl

        code = int(nccl.get_version())
    except Exception:  # ImportError, or a CuPy without NCCL bindings
        return None
    # NCCL >= 2.9 encodes major*10000 + minor*100 + patch; older ones major*1000 + ...
    if code >= 20900:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"
