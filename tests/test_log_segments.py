"""Segments: rolling, reopen, truncate across a boundary, compaction, the index cache."""

from __future__ import annotations

import os
import time

import pytest
import trio

from tinyraftplus import Entry, FsLog
from tinyraftplus.errors import InvalidArgumentError, LogCorruptError
from tinyraftplus.log import format as fmt

SEG = 4096


def _segs(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


async def _fill(log, n, size=100, term=1):
    for i in range(n):
        await log.append(b"%06d" % i + bytes(size - 6), term=term + i // 50)


async def test_roll_reopen_continue(tmp_path):
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 200)
    names = _segs(tmp_path / "x")
    assert len(names) >= 5
    assert names[0] == fmt.segment_name(0)
    # every sealed segment got an index cache, the tail none
    idx = sorted(n for n in os.listdir(tmp_path / "x") if n.endswith(".idx"))
    assert [n[:-4] for n in idx] == [n[:-4] for n in names[:-1]]
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert log.seq == 199 and log.head[:6] == b"000199"
        assert log.term_at(0) == 1 and log.term_at(199) == 4 and log.term_at(100) == 3
        assert await log.append(b"more", term=9) == 200
        got = [e async for e in log.iter()]
        assert [e.seq for e in got] == list(range(201))
        assert all(e.data[:6] == b"%06d" % e.seq for e in got[:200])
        assert log.entries(40, 60, 1 << 20) == got[40:61]  # across a boundary


async def test_batch_never_spans_segments(tmp_path):
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 30)
        first = await log.append_batch([bytes(300)] * 20)  # 6.6 KB > segment size
    assert fmt.segment_name(first) in _segs(tmp_path / "x")
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert log.seq == first + 19


async def test_truncate_across_segment_boundary(tmp_path):
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 200)
        firsts = [int(n[:-4]) for n in _segs(tmp_path / "x")]
        boundary = firsts[2]
        await log.truncate(boundary - 1)  # exactly at a boundary
        assert log.seq == boundary - 1
        assert _segs(tmp_path / "x")[-1] == fmt.segment_name(firsts[2])  # kept, now empty
        await log.truncate(firsts[1] + 3)  # inside a sealed segment
        assert log.seq == firsts[1] + 3 and log.head[:6] == b"%06d" % (firsts[1] + 3)
        assert await log.append(b"x") == firsts[1] + 4
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert log.seq == firsts[1] + 4
        seqs = [e.seq async for e in log.iter()]
        assert seqs == list(range(firsts[1] + 5))
        await _fill(log, 100)  # rolls again from the truncated segment
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert log.seq == firsts[1] + 104
        assert len([e async for e in log.iter()]) == firsts[1] + 105


async def test_compact_then_reopen(tmp_path):
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 200)
        firsts = [int(n[:-4]) for n in _segs(tmp_path / "x")]
        await log.compact(firsts[3] - 1)
        assert log.first_seq == firsts[3]
        assert log.term_at(firsts[3] - 1) == 1 + (firsts[3] - 1) // 50  # from the header
        with pytest.raises(InvalidArgumentError):
            await log.read(firsts[3] - 1)
        assert (await log.read(firsts[3])).seq == firsts[3]
        await log.compact(firsts[4] + 2)  # not a whole segment more: only up to firsts[4]
        assert log.first_seq == firsts[4]
        await log.compact(10**9)  # never drops the tail segment
        assert log.first_seq == firsts[-1] and log.seq == 199
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert log.first_seq == firsts[-1] and log.seq == 199
        assert log.term_at(firsts[-1] - 1) == 1 + (firsts[-1] - 1) // 50
        assert [e.seq async for e in log.iter(0)] == list(range(firsts[-1], 200))
        with pytest.raises(InvalidArgumentError, match="compacted"):
            await log.truncate(firsts[-1] - 2)
        await log.truncate(firsts[-1] - 1)  # empties, numbering kept
        assert log.seq == firsts[-1] - 1 and log.head is None
        assert await log.append(b"n") == firsts[-1]


async def test_missing_or_damaged_index_is_rebuilt(tmp_path):
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 120)
        expect = [e async for e in log.iter()]
    d = tmp_path / "x"
    idx = sorted(n for n in os.listdir(d) if n.endswith(".idx"))
    os.unlink(d / idx[0])
    raw = bytearray((d / idx[1]).read_bytes())
    raw[50] ^= 1  # in the runs section
    (d / idx[1]).write_bytes(bytes(raw))
    raw = bytearray((d / idx[2]).read_bytes())
    raw[-3] ^= 1  # in the offsets section: found only when the segment is first read
    (d / idx[2]).write_bytes(bytes(raw))
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert [e async for e in log.iter()] == expect
    assert (d / idx[0]).exists()  # rewritten


async def test_open_does_not_read_sealed_records(tmp_path):
    """Damage inside a sealed segment is found when read, not at open (open stays cheap)
    and the bad bytes are never returned."""
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 120)
    first = _segs(tmp_path / "x")[0]
    p = tmp_path / "x" / first
    raw = bytearray(p.read_bytes())
    raw[fmt.SEG_HDR + fmt.REC_HDR + 2 * 132 + 50] ^= 0x40  # payload of seq 2 (132-byte frames)
    p.write_bytes(bytes(raw))
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert log.seq == 119
        assert (await log.read(1)).data[:6] == b"000001"
        with pytest.raises(LogCorruptError) as ei:
            await log.read(2)
        assert ei.value.path == str(p) and ei.value.offset == fmt.SEG_HDR + 2 * 132
        with pytest.raises(LogCorruptError):
            [e async for e in log.iter()]
        assert [e.seq for e in log.entries(3, 5, 1000)] == [3, 4, 5]


