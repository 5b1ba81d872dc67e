"""Faults: full disk, failed writes and fsyncs, torn tails, damage in the middle."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import warnings

import pytest
import trio

from tinyraftplus import FsLog
from tinyraftplus._native import lib
from tinyraftplus.errors import LogCorruptError, LogFailedError, LogFullError
from tinyraftplus.log import LogRecoveryWarning
from tinyraftplus.log import format as fmt


@pytest.fixture(autouse=True)
def _disarm():
    yield
    lib.tp_inject_fault(0, 0, 0)


def _seg0(tmp_path):
    return tmp_path / "x" / fmt.segment_name(0)


def _data_end(path):
    """Where the bytes of a segment end, the preallocated zeros after them not counted."""
    return len(path.read_bytes().rstrip(b"\0"))


@pytest.mark.parametrize("fsync", [True, False])  # False: small writes go inline
async def test_enospc_on_write_is_clean_and_recoverable(tmp_path, fsync):
    async with FsLog(tmp_path, "x", fsync=fsync) as log:
        await log.append_batch([b"a", b"b"])
        end_before = _data_end(_seg0(tmp_path))
        lib.tp_inject_fault(lib.TP_OP_WRITE, errno.ENOSPC, 0)
        with pytest.raises(LogFullError, match="disk full") as ei:
            await log.append_batch([b"c" * 5000, b"d"])
        assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(_seg0(tmp_path))
        assert log.seq == 1 and log.head == b"b"
        # the half-written batch was cut back (and the file with it)
        assert _data_end(_seg0(tmp_path)) == end_before
        assert os.path.getsize(_seg0(tmp_path)) == end_before
        assert await log.append(b"e") == 2
    async with FsLog(tmp_path, "x") as log:
        assert [e.data async for e in log.iter()] == [b"a", b"b", b"e"]


async def test_enospc_fails_every_waiting_append_and_rewinds_seqs(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"0")
        lib.tp_inject_fault(lib.TP_OP_WRITE, errno.ENOSPC, 0)
        results = []

        async def w(i):
            try:
                results.append(("ok", await log.append(b"w%d" % i)))
            except LogFullError:
                results.append(("full", i))

        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(w, i)
        assert any(r[0] == "full" for r in results)
        ok = sorted(r[1] for r in results if r[0] == "ok")
        assert ok == list(range(1, 1 + len(ok)))  # no holes
        assert log.seq == len(ok)
        assert await log.append(b"after") == len(ok) + 1
        entries = [e async for e in log.iter()]
        assert [e.seq for e in entries] == list(range(len(ok) + 2))


@pytest.mark.parametrize(("op", "fsync"), [("write", True), ("sync", True), ("write", False)])
async def test_io_error_fails_the_log_for_good(tmp_path, op, fsync):
    async with FsLog(tmp_path, "x", fsync=fsync) as log:
        await log.append(b"durable")
        lib.tp_inject_fault(lib.TP_OP_WRITE if op == "write" else lib.TP_OP_SYNC, errno.EIO, 0)
        with pytest.raises(LogFailedError, match="fdatasync" if op == "sync" else "write"):
            await log.append(b"lost")
        # sticky: no retry, even though the next fsync would succeed
        with pytest.raises(LogFailedError, match="refuses further writes"):
            await log.append(b"again")
        with pytest.raises(LogFailedError):
            async with log.txn():
                pass
        with pytest.raises(LogFailedError):
            await log.truncate(0)
        assert log.seq == 0 and (await log.read(0)).data == b"durable"
    async with FsLog(tmp_path, "x") as log:  # reopening recovers from what is on disk
        assert (await log.read(0)).data == b"durable"
        assert await log.append(b"next") == log.seq


async def test_fsync_failure_after_some_successes(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        lib.tp_inject_fault(lib.TP_OP_SYNC, errno.EIO, 3)
        for i in range(3):
            await log.append(b"%d" % i)
        with pytest.raises(LogFailedError, match="EIO"):
            await log.append(b"x")


async def test_torn_tail_is_cut_back_with_a_warning(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        for i in range(10):
            await log.append(b"rec%d" % i * 20)
    p = _seg0(tmp_path)
    full = p.read_bytes()
    for cut in (len(full) - 1, len(full) - 70, len(full) - 111):  # records are 112 bytes
        p.write_bytes(full[:cut])
        with pytest.warns(LogRecoveryWarning, match="torn record"):
            async with FsLog(tmp_path, "x") as log:
                assert log.seq == 8 and log.head == b"rec8" * 20
        assert os.path.getsize(p) == len(full) - (len(full) - fmt.SEG_HDR) // 10
    # zeros after the last record (what preallocation leaves, or a write that never
    # reached the disk): the end of the log, no warning, nothing cut
    p.write_bytes(full + bytes(500))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LogRecoveryWarning)
        async with FsLog(tmp_path, "x") as log:
            assert log.seq == 9
            assert await log.append(b"next") == 10
    # garbage that is not all zeros after the last record: a torn tail, cut with a warning
    p.write_bytes(full + bytes(500) + b"\x01")
    with pytest.warns(LogRecoveryWarning, match="torn record"):
        async with FsLog(tmp_path, "x") as log:
            assert log.seq == 9
            assert await log.append(b"next") == 10


async def test_incomplete_batch_disappears_whole(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"single")
        await log.append_batch([b"b%d" % i * 10 for i in range(5)])
    p = _seg0(tmp_path)
    full = p.read_bytes()
    p.write_bytes(full[: len(full) - 42])  # the batch's last record (32 + 30 bytes) cut
    with pytest.warns(LogRecoveryWarning, match="incomplete batch of 4"):
        async with FsLog(tmp_path, "x") as log:
            assert log.seq == 0 and log.head == b"single"
            assert await log.append(b"x") == 1


async def test_flip_in_the_middle_of_the_tail_is_an_error(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        for i in range(10):
            await log.append(b"r%d" % i)
    p = _seg0(tmp_path)
    raw = bytearray(p.read_bytes())
    rec = 32 + 2
    off = fmt.SEG_HDR + 4 * rec
    raw[off + 33] ^= 0x01  # payload of seq 4
    p.write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError) as ei:
        await FsLog(tmp_path, "x").open()
    assert ei.value.path == str(p) and ei.value.offset == off
    assert str(off) in str(ei.value) and str(p) in str(ei.value)
    # the failed open released the lock and left the file alone
    assert p.read_bytes() == bytes(raw)
    raw[off + 33] ^= 0x01
    p.write_bytes(bytes(raw))
    async with FsLog(tmp_path, "x") as log:
        assert log.seq == 9


async def test_interrupted_roll_leaves_removable_empty_segment(tmp_path):
    async with FsLog(tmp_path, "x", segment_size=4096) as log:
        for _ in range(40):
            await log.append(bytes(200))
        last = log.seq
    d = tmp_path / "x"
    nxt = d / fmt.segment_name(last + 1)
    nxt.write_bytes(b"TPLOG")  # a header torn by a crash while rolling
    with pytest.warns(LogRecoveryWarning, match="roll"):
        async with FsLog(tmp_path, "x", segment_size=4096) as log:
            assert log.seq == last
            assert await log.append(b"y") == last + 1
    assert not os.path.exists(nxt) or os.path.getsize(nxt) > fmt.SEG_HDR


async def test_damaged_header_with_records_is_an_error(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"a")
    p = _seg0(tmp_path)
    raw = bytearray(p.read_bytes())
    raw[3] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError, match="header") as ei:
        await FsLog(tmp_path, "x").open()
    assert ei.value.offset == 0


def _can_mount_tmpfs(path) -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return f"cannot mount tmpfs here: {r.stderr.strip()}"
    return None


async def test_real_enospc_on_a_tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    why = _can_mount_tmpfs(mnt)
    if why:
        pytest.skip(why)
    try:
        async with FsLog(mnt, "x") as log:
            acked = []
            with pytest.raises(LogFullError):
                for i in range(10_000):
                    acked.append(await log.append(b"%08d" % i + bytes(1000)))
            n = len(acked)
            assert n > 100 and log.seq == n - 1
            # the log is consistent: everything acknowledged is readable, nothing more
            assert [e.seq async for e in log.iter()] == acked
            await log.truncate(n // 2)  # free space, then append again
            assert await log.append(b"after") == n // 2 + 1
        async with FsLog(mnt, "x") as log:
            assert log.seq == n // 2 + 1 and log.head == b"after"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("appenders", [1, 20])
async def test_failed_roll_fails_every_append_that_needed_it(tmp_path, monkeypatch, appenders):
    """Regression: when creating the next segment failed (disk full), the append whose
    task was flushing at the time got its seq back as if durable, though its record was
    never written (its round failed while queued, and only waiting tasks were told).
    Every seq an append returns must be in the log, before and after a reopen."""
    from tinyraftplus.log.segment import Segment

    real_create = Segment.create_file
    full = True

    def create_file(self):
        if full and self.first_seq > 0:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", self.path)
        return real_create(self)

    monkeypatch.setattr(Segment, "create_file", create_file)
    acked: list[int] = []
    failures = 0
    async with FsLog(tmp_path, "x", segment_size=4096) as log:

        async def appender(i: int) -> None:
            nonlocal failures
            for k in range(40):
                try:
                    acked.append(await log.append(b"%03d-%03d" % (i, k) + bytes(200)))
                except LogFullError:
                    failures += 1
                    return

        async with trio.open_nursery() as n:
            for i in range(appenders):
                n.start_soon(appender, i)
        assert failures == appenders  # every appender reached the full disk
        assert sorted(acked) == list(range(len(acked))) and log.seq == len(acked) - 1
        assert [e.seq async for e in log.iter()] == sorted(acked)
        full = False  # space again: the roll now succeeds and appends continue
        assert await log.append(b"after") == len(acked)
    async with FsLog(tmp_path, "x", segment_size=4096) as log:
        assert [e.seq async for e in log.iter()] == list(range(len(acked) + 1))
        assert log.head == b"after"


@pytest.mark.parametrize("cut_err", [errno.EIO, errno.ENOSPC])
async def test_enospc_then_a_failed_cut_back_fails_the_log(tmp_path, cut_err):
    """Issue 9.1: a write fails half-way (ENOSPC) and cutting the partial round back fails
    too. Before, the cut's failure hid behind ENOSPC: the appends raised the recoverable
    ``LogFullError`` ("the log is unchanged"), a retry reused their seqs, and after reopen
    the "failed" appends' payloads came back. Now the log fails for good."""
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"first")
        lib.tp_inject_fault(lib.TP_OP_WRITE, errno.ENOSPC, 0)
        lib.tp_inject_fault(lib.TP_OP_TRUNC, cut_err, 0)
        outcomes: list[str] = []

        async def one(i: int) -> None:
            try:
                await log.append(b"failed-%d-" % i + b"x" * 200)
                outcomes.append("ok")
            except (LogFailedError, LogFullError) as e:
                outcomes.append(type(e).__name__)

        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(one, i)
        assert "LogFullError" not in outcomes and "ok" not in outcomes, outcomes
        with pytest.raises(LogFailedError, match="cutting the partial write back failed"):
            await log.append(b"retry")
        assert log.seq == 0
    # Reopen: the log opens, "first" is there; what the failed appends left is either
    # absent or whole records with their own payloads (never another append's seq).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogRecoveryWarning)
        async with FsLog(tmp_path, "x") as log:
            got = [e.data async for e in log.iter()]
    assert got[0] == b"first"
    assert all(d.startswith(b"failed-") for d in got[1:])


