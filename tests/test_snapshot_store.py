"""``SnapshotStore``: format (checked against the ``crc32c`` package and an independent
parser), damage detection, pruning, resumable partials, a 64 MiB snapshot in bounded memory,
the states a power loss may leave after every syscall (``crashsim``), and the CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import crashsim
import crc32c
import msgpack
import pytest
import trio

from tinyraftplus.errors import (
    ClosedError,
    InvalidArgumentError,
    LogError,
    LogFullError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotGoneError,
)
from tinyraftplus.log import fileops
from tinyraftplus.raft.membership import Config
from tinyraftplus.snapshot import (
    PartialSnapshot,
    SnapshotMeta,
    SnapshotStore,
    SnapshotWarning,
    SnapshotWriter,
)
from tinyraftplus.snapshot import cli as snap_cli
from tinyraftplus.snapshot import store as store_mod

CFG = Config(frozenset({1, 2, 3})).encode()


def data_of(i: int, size: int) -> bytes:
    return crashsim.payload(i, size)


async def take(store: SnapshotStore, seq: int, term: int, data: bytes, *, piece: int = 1000,
               config: bytes | None = CFG, extra: bytes = b"sessions") -> SnapshotMeta:
    with store.begin(seq, term, config, extra) as w:
        for i in range(0, len(data), piece):
            w.write(memoryview(data)[i : i + piece])
        return await w.finish()


def opened(tmp: Path, **kw) -> SnapshotStore:
    s = SnapshotStore(tmp, "x", **kw)
    s.open()
    return s


def snap_file(tmp: Path, m: SnapshotMeta) -> Path:
    return tmp / "x.snap" / f"{m.seq:016x}-{m.term:016x}.snap"


def parse_independently(raw: bytes) -> tuple[dict, int]:
    """The documented format, read without the library: (header map, data offset)."""
    magic, version, hlen = struct.unpack_from("<6sHI", raw)
    assert (magic, version) == (b"TPSNAP", 1)
    (hcrc,) = struct.unpack_from("<I", raw, 12 + hlen)
    assert hcrc == crc32c.crc32c(raw[: 12 + hlen])
    return msgpack.unpackb(raw[12 : 12 + hlen]), 16 + hlen


# --- format and round trip --------------------------------------------------------------


async def test_round_trip_format_and_crc_agree_with_oracle(tmp_path):
    s = opened(tmp_path)
    assert s.latest() is None and s.list() == []
    data = data_of(1, 10_000)
    m = await take(s, 41, 3, data)
    assert m == SnapshotMeta(41, 3, len(data), crc32c.crc32c(data), CFG, b"sessions")
    assert s.latest() == m and s.list() == [m]
    s.verify(m)
    await s.averify(m)
    raw = snap_file(tmp_path, m).read_bytes()
    hdr, off = parse_independently(raw)
    assert hdr == {"seq": 41, "term": 3, "size": len(data), "crc": m.crc, "config": CFG,
                   "extra": b"sessions"}
    assert raw[off:] == data
    with s.open_data(m) as f:
        assert f.read(7) == data[:7]
        assert f.read() == data[7:]
        assert f.read(10) == b""
    assert s.read_chunk(m, 9_990, 100) == data[9_990:]
    assert s.read_chunk(m, 10_000, 5) == b""
    assert s.read_chunk(m, 123, 0) == b""
    # A fresh store on the same directory finds it.
    s2 = opened(tmp_path)
    assert s2.latest() == m
    s2.verify(m)


async def test_empty_snapshot_and_no_config(tmp_path):
    s = opened(tmp_path)
    m = await take(s, 0, 0, b"", config=None, extra=b"")
    assert (m.size, m.crc, m.config) == (0, 0, None)
    s.verify(m)
    assert opened(tmp_path).latest() == m


async def test_big_values_keep_the_header_width(tmp_path):
    """size and crc are fixed-width in the header: the data offset is known at begin()."""
    h1 = store_mod.encode_header(SnapshotMeta(5, 1, 0, 0, None, b""))
    h2 = store_mod.encode_header(SnapshotMeta(5, 1, 2**64 - 1, 2**32 - 1, None, b""))
    assert len(h1) == len(h2)
    s = opened(tmp_path)
    m = await take(s, 2**64 - 1, 2**64 - 1, b"z" * 300)
    assert opened(tmp_path).latest() == m


async def test_usage_errors(tmp_path):
    s = SnapshotStore(tmp_path, "x")
    with pytest.raises(ClosedError):
        s.latest()
    with pytest.raises(ClosedError):
        s.begin(1, 1, None)
    with pytest.raises(InvalidArgumentError):
        SnapshotStore(tmp_path, "x", keep=0)
    s.open()
    for bad in [(-1, 1, None, b""), (1, 2**64, None, b""), (1, 1, "cfg", b""), (1, 1, None, "")]:
        with pytest.raises(InvalidArgumentError):
            s.begin(*bad)
    m = await take(s, 5, 1, b"abc")
    with pytest.raises(InvalidArgumentError):
        s.read_chunk(m, 4, 1)
    w = s.begin(6, 1, None)
    w.write(b"x")
    await w.finish()
    with pytest.raises(ClosedError):
        w.write(b"y")
    with pytest.raises(ClosedError):
        await w.finish()
    assert issubclass(SnapshotCorruptError, SnapshotError)
    assert issubclass(SnapshotError, LogError) and issubclass(SnapshotGoneError, SnapshotError)


# --- damage -------------------------------------------------------------------------------


def flip(path: Path, off: int, bit: int = 0x10) -> None:
    raw = bytearray(path.read_bytes())
    raw[off] ^= bit
    path.write_bytes(bytes(raw))


async def test_every_header_byte_flip_is_detected(tmp_path):
    s = opened(tmp_path)
    old = await take(s, 10, 1, data_of(1, 3000))
    new = await take(s, 20, 2, data_of(2, 3000))
    p = snap_file(tmp_path, new)
    _, data_off = parse_independently(p.read_bytes())
    for off in range(data_off):
        for bit in (0x01, 0x80):
            flip(p, off, bit)
            with pytest.warns(SnapshotWarning, match=str(p)):
                s2 = opened(tmp_path)
            assert s2.latest() == old, off  # the damaged one is ignored
            assert s2.list() == [old]
            flip(p, off, bit)
    assert opened(tmp_path).latest() == new


async def test_data_flip_is_caught_by_verify(tmp_path):
    s = opened(tmp_path)
    data = data_of(3, 20_000)
    m = await take(s, 7, 1, data)
    p = snap_file(tmp_path, m)
    _, data_off = parse_independently(p.read_bytes())
    for off in (data_off, data_off + 12_345, data_off + len(data) - 1):
        flip(p, off)
        s2 = opened(tmp_path)
        assert s2.latest() == m  # the header is sound: found, but...
        with pytest.raises(SnapshotCorruptError, match="data CRC32C") as ei:
            s2.verify(m)
        assert ei.value.path == str(p) and str(p) in str(ei.value)
        with pytest.raises(SnapshotCorruptError):
            await s2.averify(m)
        flip(p, off)
    opened(tmp_path).verify(m)


async def test_truncated_or_extended_file_is_ignored(tmp_path):
    s = opened(tmp_path)
    old = await take(s, 1, 1, data_of(4, 5000))
    new = await take(s, 2, 1, data_of(5, 5000))
    p = snap_file(tmp_path, new)
    raw = p.read_bytes()
    for bad in (raw[:-1], raw + b"\0", raw[:10], b""):
        p.write_bytes(bad)
        with pytest.warns(SnapshotWarning):
            assert opened(tmp_path).latest() == old
    p.write_bytes(raw)
    # A file renamed to another seq is damage too (its header disagrees with its name).
    p.rename(snap_file(tmp_path, SnapshotMeta(3, 1, 0, 0)))
    with pytest.warns(SnapshotWarning, match="its name seq 3"):
        assert opened(tmp_path).latest() == old


# --- pruning, replacement, gone -----------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 2, 3])
async def test_keep_prunes_oldest(tmp_path, keep):
    s = opened(tmp_path, keep=keep)
    metas = [await take(s, 10 * i, 1, data_of(i, 2000)) for i in range(1, 6)]
    assert s.list() == metas[-keep:]
    names = sorted(os.listdir(tmp_path / "x.snap"))
    assert names == [snap_file(tmp_path, m).name for m in metas[-keep:]]
    assert opened(tmp_path, keep=keep).list() == metas[-keep:]
    with pytest.raises(SnapshotGoneError):
        s.read_chunk(metas[0], 0, 10)
    with pytest.raises(SnapshotGoneError):
        s.open_data(metas[0])
    with pytest.raises(SnapshotGoneError):
        s.verify(metas[0])


async def test_prune_removes_damaged_files_older_than_the_kept(tmp_path):
    s = opened(tmp_path, keep=1)
    a = await take(s, 1, 1, b"a" * 100)
    b = await take(s, 5, 1, b"b" * 100)
    snap_file(tmp_path, a).write_bytes(b"garbage")  # an old file nobody can read
    snap_file(tmp_path, SnapshotMeta(9, 1, 0, 0)).write_bytes(b"garbage")  # a newer one
    with pytest.warns(SnapshotWarning):
        s = opened(tmp_path, keep=1)
    assert s.latest() == b
    c = await take(s, 7, 1, b"c" * 100)
    left = sorted(os.listdir(tmp_path / "x.snap"))
    # the old damaged file and b are pruned; the damaged one newer than c is left alone
    assert left == [snap_file(tmp_path, c).name, f"{9:016x}-{1:016x}.snap"]


async def test_same_seq_and_term_replaces_and_old_readers_are_told(tmp_path):
    s = opened(tmp_path)
    m1 = await take(s, 5, 2, b"one" * 100)
    m2 = await take(s, 5, 2, b"two" * 100)
    assert s.list() == [m2]
    with pytest.raises(SnapshotGoneError, match="now holds"):
        s.read_chunk(m1, 0, 10)
    assert s.read_chunk(m2, 0, 3) == b"two"


async def test_reader_survives_pruning(tmp_path):
    s = opened(tmp_path, keep=1)
    data = data_of(7, 50_000)
    m = await take(s, 1, 1, data)
    f = s.open_data(m)
    await take(s, 2, 1, b"newer")
    assert f.read() == data  # an open reader keeps the unlinked file
    f.close()


# --- writer abort and leftovers -----------------------------------------------------------


async def test_abort_and_leftover_temp_files(tmp_path):
    s = opened(tmp_path)
    m = await take(s, 1, 1, b"kept")
    with pytest.raises(RuntimeError):
        with s.begin(2, 1, None) as w:
            w.write(b"x" * 5000)
            raise RuntimeError("state machine failed")
    w.abort()  # idempotent
    with s.begin(3, 1, None) as w:
        w.write(b"never finished")
    assert sorted(os.listdir(tmp_path / "x.snap")) == [snap_file(tmp_path, m).name]
    # A crash mid-write leaves a temp file: the next open removes it.
    w = s.begin(4, 1, None)
    w.write(b"y" * 10)
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path / "x.snap"))
    with pytest.warns(SnapshotWarning, match="removed 1 temp file"):
        s2 = opened(tmp_path)
    assert s2.latest() == m
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "x.snap"))


async def test_cancelled_finish_leaves_nothing_behind(tmp_path):
    s = opened(tmp_path)
    m = await take(s, 1, 1, b"kept")
    with trio.CancelScope() as cs:
        cs.cancel()
        with s.begin(2, 1, None) as w:
            w.write(b"z" * 100)
            await w.finish()
    assert cs.cancelled_caught
    assert s.latest() == m
    assert os.listdir(tmp_path / "x.snap") == [snap_file(tmp_path, m).name]


@pytest.mark.parametrize("where", ["write", "fdatasync", "rename"])
async def test_failing_syscalls_abandon_the_snapshot(tmp_path, monkeypatch, where):
    import errno

    s = opened(tmp_path)
    m = await take(s, 1, 1, b"kept")

    def fail(*a, **kw):
        raise OSError(errno.ENOSPC if where == "write" else errno.EIO, where)

    monkeypatch.setattr(fileops, {"write": "write_all", "rename": "replace"}.get(where, where),
                        fail)
    w = s.begin(2, 1, None)
    w.write(b"x" * 100)
    with pytest.raises(LogFullError if where == "write" else SnapshotError, match=where) as ei:
        await w.finish()
    assert "the snapshot is abandoned" in str(ei.value)
    monkeypatch.undo()
    assert s.latest() == m
    assert os.listdir(tmp_path / "x.snap") == [snap_file(tmp_path, m).name]
    assert await take(s, 3, 1, b"next") == s.latest()  # the store goes on


# --- partials -----------------------------------------------------------------------------


def meta_for(data: bytes, seq: int = 100, term: int = 4) -> SnapshotMeta:
    return SnapshotMeta(seq, term, len(data), crc32c.crc32c(data), CFG, b"leader-extra")


async def test_partial_resume_after_reopen_and_wrong_offsets(tmp_path):
    data = data_of(9, 30_000)
    meta = meta_for(data)
    s = opened(tmp_path)
    p = s.partial(meta)
    assert isinstance(p, PartialSnapshot) and p.offset == 0 and p.meta == meta
    assert p.write_at(0, data[:10_000]) == 10_000
    assert p.write_at(5_000, data[5_000:15_000]) == 10_000  # a resend of old bytes: ignored
    assert p.write_at(20_000, data[20_000:]) == 10_000  # a gap: nothing written
    assert p.offset == 10_000
    with pytest.raises(InvalidArgumentError, match="past the snapshot's size"):
        p.write_at(10_000, data[10_000:] + b"!")
    assert p.offset == 10_000
    with pytest.raises(InvalidArgumentError, match="needs all"):
        await p.complete()
    assert p.write_at(10_000, data[10_000:12_000]) == 12_000
    p.close()
    # The process restarts: a new store resumes from the bytes held.
    s2 = opened(tmp_path)
    assert s2.latest() is None
    p2 = s2.partial(meta)
    assert p2.offset == 12_000
    assert p2.write_at(12_000, data[12_000:]) == len(data)
    assert await p2.complete() == meta
    assert s2.latest() == meta
    s2.verify(meta)
    assert s2.read_chunk(meta, 0, len(data)) == data
    assert not any(n.endswith(".part") for n in os.listdir(tmp_path / "x.snap"))
    with pytest.raises((SnapshotGoneError, ClosedError)):
        p2.write_at(len(data), b"")


async def test_partial_of_another_snapshot_is_discarded(tmp_path):
    a, b = data_of(1, 8000), data_of(2, 8000)
    s = opened(tmp_path)
    pa = s.partial(meta_for(a))
    pa.write_at(0, a[:4000])
    # Same seq and term but other bytes (another leader's snapshot): no resume into it.
    pb = s.partial(meta_for(b))
    assert pb.offset == 0
    with pytest.raises(SnapshotGoneError):
        pa.write_at(4000, a[4000:])
    assert [n for n in os.listdir(tmp_path / "x.snap") if n.endswith(".part")] == [
        os.path.basename(pb.path)
    ]
    pb.write_at(0, b[:100])
    assert s.partial(meta_for(b)) is pb  # the open one is handed back
    pb.close()
    assert opened(tmp_path).partial(meta_for(b)).offset == 100
    s3 = opened(tmp_path)
    s3.discard_partials(keep=meta_for(b))
    assert s3.partial(meta_for(b)).offset == 100
    s3.discard_partials()
    assert not any(n.endswith(".part") for n in os.listdir(tmp_path / "x.snap"))


async def test_partial_with_bad_bytes_is_deleted_and_restarts_from_zero(tmp_path):
    data = data_of(3, 9000)
    meta = meta_for(data)
    s = opened(tmp_path)
    good = await take(s, 50, 1, b"older")
    p = s.partial(meta)
    bad = bytearray(data)
    bad[4444] ^= 1  # a chunk corrupted in flight (or garbage a power loss left)
    p.write_at(0, bytes(bad))
    with pytest.raises(SnapshotCorruptError, match="data CRC32C"):
        await p.complete()
    assert s.latest() == good
    assert not any(n.endswith(".part") for n in os.listdir(tmp_path / "x.snap"))
    p = s.partial(meta)
    assert p.offset == 0
    p.write_at(0, data)
    await p.complete()
    assert s.latest() == meta


async def test_partial_garbage_tail_after_power_loss(tmp_path):
    """A partial whose size reached the disk but whose last pages did not: resumed from
    its size, caught by the CRC at the end, restarted from 0."""
    data = data_of(4, 20_000)
    meta = meta_for(data)
    s = opened(tmp_path)
    p = s.partial(meta)
    p.write_at(0, data[:12_000])
    p.close()
    path = Path(p.path)
    raw = bytearray(path.read_bytes())
    raw[-4000:] = bytes(4000)  # zero-filled: the pages never written back
    path.write_bytes(bytes(raw))
    p = opened(tmp_path).partial(meta)
    assert p.offset == 12_000
    p.write_at(12_000, data[12_000:])
    with pytest.raises(SnapshotCorruptError):
        await p.complete()


async def test_partial_completion_prunes(tmp_path):
    s = opened(tmp_path, keep=2)
    olds = [await take(s, i, 1, b"o%d" % i) for i in (1, 2)]
    data = data_of(5, 3000)
    p = s.partial(meta_for(data))
    p.write_at(0, data)
    m = await p.complete()
    assert s.list() == [olds[1], m]


# --- large snapshot, bounded memory -------------------------------------------------------


def _chunk(i: int, n: int) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


async def test_64_mib_snapshot_in_bounded_memory(tmp_path):
    size, piece = 64 << 20, 1 << 20
    s = opened(tmp_path)
    tracemalloc.start()
    try:
        oracle = 0
        with s.begin(1_000_000, 9, CFG) as w:
            for i in range(size // piece):
                c = _chunk(i, piece)
                oracle = crc32c.crc32c(c, oracle)
                w.write(c)
            m = await w.finish()
        assert (m.size, m.crc) == (size, oracle)
        await s.averify(m)
        for i in range(0, size // piece, 7):  # read_chunk, unaligned to the pieces
            off = i * piece + 123
            got = s.read_chunk(m, off, 4096)
            want = (_chunk(i, piece) + _chunk(i + 1, piece))[123 : 123 + 4096]
            assert got == want[: len(got)]
        pos = 0
        with s.open_data(m) as f:
            while b := f.read(piece):
                assert b == _chunk(pos // piece, piece), pos
                pos += len(b)
        assert pos == size
        # A follower receiving it in chunks.
        s.discard_partials()
        p = opened(tmp_path / "follower").partial(m)
        off = 0
        while off < size:
            off = p.write_at(off, s.read_chunk(m, off, piece))
        await p.complete()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * piece, f"peak Python memory {peak / 2**20:.1f} MiB"


# --- crash states -------------------------------------------------------------------------


class Driver:
    """A workload of snapshots taken and received, marking what it tried and what finished."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep
        self.known: dict[str, bytes] = {}  # json(ident) -> data

    def _mark(self, k: str, m: SnapshotMeta, **kw) -> None:
        fileops.mark({"k": k, "ident": list(m.ident), **kw})

    async def take(self, s: SnapshotStore, i: int, seq: int, size: int) -> None:
        data = data_of(i, size)
        m = SnapshotMeta(seq, 1, len(data), crc32c.crc32c(data), CFG, b"e%d" % i)
        self.known[json.dumps(list(m.ident))] = data
        self._mark("try", m)
        with s.begin(seq, 1, CFG, b"e%d" % i) as w:
            for j in range(0, len(data), 3000):
                w.write(data[j : j + 3000])
            got = await w.finish()
        assert got == m
        self._mark("ack", m)

    async def receive(self, i: int, seq: int, size: int, stop_at: int | None = None) -> None:
        data = data_of(i, size)
        m = SnapshotMeta(seq, 2, len(data), crc32c.crc32c(data), CFG, b"r%d" % i)
        self.known[json.dumps(list(m.ident))] = data
        self._mark("try", m, partial=True)
        s = opened(self.root, keep=self.keep)  # a fresh process: resumes what one held
        p = s.partial(m)
        off = p.offset
        while off < size and (stop_at is None or off < stop_at):
            off = p.write_at(off, data[off : off + 2500])
        if stop_at is not None:
            p.close()
            return
        await p.complete()
        self._mark("ack", m)

    async def run(self) -> None:
        s = opened(self.root, keep=self.keep)
        await self.take(s, 1, 10, 9000)
        await self.take(s, 2, 20, 7000)
        await self.take(s, 3, 30, 11000)  # prunes seq 10
        await self.receive(4, 40, 10_000, stop_at=5000)  # a transfer interrupted...
        await self.receive(4, 40, 10_000)  # ...and resumed after a restart; prunes seq 20
        w = opened(self.root, keep=self.keep).begin(50, 1, None)  # a write a crash interrupts
        w.write(b"q" * 6000)


