"""``SnapshotStore``: durable snapshot files beside the log, written crash-safely.

Where
-----
The snapshots of the log ``<dir>/<name>`` live in ``<dir>/<name>.snap/`` (beside the log's
directory and ``<dir>/<name>.raftstate``). One file per snapshot, named
``<seq:016x>-<term:016x>.snap`` so that sorting the names sorts the snapshots by
``(seq, term)``. Beside them, at most transiently:

* ``<seq>-<term>.<pid>-<n>.tmp``: a snapshot being written (``SnapshotWriter``); ``open()``
  removes these, since a writer that did not finish never produced a snapshot;
* ``<seq:016x>-<term:016x>-<size:016x>-<crc:08x>.part``: a snapshot being received from the
  leader (``PartialSnapshot``). The name holds the whole ident, so a transfer resumes only
  into the very same bytes; ``open()`` keeps these (a restarted follower resumes).

File format, version 1 (little-endian where not msgpack)
--------------------------------------------------------
====== ============ ===============================================================
offset size         field
====== ============ ===============================================================
0      6            magic ``b"TPSNAP"``
6      2            u16 format version (1)
8      4            u32 ``H``: header length
12     H            header: a msgpack map with (at least) the keys ``seq``, ``term``,
                    ``size``, ``crc`` (ints), ``config`` (bin or nil: ``Config.encode()``)
                    and ``extra`` (bin). ``size`` is always encoded as a msgpack uint64
                    (``0xcf`` + 8 bytes) and ``crc`` as a uint32 (``0xce`` + 4 bytes): valid
                    msgpack, and fixed width, so ``H`` is known before the data is written.
                    Readers of version 1 ignore keys they do not know.
12+H   4            u32 CRC32C of bytes ``[0, 12+H)`` (magic, version, length, header)
16+H   ``size``     the state machine's data; its CRC32C is the header's ``crc``
====== ============ ===============================================================

The file is exactly ``16 + H + size`` bytes; anything else is damage. CRC32C is the
``crc32c`` package's convention (``tp_crc32c`` of the C core). A file whose header is
unsound (bad magic, unknown version, CRC mismatch, a seq/term that disagrees with its name,
a wrong length) is ignored by ``latest()`` and ``list()`` with a ``SnapshotWarning`` and left
in place for inspection (``python -m tinyraftplus.log snapshots DIR NAME --verify`` lists
it); the data's CRC is checked by ``verify()`` (the node does so before restoring, and a
follower before installing).

Crash safety: the order of the steps
------------------------------------
Taking a snapshot (``begin`` ... ``finish``): the data is written into a temp file at its
final offset (``16 + H``: the header's width is fixed, see above); ``finish`` writes the
header at the front, ``fdatasync``\\s the temp file, renames it to its final name, fsyncs
the directory, and only then prunes older snapshots (oldest first, then fsyncs the
directory again). A crash before the rename leaves a temp file, which ``open()`` removes; a
crash after it leaves the new file whole (its data was durable before the rename could be)
or, if the rename did not reach the disk, the previous snapshots untouched (nothing was
pruned before the directory fsync). So after any crash ``latest()`` is the new snapshot,
complete, or the previous one, never a half-written file. ``tests/test_snapshot_store.py``
checks this by enumerating the states a power loss may leave after every syscall.

Receiving a snapshot (``partial`` ... ``complete``): chunks are appended to the ``.part``
file WITHOUT an fsync per chunk (speed: a transfer is many chunks). That is safe because
nothing is taken from a partial file before ``complete()`` re-reads it and checks its header
and its data's CRC32C against the leader's ``meta.crc``; only then is it fdatasynced,
renamed into place and the directory fsynced, as above. A process crash (SIGKILL) keeps the
page cache, so the transfer resumes from the bytes held. A power loss may leave the partial
shorter than what was acknowledged (the leader resends from the offset we report) or with
garbage at its end (zero-filled pages, with a file size that reached the disk before the
data): the final CRC check catches that, the partial is deleted and the transfer restarts
from offset 0. That costs a re-send after a rare power loss; it never installs bad bytes.

``keep`` (default 2): after a snapshot is in place, the newest ``keep`` snapshots by
``(seq, term)`` are kept (the one just written always among them) and older ones deleted,
together with damaged files older than the oldest kept. A second snapshot of the same
``(seq, term)`` replaces the first (same name): readers of the replaced one get
``SnapshotGoneError``.

``fsync=False`` skips every fdatasync and directory fsync: for tests and simulations only,
where a power loss is not part of the model.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import Any, BinaryIO

import msgpack
import trio

from .._native import ffi, lib
from ..errors import (
    ClosedError,
    InvalidArgumentError,
    LogError,
    LogFullError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotGoneError,
)
from ..log import fileops
from .meta import SnapshotMeta

MAGIC = b"TPSNAP"
VERSION = 1
PREAMBLE = struct.Struct("<6sHI")  # magic, version, header length
CRC = struct.Struct("<I")
MAX_HEADER = 1 << 30  # a header length beyond this is damage, not a reason to allocate
_U64 = 1 << 64

_BUF = 1 << 20  # SnapshotWriter's buffer; writes are handed to the kernel in pieces this big
_READ = 1 << 20  # verify() reads the data in pieces this big

_FINAL_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
_PART_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{8})\.part$")
_TMP_SUFFIX = ".tmp"

_Bytes = bytes | bytearray | memoryview


class SnapshotWarning(UserWarning):
    """A snapshot file is damaged (ignored) or leftovers of an interrupted write were removed."""


# --- the format ---------------------------------------------------------------------------


def final_name(seq: int, term: int) -> str:
    return f"{seq:016x}-{term:016x}.snap"


def partial_name(meta: SnapshotMeta) -> str:
    return f"{meta.seq:016x}-{meta.term:016x}-{meta.size:016x}-{meta.crc:08x}.part"


def parse_final_name(name: str) -> tuple[int, int] | None:
    m = _FINAL_RE.match(name)
    return (int(m[1], 16), int(m[2], 16)) if m else None


def parse_partial_name(name: str) -> tuple[int, int, int, int] | None:
    m = _PART_RE.match(name)
    return (int(m[1], 16), int(m[2], 16), int(m[3], 16), int(m[4], 16)) if m else None


def crc32c(data: _Bytes, crc: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``crc`` (the ``crc32c`` package's convention)."""
    mv = memoryview(data)
    if not mv.contiguous:
        mv = memoryview(mv.tobytes())
    n = mv.nbytes
    if n == 0:
        return crc
    return int(lib.tp_crc32c(crc, ffi.from_buffer(mv), n))


