"""One segment file: its header, its record offsets (loaded lazily from the ``.idx``
cache for sealed segments), the recovery scan and verified range reads.

Blocking here is bounded: header reads are 48 bytes, index headers a few KiB; scans and
large reads are called through ``trio.to_thread`` by ``FsLog`` where they can be large.
"""

from __future__ import annotations

import contextlib
import os
import threading
from array import array
from collections.abc import Iterator
from itertools import count, repeat
from typing import NamedTuple

from .._native import ffi, lib
from ..entry import Entry
from ..errors import LogCorruptError
from . import fileops
from . import format as fmt
from ._codes import corrupt
from .fileops import fsync_dir

_U64 = ffi.sizeof("uint64_t")
_ZEROS = bytes(_U64)


def encode_seg_header(first_seq: int, prev_term: int) -> bytes:
    out = ffi.new("uint8_t[]", fmt.SEG_HDR)
    lib.tp_seg_header_encode(out, first_seq, prev_term)
    return bytes(ffi.buffer(out))


def decode_seg_header(data: bytes) -> tuple[int, int] | int:
    """(first_seq, prev_term), or a TP_E* code."""
    first = ffi.new("uint64_t*")
    prev = ffi.new("uint64_t*")
    rc = lib.tp_seg_header_decode(data, len(data), first, prev)
    return rc if rc else (first[0], prev[0])


class ScanResult(NamedTuple):
    offs: array  # array('Q') of record offsets (empty if not requested)
    n: int
    runs: list[tuple[int, int]]
    n_commit: int
    commit_end: int
    end: int
    file_size: int
    status: int
    reason: int
    bad_off: int
    resync_off: int


def scan_fd(fd: int, first_seq: int, want_offs: bool = True) -> ScanResult:
    """Run the C recovery scan over a whole segment (blocking; call from a thread)."""
    s = ffi.new("tp_scan*")
    rc = lib.tp_scan_segment(fd, fmt.SEG_HDR, first_seq, 1 if want_offs else 0, s)
    if rc:
        raise OSError(-rc, os.strerror(-rc))
    try:
        offs = array("Q")
        if want_offs and s.n:
            offs.frombytes(ffi.buffer(s.offs, s.n * _U64))
        runs = [(s.run_seq[i], s.run_term[i]) for i in range(s.nruns)]
        return ScanResult(
            offs,
            s.n,
            runs,
            s.n_commit,
            s.commit_end,
            s.end,
            s.file_size,
            s.status,
            s.reason,
            s.bad_off,
            s.resync_off,
        )
    finally:
        lib.tp_scan_release(s)