async def test_cut_back_after_enospc_is_durable(tmp_path):
    """Issue 9.1: the cut after a failed write is fdatasynced before LogFullError is
    raised (checked here through the fault hook: a failing fdatasync of the cut also
    fails the log; the crash-state enumeration checks the ordering itself)."""
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"first")
        lib.tp_inject_fault(lib.TP_OP_WRITE, errno.ENOSPC, 0)
        with pytest.raises(LogFullError, match="disk full"):
            await log.append_batch([b"y" * 3000, b"z"])
        assert os.path.getsize(_seg0(tmp_path)) == fmt.SEG_HDR + fmt.REC_HDR + 5
        assert await log.append(b"after") == 1


def _rounds(raw: bytes) -> list[tuple[int, int]]:
    """(offset, seq) of every record that starts a write round, per the documented format."""
    out, pos = [], fmt.SEG_HDR
    while pos < len(raw):
        ln, _crc, seq, _term, flags, _back = struct.unpack_from("<IIQQII", raw, pos)
        if flags & fmt.FLAG_ROUND:
            out.append((pos, seq))
        pos += fmt.REC_HDR + ln
    return out


async def _log_ending_in_a_multi_page_round(tmp_path) -> list[tuple[int, int]]:
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"a" * 100)
        await log.append(b"b" * 100)
        async with trio.open_nursery() as n:  # one round of many independent appends
            for i in range(12):
                n.start_soon(log.append, bytes([65 + i]) * 1000)
    rounds = _rounds(_seg0(tmp_path).read_bytes())
    assert len(rounds) >= 3 and os.path.getsize(_seg0(tmp_path)) - rounds[-1][0] > 8192
    return rounds