class Knowledge:
    def __init__(self) -> None:
        self.acked: list[tuple[int, ...]] = []
        self.trying: tuple[int, ...] | None = None
        self.trying_partial = False

    def mark(self, m: dict) -> None:
        ident = tuple(m["ident"])
        if m["k"] == "try":
            self.trying, self.trying_partial = ident, bool(m.get("partial"))
        elif m["k"] == "ack":
            self.acked.append(ident)
            self.trying = None


async def check_state(files: dict[str, bytes], scratch: Path, kn: Knowledge,
                      known: dict[str, bytes]) -> list[str]:
    root = scratch / "state"
    shutil.rmtree(root, ignore_errors=True)
    (root / "x.snap").mkdir(parents=True)
    for n, data in files.items():
        (root / "x.snap" / n).write_bytes(data)
    bad: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SnapshotWarning)
        try:
            s = opened(root, fsync=False)
        except Exception as e:  # noqa: BLE001 - any failure to open is the finding
            return [f"open failed: {type(e).__name__}: {e}"]
    if any(n.endswith(".tmp") for n in os.listdir(root / "x.snap")):
        bad.append("a temp file survived open()")
    latest = s.latest()
    allowed = {kn.acked[-1]} if kn.acked else {None}
    if kn.trying is not None:
        allowed.add(kn.trying)
    got = latest.ident if latest else None
    if got not in allowed:
        bad.append(f"latest() is {got}, expected one of {allowed}")
    for m in s.list():
        data = known.get(json.dumps(list(m.ident)))
        if data is None:
            bad.append(f"a snapshot that was never written: {m.ident}")
            continue
        try:
            if s.read_chunk(m, 0, m.size) != data:  # compared without the store's CRC check
                bad.append(f"snapshot {m.ident} holds other bytes than were written")
            s.verify(m)
        except SnapshotError as e:
            bad.append(f"snapshot {m.ident} listed but damaged: {e}")
    if kn.trying is not None and kn.trying_partial and got != kn.trying:
        # Resume the transfer from what survived; bad bytes must be caught, then a restart
        # from 0 must work.
        data = known[json.dumps(list(kn.trying))]
        meta = SnapshotMeta(*kn.trying[:4], CFG, b"r%d" % 4)
        p = s.partial(meta)
        if not 0 <= p.offset <= meta.size:
            bad.append(f"resume offset {p.offset} outside [0, {meta.size}]")
        p.write_at(p.offset, data[p.offset :])
        try:
            await p.complete()
        except SnapshotCorruptError:
            p = s.partial(meta)
            if p.offset != 0:
                bad.append(f"after a CRC failure the transfer resumes at {p.offset}, not 0")
            p.write_at(0, data)
            await p.complete()
        if s.latest() != meta or s.read_chunk(meta, 0, meta.size) != data:
            bad.append("a resumed transfer installed other bytes than were sent")
    m = await take(s, 2**40, 9, b"after the crash")
    if s.latest() != m:
        bad.append("a snapshot taken after the crash is not the latest")
    return bad


