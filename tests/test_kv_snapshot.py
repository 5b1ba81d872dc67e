"""KVStore.snapshot / KVStore.restore: everything ``apply`` changes round-trips, snapshots are
byte-identical across replicas, damaged streams are refused without touching the store, and
neither side holds the serialized form in memory.

The checks compare the stores' whole state directly (:func:`state`), never through a CRC.
"""

from __future__ import annotations

import io
import random
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import pytest

from tinyraftplus.errors import SnapshotCorruptError
from tinyraftplus.kv.store import (
    SNAPSHOT_MAGIC,
    KVStore,
    SnapshotFormatError,
    encode_register,
    encode_write,
)
from tinyraftplus.snapshot import SnapshotMeta


def meta(seq: int) -> SnapshotMeta:
    return SnapshotMeta(seq=seq, term=1, size=0, crc=0)


def state(kv: KVStore) -> dict[str, Any]:
    """Everything the store holds, orders included (insertion order of the map, LRU order of
    the sessions, order of each session's results)."""
    return {
        "data": list(kv.data.items()),
        "sessions": [(sid, s.owner, s.floor, list(s.results.items()))
                     for sid, s in kv._sessions.items()],
        "applied_seq": kv.applied_seq,
        "duplicates": kv.duplicates,
        "expired": kv.expired,
        "max_sessions": kv._max_sessions,
        "max_results": kv._max_results,
        "max_results_total": kv._max_results_total,
        "results_total": kv._results_total,
        "data_bytes": kv.data_bytes,
        "quota_bytes": kv.quota_bytes,
    }


def snap_bytes(kv: KVStore) -> bytes:
    return b"".join(bytes(c) for c in kv.snapshot())


def restored(data: bytes, seq: int | None = None) -> KVStore:
    kv = KVStore()
    kv.restore(None if seq is None else meta(seq), io.BytesIO(data))
    return kv


def history(seed: int, n: int = 3000) -> list[bytes | None]:
    """Log entries that exercise every path of ``apply``: registers with changing bounds
    and quota (so sessions are evicted and writes expire), puts, appends, deletes, retries,
    stale and out-of-range seqs, foreign owners, bad commands, no-ops, large values (the
    pair-by-pair batching) and a session with more than 512 results kept."""
    rng = random.Random(seed)
    ents: list[bytes | None] = [None, encode_register("big")]
    for i, size in enumerate((300_000, 1 << 20, 5, 700_000)):  # keys no later write touches
        ents.append(encode_write(1, i + 1, 1, "put", b"big%d" % i, bytes([i]) * size, "big"))
    sessions: list[tuple[int, str, int]] = []  # (id, owner, next seq)
    owners = ["", "alice", "bob"]
    keys = [b"k%d" % i for i in range(300)]
    while len(ents) < n:
        r = rng.random()
        seq = len(ents)
        if r < 0.03 or not sessions:
            owner = rng.choice(owners)
            ents.append(encode_register(owner, max_sessions=rng.choice([4, 6, 50]),
                                        max_results_total=rng.choice([40, 200, 5000]),
                                        quota_bytes=rng.choice([0, 0, 3 << 20])))
            sessions.append((seq, owner, 1))
            continue
        if r < 0.04:
            ents.append(rng.choice([None, b"\xc1garbage", msgpack.packb([1, 2])]))
            continue
        i = rng.randrange(len(sessions))
        sid, owner, nxt = sessions[i]
        if r < 0.10 and nxt > 1:  # a retry, perhaps after the result was acknowledged
            rs = rng.randrange(1, nxt)
            ents.append(encode_write(sid, rs, rs, "put", rng.choice(keys), b"retry"))
            continue
        if r < 0.12:  # another owner, or a seq far ahead
            if r < 0.11:
                ents.append(encode_write(sid, nxt + 5000, 1, "put", b"x", b"y", owner))
            else:
                ents.append(encode_write(sid, nxt, 1, "put", b"x", b"y", owner + "-not"))
            continue
        op = rng.choice(["put", "put", "append", "delete"])
        key = rng.choice(keys)
        value = None if op == "delete" else rng.randbytes(rng.choice([0, 3, 40, 200]))
        if rng.random() < 0.004:
            value = None if op == "delete" else bytes(rng.choice([300_000, 1 << 20]))
        ack = rng.randint(max(1, nxt - 20), nxt) if rng.random() < 0.9 else 1
        ents.append(encode_write(sid, nxt, ack, op, key, value, owner))
        sessions[i] = (sid, owner, nxt + 1)
    # One session that keeps more than 512 results (ack stays at 1).
    sid = len(ents)
    ents.append(encode_register("many", max_sessions=50, max_results_total=5000))
    for s in range(1, 700):
        ents.append(encode_write(sid, s, 1, "put", b"m%d" % (s % 7), b"v", "many"))
    return ents


