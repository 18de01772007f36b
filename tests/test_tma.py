"""The tma kernel's host side on the CPU: the launch struct and what encoding refuses."""

from __future__ import annotations

import struct

import pytest

from flashmoe_gen.errors import ConfigError
from flashmoe_gen.tma import LAUNCH_BYTES, MAP_BYTES, encode_map, launch_bytes


def test_launch_struct_layout():
    maps = [bytes([i]) * MAP_BYTES for i in (1, 2, 3)]
    b = launch_bytes(*maps, groups=77)
    assert len(b) == LAUNCH_BYTES and LAUNCH_BYTES % 64 == 0  # struct __align__(64)
    assert b[:MAP_BYTES] == maps[0] and b[2 * MAP_BYTES:3 * MAP_BYTES] == maps[2]
    assert struct.unpack_from("<i", b, 3 * MAP_BYTES)[0] == 77


@pytest.mark.parametrize("ptr,k", [(0x1000 + 8, 4096), (0x1000, 4100)],
                         ids=["misaligned_address", "row_not_16_bytes"])
def test_encode_refuses_what_tma_cannot_read(ptr, k):
    with pytest.raises(ConfigError, match="16-byte"):
        encode_map(ptr, 128, k, 128)