@pytest.mark.slow
async def test_open_time_does_not_grow_with_sealed_records(tmp_path):
    async with FsLog(tmp_path, "x", segment_size=1 << 20, fsync=False) as log:
        for _ in range(256):
            await log.append_batch([bytes(1000)] * 1000)
    t = time.perf_counter()
    async with FsLog(tmp_path, "x", segment_size=1 << 20) as log:
        dt = time.perf_counter() - t
        assert log.seq == 256_000 - 1
    assert dt < 0.2


async def test_open_reads_only_index_headers(tmp_path, monkeypatch):
    from tinyraftplus.log import segment as segmod

    async with FsLog(tmp_path, "x", segment_size=SEG, fsync=False) as log:
        await _fill(log, 300)
    scans = []
    real = segmod.scan_fd
    monkeypatch.setattr(segmod, "scan_fd", lambda *a, **k: scans.append(a) or real(*a, **k))
    from tinyraftplus.log import fslog

    monkeypatch.setattr(fslog, "scan_fd", lambda *a, **k: scans.append(a) or real(*a, **k))
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        assert log.seq == 299
    assert len(scans) == 1  # the tail only
    await trio.lowlevel.checkpoint()


def test_entry_is_plain_tuple():
    assert Entry(1, 2, b"x") == (1, 2, b"x")


async def test_damaged_index_sizes_never_size_a_read(tmp_path, monkeypatch):
    """Regression: a flipped run count in an index header (bytes 12..16) made open() ask
    ``os.pread`` for up to 32 GiB and die with a bare MemoryError. Every bit of every size
    field of the index header is flipped in turn: open must rebuild the index from the
    segment (the index is a cache), read everything back intact, and never issue a read
    larger than the files involved."""
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 120)
        expect = [e async for e in log.iter()]
    d = tmp_path / "x"
    idx = d / sorted(n for n in os.listdir(d) if n.endswith(".idx"))[0]
    pristine = idx.read_bytes()
    biggest = max(os.path.getsize(d / n) for n in os.listdir(d))
    sizes: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        sizes.append(n)
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    # nruns (12..16), count (24..32), data end (32..40)
    for pos in [*range(12, 16), *range(24, 40)]:
        for bit in range(8):
            raw = bytearray(pristine)
            raw[pos] ^= 1 << bit
            idx.write_bytes(bytes(raw))
            sizes.clear()
            async with FsLog(tmp_path, "x", segment_size=SEG) as log:
                assert [e async for e in log.iter()] == expect, (pos, bit)
            assert max(sizes) <= max(biggest, 1 << 20), (pos, bit, max(sizes))
            assert idx.read_bytes() == pristine, "the damaged index was not rewritten"


async def test_missing_middle_segment_is_an_error_not_a_huge_read(tmp_path):
    """Without the segment in the middle, the one before it would have to hold the
    missing records too: open says so naming the file, instead of trusting the count."""
    async with FsLog(tmp_path, "x", segment_size=SEG) as log:
        await _fill(log, 200)
    names = _segs(tmp_path / "x")
    assert len(names) >= 4
    os.unlink(tmp_path / "x" / names[2])
    with pytest.raises(LogCorruptError) as ei:
        async with FsLog(tmp_path, "x", segment_size=SEG):
            pass
    assert ei.value.path == str(tmp_path / "x" / names[1])
    assert ei.value.offset == os.path.getsize(tmp_path / "x" / names[1])


async def test_readers_in_threads_race_rolls_truncates_and_compactions(tmp_path):
    """Iterators read in worker threads while the event loop rolls segments (closing the
    old tail's descriptor), truncates and compacts. A read must never see another file
    through a reused descriptor number (a spurious LogCorruptError or OSError) and never
    return anything but the records appended."""
    stop = False
    model: dict[int, bytes] = {}

    def payload(seq: int) -> bytes:
        return b"%08d" % seq + bytes(seq % 300)

    async with FsLog(tmp_path, "x", segment_size=SEG, fsync=False) as log:

        async def writer() -> None:
            nonlocal stop
            rounds = 0
            while rounds < 30:
                for _ in range(40):
                    seq = log.seq + 1
                    model[seq] = payload(seq)
                    assert await log.append(model[seq]) == seq
                rounds += 1
                if rounds % 10 == 0:
                    keep = log.seq - 25
                    await log.truncate(keep)
                    for s in [s for s in model if s > keep]:
                        del model[s]
                if rounds % 7 == 0:
                    await log.compact(log.seq - 100)
            stop = True

        async def reader(i: int) -> None:
            while not stop:
                start = max(log.first_seq, log.seq - 150 + 17 * i)
                try:
                    async for e in log.iter(start):
                        assert e.data == payload(e.seq), e.seq
                        if stop:
                            break
                except InvalidArgumentError:
                    pass  # compacted away under the iterator: allowed, and said so
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            for i in range(4):
                n.start_soon(reader, i)
        assert log.first_seq > 0  # the compactions did drop segments
        kept = [model[s] for s in sorted(model) if s >= log.first_seq]
        assert [e.data async for e in log.iter()] == kept