async def explore(check=None, keep: int = 2,
                  budget: crashsim.Budget | None = None) -> crashsim.Result:
    check = check or check_state
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix="tpsnap-crash-", dir=base))
    try:
        buf, store_mod._BUF = store_mod._BUF, 4096  # several writes per snapshot
        trace = root / "trace"
        work = root / "work"
        work.mkdir()
        drv = Driver(work, keep)
        fileops.start_recording(str(trace))
        try:
            await drv.run()
        finally:
            fileops.stop_recording()
            store_mod._BUF = buf
        events = crashsim.read_trace(str(trace))
        model = crashsim.Model(str(work / "x.snap"))
        kn = Knowledge()
        rng = __import__("random").Random(5)
        budget = budget or crashsim.Budget()
        seen: set[bytes] = set()
        res = crashsim.Result()
        version = 0
        for ev in events:
            if ev.op == fileops.EV_MARK:
                kn.mark(json.loads(ev.name))
                version += 1
                continue
            if not model.apply(ev):
                continue
            res.crash_points += 1
            for files in model.crash_states(rng, budget):
                key = crashsim._state_key(files) + struct.pack("<Q", version)
                if key in seen:
                    continue
                seen.add(key)
                res.states += 1
                bad = await check(files, root, kn, drv.known)
                if bad:
                    res.violations.append(f"after event {ev.op}: {bad[:3]}")
                    if len(res.violations) >= 5:
                        return res
        return res
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("keep", [1, 2])
async def test_every_crash_state_keeps_new_or_previous(keep):
    res = await explore(keep=keep)
    assert res.violations == [], res.violations
    assert res.crash_points > 35 and res.states > 300, (res.crash_points, res.states)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1, 2, 3])
