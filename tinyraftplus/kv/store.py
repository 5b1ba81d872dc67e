"""The example replicated key-value store: a deterministic state machine with client sessions.

Theory of operation
-------------------
Keys and values are ``bytes``. Every write travels through the Raft log as one msgpack
*command* ``[client_id, seq, ack, op, key, value, owner]`` (:func:`encode_write`), and every node
applies the same commands in the same order, so every replica reaches the same state.

**Exactly once.** A client that does not hear back (its connection broke, the leader changed,
the answer was slow) sends the same request again, perhaps to another node; both copies may
end up committed. The store therefore keeps a *session* per client (Raft dissertation,
section 6.3): the result of each request it applied, by ``seq``. A request whose result is
already there is not applied again; its first result is returned instead. Because a client
may have many requests in flight, which can commit in any order, a session keeps one result
per outstanding request, not only the last one; ``ack`` (the client's lowest seq still
waiting for an answer) tells the store which results the client no longer needs. A command
with ``seq < ack`` seen earlier is one the client has given up on: it is refused rather than
applied late (``stale``).

**Sessions are registered, owned and bounded.** A client starts with a *register* command
(:func:`encode_register`); its session id is the log seq of that command, so ids are unique
and increase, and an id below the current seq that the store does not hold is one it has
*forgotten*. Sessions are bounded (``max_sessions``, least recently used out, and
``max_results_total`` results over all sessions, the oldest sessions out first): a write for a
forgotten session is refused with ``session_expired`` and never applied -- it may be a late
retry of a write applied before the session was evicted, and applying it again is what
exactly-once forbids -- and the client must register again. The bounds travel in each
register command (the leader's settings), so every replica evicts the same sessions at the
same entry whatever its own command line says. A session belongs to the *owner* named at
registration (the server puts the client certificate's identity there): a write naming it
from another owner is refused (``not_owner``). Seqs must stay within ``max_results`` of the
session's oldest unacknowledged seq (``bad_seq`` otherwise, and the session is left as it
was), so one bad request cannot move a session's floor out of reach. Commands of the older
six-field form (client-chosen ids, no registration, in logs written before this) are replayed
as they were then applied, sessions made on demand; servers no longer write them.

Everything a session does depends only on the commands in the log, never on clocks or on
which node applies them, so sessions are replicated state like the data: a retry that lands
on a new leader is recognised there too.

**Results** are tuples, because ``apply`` must never raise (a state machine that raises
stops the node): ``("ok", value)`` or ``("err", code, message)``. ``put`` gives the log seq it
was applied at (the key's revision), ``append`` the value's new length, ``delete`` whether the
key existed. A malformed command in the log (written by hand through the library) gives
``("err", "bad_command", ...)`` on every node alike.

The store lives in memory. A node rebuilds it from its newest snapshot plus the log after
it (``RaftNode(snapshot=store.snapshot, restore=store.restore)``), or from the whole log when
there is no snapshot.

**Snapshots** (:meth:`KVStore.snapshot`, :meth:`KVStore.restore`). ``snapshot()`` *captures*
the state in O(n) pointer copies (the map's ``dict.copy()``, each session's keys and results
as lists; keys, values and results are immutable, so nothing deeper is copied) and returns a
generator that serializes the captured view in chunks of about ``SNAPSHOT_CHUNK`` bytes while
applying goes on; the serialized form never exists whole in memory. ``restore`` reads the
stream in pieces (``msgpack.Unpacker`` over the file object, at most a few MiB buffered).
Everything ``apply`` changes travels: the map, every session (owner, floor, results in their
order), the bounds and quota the register commands set, the counters, the applied seq.

Format, version 1 (little-endian)::

    magic   8 bytes  b"TPKVSNAP"
    version u32      1
    then msgpack objects, one after the other:
    header  [applied_seq, n_keys, n_sessions, max_sessions, max_results_total,
             quota_bytes, duplicates, expired]
    data    arrays [k1, v1, k2, v2, ...] (bin), the map in insertion order, each array up
            to 4096 pairs or about 256 KiB, until n_keys pairs were read
    per session, in least-recently-used-first order:
            [session_id, owner, floor, n_results], then arrays
            [rseq1, result1, rseq2, result2, ...] of up to 512 results, in their order
            (a result is an array: ["ok", value] or ["err", code, message])
    trailer [n_keys, n_sessions, data_bytes]
    nothing after it

The bytes depend only on the entries applied: a dict's insertion order and the sessions'
LRU order are fixed by the command sequence, and the batch boundaries by the data, so two
replicas that applied the same entries write byte-identical snapshots (a transfer resumes
across a leader change only if the new leader's snapshot has the same CRC), and a store
restored from a snapshot keeps those orders, so its later snapshots match too.
"""

