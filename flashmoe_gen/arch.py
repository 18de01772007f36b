"""GPU targets: the limits a config is validated against, per compute capability."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DeviceError


@dataclass(frozen=True)
class DeviceLimits:
    """What a kernel config must fit into on one GPU architecture."""

    arch: str                      # NVRTC target, e.g. "sm_90"
    smem_per_block_optin: int      # bytes of dynamic shared memory one block may opt into
    regs_per_thread: int = 255
    regs_per_block: int = 65536
    max_threads_per_block: int = 1024
    sm_count: int | None = None    # known only for a live device

    @property
    def major_minor(self) -> tuple[int, int]:
        digits = self.arch.removeprefix("sm_").rstrip("a")
        return int(digits[:-1]), int(digits[-1])


#: Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
KNOWN_ARCHS: dict[str, DeviceLimits] = {
    "sm_80": DeviceLimits("sm_80", 163 * 1024),
    "sm_86": DeviceLimits("sm_86", 99 * 1024),
    "sm_89": DeviceLimits("sm_89", 99 * 1024),
    "sm_90": DeviceLimits("sm_90", 227 * 1024),
    "sm_90a": DeviceLimits("sm_90a", 227 * 1024),
}
DEFAULT_ARCH = "sm_90"
#: mma.sync bf16 needs sm_80 or newer.
MIN_ARCH = (8, 0)


def limits_for(arch: str) -> DeviceLimits:
    if isinstance(arch, str) and arch in KNOWN_ARCHS:
        return KNOWN_ARCHS[arch]
    raise DeviceError(f"unknown arch {arch!r}; known: {', '.join(sorted(KNOWN_ARCHS))}")


#: What a user without a GPU can still do (said whenever no GPU is found).
NO_GPU_HINT = ("`run` and `tune` need a CUDA GPU; `compile` and `export` work without one "
               f"(they target --arch, default {DEFAULT_ARCH})")


def no_gpu_error(reason: object) -> DeviceError:
    """The one error for "this machine has no usable CUDA GPU", with the CUDA reason."""
    why = str(reason).strip().splitlines()[0] if str(reason).strip() else "none visible"
    return DeviceError(f"no CUDA GPU found ({why}): {NO_GPU_HINT}")


def visible_gpu_count() -> int:
    """CUDA devices this process sees; raises DeviceError (no_gpu_error) when there are none."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, driver too old, CuPy unusable
        raise no_gpu_error(e) from e
    if n < 1:
        raise no_gpu_error("0 devices visible; check CUDA_VISIBLE_DEVICES")
    return n


def current_device_limits() -> DeviceLimits:
    """Limits read off the current CUDA device (needs a GPU)."""
    try:
        import cupy
        dev = cupy.cuda.Device()
        attrs = dev.attributes
        major, minor = dev.compute_capability[:-1], dev.compute_capability[-1]
    except Exception as e:  # no driver, no device
        raise no_gpu_error(e) from e
    if (int(major), int(minor)) < MIN_ARCH:
        raise DeviceError(f"compute capability {major}.{minor} is too old: need >= 8.0 "
                          "(bf16 mma.sync)")
    return DeviceLimits(
        arch=f"sm_{major}{minor}",
        smem_per_block_optin=int(attrs["MaxSharedMemoryPerBlockOptin"]),
        regs_per_thread=255,
        regs_per_block=int(attrs["MaxRegistersPerBlock"]),
        max_threads_per_block=int(attrs["MaxThreadsPerBlock"]),
        sm_count=int(attrs["MultiProcessorCount"]),
    )