async def test_every_crash_state_wider(keep):
    res = await explore(keep=keep, budget=crashsim.Budget(full=8, sample=40, tears=6,
                                                          combos=400))
    assert res.violations == [], res.violations


async def test_crash_states_catch_a_missing_fdatasync(monkeypatch):
    """The planted bug: rename before the data is durable."""
    monkeypatch.setattr(fileops, "fdatasync", lambda fd: None)
    res = await explore()
    assert any("damaged" in v or "other bytes" in v or "latest()" in v
               for v in res.violations), res.violations


async def test_crash_states_catch_a_missing_directory_fsync(monkeypatch):
    """The planted bug: a snapshot reported durable before its rename is."""
    monkeypatch.setattr(fileops, "fsync_dir", lambda path: None)
    res = await explore()
    assert any("latest() is None" in v for v in res.violations), res.violations


async def test_crash_states_catch_a_partial_installed_without_crc_check(monkeypatch):
    """The planted bug: a resumed transfer installed without checking its CRC32C."""

    async def check_without_crc(*a):
        with monkeypatch.context() as mp:
            mp.setattr(store_mod, "check_data", lambda fd, path, h: None)
            return await check_state(*a)

    res = await explore(check_without_crc)
    assert any("other bytes" in v for v in res.violations), res.violations


