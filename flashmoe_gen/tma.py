"""Tensor maps of the persistent TMA GEMM (``GemmTile.mma == "tma"``), built on the host.

A launch of ``fmoe::expert_gemm_tma`` reads one ``TmaLaunch`` from global memory: the 2D
tensor maps (K innermost, rows outer, 128-byte swizzle, boxes of 64 x box rows) of its A,
B0 and B1 operands and its group count. A map spans its operand's buffer from the launch's
pointer to the buffer's end, so rows past a group's count read other rows or zeros, never
past the allocation. Maps are encoded with the CUDA driver's ``cuTensorMapEncodeTiled``
(through ctypes on ``libcuda``: CuPy does not wrap it) and cached per launch key, so a
forward re-encodes nothing unless a buffer moved (a larger capacity in mode "host").
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

#: CUtensorMapDataType / Interleave / Swizzle / L2promotion / FloatOOBfill (cuda.h).
_BFLOAT16, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_NONE = 9, 0, 3, 3, 0
#: Bytes of one CUtensorMap and of the TmaLaunch struct (three maps, the group count,
#: padded to its 64-byte alignment).
MAP_BYTES = 128
LAUNCH_BYTES = 448
#: Elements of K per box row (one 128-byte swizzle atom of bf16).
BOX_K = 64

_lib = None


def _libcuda():
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise ConfigError("mma", "tma", f"the CUDA driver library is not loadable ({e}); "
                              "tma tiles need a GPU with its driver") from None
        lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
        lib.cuTensorMapEncodeTiled.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.cuMemGetAddressRange_v2.restype = ctypes.c_int
        lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                                ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.c_uint64]
        _lib = lib
    return _lib


def rows_to_end(ptr: int, k: int) -> int:
    """Whole rows of ``k`` bf16 from ``ptr`` to the end of the device allocation holding it
    (the allocation, not the array: a pool chunk may be larger, which is still memory the
    map may read)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr)
    if rc != 0:
        raise ConfigError("mma", "tma", f"cuMemGetAddressRange failed (CUresult {rc}) for "
                          f"{ptr:#x}: not a device allocation of this context")
    return (base.value + size.value - ptr) // (2 * k)


def encode_map(ptr: int, rows: int, k: int, box_rows: int) -> bytes:
    """The 128-byte tensor map of a bf16 matrix ``[rows, k]`` (row-major) at ``ptr``, read
    in boxes of ``box_rows`` x 64 with the 128-byte swizzle."""
    if ptr % 16 or (k * 2) % 16:
        raise ConfigError("K", k, f"tma: rows of 16-byte multiples at 16-byte aligned "
                          f"addresses (K % 8 == 0; address {ptr:#x})")
    out = (ctypes.c_uint8 * MAP_BYTES)()
    dims = (ctypes.c_uint64 * 2)(k, max(rows, 1))
    strides = (ctypes.c_uint64 * 1)(k * 2)
    box = (ctypes.c_uint32 * 2)(BOX_K, box_rows)
    elem = (ctypes.c_uint32 * 2)(1, 1)
    rc = _libcuda().cuTensorMapEncodeTiled(
        ctypes.addressof(out), _BFLOAT16, 2, ctypes.c_void_p(ptr), dims, strides, box, elem,
        _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_NONE)
    if rc != 0:
        raise ConfigError("mma", "tma", f"cuTensorMapEncodeTiled failed (CUresult {rc}) for "
                          f"a [{rows}, {k}] matrix at {ptr:#x}, box {box_rows} x {BOX_K}")
    return bytes(out)


def launch_bytes(a: bytes, b0: bytes, b1: bytes, groups: int) -> bytes:
    """The TmaLaunch struct as the kernel reads it."""
    body = a + b0 + b1 + struct.pack("<i", groups)
    return body + bytes(LAUNCH_BYTES - len(body))


@dataclass(frozen=True)
class Operand:
    """One GEMM operand as a tensor map sees it: address, rows to its buffer's end, K."""

    ptr: int
    rows: int
    k: int

    @classmethod
    def at(cls, ptr: int, k: int) -> Operand:
        return cls(ptr, rows_to_end(ptr, k), k)


class TmaMaps:
    """Device copies of TmaLaunch structs, one per distinct launch key, kept for the
    layer's life (a captured CUDA graph reads them at every replay)."""

    #: Launch keys kept before the cache is emptied (mode "host": buffers that grew leave
    #: stale keys behind; mode "graph" has a fixed few).
    MAX_KEYS = 512

    def __init__(self):
        self._dev: dict[tuple, object] = {}

    def launch(self, a: Operand, b0: Operand, b1: Operand | None, groups: int, bm: int,
               bn: int, stream) -> int:
        """Device address of the TmaLaunch of these operands (encoded on first use, which
        ``stream``, the launch's, must not be capturing)."""
        key = (a, b0, b1, groups, bm, bn)
        dev = self._dev.get(key)
        if dev is None:
            import cupy

            if stream.is_capturing():
                raise RuntimeError("tma: a new launch key during CUDA graph capture; "
                                   "run the forward once before capturing it")
            if len(self._dev) >= self.MAX_KEYS:  # no kernel may still read a freed struct
                cupy.cuda.Device().synchronize()
                self._dev.clear()
            ma = encode_map(a.ptr, a.rows, a.k, bm)
            mb0 = encode_map(b0.ptr, b0.rows, b0.k, bn)
            mb1 = encode_map(b1.ptr, b1.rows, b1.k, bn) if b1 is not None else mb0
            dev = cupy.asarray(np.frombuffer(launch_bytes(ma, mb0, mb1, groups), np.uint8))
            self._dev[key] = dev
        return dev.data.ptr

    def __len__(self) -> int:
        return len(self._dev)