from __future__ import annotations

import itertools
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack

from ..errors import InvalidArgumentError, SnapshotCorruptError

OPS = ("put", "append", "delete")
MAX_KEY = 4096
"""Largest key in bytes."""
MAX_VALUE = 1 << 20
"""Largest value in bytes (an append that would make a value larger is refused)."""
MAX_CLIENT_ID = (1 << 63) - 1

Result = tuple[Any, ...]


MAX_OWNER = 1024
"""Longest owner identity (a certificate name) in characters."""
DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_MAX_RESULTS = 4096
DEFAULT_MAX_RESULTS_TOTAL = 1 << 20
"""Results kept over all sessions (each costs about 200 bytes: ~200 MiB in all)."""


SNAPSHOT_MAGIC = b"TPKVSNAP"
SNAPSHOT_VERSION = 1
_PREFIX = struct.Struct("<8sI")
SNAPSHOT_CHUNK = 256 * 1024
"""About how many bytes each chunk of :meth:`KVStore.snapshot`'s stream holds."""
_BATCH_PAIRS = 4096  # key/value pairs per data array at most
_BATCH_BYTES = 256 * 1024  # bytes of keys and values per data array, about
_GROUP = 256  # pairs taken from the map at once (then split if they are large)
_RESULTS_BATCH = 512  # results per array
_READ_SIZE = 256 * 1024  # bytes restore reads at once
_MAX_OBJECT = 8 << 20  # largest msgpack object restore accepts (a data array is <= ~1.3 MiB)


class SnapshotFormatError(SnapshotCorruptError):
    """The stream given to :meth:`KVStore.restore` is not a whole key-value snapshot this
    code reads: truncated, damaged, of another version, or not a KV snapshot at all.
    ``offset`` is where in the snapshot's data the problem was found, ``path`` the file (when
    the stream has a name). The store is left as it was."""


def encode_write(client_id: int, seq: int, ack: int, op: str, key: bytes,
                 value: bytes | None, owner: str = "") -> bytes:
    """The log command for one write in session ``client_id`` (from :func:`encode_register`),
    on behalf of ``owner``. Raises ``InvalidArgumentError`` for a request the store would
    refuse (so the mistake shows at the caller, not as an error result later)."""
    check_write(client_id, seq, ack, op, key, value)
    check_owner(owner)
    return msgpack.packb([client_id, seq, ack, op, key, value, owner], use_bin_type=True)


def encode_register(owner: str = "", *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                    max_results_total: int = DEFAULT_MAX_RESULTS_TOTAL,
                    quota_bytes: int = 0) -> bytes:
    """The log command that opens a session for ``owner``; its result is ``("ok", id)``, the
    session id (the command's log seq). The bounds (and the store's quota, 0 for none) are
    those the store applies from this entry on: carried in the log so that every replica
    decides alike."""
    check_owner(owner)
    for name, v in (("max_sessions", max_sessions), ("max_results_total", max_results_total)):
        if type(v) is not int or not 1 <= v <= MAX_CLIENT_ID:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")
    if type(quota_bytes) is not int or not 0 <= quota_bytes <= MAX_CLIENT_ID:
        raise InvalidArgumentError(f"quota_bytes must be an int >= 0, got {quota_bytes!r}")
    return msgpack.packb(["register", owner, max_sessions, max_results_total, quota_bytes],
                         use_bin_type=True)