# --- CLI ----------------------------------------------------------------------------------


def _cli(*args) -> tuple[int, str]:
    out = io.StringIO()
    err = io.StringIO()
    rc = snap_cli.run(*args, out=out, err=err)
    return rc, out.getvalue() + err.getvalue()


async def test_cli_lists_and_verifies(tmp_path):
    s = opened(tmp_path, keep=3)
    a = await take(s, 10, 1, data_of(1, 5000))
    b = await take(s, 20, 2, data_of(2, 5000), config=None)
    c = await take(s, 30, 2, data_of(3, 5000), config=b"\x93junk")
    p = s.partial(meta_for(b"x" * 100))
    p.write_at(0, b"x" * 40)
    rc, out = _cli(str(tmp_path), "x", True)
    assert rc == 0, out
    rows = [ln.split("\t") for ln in out.splitlines() if ln[:1].isdigit()]
    assert rows[0] == ["10", "1", "5000", f"{a.crc:#010x}", "voters {1, 2, 3}", "OK"]
    assert rows[1][4] == "-" and rows[2][4].startswith("undecodable")
    assert "40 of 100 bytes received" in out and "3 snapshot(s), 0 damaged" in out
    flip(snap_file(tmp_path, c), parse_independently(snap_file(tmp_path, c).read_bytes())[1])
    rc, out = _cli(str(tmp_path), "x", False)
    assert rc == 0 and "header ok" in out  # without --verify the data is not read
    rc, out = _cli(str(tmp_path), "x", True)
    assert rc == 1 and "DAMAGED: snapshot file" in out and "data CRC32C" in out
    flip(snap_file(tmp_path, b), 20)  # a header byte
    rc, out = _cli(str(tmp_path), "x", False)
    assert rc == 1 and f"DAMAGED\t{snap_file(tmp_path, b)}" in out
    rc, out = _cli(str(tmp_path), "nope", False)
    assert rc == 2 and "no log and no snapshots" in out


def test_cli_through_the_log_command(tmp_path):
    (tmp_path / "x").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "tinyraftplus.log", "snapshots", str(tmp_path), "x", "--verify"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0 and "no snapshots" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "tinyraftplus.log", "snapshots", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert r.returncode == 2 and "usage" in r.stderr


def test_public_names():
    import tinyraftplus.snapshot as pkg

    for n in ("SnapshotStore", "SnapshotWriter", "PartialSnapshot", "SnapshotMeta",
              "SnapshotCorruptError", "SnapshotGoneError", "SnapshotError"):
        assert n in pkg.__all__
    assert SnapshotWriter is store_mod.SnapshotWriter