def _check_meta_fields(seq: int, term: int, config: object, extra: object) -> None:
    for what, v in (("seq", seq), ("term", term)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _U64:
            raise InvalidArgumentError(f"snapshot {what} must be an int in [0, 2**64), got {v!r}")
    if config is not None and not isinstance(config, bytes):
        raise InvalidArgumentError(
            f"snapshot config must be bytes (Config.encode()) or None, got {type(config).__name__}"
        )
    if not isinstance(extra, bytes):
        raise InvalidArgumentError(f"snapshot extra must be bytes, got {type(extra).__name__}")


def encode_header(meta: SnapshotMeta) -> bytes:
    """Preamble + header + header CRC: everything before the data (``16 + H`` bytes)."""
    if not 0 <= meta.size < _U64 or not 0 <= meta.crc < (1 << 32):
        raise InvalidArgumentError(f"snapshot size/crc out of range: {meta.size}, {meta.crc}")
    pk = msgpack.packb
    body = b"".join([
        b"\x86",
        pk("seq"), pk(meta.seq),
        pk("term"), pk(meta.term),
        pk("size"), b"\xcf", meta.size.to_bytes(8, "big"),
        pk("crc"), b"\xce", meta.crc.to_bytes(4, "big"),
        pk("config"), pk(meta.config, use_bin_type=True),
        pk("extra"), pk(meta.extra, use_bin_type=True),
    ])
    head = PREAMBLE.pack(MAGIC, VERSION, len(body)) + body
    return head + CRC.pack(crc32c(head))


def _decode_body(body: bytes) -> SnapshotMeta:
    v = msgpack.unpackb(body, raw=False, strict_map_key=True)
    if not isinstance(v, dict):
        raise ValueError("the header is not a msgpack map")
    ints = []
    for k in ("seq", "term", "size", "crc"):
        x = v.get(k)
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise ValueError(f"header field {k!r} is {x!r}, not a non-negative int")
        ints.append(x)
    config, extra = v.get("config"), v.get("extra")
    if config is not None and not isinstance(config, bytes):
        raise ValueError("header field 'config' is neither bytes nor nil")
    if not isinstance(extra, bytes):
        raise ValueError("header field 'extra' is not bytes")
    return SnapshotMeta(ints[0], ints[1], ints[2], ints[3], config, extra)


@dataclass(frozen=True)
class _Header:
    meta: SnapshotMeta
    data_off: int  # 16 + H


def read_header(fd: int, path: str) -> _Header:
    """Read and check the header of an open snapshot (or partial) file; the file's size
    must be exactly ``16 + H + size``. Raises ``SnapshotCorruptError`` naming what is wrong."""
    file_size = os.fstat(fd).st_size

    def bad(what: str, offset: int) -> SnapshotCorruptError:
        return SnapshotCorruptError(
            f"snapshot file {path}: {what}; it is ignored (a newer snapshot or the leader's"
            " replaces it; delete it once inspected)",
            path=path,
            offset=offset,
        )

    pre = os.pread(fd, PREAMBLE.size, 0)
    if len(pre) < PREAMBLE.size:
        raise bad(f"{file_size} bytes, shorter than the {PREAMBLE.size}-byte preamble", 0)
    magic, version, hlen = PREAMBLE.unpack(pre)
    if magic != MAGIC:
        raise bad(f"bad magic {magic!r} (not a snapshot file)", 0)
    if version != VERSION:
        raise bad(f"format version {version}, this library reads version {VERSION}", 6)
    if hlen > MAX_HEADER or PREAMBLE.size + hlen + CRC.size > file_size:
        raise bad(f"header length {hlen} does not fit in the file ({file_size} bytes)", 8)
    rest = os.pread(fd, hlen + CRC.size, PREAMBLE.size)
    body = rest[:hlen]
    (want,) = CRC.unpack_from(rest, hlen)
    if crc32c(body, crc32c(pre)) != want:
        raise bad("header CRC32C mismatch (damaged header)", PREAMBLE.size)
    try:
        meta = _decode_body(body)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise bad(f"undecodable header ({e})", PREAMBLE.size) from None
    data_off = PREAMBLE.size + hlen + CRC.size
    if file_size != data_off + meta.size:
        raise bad(
            f"{file_size} bytes, expected {data_off + meta.size} (header {data_off} + data"
            f" {meta.size}): truncated or extended",
            min(file_size, data_off + meta.size),
        )
    return _Header(meta, data_off)


def _data_crc(fd: int, off: int, size: int) -> int:
    crc, pos = 0, 0
    buf = bytearray(min(_READ, max(size, 1)))
    mv = memoryview(buf)
    while pos < size:
        n = os.preadv(fd, [mv[: min(len(buf), size - pos)]], off + pos)
        if n <= 0:
            break
        crc = crc32c(mv[:n], crc)
        pos += n
    return crc


def check_data(fd: int, path: str, h: _Header) -> None:
    """Re-read the data and compare its CRC32C with the header's; raises on mismatch."""
    got = _data_crc(fd, h.data_off, h.meta.size)
    if got != h.meta.crc:
        raise SnapshotCorruptError(
            f"snapshot file {path}: data CRC32C {got:#010x}, header says {h.meta.crc:#010x}"
            f" ({h.meta.size} bytes at offset {h.data_off}): damaged data; it must not be"
            " restored",
            path=path,
            offset=h.data_off,
        )


@dataclass(frozen=True)
class ScanEntry:
    """One file of a snapshot directory, as ``scan`` found it (read-only)."""

    name: str
    kind: str  # "snapshot" | "partial" | "temp" | "other"
    meta: SnapshotMeta | None  # snapshots with a sound header
    error: str | None  # why a snapshot file is damaged
    ino: int = 0
    data_off: int = 0


def scan(snap_dir: str) -> list[ScanEntry]:
    """Read-only look at a snapshot directory: every file, snapshots' headers checked,
    sorted by name (so snapshots oldest first). Reads headers only, never whole files."""
    out = []
    for name in sorted(os.listdir(snap_dir)):
        path = os.path.join(snap_dir, name)
        if name.endswith(_TMP_SUFFIX):
            out.append(ScanEntry(name, "temp", None, None))
            continue
        if parse_partial_name(name) is not None:
            out.append(ScanEntry(name, "partial", None, None))
            continue
        st = parse_final_name(name)
        if st is None:
            out.append(ScanEntry(name, "other", None, None))
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            h = read_header(fd, path)
            if (h.meta.seq, h.meta.term) != st:
                raise SnapshotCorruptError(
                    f"snapshot file {path}: its header says seq {h.meta.seq} term"
                    f" {h.meta.term}, its name seq {st[0]} term {st[1]}",
                    path=path,
                    offset=PREAMBLE.size,
                )
            out.append(ScanEntry(name, "snapshot", h.meta, None, os.fstat(fd).st_ino, h.data_off))
        except SnapshotCorruptError as e:
            out.append(ScanEntry(name, "snapshot", None, str(e)))
        finally:
            os.close(fd)
    return out


# --- the store ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    meta: SnapshotMeta
    name: str
    ino: int
    data_off: int


class SnapshotStore:
    """The snapshots of one log (see the module docstring for layout, format and order).

    ``open()`` first (sync, cheap: one header read per file). Every method but ``finish``,
    ``complete`` and ``averify`` is synchronous; the blocking ones (``verify``, ``read_chunk``
    of big ranges) may be run in a worker thread by the caller; the store's bookkeeping is
    guarded by a lock. One store per directory per process (there is no lock file: the log's
    own lock keeps a second process away from the node's files).
    """

    def __init__(self, log_dir: str | os.PathLike[str], log_name: str, *, keep: int = 2,
                 fsync: bool = True) -> None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise InvalidArgumentError(f"keep must be an int >= 1, got {keep!r}")
        if not isinstance(log_name, str) or not log_name or "/" in log_name:
            raise InvalidArgumentError(f"log_name must be a plain file name, got {log_name!r}")
        self.log_dir = os.fspath(log_dir)
        self.log_name = log_name
        self.path = os.path.join(self.log_dir, log_name + ".snap")
        self.keep = keep
        self.fsync = fsync
        self._lock = threading.RLock()  # the index; held briefly, never across a syscall
        self._install_lock = threading.Lock()  # serializes installs (worker threads)
        self._entries: list[_Entry] = []  # sound snapshots, sorted by (seq, term)
        self._damaged: list[tuple[str, tuple[int, int]]] = []  # (name, (seq, term) of name)
        self._partials: dict[tuple[int, int, int, int], PartialSnapshot] = {}
        self._opened = False
        self._tmp_ids = itertools.count()

    # -- lifecycle

    def open(self) -> None:
        """Create ``<name>.snap/`` if needed (durably), remove temp files of an interrupted
        write, and index the snapshots by their headers. Damaged headers: ``SnapshotWarning``."""
        fileops.makedirs(self.path)
        if self.fsync:
            fileops.fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        removed = []
        entries, damaged = [], []
        for e in scan(self.path):
            if e.kind == "temp":
                fileops.unlink(os.path.join(self.path, e.name))
                removed.append(e.name)
            elif e.kind == "snapshot":
                if e.meta is not None:
                    entries.append(_Entry(e.meta, e.name, e.ino, e.data_off))
                else:
                    st = parse_final_name(e.name)
                    assert st is not None
                    damaged.append((e.name, st))
                    warnings.warn(f"{e.error}", SnapshotWarning, stacklevel=2)
        if removed and self.fsync:
            fileops.fsync_dir(self.path)
        if removed:
            warnings.warn(
                f"snapshot store {self.path}: removed {len(removed)} temp file(s) of a snapshot"
                f" write a crash interrupted ({', '.join(removed)})",
                SnapshotWarning,
                stacklevel=2,
            )
        entries.sort(key=lambda x: (x.meta.seq, x.meta.term))
        with self._lock:
            self._entries = entries
            self._damaged = damaged
            self._opened = True

    def close(self) -> None:
        """Close open partial files (they stay on disk for a later resume)."""
        with self._lock:
            parts = list(self._partials.values())
        for p in parts:
            p.close()

    def _need_open(self) -> None:
        if not self._opened:
            raise ClosedError(f"snapshot store {self.path}: call open() first")

    # -- reading

    def latest(self) -> SnapshotMeta | None:
        """The newest snapshot whose header is sound, or None. Its data's CRC is checked
        by ``verify`` / ``averify``."""
        self._need_open()
        with self._lock:
            return self._entries[-1].meta if self._entries else None

    def list(self) -> list[SnapshotMeta]:
        """Every snapshot with a sound header, oldest first."""
        self._need_open()
        with self._lock:
            return [e.meta for e in self._entries]

    def _file(self, meta: SnapshotMeta) -> tuple[int, str, _Header]:
        """Open the snapshot file of ``meta``: (fd, path, its header). Raises
        ``SnapshotGoneError`` if it is gone or now holds another snapshot (same seq and
        term, other bytes), ``SnapshotCorruptError`` if its header is damaged."""
        self._need_open()
        if not isinstance(meta, SnapshotMeta):
            raise InvalidArgumentError(f"expected a SnapshotMeta, got {type(meta).__name__}")
        path = os.path.join(self.path, final_name(meta.seq, meta.term))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SnapshotGoneError(
                f"snapshot seq {meta.seq} term {meta.term} is no longer stored ({path} is"
                " gone: pruned by a newer snapshot); start over from the latest one"
            ) from None
        try:
            ino = os.fstat(fd).st_ino
            with self._lock:
                known = next((e for e in self._entries if e.ino == ino), None)
            h = _Header(known.meta, known.data_off) if known else read_header(fd, path)
            if h.meta.ident != meta.ident:
                raise SnapshotGoneError(
                    f"snapshot {meta.ident} (seq, term, size, crc) is no longer stored: {path}"
                    f" now holds {h.meta.ident}; start over from the latest one"
                )
            return fd, path, h
        except BaseException:
            os.close(fd)
            raise

    def verify(self, meta: SnapshotMeta) -> None:
        """Re-read the whole file: header sound and equal to ``meta``, size and data CRC32C
        right. Raises ``SnapshotCorruptError`` (naming the file and what is wrong), or
        ``SnapshotGoneError`` if it is no longer stored. Blocking: see ``averify``."""
        fd, path, _ = self._file(meta)
        try:
            h = read_header(fd, path)  # again: the cached one is not proof of the bytes
            if h.meta != meta:
                raise SnapshotCorruptError(
                    f"snapshot file {path}: header {h.meta} differs from the expected {meta}",
                    path=path,
                    offset=PREAMBLE.size,
                )
            check_data(fd, path, h)
        finally:
            os.close(fd)

    async def averify(self, meta: SnapshotMeta) -> None:
        """``verify`` in a worker thread (the event loop keeps running)."""
        await trio.to_thread.run_sync(self.verify, meta)

    def open_data(self, meta: SnapshotMeta) -> BinaryIO:
        """A readable binary file positioned at the data; ``read(n)`` stops at its end.
        The caller closes it. The bytes are not CRC-checked here (``verify`` does that)."""
        fd, path, h = self._file(meta)
        return io.BufferedReader(_DataReader(fd, path, h.data_off, meta.size), 1 << 16)

    def read_chunk(self, meta: SnapshotMeta, offset: int, n: int) -> bytes:
        """``data[offset:offset+n]`` (shorter at the end of the data). Raises
        ``SnapshotGoneError`` if that snapshot is no longer stored."""
        if not isinstance(offset, int) or not 0 <= offset <= meta.size:
            raise InvalidArgumentError(f"offset {offset!r} outside the data [0, {meta.size}]")
        if not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(f"chunk length must be an int >= 0, got {n!r}")
        fd, path, h = self._file(meta)
        off = h.data_off
        try:
            want = min(n, meta.size - offset)
            out = os.pread(fd, want, off + offset)
            if len(out) != want:
                raise SnapshotCorruptError(
                    f"snapshot file {path}: short read at data offset {offset}",
                    path=path,
                    offset=off + offset,
                )
            return out
        finally:
            os.close(fd)

    # -- writing our own

    def begin(self, seq: int, term: int, config: bytes | None,
              extra: bytes = b"") -> SnapshotWriter:
        """Start writing a snapshot of the state through ``seq`` (of ``term``)."""
        self._need_open()
        _check_meta_fields(seq, term, config, extra)
        tmp = os.path.join(
            self.path, f"{seq:016x}-{term:016x}.{os.getpid()}-{next(self._tmp_ids)}{_TMP_SUFFIX}"
        )
        return SnapshotWriter(self, SnapshotMeta(seq, term, 0, 0, config, extra), tmp)

    def _install(self, src: str, meta: SnapshotMeta, data_off: int, fd: int) -> None:
        """In a worker thread, with ``src`` complete and checked: fdatasync, rename into
        place, fsync the directory, prune. Closes ``fd``. Installs are serialized; the
        index lock is only held for quick updates (``latest()`` never waits for a sync)."""
        with self._install_lock:
            try:
                if self.fsync:
                    fileops.fdatasync(fd)
                ino = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            name = final_name(meta.seq, meta.term)
            key = (meta.seq, meta.term)
            fileops.replace(src, os.path.join(self.path, name))
            try:
                if self.fsync:
                    fileops.fsync_dir(self.path)
            finally:  # the file is in place either way; a failed fsync still raises
                with self._lock:
                    entries = [e for e in self._entries if (e.meta.seq, e.meta.term) != key]
                    entries.append(_Entry(meta, name, ino, data_off))
                    entries.sort(key=lambda x: (x.meta.seq, x.meta.term))
                    self._entries = entries
                    self._damaged = [d for d in self._damaged if d[1] != key]
            self._prune(key)

    def _prune(self, new: tuple[int, int]) -> None:
        """Keep ``new`` and the newest ``keep - 1`` others; delete the rest, oldest first,
        and damaged files older than the oldest kept; then fsync the directory."""
        with self._lock:
            others = [e for e in self._entries if (e.meta.seq, e.meta.term) != new]
            n_drop = max(0, len(others) - (self.keep - 1))
            kept = others[n_drop:]
            floor = min([(e.meta.seq, e.meta.term) for e in kept] + [new])
            names = [e.name for e in others[:n_drop]]
            names += [n for n, st in self._damaged if st < floor]
        for n in names:
            try:
                fileops.unlink(os.path.join(self.path, n))
            except FileNotFoundError:
                pass
        if names and self.fsync:
            fileops.fsync_dir(self.path)
        gone = set(names)
        with self._lock:
            self._entries = [e for e in self._entries if e.name not in gone]
            self._damaged = [d for d in self._damaged if d[0] not in gone]

    # -- receiving from the leader

    def partial(self, meta: SnapshotMeta) -> PartialSnapshot:
        """The partial file for ``meta`` (resumed from what an earlier transfer left, else
        empty); partials of every other ident are deleted (and their objects invalidated)."""
        self._need_open()
        if not isinstance(meta, SnapshotMeta):
            raise InvalidArgumentError(f"expected a SnapshotMeta, got {type(meta).__name__}")
        _check_meta_fields(meta.seq, meta.term, meta.config, meta.extra)
        if not 0 <= meta.size < _U64 or not 0 <= meta.crc < (1 << 32):
            raise InvalidArgumentError(f"snapshot size/crc out of range: {meta}")
        with self._lock:
            cur = self._partials.get(meta.ident)
            if cur is not None and cur.open and cur.meta == meta:
                self._discard_others(meta)
                return cur
        self._discard_others(meta)
        p = PartialSnapshot(self, meta)
        with self._lock:
            self._partials[meta.ident] = p
        return p

    def discard_partials(self, keep: SnapshotMeta | None = None) -> None:
        """Delete every partial file (and invalidate its object) but that of ``keep``."""
        self._need_open()
        self._discard_others(keep)

    def _discard_others(self, keep: SnapshotMeta | None) -> None:
        with self._lock:
            drop = [
                (ident, p) for ident, p in self._partials.items()
                if keep is None or ident != keep.ident or p.meta != keep
            ]
            for ident, _ in drop:
                del self._partials[ident]
        for _, p in drop:
            p._invalidate()
        removed = False
        for name in os.listdir(self.path):
            pid = parse_partial_name(name)
            if pid is None or (keep is not None and pid == keep.ident):
                continue
            try:
                fileops.unlink(os.path.join(self.path, name))
                removed = True
            except FileNotFoundError:
                pass
        if removed and self.fsync:
            fileops.fsync_dir(self.path)

    def _forget_partial(self, p: PartialSnapshot) -> None:
        with self._lock:
            if self._partials.get(p.meta.ident) is p:
                del self._partials[p.meta.ident]

    def remove_all(self) -> None:
        """Delete every file of the store (snapshots, partials, temps); keeps the directory."""
        self._need_open()
        self.discard_partials()
        for name in os.listdir(self.path):
            fileops.unlink(os.path.join(self.path, name))
        if self.fsync:
            fileops.fsync_dir(self.path)
        with self._lock:
            self._entries = []
            self._damaged = []


class _DataReader(io.RawIOBase):
    """The data of one snapshot file, as a raw stream that ends where the data ends."""

    def __init__(self, fd: int, path: str, off: int, size: int) -> None:
        super().__init__()
        self._fd, self.name, self._off, self._size, self._pos = fd, path, off, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError("read from a closed snapshot reader")
        mv = memoryview(b).cast("B")
        n = min(len(mv), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [mv[:n]], self._off + self._pos)
        self._pos += got
        return got

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class SnapshotWriter:
    """Writes one snapshot we take ourselves: ``write`` the data (sync, buffered), then
    ``await finish()``. As a context manager it aborts (removes the temp file) when the
    block raises or ends without ``finish``."""

    def __init__(self, store: SnapshotStore, proto: SnapshotMeta, tmp: str) -> None:
        self._store = store
        self._proto = proto
        self.path = tmp
        self._data_off = len(encode_header(proto))
        self._buf = bytearray()
        self._crc = 0
        self._size = 0  # bytes handed to write()
        self._written = 0  # bytes handed to the kernel
        self._fd: int | None = fileops.open_fd(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )
        self._state = "open"  # "open" | "finishing" | "done" | "aborted"

    @property
    def size(self) -> int:
        return self._size

    def _fail(self, what: str, e: OSError) -> LogError:
        self.abort()
        msg = f"snapshot temp file {self.path}: {what} failed ({e}); the snapshot is abandoned"
        if e.errno == errno.ENOSPC:
            return LogFullError(msg + "; free disk space and take it again")
        return SnapshotError(msg)

    def _pwrite(self, data: _Bytes) -> None:
        assert self._fd is not None
        try:
            fileops.write_all(self._fd, data, self._data_off + self._written)  # type: ignore[arg-type]
        except OSError as e:
            raise self._fail("write", e) from e
        self._written += memoryview(data).nbytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (buffered; updates the running size and CRC32C)."""
        if self._state != "open":
            raise ClosedError(f"snapshot writer {self.path} is {self._state}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgumentError(f"write takes bytes, got {type(data).__name__}")
        mv = memoryview(data)
        if not mv.contiguous:
            mv = memoryview(mv.tobytes())
        mv = mv.cast("B")
        n = mv.nbytes
        self._crc = crc32c(mv, self._crc)
        self._size += n
        if len(self._buf) + n < _BUF:
            self._buf += mv
            return
        if self._buf:
            self._pwrite(self._buf)
            self._buf = bytearray()
        if n >= _BUF:
            self._pwrite(mv)
        else:
            self._buf += mv

    async def finish(self) -> SnapshotMeta:
        """Make the snapshot durable and current (header, fdatasync, rename, directory
        fsync), then prune to ``keep``. Returns its meta."""
        if self._state != "open":
            raise ClosedError(f"snapshot writer {self.path} is {self._state}")
        p = self._proto
        meta = SnapshotMeta(p.seq, p.term, self._size, self._crc, p.config, p.extra)
        head = encode_header(meta)
        assert len(head) == self._data_off
        fd, tail, tail_off = self._fd, bytes(self._buf), self._data_off + self._written
        assert fd is not None
        self._state = "finishing"
        self._fd = None
        self._buf = bytearray()
        ran = False

        def install() -> None:  # in a worker thread: the last piece, the header, then sync
            nonlocal ran
            ran = True
            try:
                if tail:
                    fileops.write_all(fd, tail, tail_off)
                fileops.write_all(fd, head, 0)
            except BaseException:
                os.close(fd)
                raise
            self._store._install(self.path, meta, self._data_off, fd)

        try:
            await trio.to_thread.run_sync(install)
        except OSError as e:
            self._state = "open"
            raise self._fail("writing, fdatasync, rename or directory fsync", e) from e
        except BaseException:  # cancelled before the thread took the file: abandon it
            self._state = "open"
            if not ran:
                self._fd = fd
            self.abort()
            raise
        self._state = "done"
        return meta

    def abort(self) -> None:
        """Remove the temp file; idempotent, and a no-op after ``finish``."""
        if self._state in ("done", "aborted"):
            return
        self._state = "aborted"
        self._buf = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            fileops.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


class PartialSnapshot:
    """A snapshot being received from the leader, in chunks (see the module docstring).

    ``offset`` is how many bytes of data are held: the resume point to report to the
    leader. ``write_at`` only ever appends at ``offset``; ``complete`` checks the CRC32C
    before the snapshot is put in place.
    """

    def __init__(self, store: SnapshotStore, meta: SnapshotMeta) -> None:
        self._store = store
        self.meta = meta
        self.path = os.path.join(store.path, partial_name(meta))
        head = encode_header(meta)
        self._data_off = len(head)
        self._gone = False
        fd = fileops.open_fd(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            file_size = os.fstat(fd).st_size
            sound = file_size >= len(head) and os.pread(fd, len(head), 0) == head
            if sound:
                held = min(file_size - len(head), meta.size)
                if file_size != len(head) + held:
                    fileops.ftruncate(fd, len(head) + held)
            else:  # new, or a header a crash damaged: start over
                if file_size:
                    fileops.ftruncate(fd, 0)
                fileops.write_all(fd, head, 0)
                held = 0
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self.offset = held

    @property
    def open(self) -> bool:
        return self._fd is not None and not self._gone

    def _need(self) -> int:
        if self._gone:
            raise SnapshotGoneError(
                f"partial snapshot {self.path} was discarded (another snapshot's transfer"
                " began, or discard_partials); start a new transfer"
            )
        if self._fd is None:
            raise ClosedError(f"partial snapshot {self.path} is closed")
        return self._fd

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` if ``offset`` is where the data held ends; else write nothing.
        Returns the new (or unchanged) ``offset``: the leader resends from there. Raises
        ``InvalidArgumentError`` if the data would run past ``meta.size``."""
        fd = self._need()
        if not isinstance(offset, int) or offset < 0:
            raise InvalidArgumentError(f"chunk offset must be an int >= 0, got {offset!r}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgumentError(f"chunk data must be bytes, got {type(data).__name__}")
        if offset != self.offset:
            return self.offset
        n = memoryview(data).nbytes
        if offset + n > self.meta.size:
            raise InvalidArgumentError(
                f"chunk [{offset}, {offset + n}) runs past the snapshot's size {self.meta.size}"
                f" ({self.path})"
            )
        try:
            fileops.write_all(fd, data, self._data_off + offset)  # type: ignore[arg-type]
        except OSError as e:
            msg = f"partial snapshot {self.path}: write at data offset {offset} failed ({e})"
            if e.errno == errno.ENOSPC:
                raise LogFullError(msg + "; free disk space") from e
            raise SnapshotError(msg) from e
        self.offset = offset + n
        return self.offset

    async def complete(self) -> SnapshotMeta:
        """All data held: check header and data CRC32C (a mismatch deletes the partial and
        raises ``SnapshotCorruptError``: restart the transfer from 0), then fdatasync,
        rename into place, fsync the directory and prune. Returns ``meta``."""
        fd = self._need()
        if self.offset != self.meta.size:
            raise InvalidArgumentError(
                f"partial snapshot {self.path}: holds {self.offset} of {self.meta.size} bytes;"
                " complete() needs all of them"
            )
        self._fd = None
        ran = False

        def run() -> None:
            nonlocal ran
            ran = True
            self._complete_sync(fd)

        try:
            await trio.to_thread.run_sync(run)
        except SnapshotCorruptError:
            self._store._forget_partial(self)
            raise
        except OSError as e:
            self._store._forget_partial(self)
            raise SnapshotError(
                f"partial snapshot {self.path}: installing failed ({e}); resume with"
                " store.partial(meta)"
            ) from e
        except BaseException:
            if not ran:  # cancelled before the thread took the file: still usable
                self._fd = fd
            else:
                self._store._forget_partial(self)
            raise
        self._store._forget_partial(self)
        return self.meta

    def _complete_sync(self, fd: int) -> None:
        try:
            h = read_header(fd, self.path)
            if h.meta != self.meta:
                raise SnapshotCorruptError(
                    f"partial snapshot {self.path}: header {h.meta} differs from {self.meta}",
                    path=self.path,
                    offset=PREAMBLE.size,
                )
            check_data(fd, self.path, h)
        except SnapshotCorruptError:
            os.close(fd)
            self._gone = True
            try:
                fileops.unlink(self.path)
            except FileNotFoundError:
                pass
            raise
        except BaseException:
            os.close(fd)
            raise
        self._store._install(self.path, self.meta, self._data_off, fd)
        self._gone = True

    def close(self) -> None:
        """Close the file; it stays for a later resume (``store.partial(meta)``)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._store._forget_partial(self)

    def discard(self) -> None:
        """Close and delete the partial file."""
        self._invalidate()
        self._store._forget_partial(self)

    def _invalidate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._gone:
            self._gone = True
            try:
                fileops.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> PartialSnapshot:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = [
    "SnapshotStore",
    "SnapshotWriter",
    "PartialSnapshot",
    "SnapshotWarning",
    "scan",
    "ScanEntry",
    "encode_header",
    "read_header",
    "final_name",
    "partial_name",
    "crc32c",
]