async def test_torn_final_round_is_cut_not_called_corrupt(tmp_path):
    """Issue 9.3: a power loss during the last (never acknowledged) group commit persisted
    a later page of the round but not its first (zeros). Before, open raised
    LogCorruptError ("valid records follow"); now the tail is cut with a warning."""
    rounds = await _log_ending_in_a_multi_page_round(tmp_path)
    start, first_seq = rounds[-1]
    page_end = (start // 4096 + 1) * 4096
    with open(_seg0(tmp_path), "r+b") as f:
        f.seek(start)
        f.write(bytes(page_end - start))
    with pytest.warns(LogRecoveryWarning, match="same unacknowledged write round"):
        async with FsLog(tmp_path, "x") as log:
            assert log.seq == first_seq - 1
            assert [e.data[:1] async for e in log.iter()][:2] == [b"a", b"b"]
            assert await log.append(b"next") == first_seq
    assert os.path.getsize(_seg0(tmp_path)) == start + fmt.REC_HDR + 4


async def test_damage_before_a_later_round_stays_corrupt(tmp_path):
    """Issue 9.3: damage in an acknowledged round, followed by a round written after it
    was durable, is mid-log corruption, never cut as a torn tail."""
    rounds = await _log_ending_in_a_multi_page_round(tmp_path)
    victim = rounds[1][0] + fmt.REC_HDR + 10  # a payload byte of the second round
    with open(_seg0(tmp_path), "r+b") as f:
        f.seek(victim)
        f.write(b"\xff")
    with pytest.raises(LogCorruptError, match="valid records follow"):
        async with FsLog(tmp_path, "x"):
            pass


async def test_version_1_segment_keeps_the_old_rule(tmp_path):
    """A format-1 segment has no rounds: any valid record after damage is mid-log."""
    rounds = await _log_ending_in_a_multi_page_round(tmp_path)
    raw = bytearray(_seg0(tmp_path).read_bytes())
    raw[8:12] = (1).to_bytes(4, "little")
    raw[44:48] = lib.tp_crc32c(0, bytes(raw[:44]), 44).to_bytes(4, "little")
    start = rounds[-1][0]
    raw[start : start + 100] = bytes(100)
    _seg0(tmp_path).write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError, match="valid records follow"):
        async with FsLog(tmp_path, "x"):
            pass