def apply_all(kv: KVStore, ents: list[bytes | None], start: int, stop: int) -> list[Any]:
    out = []
    for lo in range(start, stop, 97):  # batches of several entries, as the node applies
        out += kv.apply(ents[lo:min(stop, lo + 97)], lo)
    return out


@pytest.fixture(scope="module")
def ents() -> list[bytes | None]:
    return history(7)


def test_history_exercises_every_path(ents):
    kv = KVStore()
    res = apply_all(kv, ents, 0, len(ents))
    codes = {r[1] if r[0] == "err" else "ok" for r in res if r is not None}
    assert {"ok", "session_expired", "not_owner", "bad_seq", "stale", "bad_command",
            "too_large"} <= codes, codes
    assert kv.duplicates > 0 and kv.expired > 0
    assert max(len(s.results) for s in kv._sessions.values()) > 512
    assert max(map(len, kv.data.values())) > 256 * 1024  # pair-by-pair batches are used


def test_restore_then_apply_equals_applying_everything(ents):
    whole = KVStore()
    whole_results = apply_all(whole, ents, 0, len(ents))
    for cut in (1, 50, 777, 1500, len(ents) // 2, len(ents) - 300, len(ents)):
        first = KVStore()
        apply_all(first, ents, 0, cut)
        data = snap_bytes(first)
        kv = restored(data, cut - 1)
        assert state(kv) == state(first)
        rest = apply_all(kv, ents, cut, len(ents))
        assert rest == whole_results[cut:], f"results differ after a restore at {cut}"
        assert state(kv) == state(whole), f"state differs after a restore at {cut}"
        # ... and so do its later snapshots, byte for byte.
        assert snap_bytes(kv) == snap_bytes(whole)


def test_two_replicas_write_identical_snapshots(ents):
    a, b = KVStore(), KVStore()
    for cut in (300, 1200, len(ents)):
        apply_all(a, ents, a.applied_seq + 1, cut)
        # b applies the same entries in other batch sizes: the bytes must not depend on it
        for lo in range(b.applied_seq + 1, cut, 13):
            b.apply(ents[lo:min(cut, lo + 13)], lo)
        sa, sb = snap_bytes(a), snap_bytes(b)
        assert sa == sb
        assert sa[:8] == SNAPSHOT_MAGIC
    # ... with the same chunks too, each of bounded size
    chunks = [bytes(c) for c in a.snapshot()]
    assert chunks == [bytes(c) for c in b.snapshot()]
    assert len(chunks) > 1 and max(map(len, chunks)) < 256 * 1024 + (1 << 20) + 8192


def test_empty_store_round_trips():
    kv = KVStore()
    data = snap_bytes(kv)
    assert state(restored(data)) == state(kv)
    kv2 = KVStore()
    kv2.apply([None, None], 0)
    assert restored(snap_bytes(kv2), 1).applied_seq == 1


def test_restore_replaces_all_state(ents):
    src = KVStore()
    apply_all(src, ents, 0, 400)
    dst = KVStore()
    apply_all(dst, ents, 0, 1500)  # further along, with other keys and sessions
    dst.data[b"only-here"] = b"x"
    dst.restore(meta(399), io.BytesIO(snap_bytes(src)))
    assert state(dst) == state(src)


def test_chunks_are_bytes_like(ents):
    kv = KVStore()
    apply_all(kv, ents, 0, 500)
    chunks = list(kv.snapshot())
    assert chunks and all(len(memoryview(c)) > 0 for c in chunks)  # as the node writes them


# --- damaged streams ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(ents) -> tuple[bytes, int]:
    kv = KVStore()
    apply_all(kv, ents, 0, 2000)
    return snap_bytes(kv), kv.applied_seq


def _target(ents) -> tuple[KVStore, dict[str, Any]]:
    kv = KVStore()
    apply_all(kv, ents, 0, 100)
    return kv, state(kv)


def test_truncated_stream_raises_and_leaves_the_store_as_it_was(ents, good):
    data, seq = good
    kv, before = _target(ents)
    rng = random.Random(3)
    cuts = {0, 1, 7, 8, 11, 12, 13, 40, len(data) - 1, len(data) - 2}
    cuts |= {rng.randrange(len(data)) for _ in range(60)}
    for cut in sorted(cuts):
        with pytest.raises(SnapshotFormatError) as e:
            kv.restore(meta(seq), io.BytesIO(data[:cut]))
        assert "KV snapshot" in str(e.value) and "left as it was" in str(e.value)
        assert isinstance(e.value, SnapshotCorruptError) and e.value.offset is not None
        assert state(kv) == before, f"a stream cut at {cut} changed the store"
    kv.restore(meta(seq), io.BytesIO(data))  # and the whole one is fine
    assert kv.applied_seq == seq


def test_garbage_and_foreign_streams_are_refused(ents, good):
    data, seq = good
    kv, before = _target(ents)
    u = msgpack.Unpacker()
    u.feed(data[12:200])
    u.unpack()
    h_end = 12 + u.tell()  # where the header ends and the first data array starts
    bad = {
        "empty": b"",
        "random": random.Random(1).randbytes(100_000),
        "a msgpack blob": msgpack.packb({b"k": b"v"}),
        "another version": data[:8] + struct.pack("<I", 2) + data[12:],
        "bytes after the end": data + b"\x00",
        "a second snapshot after the end": data + data,
        "a damaged header": data[:12] + msgpack.packb(["x"]) + data[h_end:],
        "garbage after the header": data[:h_end] + random.Random(2).randbytes(5000)
        + data[h_end + 5000:],
        "a string where the map is": data[:h_end] + msgpack.packb(["k", "v"]) + data[h_end:],
        "a huge declared array": data[:12] + b"\xdd\xff\xff\xff\xff" + data[12:],
    }
    for what, raw in bad.items():
        with pytest.raises(SnapshotFormatError, match="KV snapshot"):
            kv.restore(meta(seq), io.BytesIO(raw))
            pytest.fail(f"{what}: restored without an error")
        assert state(kv) == before, f"{what} changed the store"
    with pytest.raises(SnapshotFormatError) as e:
        kv.restore(meta(seq + 1), io.BytesIO(data))
    assert "different snapshots" in str(e.value)
    assert state(kv) == before


def test_version_is_named_in_the_error(good):
    data, seq = good
    with pytest.raises(SnapshotFormatError, match="version 9"):
        KVStore().restore(meta(seq), io.BytesIO(data[:8] + struct.pack("<I", 9) + data[12:]))


# --- capture and memory -------------------------------------------------------------------

N_BIG = 1_000_000


@pytest.fixture(scope="module")
def big() -> KVStore:
    """A million small keys (set directly: a million apply calls would take seconds) plus
    a few sessions made by applying."""
    kv = KVStore()
    kv.apply([encode_register("c", max_sessions=100, max_results_total=10_000)], 0)
    kv.apply([encode_write(0, s, 1, "put", b"s%d" % s, b"v", "c") for s in range(1, 101)], 1)
    kv.data.update((b"key%07d" % i, b"val%05d" % (i % 100_000)) for i in range(N_BIG))
    kv.data_bytes = sum(len(k) + len(v) for k, v in kv.data.items())
    return kv


def test_capture_is_quick_and_later_applies_do_not_change_it(big):
    ref = snap_bytes(big)
    t0 = time.perf_counter()
    gen = big.snapshot()
    took = time.perf_counter() - t0
    assert took < 0.5, f"capturing {N_BIG} keys took {took:.3f}s"
    it = iter(gen)
    head = [bytes(next(it)) for _ in range(3)]  # part of it written, as a node would
    seq = big.applied_seq + 1
    muts = [encode_write(0, 101, 50, "put", b"key0000000", b"changed", "c"),  # drops results
            encode_write(0, 102, 50, "append", b"key0999999", b"+", "c"),
            encode_write(0, 103, 50, "delete", b"key0500000", None, "c"),
            encode_write(0, 104, 50, "put", b"brand-new", b"x", "c"),
            encode_register("d", max_sessions=1, max_results_total=1, quota_bytes=5)]
    big.apply(muts, seq)
    assert big.data[b"key0000000"] == b"changed" and b"key0500000" not in big.data
    assert len(big._sessions) == 1  # the old session was evicted
    rest = b"".join(bytes(c) for c in it)
    assert b"".join(head) + rest == ref
    # the restored capture is the state before the applies
    kv = restored(ref)
    assert kv.data[b"key0000000"] == b"val00000" and b"brand-new" not in kv.data
    assert len(kv._sessions) == 1 and kv._max_sessions == 100 and kv.quota_bytes == 0


def test_snapshot_and_restore_never_hold_the_serialized_form(big, tmp_path):
    path = tmp_path / "snap"
    gen = big.snapshot()  # the capture (a dict copy) is not serialization: not measured
    tracemalloc.start()
    try:
        with open(path, "wb") as f:
            for chunk in gen:
                f.write(chunk)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        size = path.stat().st_size
        assert size > 20 << 20
        bound = 4 << 20
        assert write_peak < bound, f"writing {size} bytes held {write_peak} bytes at once"

        kv = KVStore()
        with open(path, "rb") as f:
            tracemalloc.start()
            kv.restore(meta(big.applied_seq), f)
            current, read_peak = tracemalloc.get_traced_memory()
        # The peak is the new state plus what was in flight; the stream's own buffers
        # must stay small against the serialized size.
        transient = read_peak - current
        assert transient < 8 << 20 < size, (
            f"restoring {size} bytes held {transient} bytes beyond the state it built")
    finally:
        tracemalloc.stop()
    assert state(kv) == state(big)