def check_owner(owner: Any) -> None:
    if type(owner) is not str or len(owner) > MAX_OWNER:
        raise InvalidArgumentError(f"an owner must be a str of at most {MAX_OWNER} characters")


def check_write(client_id: Any, seq: Any, ack: Any, op: Any, key: Any, value: Any) -> None:
    """Raise ``InvalidArgumentError`` unless the fields make a valid write."""
    if type(client_id) is not int or not 0 <= client_id <= MAX_CLIENT_ID:
        raise InvalidArgumentError(f"client_id must be an int in [0, 2**63), got {client_id!r}")
    if type(seq) is not int or not 1 <= seq <= MAX_CLIENT_ID:
        raise InvalidArgumentError(f"request seq must be an int >= 1, got {seq!r}")
    if type(ack) is not int or not 1 <= ack <= seq:
        raise InvalidArgumentError(f"ack must be an int in [1, seq={seq}], got {ack!r}")
    if op not in OPS or type(op) is not str:
        raise InvalidArgumentError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    check_key(key)
    if op == "delete":
        if value is not None:
            raise InvalidArgumentError("delete takes no value")
    elif type(value) is not bytes or len(value) > MAX_VALUE:
        raise InvalidArgumentError(
            f"{op} needs a bytes value of at most {MAX_VALUE} bytes, got "
            f"{type(value).__name__}{'' if type(value) is not bytes else f' of {len(value)}'}"
        )


def check_key(key: Any) -> None:
    if type(key) is not bytes or not 0 < len(key) <= MAX_KEY:
        raise InvalidArgumentError(
            f"a key must be 1..{MAX_KEY} bytes, got {type(key).__name__}"
            f"{f' of {len(key)} bytes' if type(key) is bytes else ''}"
        )


class _Session:
    __slots__ = ("floor", "results", "owner")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.floor = 1  # requests below this are done with: their results may be forgotten
        self.results: OrderedDict[int, Result] = OrderedDict()


