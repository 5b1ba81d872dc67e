"""The C CRC32C (hardware and table paths) against the independent ``crc32c`` package."""

from __future__ import annotations

import random

import crc32c
import pytest

from tinyraftplus._native import lib


def _paths():
    paths = [("table", lib.tp_crc32c_sw), ("auto", lib.tp_crc32c)]
    if lib.tp_crc32c_hw_available():
        paths.append(("sse4.2", lib.tp_crc32c_hw))
    return paths


@pytest.mark.parametrize("name,fn", _paths(), ids=[p[0] for p in _paths()])
def test_every_length_0_to_4096_matches_oracle(name, fn):
    rng = random.Random(42)
    blob = rng.randbytes(4096 + 8)
    for n in range(4097):
        # Vary the start too, so the unaligned head/tail loops of both paths are covered.
        start = n % 8
        data = blob[start : start + n]
        assert fn(0, data, n) == crc32c.crc32c(data), (name, n, start)


@pytest.mark.parametrize("name,fn", _paths(), ids=[p[0] for p in _paths()])
def test_incremental_matches_one_shot(name, fn):
    rng = random.Random(7)
    for _ in range(200):
        a = rng.randbytes(rng.randrange(0, 300))
        b = rng.randbytes(rng.randrange(0, 300))
        assert fn(fn(0, a, len(a)), b, len(b)) == crc32c.crc32c(a + b)
        assert fn(0, a + b, len(a + b)) == crc32c.crc32c(b, value=crc32c.crc32c(a))


def test_known_vector():
    # RFC 3720 B.4: 32 bytes of zeros -> 0x8A9136AA; "123456789" -> 0xE3069283.
    assert lib.tp_crc32c_sw(0, bytes(32), 32) == 0x8A9136AA
    assert lib.tp_crc32c(0, b"123456789", 9) == 0xE3069283


def test_hardware_path_is_used_when_available():
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("SSE4.2 path exists only on x86-64")
    with open("/proc/cpuinfo") as f:
        has = " sse4_2" in f.read()
    assert bool(lib.tp_crc32c_hw_available()) == has