async def test_failed_fdatasync_cuts_the_round_back(tmp_path):
    """Issue 9.6 (fsyncgate): after a failed fdatasync the page cache may hold bytes the
    disk never got; the failed round is cut back (and the cut synced) before the log
    fails, so a reopen reads exactly the acknowledged records."""
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"durable")
        end = _data_end(_seg0(tmp_path))
        lib.tp_inject_fault(lib.TP_OP_SYNC, errno.EIO, 0)
        with pytest.raises(LogFailedError, match="was cut back"):
            await log.append_batch([b"never acknowledged"] * 3)
        assert os.path.getsize(_seg0(tmp_path)) == end
    async with FsLog(tmp_path, "x") as log:
        assert [e.data async for e in log.iter()] == [b"durable"]


async def test_roll_without_fsync_syncs_the_sealed_segment(tmp_path, monkeypatch):
    """Issue 9.6: with fsync=False a roll fdatasyncs the segment it seals, so a power loss
    cannot leave a sealed segment short."""
    synced: list[str] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    async with FsLog(tmp_path, "x", fsync=False, segment_size=4096) as log:
        synced.clear()
        while log.seq < 60:
            await log.append(b"r" * 200)
        first_two = sorted(str(p) for p in (tmp_path / "x").glob("*.seg"))[:2]
    assert first_two[0] in synced and first_two[1] in synced


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_failed_segment_creation_leaks_nothing(tmp_path, monkeypatch, err):
    """Issue 9.6: a failing directory fsync while creating a segment closed nothing (the
    descriptor leaked) and left the file, so after ENOSPC the next roll failed (EEXIST)."""
    from tinyraftplus.log import segment

    real = segment.fsync_dir
    calls = {"n": 0}

    def failing(path: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(err, os.strerror(err))
        real(path)

    async with FsLog(tmp_path, "x", segment_size=4096) as log:
        while log.seq < 10:
            await log.append(b"r" * 300)
        fds = len(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(segment, "fsync_dir", failing)
        with pytest.raises(LogFullError if err == errno.ENOSPC else LogFailedError):
            while True:
                await log.append(b"r" * 300)
        assert len(os.listdir("/proc/self/fd")) == fds
        assert len(list((tmp_path / "x").glob("*.seg"))) == 1
        if err == errno.ENOSPC:  # the log goes on: the next roll creates the file
            seq = await log.append(b"r" * 300)
            assert seq == log.seq and len(list((tmp_path / "x").glob("*.seg"))) == 2