class KVStore:
    """The state machine: ``RaftNode(..., apply=kv.apply, read=kv.read,
    snapshot=kv.snapshot, restore=kv.restore)``.

    ``read(("get", key))`` returns the value or ``None``; ``read(("len",))`` the number of
    keys; ``read(("sessions",))`` the number of client sessions.

    ``max_sessions`` and ``max_results_total`` are the bounds until the first register
    command in the log sets them (see the module docstring); ``max_results`` is the most
    results one session keeps and how far its seqs may run ahead of its oldest unanswered one.
    """

    def __init__(self, *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_results: int = DEFAULT_MAX_RESULTS,
                 max_results_total: int = DEFAULT_MAX_RESULTS_TOTAL) -> None:
        if max_sessions < 1 or max_results < 1 or max_results_total < 1:
            raise InvalidArgumentError(
                "KVStore: max_sessions, max_results and max_results_total must be >= 1")
        self.data: dict[bytes, bytes] = {}
        self.applied_seq = -1
        self.duplicates = 0
        """Requests recognised as retries of ones already applied (not applied again)."""
        self.expired = 0
        """Writes refused because their session had been evicted."""
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._max_sessions = max_sessions
        self._max_results = max_results
        self._max_results_total = max_results_total
        self._results_total = 0
        self.data_bytes = 0
        """Bytes of keys and values held."""
        self.quota_bytes = 0
        """Most bytes of keys and values (0: none); set by register commands."""

    # --- RaftNode's state machine interface ----------------------------------------------

    def apply(self, bufs: list[bytes | None], seq: int) -> list[Result | None]:
        out: list[Result | None] = []
        for i, buf in enumerate(bufs):
            out.append(None if buf is None else self._apply_one(buf, seq + i))
        self.applied_seq = seq + len(bufs) - 1
        return out

    def read(self, cmd: Any) -> Any:
        if isinstance(cmd, tuple) and cmd:
            if cmd[0] == "get" and len(cmd) == 2:
                return self.data.get(cmd[1])
            if cmd[0] == "len":
                return len(self.data)
            if cmd[0] == "sessions":
                return len(self._sessions)
        raise InvalidArgumentError(f"KVStore.read: unknown query {cmd!r}")

    # --- snapshots (RaftNode's snapshot= and restore=) -----------------------------------

    def snapshot(self) -> Iterator[bytearray]:
        """Capture the state now and return a generator of the snapshot's bytes (chunks of
        about ``SNAPSHOT_CHUNK``; format in the module docstring).

        The capture is O(n) pointer copies and no serialization (about 50 ms for a million
        keys); applying may go on while the generator runs, and never changes what it
        yields. Call it between applies (RaftNode does, right after applying through the
        snapshot's seq)."""
        data = self.data.copy()
        sessions = [(sid, s.owner, s.floor, list(s.results), list(s.results.values()))
                    for sid, s in self._sessions.items()]
        header = [self.applied_seq, len(data), len(sessions), self._max_sessions,
                  self._max_results_total, self.quota_bytes, self.duplicates, self.expired]
        trailer = [len(data), len(sessions), self.data_bytes]
        return _serialize(header, data, sessions, trailer)

    def restore(self, meta: Any, stream: BinaryIO) -> None:
        """Replace the whole state with the snapshot read from ``stream`` (a binary file
        object; ``read(n)`` returns ``b""`` at its end), made by :meth:`snapshot` after
        applying through ``meta.seq`` (``meta`` a ``SnapshotMeta``, or ``None`` to trust the
        snapshot's own seq).

        The stream is read in pieces of ``256 KiB`` (msgpack objects of at most 8 MiB are
        buffered), so memory holds the new state, not its serialized form. The new state is
        built beside the old one and swapped in only once the stream was read to its end and
        every count and total checked: a truncated, damaged or foreign stream raises
        :class:`SnapshotFormatError` and leaves the store exactly as it was (old and new state
        are both in memory for the duration). ``OSError`` from ``stream.read`` propagates."""
        st = _deserialize(stream, getattr(stream, "name", None))
        if meta is not None and getattr(meta, "seq", st.applied_seq) != st.applied_seq:
            raise SnapshotFormatError(
                f"KV snapshot: the data holds the state after seq {st.applied_seq} but its "
                f"metadata says seq {meta.seq}: data and metadata belong to different "
                f"snapshots; the store was left as it was")
        self.data = st.data
        self._sessions = st.sessions
        self._results_total = st.results_total
        self.data_bytes = st.data_bytes
        self._max_sessions = st.max_sessions
        self._max_results_total = st.max_results_total
        self.quota_bytes = st.quota_bytes
        self.duplicates = st.duplicates
        self.expired = st.expired
        self.applied_seq = st.applied_seq

    # --- applying ------------------------------------------------------------------------

    def _apply_one(self, buf: bytes, seq: int) -> Result:
        try:
            cmd = msgpack.unpackb(buf, raw=False, max_array_len=8, max_map_len=0)
            if type(cmd) is list and len(cmd) == 5 and cmd[0] == "register":
                _, owner, max_sessions, max_total, quota = cmd
                encode_register(owner, max_sessions=max_sessions, max_results_total=max_total,
                                quota_bytes=quota)
                self.quota_bytes = quota
                return self._register(owner, max_sessions, max_total, seq)
            if type(cmd) is not list or len(cmd) not in (6, 7):
                raise InvalidArgumentError("not a [client, seq, ack, op, key, value, owner] "
                                           "array")
            client_id, rseq, ack, op, key, value = cmd[:6]
            owner = cmd[6] if len(cmd) == 7 else ""
            check_write(client_id, rseq, ack, op, key, value)
            check_owner(owner)
        except Exception as e:  # never raise from apply: every replica returns the same error
            return ("err", "bad_command", f"seq {seq}: not a key-value command "
                    f"({type(e).__name__}: {str(e)[:200]})")
        sess = self._sessions.get(client_id)
        if sess is None and len(cmd) == 6:
            # A command written before sessions were registered (an older server's log):
            # replayed as it was applied then, its session made on demand, so that an
            # upgraded node rebuilds the same data. Servers no longer write this form.
            sess = self._sessions[client_id] = _Session("")
        if sess is None:
            self.expired += 1
            return ("err", "session_expired",
                    f"session {client_id} is not known here: it was evicted (the store keeps "
                    f"{self._max_sessions} sessions and {self._max_results_total} results, "
                    f"least recently used out) or never registered. Request {rseq} was not "
                    f"applied now; if it was sent before, it may have been applied then. "
                    f"Register a new session")
        if sess.owner != owner:
            return ("err", "not_owner",
                    f"session {client_id} belongs to another client identity; not applied")
        if rseq >= sess.floor + self._max_results:
            return ("err", "bad_seq",
                    f"request {rseq} of session {client_id} is {self._max_results} or more "
                    f"past its oldest unacknowledged request ({sess.floor}); not applied")
        self._sessions.move_to_end(client_id)
        if ack > sess.floor:
            sess.floor = ack
            res = sess.results
            while res and next(iter(res)) < ack:
                res.popitem(last=False)
                self._results_total -= 1
        done = sess.results.get(rseq)
        if done is not None:
            self.duplicates += 1
            return done
        if rseq < sess.floor:
            return ("err", "stale",
                    f"request {rseq} of client {client_id} arrived after the client gave up "
                    f"on it (it acknowledged everything below {sess.floor}); not applied")
        result = self._do(op, key, value, seq)
        sess.results[rseq] = result
        self._results_total += 1
        if len(sess.results) > self._max_results:
            # Commands commit in any order, so the oldest kept result is the smallest seq
            # only approximately; dropping by insertion order is deterministic either way.
            sess.results.popitem(last=False)
            self._results_total -= 1
        self._evict(keep=client_id)
        return result

    def _register(self, owner: str, max_sessions: int, max_total: int, seq: int) -> Result:
        self._max_sessions = max_sessions
        self._max_results_total = max_total
        self._sessions[seq] = _Session(owner)
        self._evict(keep=seq)
        return ("ok", seq)

    def _evict(self, keep: int) -> None:
        """Drop least recently used sessions while over a bound (never ``keep``, the one
        in use)."""
        sessions = self._sessions
        while (len(sessions) > self._max_sessions
               or self._results_total > self._max_results_total) and len(sessions) > 1:
            sid = next(iter(sessions))
            if sid == keep:
                sessions.move_to_end(sid)
                continue
            self._results_total -= len(sessions.pop(sid).results)

    def _do(self, op: str, key: bytes, value: bytes | None, seq: int) -> Result:
        data = self.data
        old = data.get(key)
        before = 0 if old is None else len(key) + len(old)
        if op == "delete":
            if old is not None:
                del data[key]
                self.data_bytes -= before
            return ("ok", old is not None)
        assert value is not None
        new = value if op == "put" or old is None else old + value
        if len(new) > MAX_VALUE:
            return ("err", "too_large",
                    f"append would make the value {len(new)} bytes, over the limit of "
                    f"{MAX_VALUE}; not applied")
        grown = self.data_bytes - before + len(key) + len(new)
        if self.quota_bytes and grown > self.quota_bytes and grown > self.data_bytes:
            return ("err", "no_space",
                    f"the store holds {self.data_bytes} bytes and this {op} would make it "
                    f"{grown}, over its quota of {self.quota_bytes} (--quota-bytes); delete "
                    f"keys or raise the quota. Not applied")
        data[key] = new
        self.data_bytes = grown
        return ("ok", seq if op == "put" else len(new))


