"""FsLog API: appends, batches, transactions, reads, truncate, bad input, locking."""

from __future__ import annotations

import os
import random
import warnings

import crc32c
import pytest
import trio
import trio.testing

from tinyraftplus import Entry, FsLog, StateFile
from tinyraftplus.errors import (
    ClosedError,
    InvalidArgumentError,
    LogCorruptError,
    LogLockedError,
    SeqMismatchError,
    UsageError,
)
from tinyraftplus.log import format as fmt


async def test_empty_log(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        assert log.seq == -1 and log.first_seq == 0
        assert log.head is None and log.head_term == 0
        assert log.term_at(-1) == 0
        assert [e async for e in log.iter()] == []
        assert log.entries(0, -1, 100) == []


async def test_append_read_iter_reopen(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        assert await log.append(b"a") == 0
        assert await log.append(bytearray(b"bb"), term=3) == 1
        assert await log.append(memoryview(b"ccc"), seq=2, term=3) == 2
        assert log.seq == 2 and log.head == b"ccc" and log.head_term == 3
        assert await log.read(1) == Entry(1, 3, b"bb")
        assert [e async for e in log.iter(1)] == [Entry(1, 3, b"bb"), Entry(2, 3, b"ccc")]
    async with FsLog(tmp_path, "x") as log:
        assert log.seq == 2 and log.head == b"ccc" and log.head_term == 3
        assert [e.data async for e in log.iter()] == [b"a", b"bb", b"ccc"]
        assert await log.append(b"d") == 3


async def test_on_disk_frame_matches_documented_format(tmp_path):
    """An independent reader (struct + the crc32c package) decodes what FsLog wrote."""
    import struct

    async with FsLog(tmp_path, "x") as log:
        await log.append_batch([b"hello", b"world"], term=7)
        await log.append(b"!", term=8)
    raw = (tmp_path / "x" / fmt.segment_name(0)).read_bytes()
    assert raw[:8] == b"TPLOGSEG"
    assert struct.unpack_from("<I", raw, 44)[0] == crc32c.crc32c(raw[:44])
    pos, got = fmt.SEG_HDR, []
    while pos < len(raw):
        ln, crc, seq, term, flags, res = struct.unpack_from("<IIQQII", raw, pos)
        assert crc == crc32c.crc32c(raw[pos + 8 : pos + 32 + ln])
        got.append((seq, term, flags, res, raw[pos + 32 : pos + 32 + ln]))
        pos += 32 + ln
    # flags: MORE = 1 inside a batch, ROUND = 2 on each write round's first record (its
    # durable back, bytes 28..32, is 0 with fsync)
    assert got == [(0, 7, 3, 0, b"hello"), (1, 7, 0, 0, b"world"), (2, 8, 2, 0, b"!")]
    assert struct.unpack_from("<I", raw, 8)[0] == 2  # format version


async def test_append_batch_terms_and_errors(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        assert await log.append_batch([b"1", b"2", b"3"], term=[1, 1, 2]) == 0
        assert [log.term_at(s) for s in range(3)] == [1, 1, 2]
        assert await log.append_batch((b"4",), seq=3, term=5) == 3
        with pytest.raises(InvalidArgumentError, match="empty"):
            await log.append_batch([])
        with pytest.raises(InvalidArgumentError, match="str"):
            await log.append_batch([b"ok", "text"])
        with pytest.raises(InvalidArgumentError):
            await log.append_batch(b"not a list")
        with pytest.raises(InvalidArgumentError, match="one term per item"):
            await log.append_batch([b"a", b"b"], term=[1])
        with pytest.raises(SeqMismatchError) as ei:
            await log.append_batch([b"a"], seq=9)
        assert ei.value.expected == 4 and ei.value.got == 9
        assert log.seq == 3  # nothing from the failed calls got in


async def test_mixed_term_batches_keep_every_term(tmp_path):
    """Term lists as the Raft driver passes them: runs inside a batch, across batches that
    share a round (concurrent appenders), a batch whose only term continues the previous
    one, and 2**64-1; checked against a per-record model, in memory and after reopen."""
    model: list[int] = []
    batches = [[3, 3, 4, 4, 4, 7], [7, 7], [7, 8], [9], [9, 9, 10, 2**64 - 1], [1] * 50]

    async with FsLog(tmp_path, "x") as log:

        async def put(terms: list[int]) -> None:
            await log.append_batch([b"t%d" % t for t in terms], term=terms)

        for terms in batches:  # one at a time: each batch its own round
            await put(terms)
            model.extend(terms)
        async with trio.open_nursery() as n:  # together: several batches in one round
            for terms in batches:
                n.start_soon(put, terms)
        order = [e.data async for e in log.iter(len(model))]
        model.extend(int(d[1:]) for d in order)
        assert [log.term_at(s) for s in range(len(model))] == model
        assert log.head_term == model[-1]
    async with FsLog(tmp_path, "x") as log:
        assert [log.term_at(s) for s in range(len(model))] == model
        assert [e.term async for e in log.iter()] == model


async def test_batch_terms_are_checked(tmp_path):
    class Term(int):
        pass

    async with FsLog(tmp_path, "x") as log:
        for bad in ([1, -1], [1, 2**64], [1, True], [1, 2.0], [1, None], [1, "2"]):
            with pytest.raises(InvalidArgumentError, match="term must be an int"):
                await log.append_batch([b"a", b"b"], term=bad)
        assert log.seq == -1
        assert await log.append_batch([b"a", b"b"], term=[Term(4), 5]) == 0
        assert [log.term_at(0), log.term_at(1)] == [4, 5]


async def test_bad_input(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        for bad in ("text", 5, None, [b"a"]):
            with pytest.raises(InvalidArgumentError, match="bytes"):
                await log.append(bad)
        with pytest.raises(SeqMismatchError, match="next seq is 0"):
            await log.append(b"a", seq=1)
        with pytest.raises(InvalidArgumentError):
            await log.append(b"a", term=-1)
        with pytest.raises(InvalidArgumentError, match="not in log"):
            await log.read(0)
        assert log.seq == -1
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        await FsLog(tmp_path / "missing", "x").open()


async def test_use_after_close_and_before_open(tmp_path):
    log = FsLog(tmp_path, "x")
    with pytest.raises(ClosedError, match="before open"):
        await log.append(b"a")
    await log.open()
    await log.append(b"a")
    await log.close()
    await log.close()  # idempotent
    with pytest.raises(ClosedError, match="after close"):
        await log.append(b"b")
    with pytest.raises(ClosedError):
        await log.read(0)
    with pytest.raises(ClosedError):
        log.iter()
    with pytest.raises(UsageError):
        await log.open()


async def test_is_open_follows_open_and_close(tmp_path):
    log = FsLog(tmp_path, "x")
    assert not log.is_open
    await log.open()
    assert log.is_open
    other = FsLog(tmp_path, "x")
    with pytest.raises(LogLockedError):
        await other.open()
    assert not other.is_open  # a failed open leaves it closed
    await log.close()
    assert not log.is_open
    async with FsLog(tmp_path, "x") as again:
        assert again.is_open
    assert not again.is_open


async def test_second_open_is_refused_and_destroy(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"a")
        with pytest.raises(LogLockedError, match="open in another"):
            await FsLog(tmp_path, "x").open()
        with pytest.raises(LogLockedError):
            FsLog.destroy(tmp_path, "x")
    # Another process too (flock is per open file description, so a subprocess is real).
    import subprocess
    import sys

    code = (
        "import trio,sys\nfrom tinyraftplus import FsLog\n"
        "async def m():\n async with FsLog(sys.argv[1],'x') as l:\n  print(l.seq)\n"
        "trio.run(m)\n"
    )
    async with FsLog(tmp_path, "x"):
        p = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
        )
        assert p.returncode != 0 and "LogLockedError" in p.stderr
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "0"
    FsLog.destroy(tmp_path, "x")
    assert not (tmp_path / "x").exists()
    async with FsLog(tmp_path, "x") as log:
        assert log.seq == -1


async def test_concurrent_appends_are_in_seq_order_and_share_fsyncs(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        got: dict[bytes, int] = {}

        async def worker(k):
            for i in range(20):
                data = b"%d-%d" % (k, i)
                got[data] = await log.append(data)

        async with trio.open_nursery() as n:
            for k in range(64):
                n.start_soon(worker, k)
        assert log.seq == 64 * 20 - 1
        assert sorted(got.values()) == list(range(64 * 20))
        entries = [e async for e in log.iter()]
        assert all(got[e.data] == e.seq for e in entries)
        # each task's own appends are in its call order
        for k in range(64):
            seqs = [got[b"%d-%d" % (k, i)] for i in range(20)]
            assert seqs == sorted(seqs)


async def test_group_commit_carries_every_appender(tmp_path, monkeypatch):
    """64 tasks appending in a loop: each fdatasync should carry all 64 (about 20 writes
    for 1,280 appends). Regressions this catches: submitting the next round before the
    woken tasks re-append (about 40 writes, two half-rounds per cycle), and a flusher that
    kept flushing for the others while its own appends waited (its last 19 appends then
    went out one write each)."""
    from tinyraftplus.log.flusher import Flusher

    writes = 0
    real_submit = Flusher.submit

    def submit(self, *args):  # noqa: ANN001, ANN002
        nonlocal writes
        writes += 1
        return real_submit(self, *args)

    monkeypatch.setattr(Flusher, "submit", submit)
    async with FsLog(tmp_path, "x") as log:

        async def worker(k: int) -> None:
            for i in range(20):
                await log.append(b"%d-%d" % (k, i))

        async with trio.open_nursery() as n:
            for k in range(64):
                n.start_soon(worker, k)
        assert log.seq == 64 * 20 - 1
    assert writes <= 25, f"{writes} writes for 1,280 appends by 64 tasks"


async def test_txn_commit_abort_exception(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        await log.append(b"before")
        async with log.txn() as txn:
            assert await txn.append(b"t1") == 1
            assert await txn.append_batch([b"t2", b"t3"], term=4) == 2
            assert log.seq == 0  # not visible before the end
        assert log.seq == 3 and log.head == b"t3" and log.head_term == 4
        async with log.txn() as txn:
            await txn.append(b"dropped")
            await txn.abort()
            with pytest.raises(UsageError):
                await txn.append(b"after abort")
        assert log.seq == 3
        with pytest.raises(RuntimeError, match="boom"):
            async with log.txn() as txn:
                await txn.append(b"dropped too")
                raise RuntimeError("boom")
        assert log.seq == 3
        assert await log.append(b"next") == 4
    async with FsLog(tmp_path, "x") as log:
        assert [e.data async for e in log.iter()] == [b"before", b"t1", b"t2", b"t3", b"next"]


async def test_log_append_inside_its_own_txn_is_an_error_not_a_hang(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        with trio.fail_after(5):
            async with log.txn() as txn:
                await txn.append(b"in")
                with pytest.raises(UsageError, match="txn.append"):
                    await log.append(b"deadlock?")
                with pytest.raises(UsageError, match="txn.append"):
                    await log.append_batch([b"deadlock?"])
        assert [e.data async for e in log.iter()] == [b"in"]


async def test_txn_serializes_other_appends_and_close_waits(tmp_path):
    log = FsLog(tmp_path, "x")
    await log.open()
    order = []
    async with trio.open_nursery() as n:
        async with log.txn() as txn:
            n.start_soon(lambda: _append_and_note(log, b"outside", order))
            await trio.sleep(0.01)
            assert order == []  # the outside append waits for the transaction
            await txn.append(b"inside")
            n.start_soon(log.close)
            await trio.sleep(0.01)
            assert not log.closed  # close waits for the open transaction
        order.append("txn done")
    assert log.closed
    assert order[0] == "txn done"
    async with FsLog(tmp_path, "x") as log2:
        assert [e.data async for e in log2.iter()][0] == b"inside"


async def _append_and_note(log, data, order):
    try:
        order.append(("appended", await log.append(data)))
    except ClosedError:
        order.append("closed")


async def test_truncate(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        await log.append_batch([b"%d" % i for i in range(10)], term=[1] * 5 + [2] * 5)
        await log.truncate(6)
        assert log.seq == 6 and log.head == b"6" and log.head_term == 2
        await log.truncate(100)  # past the end: nothing to do
        assert log.seq == 6
        await log.truncate(4)
        assert log.head_term == 1 and log.term_at(4) == 1
        assert await log.append(b"new", term=3) == 5
        await log.truncate(-1)
        assert log.seq == -1 and log.head is None
        assert await log.append(b"fresh") == 0
    async with FsLog(tmp_path, "x") as log:
        assert [e async for e in log.iter()] == [Entry(0, 0, b"fresh")]


async def test_entries_respects_max_bytes(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        await log.append_batch([bytes([i]) * 100 for i in range(20)])
        assert [e.seq for e in log.entries(0, 19, 250)] == [0, 1]
        assert [e.seq for e in log.entries(5, 19, 0)] == [5]  # at least one
        assert len(log.entries(0, 19, 1 << 20)) == 20
        assert [e.seq for e in log.entries(3, 5, 1 << 20)] == [3, 4, 5]
        with pytest.raises(InvalidArgumentError):
            log.entries(0, 20, 100)


async def test_cancelled_append_leaves_log_consistent(tmp_path):
    async with FsLog(tmp_path, "x") as log:
        acked = []

        async def writer(i):
            acked.append(await log.append(b"r%d" % i))

        for _ in range(20):
            with trio.move_on_after(0.0005):
                async with trio.open_nursery() as n:
                    for i in range(30):
                        n.start_soon(writer, i)
            assert await log.append(b"probe") == log.seq
        end = log.seq
    async with FsLog(tmp_path, "x") as log:
        assert log.seq == end
        seqs = [e.seq async for e in log.iter()]
        assert seqs == list(range(end + 1))
        assert set(acked) <= set(seqs)


async def test_random_ops_against_model(tmp_path):
    rng = random.Random(3)
    model: list[tuple[int, bytes]] = []
    async with FsLog(tmp_path, "x", segment_size=4096) as log:
        for _step in range(300):
            op = rng.random()
            if op < 0.5:
                d = rng.randbytes(rng.randrange(0, 300))
                t = rng.randrange(3)
                assert await log.append(d, term=t) == len(model)
                model.append((t, d))
            elif op < 0.7:
                ds = [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 8))]
                await log.append_batch(ds, term=5)
                model += [(5, d) for d in ds]
            elif op < 0.8 and model:
                keep = rng.randrange(-1, len(model))
                await log.truncate(keep)
                del model[keep + 1 :]
            elif op < 0.9 and model:
                s = rng.randrange(len(model))
                assert await log.read(s) == Entry(s, *model[s])
                assert log.term_at(s) == model[s][0]
            else:
                await log.close()
                log = FsLog(tmp_path, "x", segment_size=4096)
                await log.open()
            assert log.seq == len(model) - 1
        assert [(e.term, e.data) async for e in log.iter()] == model
        await log.close()


async def test_state_file(tmp_path):
    sf = StateFile(tmp_path / "state")
    assert sf.load() is None
    await sf.save(b"term=3,vote=b")
    assert sf.load() == b"term=3,vote=b"
    await sf.save(b"term=4")
    assert StateFile(tmp_path / "state").load() == b"term=4"
    assert not os.path.exists(str(tmp_path / "state") + ".tmp")
    raw = bytearray((tmp_path / "state").read_bytes())
    raw[-1] ^= 0x10
    (tmp_path / "state").write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError, match="CRC32C"):
        sf.load()
    (tmp_path / "state").write_bytes(b"TPS")
    with pytest.raises(LogCorruptError):
        sf.load()
    with pytest.raises(InvalidArgumentError):
        await sf.save("text")


@pytest.mark.parametrize("count", [1, 3])
async def test_batch_items_changed_while_waiting_do_not_change_the_record(tmp_path, count):
    """Regression: append_batch measured its items, then (while a transaction held the
    gate) waited, then for a one-item batch copied the item again: a bytearray grown in
    between was framed with its old length but copied whole, so the round held more bytes
    than its records, and every later write landed at the wrong offset. The records hold
    the items as they were when append_batch was called."""
    items = [bytearray(b"item%d" % i) for i in range(count)]
    want = [bytes(x) for x in items]
    async with FsLog(tmp_path, "x") as log:
        async with trio.open_nursery() as n:
            async with log.txn() as txn:
                await txn.append(b"txn")
                n.start_soon(log.append_batch, items)
                await trio.testing.wait_all_tasks_blocked()
                for x in items:
                    x.extend(b" changed while waiting")
        assert await log.append(b"after") == count + 1
        assert log.head == b"after"
        assert [e.data async for e in log.iter()] == [b"txn", *want, b"after"]
    async with FsLog(tmp_path, "x") as log:
        assert [e.data async for e in log.iter()] == [b"txn", *want, b"after"]


async def test_a_failure_while_framing_leaves_no_trace(tmp_path, monkeypatch):
    """Regression: framing put a batch's bytes into the shared round, then failed on a
    later step (the term bookkeeping), leaving bytes that no seq or offset accounted for;
    the next record in the round was then framed at the wrong offset with a reused seq,
    which recovery reads as damage in the middle of the log. A failed append must leave
    the round exactly as it was."""
    from tinyraftplus.log import fslog

    real = fslog._term_changes
    calls = 0

    def failing_once(*args):  # noqa: ANN002
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected failure while framing")
        return real(*args)

    monkeypatch.setattr(fslog, "_term_changes", failing_once)
    outcome: dict[str, object] = {}
    async with FsLog(tmp_path, "x") as log:

        async def single(data: bytes) -> None:
            outcome[data.decode()] = await log.append(data, term=1)

        async def batch() -> None:
            try:
                await log.append_batch([b"b1", b"b2"], term=[1, 2])
            except RuntimeError as exc:
                outcome["batch"] = exc

        async with trio.open_nursery() as n:
            async with log.txn() as txn:  # holds the gate: the three share one round
                await txn.append(b"t", term=1)
                n.start_soon(single, b"a")
                await trio.testing.wait_all_tasks_blocked()
                n.start_soon(batch)
                await trio.testing.wait_all_tasks_blocked()
                n.start_soon(single, b"c")
                await trio.testing.wait_all_tasks_blocked()
        assert calls == 1 and isinstance(outcome["batch"], RuntimeError)
        # Trio may run the two woken appenders in either order; the batch is between.
        assert sorted([outcome["a"], outcome["c"]]) == [1, 2]
        assert await log.append_batch([b"d1", b"d2"], term=[2, 3]) == 3
        mid = sorted([(outcome["a"], 1, b"a"), (outcome["c"], 1, b"c")])
        want = [(0, 1, b"t"), *mid, (3, 2, b"d1"), (4, 3, b"d2")]
        assert [tuple(e) async for e in log.iter()] == want
    async with FsLog(tmp_path, "x") as log:
        assert [tuple(e) async for e in log.iter()] == want


# poll_us 0: the flusher parks on the eventfd; 300: it polls first. A 4 KiB segment: a
# new segment (made in a worker thread) every few records.
@pytest.mark.parametrize("poll_us,segment_size", [(0, 1 << 20), (300, 1 << 20), (300, 4096)])
async def test_a_cancelled_flusher_finishes_its_write_before_it_sees_the_cancel(
    tmp_path, poll_us, segment_size
):
    """The appender that writes the round (the flusher) is cancelled, already at the call
    or while the write is in flight: the record is durable and counted before the
    Cancelled reaches it, whichever way the flusher waits."""
    async with FsLog(tmp_path, "x", poll_us=poll_us, segment_size=segment_size) as log:
        for i in range(100):
            with trio.CancelScope() as cs:
                if i % 2 == 0:
                    cs.cancel()
                else:
                    cs.deadline = trio.current_time() + 50e-6
                await log.append(b"r%d" % i + b"x" * 1000)
                await trio.sleep_forever()
            assert cs.cancelled_caught
            assert log.seq == i, f"append {i} was cancelled before its write was counted"
    async with FsLog(tmp_path, "x") as log:
        assert [e.data async for e in log.iter()] == [
            b"r%d" % i + b"x" * 1000 for i in range(100)]


async def test_the_tail_is_preallocated_and_sealed_segments_and_closed_logs_end_at_a_record(
    tmp_path,
):
    """``format``: preallocated tail. While open the tail file runs ahead of its records
    in zeros; a copy taken then (what a SIGKILL leaves) reopens with every record and no
    warning; a sealed segment and a closed log's tail end exactly at their last record."""
    import shutil

    d = tmp_path / "x"
    async with FsLog(tmp_path, "x", segment_size=64 << 10) as log:
        for i in range(40):  # 40 x 1 KiB: the first segment holds about 60
            await log.append(b"%04d" % i + b"x" * 1020)
        (seg0,) = sorted(d.glob("*.seg"))
        raw = seg0.read_bytes()
        data = raw.rstrip(b"\0")
        assert len(raw) > len(data) and len(raw) % 4096 == 0  # grown ahead, in zeros
        shutil.copytree(d, tmp_path / "copy" / "x")
        for i in range(40, 100):  # into a second segment: the first is sealed
            await log.append(b"%04d" % i + b"x" * 1020)
        segs = sorted(d.glob("*.seg"))
        assert len(segs) == 2
        sealed = segs[0].read_bytes()
        assert len(sealed) == len(sealed.rstrip(b"\0")) and sealed.endswith(b"x" * 1020)
        assert os.path.getsize(segs[1]) > len(segs[1].read_bytes().rstrip(b"\0"))
    tail = sorted(d.glob("*.seg"))[-1].read_bytes()
    assert tail.endswith(b"x" * 1020)  # closed: the zeros are cut off
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LogRecoveryWarning
        async with FsLog(tmp_path / "copy", "x", segment_size=64 << 10) as log:
            assert log.seq == 39
            assert [e.data[:4] async for e in log.iter()] == [b"%04d" % i for i in range(40)]
            assert await log.append(b"next") == 40
        async with FsLog(tmp_path, "x", segment_size=64 << 10) as log:
            assert log.seq == 99
