"""The recovery scan's search for valid records after damage (``find_resync`` in
``csrc/tplog.c``) skips runs of zeros instead of trying a CRC at every offset in them. It may
only skip what cannot hold a record: every header that lies wholly inside zeros. These put
real records (framed by the log itself) right after runs of zeros of awkward lengths and
check that the scan still finds each one at its exact offset."""

from __future__ import annotations

import os
from pathlib import Path

import crc32c
import pytest

from tinyraftplus import FsLog
from tinyraftplus.log import format as fmt
from tinyraftplus.log.segment import scan_fd

NO_RESYNC = 2**64 - 1


def test_a_header_of_zeros_fails_its_crc() -> None:
    # The premise of the skip, checked with the independent crc32c package: a header's
    # CRC field covers its other 24 bytes, and for zeros that CRC is not the field's 0.
    assert crc32c.crc32c(bytes(fmt.REC_HDR - 8)) != 0


async def _first_record(tmp_path: Path, payload: bytes) -> tuple[bytes, bytes]:
    """(segment header, the first record) of a log holding only ``payload`` at seq 0."""
    d = tmp_path / "src"
    d.mkdir()
    log = FsLog(str(d), "x")
    await log.open()
    await log.append(payload)
    await log.close()
    (seg,) = sorted((d / "x").glob("*.seg"))
    data = seg.read_bytes()
    rec = data[fmt.SEG_HDR : fmt.SEG_HDR + fmt.REC_HDR + len(payload)]
    assert int.from_bytes(rec[:4], "little") == len(payload)
    return data[: fmt.SEG_HDR], rec


def _scan(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan_fd(fd, 0).resync_off
    finally:
        os.close(fd)


# Payload lengths whose records start with zero bytes (0: a length field of zeros; 256:
# its first byte is 0), and zero runs that end on and off 8-byte words.
@pytest.mark.parametrize("size", [0, 256, 1000])
@pytest.mark.parametrize("zeros", [1, 31, 32, 33, 4096 + 5, (1 << 20) + 3])
async def test_a_record_right_after_a_run_of_zeros_is_found(
    tmp_path: Path, size: int, zeros: int
) -> None:
    header, rec = await _first_record(tmp_path, bytes([0x5A]) * size)
    junk = b"\xff" * 40  # a damaged first record: the scan stops here and searches on
    path = tmp_path / "t.seg"
    path.write_bytes(header + junk + bytes(zeros) + rec)
    assert _scan(path) == fmt.SEG_HDR + len(junk) + zeros


@pytest.mark.parametrize("zeros", [0, 7, 4096, (1 << 20) + 3])
async def test_zeros_to_the_end_hold_no_record(tmp_path: Path, zeros: int) -> None:
    header, rec = await _first_record(tmp_path, b"r" * 100)
    path = tmp_path / "t.seg"
    # A torn copy of the record (its last byte missing) before the zeros: nothing whole.
    path.write_bytes(header + b"\xff" * 40 + rec[:-1] + bytes(zeros))
    assert _scan(path) == NO_RESYNC
    path.write_bytes(header + b"\xff" * 40 + bytes(zeros) + rec + bytes(zeros))
    assert _scan(path) == fmt.SEG_HDR + 40 + zeros