def _data_batches(data: dict[bytes, bytes]) -> Iterator[list[bytes]]:
    """The map as flat ``[k1, v1, k2, v2, ...]`` lists in insertion order, each of at most
    ``_BATCH_PAIRS`` pairs and about ``_BATCH_BYTES`` (a single larger pair goes alone). The
    boundaries depend only on the data, so the bytes are the same on every replica."""
    items = iter(data.items())
    batch: list[bytes] = []
    size = 0
    while True:
        group = list(itertools.islice(items, _GROUP))
        if not group:
            break
        flat = list(itertools.chain.from_iterable(group))
        gsize = sum(map(len, flat))
        if gsize <= _BATCH_BYTES:  # the common case: small pairs, taken 256 at a time
            if batch and (size + gsize > _BATCH_BYTES or len(batch) + len(flat)
                          > 2 * _BATCH_PAIRS):
                yield batch
                batch, size = [], 0
            batch += flat
            size += gsize
            continue
        for k, v in group:  # large values: pair by pair
            n = len(k) + len(v)
            if batch and (size + n > _BATCH_BYTES or len(batch) >= 2 * _BATCH_PAIRS):
                yield batch
                batch, size = [], 0
            batch += (k, v)
            size += n
    if batch:
        yield batch


def _serialize(header: list[int], data: dict[bytes, bytes],
               sessions: list[tuple[int, str, int, list[int], list[Result]]],
               trailer: list[int]) -> Iterator[bytearray]:
    pack = msgpack.Packer(use_bin_type=True).pack
    buf = bytearray(_PREFIX.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION))
    buf += pack(header)
    for batch in _data_batches(data):
        buf += pack(batch)
        if len(buf) >= SNAPSHOT_CHUNK:
            yield buf
            buf = bytearray()
    for sid, owner, floor, rseqs, results in sessions:
        buf += pack([sid, owner, floor, len(rseqs)])
        for i in range(0, len(rseqs), _RESULTS_BATCH):
            buf += pack(list(itertools.chain.from_iterable(
                zip(rseqs[i:i + _RESULTS_BATCH], results[i:i + _RESULTS_BATCH],
                    strict=True))))
        if len(buf) >= SNAPSHOT_CHUNK:
            yield buf
            buf = bytearray()
    buf += pack(trailer)
    yield buf