class Segment:
    """In-memory state of one segment file.

    ``count``/``end`` describe durable records only; ``write_end`` also counts bytes framed
    into rounds that are not yet written (the tail only). ``offs`` is None for a sealed
    segment until first read.
    """

    __slots__ = (
        "dir",
        "first_seq",
        "prev_term",
        "path",
        "idx_path",
        "fd",
        "offs",
        "count",
        "end",
        "write_end",
        "created",
        "idx_offsets_at",
        "idx_offsets_crc",
        "runs_from_scan",
        "fd_lock",
        "synced_end",
        "alloc_end",
    )

    def __init__(self, dir: str, first_seq: int, prev_term: int = 0) -> None:
        self.dir = dir
        self.first_seq = first_seq
        self.prev_term = prev_term
        self.path = os.path.join(dir, fmt.segment_name(first_seq))
        self.idx_path = os.path.join(dir, fmt.index_name(first_seq))
        self.fd: int | None = None
        self.offs: array | None = None
        self.count = 0
        self.end = fmt.SEG_HDR
        self.write_end = fmt.SEG_HDR
        self.created = True
        self.idx_offsets_at = -1
        self.idx_offsets_crc = 0
        self.runs_from_scan: list[tuple[int, int]] = []
        self.fd_lock = threading.RLock()  # see read_verified
        # Up to where the file is known durable (fdatasynced): what a round's first record
        # records as its durable end (see ``format``: write rounds and torn tails).
        self.synced_end = fmt.SEG_HDR
        # The file's size: past ``end`` while the tail is extended ahead of its writes
        # (``FsLog._submit``); bytes between ``end`` and it read as zeros.
        self.alloc_end = fmt.SEG_HDR

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1

    # --- files ------------------------------------------------------------------------
    def open_fd(self) -> int:
        """The segment's descriptor, opened on first use. Read-write even for reading: a
        descriptor a reader opened must serve the writer too if the segment becomes the
        tail again (truncate), and the log holds the directory's lock anyway."""
        with self.fd_lock:
            if self.fd is None:
                self.fd = fileops.open_fd(self.path, os.O_RDWR | os.O_CLOEXEC)
            return self.fd

    def close_fd(self) -> None:
        """Close the descriptor; waits for a read in progress on it (see ``read_verified``)."""
        with self.fd_lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def create_file(self) -> None:
        """Create the file with its header, durably (blocking). A file of that name that
        holds no record (what a failed creation can leave) is replaced."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = fileops.open_fd(self.path, flags, 0o644)
        except FileExistsError:
            if os.stat(self.path).st_size > fmt.SEG_HDR:
                raise
            fileops.unlink(self.path)
            fd = fileops.open_fd(self.path, flags, 0o644)
        try:
            hdr = encode_seg_header(self.first_seq, self.prev_term)
            if fileops.pwrite(fd, hdr, 0) != len(hdr):
                raise OSError(28, "short write of segment header", self.path)
            fileops.fdatasync(fd)
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                fileops.unlink(self.path)
            raise
        self.fd = fd
        self.synced_end = fmt.SEG_HDR
        self.alloc_end = fmt.SEG_HDR
        self.created = True

    def read_header(self) -> tuple[int, int] | int:
        fd = self.open_fd()
        return decode_seg_header(os.pread(fd, fmt.SEG_HDR, 0))

    # --- index cache ------------------------------------------------------------------
    def write_index(self, runs: list[tuple[int, int]]) -> None:
        """Persist the sealed segment's offsets and term runs (a cache: no fsync)."""
        assert self.offs is not None
        offs_bytes = self.offs.tobytes()
        run_bytes = b"".join(fmt.IDX_RUN.pack(s, t) for s, t in runs)
        head = fmt.IDX_HDR.pack(
            fmt.IDX_MAGIC,
            fmt.IDX_VERSION,
            len(runs),
            self.first_seq,
            self.count,
            self.end,
            lib.tp_crc32c(0, offs_bytes, len(offs_bytes)),
            0,
        )[:44]
        crc = lib.tp_crc32c(lib.tp_crc32c(0, head, 44), run_bytes, len(run_bytes))
        data = head + crc.to_bytes(4, "little") + run_bytes + offs_bytes
        tmp = self.idx_path + ".tmp"
        fd = fileops.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        try:
            fileops.write_all(fd, data)
        finally:
            os.close(fd)
        fileops.replace(tmp, self.idx_path)

    def load_index_header(self) -> list[tuple[int, int]] | None:
        """Term runs from the index cache, or None if it is missing, damaged or stale."""
        try:
            fd = os.open(self.idx_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            idx_size = os.fstat(fd).st_size
            head = os.pread(fd, 4096, 0)
            if len(head) < fmt.IDX_HDR.size:
                return None
            magic, ver, nruns, first, count, data_end, offs_crc, crc = fmt.IDX_HDR.unpack_from(head)
            if magic != fmt.IDX_MAGIC or ver != fmt.IDX_VERSION or first != self.first_seq:
                return None
            runs_len = nruns * fmt.IDX_RUN.size
            need = fmt.IDX_HDR.size + runs_len
            # Sizes come from disk: check them against the file before reading (a flipped
            # run count would otherwise ask for gigabytes).
            if count != self.count or idx_size != need + count * _U64:
                return None
            if len(head) < need:
                head = os.pread(fd, need, 0)
                if len(head) < need:
                    return None
            body = head[fmt.IDX_HDR.size : need]
            if lib.tp_crc32c(lib.tp_crc32c(0, head, 44), body, runs_len) != crc:
                return None
            if os.fstat(self.open_fd()).st_size != data_end:
                return None
            runs = [fmt.IDX_RUN.unpack_from(body, i * 16) for i in range(nruns)]
        finally:
            os.close(fd)
        self.end = data_end
        self.idx_offsets_at = need
        self.idx_offsets_crc = offs_crc
        return runs

    def ensure_offsets(self) -> array:
        """Record offsets of this segment, from the index or by rescanning (blocking)."""
        if self.offs is not None:
            return self.offs
        offs = None
        if self.idx_offsets_at >= 0:
            try:
                with open(self.idx_path, "rb") as f:
                    f.seek(self.idx_offsets_at)
                    raw = f.read(self.count * _U64)
                if len(raw) == self.count * _U64 and (
                    lib.tp_crc32c(0, raw, len(raw)) == self.idx_offsets_crc
                ):
                    offs = array("Q")
                    offs.frombytes(raw)
            except OSError:
                offs = None
        if offs is None:
            offs = self.rebuild_index()
        self.offs = offs
        return offs

    def rebuild_index(self) -> array:
        """Scan a sealed segment whose index is missing or damaged, and rewrite it."""
        r = scan_fd(self.open_fd(), self.first_seq, True)
        if r.status != lib.TP_SCAN_CLEAN or r.n != self.count:
            off = r.bad_off if r.status != lib.TP_SCAN_CLEAN else r.end
            raise corrupt(
                r.reason or lib.TP_ESHORT,
                self.path,
                off,
                f"sealed segment holds {r.n} valid records of {self.count} expected;"
                " damaged record",
                self.first_seq + r.n,
            )
        self.offs = r.offs
        self.end = r.end
        self.runs_from_scan = r.runs
        with contextlib.suppress(OSError):
            self.write_index(r.runs)
        return r.offs

    # --- reads ------------------------------------------------------------------------
    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """File byte range [start, end) of records lo..hi (seqs, inclusive)."""
        offs = self.ensure_offsets()
        i, j = lo - self.first_seq, hi - self.first_seq
        end = offs[j + 1] if j + 1 < self.count else self.end
        return offs[i], end

    def read_entries(self, lo: int, hi: int) -> list[Entry]:
        """Records lo..hi, CRC-checked (blocking: one pread)."""
        return list(entries_of(*self.read_verified(lo, hi)))

    def read_verified(self, lo: int, hi: int) -> Records:
        """Records lo..hi, all CRC-checked, not yet turned into ``Entry`` objects
        (blocking: one pread)."""
        start, end = self.span(lo, hi)
        # Under the lock: readers run in worker threads while the event loop may close
        # this descriptor (a roll closes the old tail's), and a number closed mid-read can
        # be reused at once by the next segment's file.
        with self.fd_lock:
            data = os.pread(self.open_fd(), end - start, start)
        return parse_records(data, start, lo, hi - lo + 1, self.path)


class Records(NamedTuple):
    """Verified records in one buffer: record i is ``data[starts[i]:ends[i]]``."""

    data: bytes
    first: int
    starts: array
    ends: array
    terms: array


def entries_of(
    data: bytes, first: int, starts: array, ends: array, terms: array
) -> Iterator[Entry]:
    """``Entry`` objects for verified records, made one at a time as they are consumed.

    Lazily on purpose: a consumer that drops each entry before taking the next keeps the
    number of live tuples at one, so the cyclic GC never runs for them; building a list of
    a chunk's ~8,000 entries first set off collections that cost more than the parse.
    ``tuple.__new__`` through ``map`` keeps the per-record work in C (``Entry(...)`` would
    run a Python-level ``__new__`` per record)."""
    payloads = map(data.__getitem__, map(slice, starts, ends))
    return map(tuple.__new__, repeat(Entry), zip(count(first), terms, payloads))


def parse_entries(data: bytes, file_off: int, first: int, n: int, path: str) -> list[Entry]:
    """The ``n`` records in ``data`` (read from ``file_off`` of ``path``), CRC-checked."""
    return list(entries_of(*parse_records(data, file_off, first, n, path)))


def parse_records(data: bytes, file_off: int, first: int, n: int, path: str) -> Records:
    """Check the ``n`` records in ``data`` (read from ``file_off`` of ``path``), the first
    of which must have seq ``first``, all in one C call before any of them is returned;
    raise ``LogCorruptError`` naming the file and offset of the first bad one."""
    starts = array("Q", _ZEROS) * n
    ends = array("Q", _ZEROS) * n
    terms = array("Q", _ZEROS) * n
    bad = ffi.new("uint64_t*")
    got = lib.tp_parse(
        data,
        len(data),
        file_off,
        first,
        n,
        ffi.from_buffer("uint64_t[]", starts),
        ffi.from_buffer("uint64_t[]", ends),
        ffi.from_buffer("uint64_t[]", terms),
        bad,
    )
    if got < 0:
        parsed = next((i for i, v in enumerate(starts) if v == 0), n)  # error path only
        raise corrupt(got, path, bad[0], seq=first + parsed)
    if got != n:
        raise LogCorruptError(
            f"{path} ends at byte offset {file_off + len(data)} inside record {first + got}"
            " (file shorter than its index says); the log will not return these bytes",
            path=path,
            offset=file_off + len(data),
        )
    return Records(data, first, starts, ends, terms)
