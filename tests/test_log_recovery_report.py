"""Issue 12: ``verify`` and ``open`` agree on what they find at the end of a log, a damaged
last record is reported loudly (it may have been acknowledged), and ``LogRecoveryWarning``
points at the caller's line."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.errors import LogCorruptError
from tinyraftplus.log import LogRecoveryWarning
from tinyraftplus.log import format as fmt
from tinyraftplus.log.__main__ import run as verify_run

REC = 32 + 1000  # the records below: 1,000-byte payloads


class Out:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def verify(d: Path, name: str = "x") -> tuple[int, str]:
    out = Out()
    rc = verify_run(str(d), name, False, 40, out)  # type: ignore[arg-type]
    return rc, out.text


async def make(d: Path, n: int = 5, name: str = "x") -> Path:
    async with FsLog(d, name) as log:
        for i in range(n):
            await log.append(bytes([65 + i]) * 1000)
    return d / name / fmt.segment_name(0)


async def reopen(d: Path, name: str = "x") -> tuple[int, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        async with FsLog(d, name) as log:  # the line every warning must point at
            seq = log.seq
    return seq, [w for w in ws if issubclass(w.category, LogRecoveryWarning)]


# --- an empty segment file -------------------------------------------------------------------

async def test_a_new_logs_empty_segment_is_rewritten_and_verify_says_so(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / fmt.segment_name(0)).write_bytes(b"")  # creation cut short
    rc, out = verify(tmp_path)
    assert rc == 0, out  # it was "CORRUPT" to verify, while open rewrote it
    assert "open writes it again" in out
    seq, ws = await reopen(tmp_path)
    assert seq == -1 and len(ws) == 1 and "rewrote the torn header" in str(ws[0].message)
    assert verify(tmp_path)[0] == 0


async def test_a_lone_empty_segment_after_compaction_is_corrupt_to_both(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / fmt.segment_name(100)).write_bytes(b"")
    rc, out = verify(tmp_path)
    assert rc == 1 and "CORRUPT" in out
    with pytest.raises(LogCorruptError, match="damaged segment header"):
        await reopen(tmp_path)  # it was rewritten, losing the term before seq 100
    assert (tmp_path / "x" / fmt.segment_name(100)).read_bytes() == b""


async def test_an_interrupted_roll_is_removed_by_open_and_a_note_to_verify(tmp_path):
    await make(tmp_path)
    (tmp_path / "x" / fmt.segment_name(5)).write_bytes(b"TPLOG")
    rc, out = verify(tmp_path)
    assert rc == 0 and "interrupted roll; open removes it" in out
    seq, ws = await reopen(tmp_path)
    assert seq == 4 and len(ws) == 1
    assert not (tmp_path / "x" / fmt.segment_name(5)).exists()


# --- the last record -------------------------------------------------------------------------

async def test_a_bit_flip_in_the_last_acknowledged_record_is_said_loudly(tmp_path, caplog):
    seg = await make(tmp_path)
    raw = bytearray(seg.read_bytes())
    raw[fmt.SEG_HDR + 4 * REC + 32 + 500] ^= 0x04  # seq 4's payload; the append returned
    seg.write_bytes(bytes(raw))
    rc, out = verify(tmp_path)
    assert rc == 0  # open will open it (cut back): verify says what open will do
    assert "WARNING" in out and "seq 4" in out and "MAY HAVE BEEN ACKNOWLEDGED" in out
    with caplog.at_level(logging.ERROR, logger="tinyraftplus.log"):
        seq, ws = await reopen(tmp_path)
    assert seq == 3
    assert len(ws) == 1
    msg = str(ws[0].message)
    assert "damaged record (seq 4)" in msg and "drops seq 4" in msg, msg
    assert "MAY HAVE BEEN ACKNOWLEDGED" in msg
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "seq 4" in errors[0].getMessage()


async def test_a_flipped_length_field_of_the_last_record_is_said_loudly(tmp_path, caplog):
    seg = await make(tmp_path)
    raw = bytearray(seg.read_bytes())
    raw[fmt.SEG_HDR + 4 * REC + 2] ^= 0x01  # seq 4's length: now past the end of the file
    seg.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, logger="tinyraftplus.log"):
        seq, ws = await reopen(tmp_path)
    assert seq == 3 and "MAY HAVE BEEN ACKNOWLEDGED" in str(ws[0].message)
    assert [r for r in caplog.records if r.levelno == logging.ERROR]


async def test_zeros_after_the_last_record_are_the_end_of_the_log(tmp_path, caplog):
    """What preallocation leaves (``format``: preallocated tail), and what a round that
    never reached the disk at all leaves: no record, no warning, nothing dropped."""
    seg = await make(tmp_path)
    seg.write_bytes(seg.read_bytes() + bytes(4096))
    rc, out = verify(tmp_path)
    assert rc == 0 and "torn tail" not in out and "WARNING" not in out, out
    with caplog.at_level(logging.WARNING, logger="tinyraftplus.log"):
        seq, ws = await reopen(tmp_path)
    assert seq == 4 and ws == []
    assert not caplog.records


@pytest.mark.parametrize("lost", [10, 63, 200])
async def test_a_last_record_whose_end_never_reached_a_grown_file_is_unfinished(
    tmp_path, caplog, lost
):
    """In a file grown ahead of its records, a write cut short leaves the record whole by
    its length, its end zeros from a sector boundary on, then the preallocated zeros:
    a plain torn tail however few bytes of it were lost, as a record cut short by the end
    of the file always was (not "may have been acknowledged")."""
    seg = await make(tmp_path, n=4)  # 4 records of 1,032 bytes from offset 48: end 4,176
    async with FsLog(tmp_path, "x") as log:  # one more, ending `lost` bytes past 4,608
        await log.append(b"E" * (4608 + lost - 4176 - fmt.REC_HDR))
    raw = bytearray(seg.read_bytes())
    assert len(raw) == 4608 + lost
    raw[4608:] = bytes(lost)  # its last sector never reached the disk
    raw += bytes(8192)  # the zeros the file was grown by
    seg.write_bytes(bytes(raw))
    rc, out = verify(tmp_path)
    assert rc == 0 and "WARNING" not in out, out
    with caplog.at_level(logging.WARNING, logger="tinyraftplus.log"):
        seq, ws = await reopen(tmp_path)
    assert seq == 3
    assert len(ws) == 1 and "never acknowledged" in str(ws[0].message), ws[0].message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("how", ["cut short", "zeros after a torn record", "a lost sector"])
async def test_an_unfinished_write_is_a_plain_torn_tail(tmp_path, caplog, how):
    seg = await make(tmp_path)
    raw = bytearray(seg.read_bytes())
    if how == "cut short":
        del raw[-300:]
    elif how == "zeros after a torn record":
        raw[-512:] = bytes(512)  # the last record's last sector never reached the disk
        raw += bytes(4096)
    else:  # a power loss kept the file's size and a later page, not an earlier sector
        start = fmt.SEG_HDR + 4 * REC
        lost = (start // 512 + 1) * 512
        raw[lost:lost + 512] = bytes(512)
    seg.write_bytes(bytes(raw))
    rc, out = verify(tmp_path)
    assert rc == 0 and "torn tail" in out and "WARNING" not in out
    with caplog.at_level(logging.WARNING, logger="tinyraftplus.log"):
        seq, ws = await reopen(tmp_path)
    assert seq == 3
    assert len(ws) == 1 and "never acknowledged" in str(ws[0].message)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- where the warning points -----------------------------------------------------------------

async def test_the_warning_points_at_the_callers_line(tmp_path):
    seg = await make(tmp_path)
    seg.write_bytes(seg.read_bytes()[:-10])
    seq, ws = await reopen(tmp_path)  # async with FsLog(...)
    assert ws and ws[0].filename == __file__, ws[0].filename
    src = Path(__file__).read_text().splitlines()
    assert "async with FsLog(d, name) as log:" in src[ws[0].lineno - 1]

    seg.write_bytes(seg.read_bytes() + b"\x01" * 20)
    log = FsLog(tmp_path, "x")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        await log.open()
        line = _line()
    await log.close()
    ws = [w for w in got if issubclass(w.category, LogRecoveryWarning)]
    assert ws and ws[0].filename == __file__ and ws[0].lineno == line - 1


async def test_a_node_that_opens_its_log_is_the_caller(tmp_path):
    seg = await make(tmp_path)
    seg.write_bytes(seg.read_bytes()[:-10])
    node = RaftNode(1, [1], lambda to, msg: None, FsLog(tmp_path, "x"), bootstrap=True)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        async with node:
            pass
    ws = [w for w in got if issubclass(w.category, LogRecoveryWarning)]
    assert ws, [str(w.message) for w in got]
    path = os.path.normpath(ws[0].filename)
    assert path.endswith(os.path.join("tinyraftplus", "node.py")), path
    assert "trio" not in path and "outcome" not in path


def _line() -> int:
    import sys

    return sys._getframe(1).f_lineno