class _CountingReader:
    """``read`` that counts what it handed out (to tell trailing bytes after the end)."""

    __slots__ = ("stream", "count")

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.stream.read(n)
        self.count += len(b)
        return b


@dataclass
class _Restored:
    applied_seq: int
    data: dict[bytes, bytes]
    data_bytes: int
    sessions: OrderedDict[int, _Session]
    results_total: int
    max_sessions: int
    max_results_total: int
    quota_bytes: int
    duplicates: int
    expired: int


def _is_count(v: Any, lo: int = 0) -> bool:
    return type(v) is int and lo <= v <= MAX_CLIENT_ID


def _deserialize(stream: BinaryIO, path: Any) -> _Restored:
    """Read a whole snapshot (format: the module docstring); raises ``SnapshotFormatError``."""
    where_file = f" {path}" if isinstance(path, str) else ""

    def bad(what: str, offset: int) -> SnapshotFormatError:
        return SnapshotFormatError(
            f"KV snapshot{where_file}, data byte {offset}: {what}; the store was left as it "
            f"was. The snapshot is damaged, truncated or was not written by KVStore.snapshot: "
            f"restore another one, or let the node fetch one from the leader",
            path=path if isinstance(path, str) else None, offset=offset)

    prefix = stream.read(_PREFIX.size)
    while 0 < len(prefix) < _PREFIX.size:  # a file object may return short reads
        more = stream.read(_PREFIX.size - len(prefix))
        if not more:
            break
        prefix += more
    if len(prefix) < _PREFIX.size or prefix[:8] != SNAPSHOT_MAGIC:
        raise bad(f"it does not start with {SNAPSHOT_MAGIC!r} (it starts with "
                  f"{bytes(prefix[:8])!r}): not a key-value store snapshot", 0)
    (version,) = struct.unpack_from("<I", prefix, 8)
    if version != SNAPSHOT_VERSION:
        raise bad(f"format version {version}, this code reads version {SNAPSHOT_VERSION} "
                  f"(a snapshot from a newer tinyraftplus: upgrade this node)", 8)
    reader = _CountingReader(stream)
    u = msgpack.Unpacker(reader, read_size=_READ_SIZE, max_buffer_size=_MAX_OBJECT,
                         raw=False, use_list=False, max_map_len=0, max_ext_len=0,
                         max_bin_len=MAX_VALUE, max_str_len=1 << 16,
                         max_array_len=2 * _BATCH_PAIRS)

    def nxt(what: str) -> Any:
        try:
            return u.unpack()
        except msgpack.OutOfData:
            raise bad(f"the stream ends in or before {what} (truncated)",
                      _PREFIX.size + reader.count) from None
        except (ValueError, msgpack.UnpackException) as e:
            raise bad(f"not valid msgpack in {what} ({type(e).__name__}: {e})",
                      _PREFIX.size + u.tell()) from None

    def where() -> int:
        return _PREFIX.size + u.tell()

    h = nxt("the header")
    if (type(h) is not tuple or len(h) != 8 or type(h[0]) is not int or h[0] < -1
            or not all(_is_count(v) for v in h[1:])):
        raise bad(f"the header is not [applied_seq, n_keys, n_sessions, max_sessions, "
                  f"max_results_total, quota_bytes, duplicates, expired]: {h!r:.200}", where())
    applied_seq, n_keys, n_sessions, max_sessions, max_total, quota, duplicates, expired = h

    data: dict[bytes, bytes] = {}
    pairs = nbytes = 0
    while pairs < n_keys:
        b = nxt(f"the map (after {pairs} of {n_keys} keys)")
        if (type(b) is not tuple or not b or len(b) % 2 or len(b) // 2 > n_keys - pairs
                or set(map(type, b)) != {bytes}):
            raise bad(f"expected an array of key/value pairs (bin) holding at most the "
                      f"{n_keys - pairs} keys still due, got {type(b).__name__}", where())
        it = iter(b)
        data.update(zip(it, it, strict=True))
        pairs += len(b) // 2
        nbytes += sum(map(len, b))
    if len(data) != n_keys:
        raise bad(f"{n_keys - len(data)} keys appear twice in the map", where())

    sessions: OrderedDict[int, _Session] = OrderedDict()
    results_total = 0
    for i in range(n_sessions):
        rec = nxt(f"session {i} of {n_sessions}")
        if (type(rec) is not tuple or len(rec) != 4 or not _is_count(rec[0])
                or type(rec[1]) is not str or not _is_count(rec[2], 1)
                or not _is_count(rec[3])):
            raise bad(f"session {i}: expected [id, owner, floor, n_results], got "
                      f"{rec!r:.200}", where())
        sid, owner, floor, n = rec
        if sid in sessions:
            raise bad(f"session {sid} appears twice", where())
        sess = sessions[sid] = _Session(owner)
        sess.floor = floor
        res = sess.results
        got = 0
        while got < n:
            b = nxt(f"the results of session {sid}")
            if type(b) is not tuple or not b or len(b) % 2 or len(b) // 2 > n - got:
                raise bad(f"session {sid}: expected an array of at most {n - got} "
                          f"(seq, result) pairs", where())
            it = iter(b)
            for rseq, r in zip(it, it, strict=True):
                if (not _is_count(rseq, 1) or type(r) is not tuple or not r
                        or r[0] not in ("ok", "err")):
                    raise bad(f"session {sid}: {rseq!r:.50} -> {r!r:.100} is not a request "
                              f"seq and its result", where())
                res[rseq] = r
            got += len(b) // 2
        if len(res) != n:
            raise bad(f"session {sid}: a request seq appears twice", where())
        results_total += n

    t = nxt("the trailer")
    if t != (n_keys, n_sessions, nbytes):
        raise bad(f"the trailer {t!r:.100} does not match what was read (keys, sessions, "
                  f"bytes of keys and values: {(n_keys, n_sessions, nbytes)})", where())
    end = where()
    if reader.count > u.tell() or stream.read(1):
        raise bad("bytes follow the trailer (the end of the snapshot)", end)
    return _Restored(applied_seq, data, nbytes, sessions, results_total, max_sessions,
                     max_total, quota, duplicates, expired)


__all__ = ["KVStore", "SnapshotFormatError", "SNAPSHOT_MAGIC", "SNAPSHOT_VERSION",
           "SNAPSHOT_CHUNK", "encode_write", "encode_register", "check_write", "check_key",
           "check_owner", "OPS", "MAX_KEY", "MAX_VALUE"]
