"""bfloat16 on the host. NumPy and CuPy have no bf16 dtype, so bf16 travels as uint16 bits."""

from __future__ import annotations

import numpy as np


def to_bits(a: np.ndarray) -> np.ndarray:
    """Round float values to bf16 (round to nearest even) and return the uint16 bits."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


def from_bits(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """The float32 value a bf16 store would keep."""
    return from_bits(to_bits(a))
