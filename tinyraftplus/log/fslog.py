"""``FsLog``: the durable, segmented, CRC-checked append-only log, with group commit.

Theory of operation
-------------------
Appends are framed into a *round* (one contiguous buffer destined for one segment) the
moment they are called, in call order, so seqs are assigned without any await and appends
are serialized in seq order however many tasks call. Rounds are written one at a time by
the C flusher thread (``pwrite`` + ``fdatasync``); while one round is in flight every new
append joins the next one: that is the group commit, one ``fdatasync`` for all of them.

There is no background task. The first appender that finds nobody flushing becomes the
*flusher*: it submits rounds and waits for their completion (shielded, so cancelling it
cannot leave a round half-handled). When a round is durable the flusher wakes its waiters
and lets them run for two scheduler batches before it submits the next round: most of them
append again at once, so the next ``fdatasync`` carries all the appenders rather than the
half that happened to append while the last one was in flight (with 256 appenders this
measured 1.4-1.7x the throughput of submitting the next round first). Once its own round is
durable the flusher hands the role to a task waiting on a later round and returns. A
cancelled waiter just stops waiting: its record was framed and will be written (it may or
may not end up durable), and the log stays consistent.

Records become visible (``seq``, ``read``, ``iter``, ``entries``) only once durable. An
``append_batch`` or a transaction is framed as one atomic batch (MORE flags, see
``format``) inside one round and one segment, so a crash keeps all of it or none.

A failed write: ``ENOSPC`` fails that round and every round framed after it (their offsets
assumed it), cuts the file back (durably: ``ftruncate`` + ``fdatasync`` before
``LogFullError`` is raised) and rewinds the seqs: the log stays usable. If the cut itself
fails, part of the round may still be in the file, so the log fails for good. Any other write
or ``fdatasync`` error fails the log for good (``LogFailedError``): after an fsync error
the kernel may have dropped the dirty pages, so nothing written since can be trusted.

Exclusive operations (transactions, ``truncate``, ``compact``, ``close``) take a lock, stop
new appends at a gate, and wait until everything framed before them is durable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from itertools import chain
from typing import Any

import outcome
import trio

from .._native import ffi, lib
from ..entry import Entry
from ..errors import (
    ClosedError,
    InvalidArgumentError,
    LogCorruptError,
    LogError,
    LogFailedError,
    LogFullError,
    LogLockedError,
    SeqMismatchError,
    UsageError,
)
from . import _owner, fileops
from . import format as fmt
from ._codes import corrupt, write_error
from .fileops import fsync_dir
from .flusher import Flusher
from .segment import Records, Segment, entries_of, parse_entries, scan_fd
from .tailcheck import (
    LogRecoveryWarning,  # noqa: F401  (re-exported: it was defined here)
    classify_tail,
    report_tail_cut,
    torn_header_action,
    warn_caller,
)
from .terms import TermIndex

_HDR_BA = bytearray(fmt.REC_HDR)
# Ctrl-C (KeyboardInterrupt) is never raised in the middle of these methods' state
# updates: Trio delivers it to the main task at its next blocking point instead. Where that
# blocking point is the flusher's own wait, the round stays in flight (``_inflight``) and
# the next flusher, or ``close``, collects it. Protection is per code object: no cost.
_ki_protected = trio.lowlevel.enable_ki_protection
# TEST ONLY: names of fixed bugs to put back, so that the crash-state enumeration can show
# it catches them (tests/test_log_crash_states.py). Empty in normal use; read on cold paths.
_TEST_BUGS: set[str] = set()
_BECOME_FLUSHER = object()
_READ_STEP = 1 << 20  # bytes per pread when iterating


def _nbytes(data: object) -> int:
    if isinstance(data, bytes | bytearray):
        return len(data)
    if isinstance(data, memoryview):
        return data.nbytes
    raise InvalidArgumentError(
        f"log payloads must be bytes, bytearray or memoryview, not {type(data).__name__}; "
        "encode the value first (e.g. msgpack.packb(value) or text.encode())"
    )


def _check_term(term: object) -> int:
    if not isinstance(term, int) or isinstance(term, bool) or not 0 <= term <= fmt.MAX_U64:
        raise InvalidArgumentError(f"term must be an int in 0..2**64-1, got {term!r}")
    return term


def _term_array(terms: Sequence[Any]) -> array:
    """Per-record terms as ``array('Q')``, checked in C-level passes (``array`` itself
    refuses non-integers and values outside 0..2**64-1) rather than one Python call per
    record: the Raft driver passes a term list with every batch it persists."""
    if set(map(type, terms)) == {int}:
        with contextlib.suppress(OverflowError):
            return array("Q", terms)
    for t in terms:
        _check_term(t)  # raises, naming the bad term; or int subclasses, which are fine
    return array("Q", terms)


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh exception like ``exc`` for each task that raises it (one object raised in
    several tasks would collect all their tracebacks)."""
    if isinstance(exc, LogFullError):
        return LogFullError(errno.ENOSPC, exc.strerror, exc.filename)
    return type(exc)(*exc.args)


def _read_error(path: str, e: OSError) -> LogError:
    return LogError(
        f"reading log {path} failed: {e}; the log's files may have been changed by "
        "something else: check them with `python -m tinyraftplus.log verify DIR NAME`"
    )


def _round_error(rnd: _Round | None) -> BaseException | None:
    return None if rnd is None or rnd.error is None else _copy_error(rnd.error)


class _Round:
    """Records framed for one write: one buffer, one segment, its waiters."""

    __slots__ = (
        "seg",
        "buf",
        "file_off",
        "first_seq",
        "count",
        "offs",
        "terms",
        "last_data",
        "waiters",
        "cbuf",
        "cur_term",
        "done",
        "error",
        "nbytes",
    )

    def __init__(self, seg: Segment, file_off: int, first_seq: int) -> None:
        self.seg = seg
        self.buf = bytearray()
        self.file_off = file_off
        self.first_seq = first_seq
        self.count = 0
        self.offs = array("Q")
        self.terms: list[tuple[int, int]] = []  # (seq, term) where the term may change
        self.last_data: bytes = b""
        self.waiters: list[trio.lowlevel.Task] = []
        self.cbuf: Any = None
        self.cur_term: int | None = None  # term of the last record framed here
        self.done = False  # durable, or failed with ``error``
        self.nbytes = 0  # what its records add up to; ``len(buf)`` must agree
        self.error: BaseException | None = None


def _term_changes(prev: int | None, first: int, terms: array) -> list[tuple[int, int]]:
    """``(seq, term)`` wherever the terms of records ``first...`` change, starting from
    ``prev`` (the term before them; None: none). Found in C: no Python loop per record."""
    idx = array("Q", bytes(8)) * len(terms)
    k = lib.tp_term_changes(
        ffi.from_buffer("uint64_t[]", terms),
        len(terms),
        prev or 0,
        prev is not None,
        ffi.from_buffer("uint64_t[]", idx),
    )
    return [(first + i, terms[i]) for i in idx[:k]]


class FsLog:
    """A durable append-only log in ``DIR/NAME/`` (see ``tinyraftplus.log.format``).

    ``segment_size``: roll to a new segment file once one holds this many bytes (a single
    batch larger than that gets a segment of its own). ``fsync``: ``False`` skips
    ``fdatasync`` (faster, survives a process crash but not a power loss).
    ``flusher_spin_us`` / ``poll_us``: how long the flusher thread and the Trio side
    busy-wait before sleeping (latency against idle CPU; see ``flusher``).

    Use ``async with FsLog(dir, name) as log:`` or ``await log.open()`` / ``await
    log.close()``. Raises ``InvalidArgumentError`` if ``dir`` does not exist,
    ``LogLockedError`` if the log is open elsewhere, ``LogCorruptError`` for damage found
    in the middle of the log.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        name: str,
        *,
        segment_size: int = 64 << 20,
        fsync: bool = True,
        flusher_spin_us: int = 200,
        poll_us: int = 300,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise InvalidArgumentError(f"log name must be a plain file name, got {name!r}")
        if not isinstance(segment_size, int) or segment_size < 4096:
            raise InvalidArgumentError(f"segment_size must be an int >= 4096, got {segment_size!r}")
        self._parent = os.fspath(dir)
        self.name = name
        self.path = os.path.join(self._parent, name)
        self._segment_size = segment_size
        self._fsync = bool(fsync)
        self._spin_us = flusher_spin_us
        self._poll_us = poll_us
        self._state = "new"  # new -> open -> closed
        self._lock_fd: int | None = None
        self._segs: list[Segment] = []
        self._firsts: list[int] = []
        self._terms = TermIndex()
        self._seq = -1
        self._next_seq = 0
        self._first_seq = 0
        self._head: bytes | None = None
        self._queue: deque[_Round] = deque()
        self._inflight: _Round | None = None
        self._flushing = False
        self._gather = False  # waiters were just woken: let them re-append before a submit
        self._failed: LogFailedError | None = None
        self._flusher: Flusher | None = None
        self._on_sync: Callable[[float], None] | None = None
        self._notes: list[str] = []  # recovery warnings, issued once open() is back
        self._bytes_before = 0  # bytes_written of a flusher since stopped (closed log)
        self._excl = trio.Lock()
        self._blocked = False
        self._gate = trio.lowlevel.ParkingLot()
        self._idle = trio.lowlevel.ParkingLot()
        # Reads in worker threads and changes to the set of files (truncate, compact,
        # close) exclude each other: a reader could otherwise open a file being deleted
        # or read a range being cut. Reads are one chunk each, so a long ``iter`` delays
        # a truncate by one chunk at most, never by its whole length.
        self._reads = 0
        self._reshaping = False
        self._reads_done = trio.lowlevel.ParkingLot()
        self._reshaped = trio.lowlevel.ParkingLot()
        self._last_framed_term = 0
        self._finalizer: Any = None
        self._hdr = ffi.new("uint8_t[]", fmt.REC_HDR)
        self._hdr_view = ffi.buffer(self._hdr)

    # --- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> FsLog:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._state != "new":
            raise UsageError(f"log {self.path} was already opened; create a new FsLog")
        if not os.path.isdir(self._parent):
            raise InvalidArgumentError(
                f"log directory {self._parent!r} does not exist; create it first"
            )
        self._notes = []
        try:
            await trio.to_thread.run_sync(self._open_sync)
        finally:
            # Recovery ran on a worker thread; its warnings are issued here, on the caller's
            # thread, attributed to the caller's line (not to Trio's or outcome's).
            for note in self._notes:
                warn_caller(note)
            self._notes = []
        self._state = "open"

    def _open_sync(self) -> None:
        if not os.path.isdir(self.path):
            fileops.makedirs(self.path)
            fsync_dir(self._parent)
        lock_fd = fileops.open_fd(
            os.path.join(self.path, fmt.LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise LogLockedError(
                f"log {self.path} is open in another process or another FsLog object "
                f"(it holds {fmt.LOCK_NAME} with flock); close that one first"
            ) from None
        self._lock_fd = lock_fd
        try:
            self._recover()
            self._flusher = Flusher(self._spin_us, self._poll_us)
            self._flusher.on_sync = self._on_sync
        except BaseException:
            self._release_files()
            raise
        self._finalizer = _owner.finalizer(self, self.path, self._flusher, self._segs, lock_fd)
        _owner.track(self)

    def _forked(self) -> None:
        """In a child after fork(): release this copy's descriptors, refuse all use."""
        if self._state != "open":
            return
        self._state = "forked"
        if self._finalizer is not None:
            self._finalizer.detach()
        _owner.close_in_child(self._flusher, self._segs, self._lock_fd)
        self._flusher = None
        self._lock_fd = None

    def _recover(self) -> None:
        names = os.listdir(self.path)
        for n in names:
            if n.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    fileops.unlink(os.path.join(self.path, n))
        firsts = sorted(f for f in map(fmt.parse_segment_name, names) if f is not None)
        if not firsts:
            seg = Segment(self.path, 0, 0)
            seg.create_file()
            seg.offs = array("Q")
            self._segs = [seg]
        else:
            self._segs = [Segment(self.path, f) for f in firsts]
        # A tail segment that is only a (possibly torn) header is what a crash while
        # rolling leaves: drop it, the one before is the tail again.
        while len(self._segs) > 1:
            tail = self._segs[-1]
            size = os.stat(tail.path).st_size
            if size > fmt.SEG_HDR or (
                size == fmt.SEG_HDR and isinstance(tail.read_header(), tuple)
            ):
                break
            tail.close_fd()
            fileops.unlink(tail.path)
            fsync_dir(self.path)
            self._segs.pop()
            self._notes.append(
                f"removed {tail.path}: a segment created by a roll that a crash interrupted"
            )
        for i, seg in enumerate(self._segs):
            hdr = seg.read_header()
            if isinstance(hdr, int):
                size = os.fstat(seg.open_fd()).st_size
                # The same rule as `verify` (tailcheck.torn_header_action): only a new log's
                # lone segment, holding no record, is written again.
                if torn_header_action(i, len(self._segs), size, seg.first_seq) == "rewrite":
                    seg.close_fd()
                    fileops.unlink(seg.path)
                    seg.create_file()
                    self._notes.append(
                        f"rewrote the torn header of {seg.path} (a new log whose creation a "
                        "crash interrupted: it held no record)"
                    )
                    hdr = (seg.first_seq, 0)
                else:
                    raise corrupt(hdr, seg.path, 0, "damaged segment header", seg.first_seq)
            if hdr[0] != seg.first_seq:
                raise LogCorruptError(
                    f"{seg.path} says it starts at seq {hdr[0]}, its name says {seg.first_seq}",
                    path=seg.path,
                    offset=16,
                )
            seg.prev_term = hdr[1]
            if i < len(self._segs) - 1:
                seg.count = self._segs[i + 1].first_seq - seg.first_seq
                self._check_sealed_size(seg)
        self._first_seq = self._segs[0].first_seq
        self._terms = TermIndex(self._first_seq - 1, self._segs[0].prev_term)
        for seg in self._segs[:-1]:
            runs = seg.load_index_header()
            if runs is None:
                seg.rebuild_index()
                runs = seg.runs_from_scan
            for s, t in runs:
                self._terms.add(s, t)
        self._recover_tail(self._segs[-1])
        self._firsts = [s.first_seq for s in self._segs]
        last = self._segs[-1]
        self._seq = last.first_seq + last.count - 1
        self._next_seq = self._seq + 1
        self._last_framed_term = self._terms.last_term()
        self._head = None
        if self._seq >= self._first_seq:
            self._head = self._locate(self._seq).read_entries(self._seq, self._seq)[0].data

    @staticmethod
    def _check_sealed_size(seg: Segment) -> None:
        """A sealed segment must be big enough for the records its neighbours' names say
        it holds (a missing segment file, for one, makes it too small). Checked before the
        count sizes any buffer: a count read from the disk is never trusted unchecked."""
        size = os.fstat(seg.open_fd()).st_size
        if seg.count > (size - fmt.SEG_HDR) // fmt.REC_HDR:
            raise LogCorruptError(
                f"{seg.path} is {size} bytes, too small for the {seg.count} records "
                f"(seqs {seg.first_seq}..{seg.last_seq}) that the next segment's name implies:"
                f" a segment file is missing or this one was cut short at byte offset {size};"
                " restore the log from a replica",
                path=seg.path,
                offset=size,
            )

    def _recover_tail(self, seg: Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            fileops.unlink(seg.idx_path)  # only sealed segments have one
        seg.close_fd()
        fd = seg.open_fd()
        r = scan_fd(fd, seg.first_seq, True)
        if r.status == lib.TP_SCAN_CORRUPT:
            raise corrupt(
                r.reason,
                seg.path,
                r.bad_off,
                f"damaged record (valid records follow at byte offset {r.resync_off})",
                seg.first_seq + r.n,
            )
        cut = classify_tail(seg.path, fd, seg.first_seq, r)
        if cut is not None:
            # Said loudly (ERROR log, "may have been acknowledged") when the bytes look like
            # damage to a whole record rather than an unfinished write: tailcheck.py.
            self._notes.append(report_tail_cut(cut, seg.first_seq + r.n_commit - 1))
            fileops.ftruncate(fd, r.commit_end)
        seg.alloc_end = r.commit_end if cut is not None else r.file_size
        # Durable before anything is appended: a new round says everything before it is
        # durable, and the bytes found here may be only in the page cache (a process
        # crash, or an fsync error that left pages the disk never got).
        fileops.fdatasync(fd)
        seg.synced_end = r.commit_end
        offs = r.offs
        del offs[r.n_commit :]
        seg.offs = offs
        seg.count = r.n_commit
        seg.end = seg.write_end = r.commit_end
        for s, t in r.runs:
            if s < seg.first_seq + r.n_commit:
                self._terms.add(s, t)

    @_ki_protected
    async def close(self) -> None:
        """Wait for an open transaction and for every framed append to be durable, then
        close the files and release the lock. Closing twice is allowed. Always finishes:
        a Ctrl-C (``KeyboardInterrupt``) that arrives while it drains is raised once the
        log is closed."""
        if self._state != "open":
            if self._state != "forked":
                self._state = "closed"
            return
        interrupted: KeyboardInterrupt | None = None
        async with self._excl:
            if self._state != "open":
                return
            self._blocked = True
            with trio.CancelScope(shield=True):
                while True:
                    try:
                        await self._drain()
                        await self._reshape_begin()
                        break
                    except KeyboardInterrupt as e:
                        interrupted = e
                self._state = "closed"
                self._reshape_end()
                self._gate.unpark_all()
                if self._finalizer is not None:
                    self._finalizer.detach()
                _owner.untrack(self)
                if self._flusher is not None:
                    self._flusher.stop()
                    self._bytes_before += self._flusher.bytes_written
                    self._flusher = None
                self._trim_tail()
                self._release_files()
        if interrupted is not None:
            raise interrupted

    def _trim_tail(self) -> None:
        """Cut the preallocated zeros off the tail (``format``): a log closed cleanly
        leaves files that end at their last record, for other readers and tools. Not made
        durable: a crash that undoes it leaves zeros, which recovery takes for the end."""
        tail = self._segs[-1] if self._segs else None
        if tail is not None and self._failed is None and tail.alloc_end > tail.end:
            with contextlib.suppress(OSError):
                fileops.ftruncate(tail.open_fd(), tail.end)
                tail.alloc_end = tail.end

    def _release_files(self) -> None:
        for s in self._segs:
            s.close_fd()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @staticmethod
    def destroy(dir: str | os.PathLike[str], name: str) -> None:
        """Delete the log ``DIR/NAME`` and its files (synchronous). Raises
        ``LogLockedError`` if it is open. A missing log is not an error."""
        path = os.path.join(os.fspath(dir), name)
        if not os.path.isdir(path):
            return
        lock_fd = fileops.open_fd(
            os.path.join(path, fmt.LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LogLockedError(
                    f"cannot destroy log {path}: it is open; close it first"
                ) from None
            for n in os.listdir(path):
                if n != fmt.LOCK_NAME:
                    fileops.unlink(os.path.join(path, n))
            fileops.unlink(os.path.join(path, fmt.LOCK_NAME))
            fileops.rmdir(path)
            fsync_dir(os.fspath(dir))
        finally:
            os.close(lock_fd)

    # --- state ------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        """Seq of the last durable record; -1 when the log is empty."""
        return self._seq

    @property
    def first_seq(self) -> int:
        """Seq of the first record held (moves forward with ``compact``)."""
        return self._first_seq

    @property
    def head(self) -> bytes | None:
        """Payload of the last durable record, or None when empty."""
        return self._head

    @property
    def head_term(self) -> int:
        """Term of the last durable record (0 when empty)."""
        return self._terms.term_at(self._seq)

    @property
    def is_open(self) -> bool:
        """True between a successful ``open()`` and ``close()``: whoever holds an open log
        may use it, and a wrapper (the Raft node) opens only a log that is not yet open."""
        return self._state == "open"

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    # --- for metrics (tinyraftplus.metrics): counted per write round, not per record ------
    @property
    def bytes_written(self) -> int:
        """Bytes of records (headers included) this object has written to its segments."""
        f = self._flusher
        return self._bytes_before + (f.bytes_written if f is not None else 0)

    def on_sync(self, callback: Callable[[float], None] | None) -> None:
        """Call ``callback(seconds)`` on the event loop after every successful durable
        write round (one ``pwrite`` + ``fdatasync`` shared by the appenders of a group
        commit): how long it took from submit until seen done. ``None`` removes it. Keep
        it cheap (a histogram's ``observe``); it may be set before ``open()``."""
        self._on_sync = callback
        if self._flusher is not None:
            self._flusher.on_sync = callback

    def _check_open(self) -> None:
        if self._state != "open":
            if self._state == "forked":
                raise ClosedError(
                    f"log {self.path} was opened by the parent of this process before "
                    "fork(); the child's copy released its descriptors and refuses use: "
                    "open the log in the child only once the parent has closed it"
                )
            what = "before open()" if self._state == "new" else "after close()"
            raise ClosedError(f"log {self.path} used {what}")

    def _check_writable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise LogFailedError(str(self._failed)) from self._failed

    # --- appends ----------------------------------------------------------------------
    @_ki_protected
    async def append(
        self, data: bytes | bytearray | memoryview, *, seq: int | None = None, term: int = 0
    ) -> int:
        """Append one record; return its seq once it is durable.

        Cancelled (a cancel scope, a timeout) after the call was made, the record was
        already framed and keeps its seq: it may still become durable and visible, and
        later appends follow it. A caller that must know checks ``log.seq`` /
        ``read(seq)`` afterwards, or writes records that are safe to find twice (Raft
        does: it compares terms). Ctrl-C behaves the same.

        Raises ``InvalidArgumentError`` for a non-bytes payload or bad term,
        ``SeqMismatchError`` if ``seq`` is given and is not the next seq,
        ``LogFullError`` if the disk is full (nothing was written),
        ``LogFailedError`` if the log failed, ``ClosedError`` when not open."""
        # The hot path of 100,000+ appends a second: checks inlined, common types first.
        if self._state != "open" or self._failed is not None:
            self._check_writable()
        if type(data) is not bytes:
            _nbytes(data)
            data = bytes(data)
        if type(term) is not int or not 0 <= term <= fmt.MAX_U64:
            _check_term(term)
        while self._blocked:
            await self._wait_at_gate()
        s = self._next_seq
        if seq is not None and seq != s:
            raise SeqMismatchError(
                f"append to {self.path} with seq={seq}, but the next seq is {s}",
                expected=s,
                got=seq,
            )
        n = len(data)
        if n > fmt.MAX_PAYLOAD:
            raise InvalidArgumentError(
                f"payload of {n} bytes exceeds the {fmt.MAX_PAYLOAD}-byte limit"
            )
        rnd = self._open_round(fmt.REC_HDR + n)
        buf = rnd.buf
        pos = len(buf)
        if pos:
            lib.tp_frame_hdr(self._hdr, data, n, s, term, 0, 0)
        else:
            lib.tp_frame_hdr(self._hdr, data, n, s, term, fmt.FLAG_ROUND, self._back(rnd))
        try:  # the round's bytes and bookkeeping change together or not at all
            rnd.offs.append(rnd.file_off + pos)
            buf += self._hdr_view
            buf += data
            if term != rnd.cur_term:
                rnd.terms.append((s, term))
        except BaseException:
            del buf[pos:]
            del rnd.offs[rnd.count :]
            raise
        rnd.cur_term = term
        rnd.last_data = data
        rnd.count += 1
        rnd.nbytes += fmt.REC_HDR + n
        rnd.seg.write_end += fmt.REC_HDR + n
        self._next_seq = s + 1
        self._last_framed_term = term
        await self._wait_durable(rnd)
        return s

    @_ki_protected
    async def append_batch(
        self,
        items: Sequence[bytes | bytearray | memoryview],
        *,
        seq: int | None = None,
        term: int | Sequence[int] = 0,
    ) -> int:
        """Append records atomically (all or none survive a crash); return the first seq
        once all are durable. ``term`` is one term for all or one per item. Cancelled
        after the call, the batch may still become durable, whole, with its seqs (see
        ``append``)."""
        self._check_writable()
        items, lens, terms, joined = self._check_batch(items, term)
        while self._blocked:
            await self._wait_at_gate()
        first = self._next_seq
        rnd = self._frame(
            items,
            lens,
            seq,
            term if isinstance(term, int) else 0,
            terms,
            atomic=True,
            joined=joined,
        )
        await self._wait_durable(rnd)
        return first

    def _check_batch(
        self, items: Any, term: Any
    ) -> tuple[Sequence[Any], list[int], array | None, bytearray]:
        if isinstance(items, bytes | bytearray | memoryview | str) or not isinstance(
            items, Sequence
        ):
            raise InvalidArgumentError(
                f"append_batch takes a list of bytes payloads, got {type(items).__name__}"
            )
        if not items:
            raise InvalidArgumentError("append_batch needs at least one item, got an empty list")
        # One C-level join both validates the types (TypeError for non-buffers) and lays
        # the payloads out with a header gap before each, ready for framing in place.
        lens = list(map(len, items))
        try:
            joined = _HDR_BA.join(chain((b"",), items))
        except TypeError:
            for x in items:
                _nbytes(x)
            raise
        if len(joined) != sum(lens) + fmt.REC_HDR * len(lens):
            lens = [_nbytes(x) for x in items]  # e.g. a memoryview with itemsize > 1
        terms = None
        if isinstance(term, int) and not isinstance(term, bool):
            _check_term(term)
        else:
            if not isinstance(term, Sequence) or len(term) != len(items):
                raise InvalidArgumentError(
                    f"term must be an int or a sequence with one term per item ({len(items)} items)"
                )
            terms = _term_array(term)
        return items, lens, terms, joined

    def _frame(
        self,
        items: Sequence[Any],
        lens: list[int],
        seq: int | None,
        term: int,
        terms: Sequence[int] | None,
        atomic: bool,
        joined: bytearray | None = None,
    ) -> _Round:
        """Frame records into the open round (no await: seqs are assigned in call order)."""
        first = self._next_seq
        if seq is not None and seq != first:
            raise SeqMismatchError(
                f"append to {self.path} with seq={seq}, but the next seq is {first}",
                expected=first,
                got=seq,
            )
        if terms is not None and not isinstance(terms, array):
            terms = array("Q", terms)  # a transaction's list, checked as it was built
        n = len(lens)
        if first + n - 1 > fmt.MAX_U64:
            raise InvalidArgumentError(f"seq would pass 2**64-1 in {self.path}")
        for ln in lens:
            if ln > fmt.MAX_PAYLOAD:
                raise InvalidArgumentError(
                    f"payload of {ln} bytes exceeds the {fmt.MAX_PAYLOAD}-byte limit"
                )
        total = sum(lens) + fmt.REC_HDR * n
        rnd = self._open_round(total)
        pos = len(rnd.buf)
        off = rnd.file_off + pos
        last_term = terms[-1] if terms is not None else term
        if terms is not None and terms.count(last_term) == n:
            terms, term = None, last_term  # one term after all: the common case
        # Everything that can fail happens before the round changes: a round whose bytes
        # and bookkeeping disagreed would put every later record at a wrong offset.
        # Only ``joined`` (laid out when the call was made, before any await) is framed:
        # the caller may change its items while the append waits at the gate.
        if joined is None:
            joined = _HDR_BA.join(chain((b"",), items))
        c_joined = ffi.from_buffer("uint8_t[]", joined)
        flags0, back = (fmt.FLAG_ROUND, self._back(rnd)) if pos == 0 else (0, 0)
        if n == 1:
            lib.tp_frame_one(c_joined, 0, lens[0], first, last_term, flags0, back)
            offs = array("Q", (off,))
        else:
            offs = array("Q", bytes(8 * n))
            lib.tp_frame_batch(
                c_joined,
                ffi.from_buffer("uint32_t[]", array("I", lens)),
                n,
                first,
                term,
                ffi.from_buffer("uint64_t[]", terms) if terms is not None else ffi.NULL,
                1 if atomic else 0,
                off,
                ffi.from_buffer("uint64_t[]", offs),
                flags0,
                back,
            )
        del c_joined  # releases the buffer export, so the round can grow it later
        if terms is None:
            changes = [(first, term)] if term != rnd.cur_term else []
        else:
            changes = _term_changes(rnd.cur_term, first, terms)
        with memoryview(joined) as whole:
            last_data = whole[len(joined) - lens[-1] :].tobytes()
        n_offs, n_terms = len(rnd.offs), len(rnd.terms)
        try:
            if pos == 0:
                rnd.buf = joined  # the common case for a batch: no copy
            else:
                rnd.buf += joined
            rnd.offs.extend(offs)
            rnd.terms.extend(changes)
        except BaseException:
            del rnd.buf[pos:]
            del rnd.offs[n_offs:]
            del rnd.terms[n_terms:]
            raise
        rnd.cur_term = last_term
        rnd.last_data = last_data
        rnd.count += n
        rnd.nbytes += total
        rnd.seg.write_end += total
        self._next_seq = first + n
        self._last_framed_term = last_term
        return rnd

    def _back(self, rnd: _Round) -> int:
        """The durable back of a round's first record (see ``format``): with fsync every
        earlier round is durable before this one is written; without, only what was
        last fdatasynced (the segment's creation, a truncate, an open)."""
        if self._fsync:
            return 0
        return min(rnd.file_off - rnd.seg.synced_end, fmt.MAX_BACK)

    def _open_round(self, nbytes: int) -> _Round:
        seg = self._segs[-1]
        if seg.write_end > fmt.SEG_HDR and seg.write_end + nbytes > self._segment_size:
            # Roll: the file is created by the flusher once everything before is durable.
            seg = Segment(self.path, self._next_seq, self._last_framed_term)
            seg.created = False
            seg.offs = array("Q")
            self._segs.append(seg)
            self._firsts.append(seg.first_seq)
        if self._queue and self._queue[-1].seg is seg:
            return self._queue[-1]
        rnd = _Round(seg, seg.write_end, self._next_seq)
        self._queue.append(rnd)
        return rnd

    # --- group commit -----------------------------------------------------------------
    async def _wait_durable(self, rnd: _Round) -> None:
        if not self._flushing:
            self._flushing = True
            await self._run_flusher(rnd)
            return
        task = trio.lowlevel.current_task()
        rnd.waiters.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with contextlib.suppress(ValueError):
                rnd.waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        v = await trio.lowlevel.wait_task_rescheduled(abort)
        if v is _BECOME_FLUSHER:
            await self._run_flusher(rnd)

    @_ki_protected
    async def _run_flusher(self, mine: _Round | None) -> None:
        """Be the flusher until ``mine`` is durable and the role can be handed on (or no
        work is left). Not cancellable: a cancelled flusher still finishes the write it
        started, and its caller sees the cancellation afterwards. Every await in the loop
        is a wait that cannot be cancelled (``Flusher.wait``, shielded schedule points, a
        shielded segment roll) rather than one shielded scope around it all, which cost
        about 8 us per durable append."""
        error: BaseException | None = None
        try:
            error = await self._flush_loop(mine)
        except BaseException:
            # Only a KeyboardInterrupt delivered at the flusher's park (or as a roll's
            # worker thread starts) gets here: hand the role on, so the waiters of queued
            # rounds are not left waiting for a flusher that is gone (the round in flight
            # is collected by the next one).
            nxt = self._next_waiter()
            if nxt is not None:
                trio.lowlevel.reschedule(nxt, outcome.Value(_BECOME_FLUSHER))
            else:
                self._stop_flushing()
            raise
        if error is not None:
            raise error
        await trio.lowlevel.checkpoint_if_cancelled()

    @_ki_protected
    async def _flush_loop(self, mine: _Round | None) -> BaseException | None:
        """Write queued rounds one at a time until ``mine`` is done (durable or failed) and
        the role is handed on, or nothing is left; return ``mine``'s error, if any."""
        while True:
            if self._inflight is not None:
                # A flusher interrupted (Ctrl-C) in its wait left its round in the C
                # thread: collect it before anything else (close() waits for this too).
                await self._collect(self._inflight)
                continue
            if mine is not None and mine.done:
                nxt = self._next_waiter()
                if nxt is not None:
                    trio.lowlevel.reschedule(nxt, outcome.Value(_BECOME_FLUSHER))
                    return _round_error(mine)
                if not self._queue:
                    # Return now, before the gather below: the tasks just woken will
                    # queue more, and whoever appends first (often this very task) takes
                    # the role and gathers. Staying would keep this task flushing for
                    # the others while its own next append waits.
                    self._stop_flushing()
                    return _round_error(mine)
            if self._gather:
                # The tasks just woken mostly append again at once: two scheduler
                # batches let them all join the queued round, so one fdatasync carries
                # every appender instead of half of them (measured 1.4-1.7x with 256
                # appenders; no cost to a lone appender, which is never woken).
                self._gather = False
                await trio.lowlevel.cancel_shielded_checkpoint()
                await trio.lowlevel.cancel_shielded_checkpoint()
            if not self._queue:
                self._stop_flushing()
                assert mine is None or mine.done  # it was queued until done
                return _round_error(mine)
            rnd = self._queue[0]
            if not rnd.seg.created:
                with trio.CancelScope(shield=True):
                    err = await self._roll_to(rnd.seg)
                if err is not None:
                    self._fail_queued(err)
                    continue
            self._queue.popleft()
            misplaced = self._check_placement(rnd)
            if misplaced is not None:
                self._fail_round(rnd, misplaced)
                self._fail_queued(misplaced)
                continue
            self._submit(rnd)
            await self._collect(rnd)

    async def _collect(self, rnd: _Round) -> None:
        """Wait for the round in flight and commit or fail it."""
        assert self._flusher is not None
        rc, op = await self._flusher.wait()
        self._inflight = None
        if rc == 0:
            self._commit_round(rnd)
            if rnd.waiters:
                self._gather = True
                self._wake(rnd.waiters, None)
        else:
            # The C side cut the file back to the round's start (``tp_write``): the
            # preallocated zeros went with it.
            rnd.seg.alloc_end = min(rnd.seg.alloc_end, rnd.file_off)
            exc = write_error(rc, op, rnd.seg.path, rnd.file_off)
            self._fail_round(rnd, exc)
            self._fail_queued(exc)

    def _check_placement(self, rnd: _Round) -> LogFailedError | None:
        """A round must start exactly where its segment's durable records end, with the
        next seq, and hold exactly the bytes its records add up to: anything else would
        write records over others, leave a gap, or put records where no seq expects them.
        Framing guarantees it; these comparisons (per round, not per record) turn a bug
        there into a failed log instead of a corrupt one."""
        seg = rnd.seg
        if (
            rnd.file_off == seg.end
            and rnd.first_seq == seg.first_seq + seg.count
            and len(rnd.buf) == rnd.nbytes
        ):
            return None
        return LogFailedError(
            f"internal error in {seg.path}: a round of {rnd.count} records from seq "
            f"{rnd.first_seq} ({rnd.nbytes} bytes, buffer of {len(rnd.buf)}) was framed for "
            f"byte offset {rnd.file_off}, but the segment's records end at seq "
            f"{seg.first_seq + seg.count - 1}, byte offset {seg.end}; nothing was written and "
            "the log refuses further writes: close and reopen it, and please report this"
        )

    def _stop_flushing(self) -> None:
        # ``_gather`` stays set: the next appender to become the flusher is then usually
        # the old flusher itself, and it should wait for the tasks it just woke.
        self._flushing = False
        self._idle.unpark_all()

    def _next_waiter(self) -> trio.lowlevel.Task | None:
        for rnd in ([self._inflight] if self._inflight else []) + list(self._queue):
            if rnd.waiters:
                return rnd.waiters.pop(0)
        return None

    def _submit(self, rnd: _Round) -> None:
        assert self._flusher is not None
        seg = rnd.seg
        fd = seg.open_fd()
        if rnd.file_off + len(rnd.buf) > seg.alloc_end:
            self._preallocate(seg, fd, rnd.file_off + len(rnd.buf))
        rnd.cbuf = ffi.from_buffer(rnd.buf)
        self._flusher.submit(fd, rnd.cbuf, len(rnd.buf), rnd.file_off, self._fsync)
        self._inflight = rnd

    def _preallocate(self, seg: Segment, fd: int, end: int) -> None:
        """Grow the tail's file past ``end`` (sparse, see ``format``: preallocated tail), so
        that the rounds' ``fdatasync``s need not also make a new file size durable: 15-30%
        cheaper per durable append here (raw 1 KiB ``pwrite`` + ``fdatasync`` loops on ext4,
        p50 133-166 us into a grown file against 190-242 us growing it). A failure is left
        to the write itself, which then grows the file as it would without this."""
        size = -(-(end + min(fmt.PREALLOC, self._segment_size)) // 4096) * 4096
        try:
            fileops.ftruncate(fd, size)
        except OSError:
            return
        seg.alloc_end = size

    def _commit_round(self, rnd: _Round) -> None:
        seg = rnd.seg
        rnd.cbuf = None
        rnd.done = True
        assert seg.offs is not None
        seg.offs.extend(rnd.offs)
        seg.count += rnd.count
        seg.end = rnd.file_off + len(rnd.buf)
        if self._fsync:
            seg.synced_end = seg.end
        for s, t in rnd.terms:
            self._terms.add(s, t)
        self._seq = rnd.first_seq + rnd.count - 1
        self._head = rnd.last_data

    def _wake(self, waiters: list[trio.lowlevel.Task], exc: BaseException | None) -> None:
        if exc is None:
            for task in waiters:
                trio.lowlevel.reschedule(task, outcome.Value(None))
        else:
            for task in waiters:
                trio.lowlevel.reschedule(task, outcome.Error(_copy_error(exc)))
        waiters.clear()

    def _fail_round(self, rnd: _Round, exc: BaseException) -> None:
        rnd.cbuf = None
        rnd.done = True
        rnd.error = exc
        if not isinstance(exc, LogFullError):
            self._failed = exc  # type: ignore[assignment]
        self._wake(rnd.waiters, exc)

    def _fail_queued(self, exc: BaseException) -> None:
        """Rounds framed after a failed one assumed its bytes: fail them all (the flusher's
        own round among them, which has no waiter list entry to tell it)."""
        if not isinstance(exc, LogFullError) and self._failed is None:
            self._failed = exc  # type: ignore[assignment]
        while self._queue:
            r = self._queue.popleft()
            r.done = True
            r.error = exc
            self._wake(r.waiters, exc)
        self._rewind()

    def _rewind(self) -> None:
        """Forget everything framed but not durable."""
        while len(self._segs) > 1 and not self._segs[-1].created:
            self._segs.pop()
            self._firsts.pop()
        tail = self._segs[-1]
        tail.write_end = tail.end
        self._next_seq = self._seq + 1
        self._last_framed_term = self._terms.last_term()
        self._queue.clear()

    async def _roll_to(self, seg: Segment) -> BaseException | None:
        """Seal the current tail (write its index) and create ``seg``'s file."""
        prev = self._segs[self._segs.index(seg) - 1]
        runs = self._terms.runs_between(prev.first_seq, prev.last_seq)

        def work() -> None:
            trim = prev.alloc_end > prev.end
            if trim:
                # A sealed segment ends at its last record (see ``format``): its zeros go,
                # durably (below), before the next segment exists.
                fileops.ftruncate(prev.open_fd(), prev.end)
                if "roll-trim-early" in _TEST_BUGS:
                    prev.alloc_end = prev.end
            if (trim or not self._fsync) and "roll-no-sync" not in _TEST_BUGS:
                # Without fsync nothing in the tail was made durable: do it before the
                # segment is sealed, or a power loss could leave a sealed segment short
                # (open fails) instead of losing only the tail.
                fileops.fdatasync(prev.open_fd())
            # Only now: if that sync failed (ENOSPC leaves the log usable), the retried
            # roll must cut and sync again, or the next segment could exist durably
            # beside a sealed segment whose zeros a power loss kept.
            prev.alloc_end = prev.end
            with contextlib.suppress(OSError):
                prev.write_index(runs)
            seg.create_file()

        try:
            await trio.to_thread.run_sync(work)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                return LogFullError(
                    errno.ENOSPC,
                    f"disk full creating segment {seg.path}; nothing was written: free space "
                    "and append again",
                    seg.path,
                )
            return LogFailedError(
                f"cannot seal {prev.path} and create segment {seg.path}: {e}; the log "
                "refuses further writes: close and reopen it to continue from what is on disk"
            )
        prev.synced_end = prev.end
        prev.close_fd()
        return None

    @_ki_protected
    async def _drain(self) -> None:
        """Wait until nothing is framed but not yet durable."""
        while self._flushing or self._queue or self._inflight:
            if not self._flushing:
                # Work without a flusher (its waiters were cancelled): flush it ourselves.
                self._flushing = True
                with contextlib.suppress(LogError):
                    await self._run_flusher(None)
                continue
            await self._idle.park()

    @_ki_protected
    async def _exclusive_begin(self) -> None:
        await self._excl.acquire()
        try:
            self._check_writable()
            self._blocked = True
            with trio.CancelScope(shield=True):
                await self._drain()
            self._check_writable()
        except BaseException:
            self._exclusive_end()
            raise

    def _exclusive_end(self) -> None:
        self._blocked = False
        self._gate.unpark_all()
        self._excl.release()

    async def _wait_at_gate(self) -> None:
        """Wait for an exclusive operation to end; in the task running it (a transaction
        whose body calls ``log.append``) that would wait forever, so it raises instead."""
        if self._excl.statistics().owner is trio.lowlevel.current_task():
            raise UsageError(
                f"log.append inside a transaction on {self.path} would wait for the "
                "transaction to end: append through the transaction (txn.append) instead"
            )
        await self._gate.park()
        self._check_writable()

    # --- transactions -----------------------------------------------------------------
    def txn(self) -> Txn:
        """``async with log.txn() as txn:`` appends that become durable and visible
        together at exit, or not at all (exception or ``await txn.abort()``). Other
        appends wait while a transaction is open; ``log.append`` from inside it raises
        ``UsageError`` (it would wait for itself): use ``txn.append``. Cancelled while
        its exit writes the records, the transaction is still written whole and may
        become durable (see ``append``); cancelled inside the block, it aborts."""
        self._check_open()
        return Txn(self)

    # --- truncate / compact -----------------------------------------------------------
    @_ki_protected
    async def truncate(self, seq: int) -> None:
        """Keep records ``<= seq`` (``-1``, or ``first_seq - 1``, empties the log)."""
        self._check_writable()
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise InvalidArgumentError(f"truncate takes an int seq, got {seq!r}")
        await self._exclusive_begin()
        try:
            if seq < self._first_seq - 1 or seq > self._seq:
                if seq > self._seq:
                    return
                raise InvalidArgumentError(
                    f"cannot truncate {self.path} to seq {seq}: records before "
                    f"{self._first_seq} were compacted away (keep >= {self._first_seq - 1})"
                )
            if seq == self._seq:
                return
            with trio.CancelScope(shield=True):
                await self._reshape_begin()
                try:
                    i = max(bisect_right(self._firsts, seq + 1) - 1, 0)
                    seg = self._segs[i]
                    await trio.to_thread.run_sync(seg.ensure_offsets)
                    cut = seg.span(seq + 1, seq + 1)[0] if seq + 1 <= seg.last_seq else seg.end
                    later = self._segs[i + 1 :]
                    # Forget the cut records first, on this thread (as compact does): a
                    # synchronous read (``entries``) then never looks at a file being
                    # deleted or a range being cut while the thread does the file work.
                    self._truncate_apply(seq, i, cut)
                    await trio.to_thread.run_sync(self._truncate_sync, seg, later, seq, cut)
                except OSError as e:
                    self._failed = LogFailedError(
                        f"truncating {self.path} to seq {seq} failed half-way ({e}); the log "
                        "refuses further writes: reopen it to continue from what is on disk"
                    )
                    raise self._failed from e
                finally:
                    self._reshape_end()
        finally:
            self._exclusive_end()

    def _truncate_sync(self, seg: Segment, gone: list[Segment], seq: int, cut: int) -> None:
        """The file work of a truncate (blocking): delete the later segments ``gone``, end
        a cut batch, cut ``seg`` (the segment holding ``seq``) at byte offset ``cut``."""
        for later in reversed(gone):
            later.close_fd()
            with contextlib.suppress(FileNotFoundError):
                fileops.unlink(later.idx_path)
            fileops.unlink(later.path)
        with contextlib.suppress(FileNotFoundError):
            fileops.unlink(seg.idx_path)
        # The unlinks are durable before the cut: a filesystem orders fsyncs per file, so
        # otherwise a crash could keep the cut and the later segments, which then do not
        # follow on from the cut segment (open fails: a sealed segment too short).
        if "truncate-order" not in _TEST_BUGS:
            fsync_dir(self.path)
        fd = seg.open_fd()
        if seq >= seg.first_seq:
            self._end_batch_at(seg, fd, seq)
        fileops.ftruncate(fd, cut)
        fileops.fdatasync(fd)
        if "truncate-order" in _TEST_BUGS:
            fsync_dir(self.path)

    def _truncate_apply(self, seq: int, i: int, cut: int) -> None:
        seg = self._segs[i]
        del self._segs[i + 1 :]
        del self._firsts[i + 1 :]
        n = seq + 1 - seg.first_seq
        assert seg.offs is not None
        del seg.offs[n:]
        seg.count = n
        seg.end = seg.write_end = seg.synced_end = seg.alloc_end = cut
        self._terms.truncate_after(seq)
        self._seq = seq
        self._next_seq = seq + 1
        self._last_framed_term = self._terms.last_term()
        self._head = None
        if seq >= self._first_seq:
            self._head = self._locate(seq).read_entries(seq, seq)[0].data

    @staticmethod
    def _end_batch_at(seg: Segment, fd: int, seq: int) -> None:
        """Clear MORE on the record at ``seq`` (truncate may cut a batch), so recovery does
        not take the kept records for an incomplete batch. Made durable before the cut: a
        crash in between leaves the batch split in two, both complete."""
        start, end = seg.span(seq, seq)
        rec = bytearray(os.pread(fd, end - start, start))
        parse_entries(bytes(rec), start, seq, 1, seg.path)  # never re-CRC damaged bytes
        flags = int.from_bytes(rec[24:28], "little")
        if not flags & fmt.FLAG_MORE:
            return
        term = int.from_bytes(rec[16:24], "little")
        back = int.from_bytes(rec[28:32], "little")
        lib.tp_frame_one(
            ffi.from_buffer("uint8_t[]", rec),
            0,
            len(rec) - fmt.REC_HDR,
            seq,
            term,
            flags & ~fmt.FLAG_MORE,
            back,
        )
        with seg.fd_lock:  # a reader in a thread never sees half a header
            n = fileops.pwrite(fd, bytes(rec[: fmt.REC_HDR]), start)
        if n != fmt.REC_HDR:
            raise OSError(errno.EIO, f"short write ({n} of {fmt.REC_HDR} bytes)", seg.path)
        fileops.fdatasync(fd)

    @_ki_protected
    async def compact(self, seq: int) -> None:
        """Drop whole segments whose records are all ``<= seq`` (never the tail
        segment); ``first_seq`` moves to the first record kept."""
        self._check_writable()
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise InvalidArgumentError(f"compact takes an int seq, got {seq!r}")
        await self._exclusive_begin()
        try:
            drop = 0
            while drop < len(self._segs) - 1 and self._segs[drop].last_seq <= seq:
                drop += 1
            if drop:
                with trio.CancelScope(shield=True):
                    await self._reshape_begin()
                    try:
                        # Forget the segments first, on this thread: a synchronous read
                        # (``entries``) then never looks for a file being deleted.
                        gone = self._segs[:drop]
                        del self._segs[:drop]
                        del self._firsts[:drop]
                        first = self._segs[0]
                        self._first_seq = first.first_seq
                        self._terms.drop_before(first.first_seq, first.prev_term)
                        await trio.to_thread.run_sync(self._compact_sync, gone)
                    except OSError as e:
                        self._failed = LogFailedError(
                            f"compacting {self.path} failed half-way ({e}); the log refuses "
                            "further writes: reopen it to continue from what is on disk"
                        )
                        raise self._failed from e
                    finally:
                        self._reshape_end()
        finally:
            self._exclusive_end()

    @_ki_protected
    async def reset(self, seq: int, term: int) -> None:
        """Drop every record; the log then holds nothing and continues at ``seq + 1``, with
        ``term_at(seq) == term`` (a follower that installed a snapshot ending at ``(seq,
        term)`` its log did not hold). Crash-safe in the only way the caller needs: a crash
        part-way leaves a prefix of the old log (oldest segments kept) or the new empty one,
        never a mix; the caller's snapshot, durable before, tells it to reset again."""
        self._check_writable()
        for name, v in (("seq", seq), ("term", term)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (-1 if name == "seq" else 0):
                raise InvalidArgumentError(f"reset takes an int {name}, got {v!r}")
        await self._exclusive_begin()
        try:
            with trio.CancelScope(shield=True):
                await self._reshape_begin()
                try:
                    gone = self._segs
                    fresh = Segment(self.path, seq + 1, term)
                    fresh.offs = array("Q")
                    self._segs = [fresh]
                    self._firsts = [seq + 1]
                    self._first_seq = seq + 1
                    self._terms = TermIndex(seq, term)
                    self._seq = seq
                    self._next_seq = seq + 1
                    self._last_framed_term = term
                    self._head = None
                    await trio.to_thread.run_sync(self._reset_sync, gone, fresh)
                except OSError as e:
                    self._failed = LogFailedError(
                        f"resetting {self.path} to start after seq {seq} failed half-way "
                        f"({e}); the log refuses further writes: reopen it to continue"
                    )
                    raise self._failed from e
                finally:
                    self._reshape_end()
        finally:
            self._exclusive_end()

    def _reset_sync(self, gone: list[Segment], fresh: Segment) -> None:
        # Newest first: a crash part-way leaves a shorter prefix, still a valid log.
        for seg in reversed(gone):
            seg.close_fd()
            with contextlib.suppress(FileNotFoundError):
                fileops.unlink(seg.idx_path)
            fileops.unlink(seg.path)
        fsync_dir(self.path)
        fresh.create_file()

    def _compact_sync(self, gone: list[Segment]) -> None:
        # Oldest first: a crash part-way leaves a shorter prefix gone, still contiguous.
        for seg in gone:
            seg.close_fd()
            with contextlib.suppress(FileNotFoundError):
                fileops.unlink(seg.idx_path)
            fileops.unlink(seg.path)
        fsync_dir(self.path)

    # --- reads ------------------------------------------------------------------------
    def _locate(self, seq: int) -> Segment:
        return self._segs[bisect_right(self._firsts, seq) - 1]

    def _check_range(self, seq: int) -> None:
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise InvalidArgumentError(f"seq must be an int, got {seq!r}")
        if not self._first_seq <= seq <= self._seq:
            raise InvalidArgumentError(
                f"seq {seq} is not in log {self.path} (it holds {self._first_seq}..{self._seq})"
            )

    def term_at(self, seq: int) -> int:
        """Term of the record at ``seq`` (0 for -1; also answers for ``first_seq - 1``).
        In memory, O(log runs)."""
        if seq == -1:
            return 0
        if not self._first_seq - 1 <= seq <= self._seq:
            raise InvalidArgumentError(
                f"term_at({seq}): log {self.path} holds {self._first_seq}..{self._seq}"
            )
        return self._terms.term_at(seq)

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Records ``lo..hi`` (inclusive), stopping once ``max_bytes`` of payload are
        gathered but always at least one when ``lo <= hi``. Synchronous: one ``pread`` per
        segment touched, served from the page cache. Safe beside a running ``truncate`` or
        ``compact`` (they change what is visible before touching files); an I/O error is
        raised as ``LogError``."""
        self._check_open()
        if hi < lo:
            return []
        self._check_range(lo)
        self._check_range(hi)
        try:
            return self._entries(lo, hi, max_bytes)
        except OSError as e:
            raise _read_error(self.path, e) from e

    def _entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        out: list[Entry] = []
        budget = max_bytes
        while lo <= hi:
            seg = self._locate(lo)
            offs = seg.ensure_offsets()
            top = min(hi, seg.last_seq)
            base = offs[lo - seg.first_seq]
            # Largest k in lo..top with payload(lo..k) <= budget (at least lo when out is empty).
            a, b = lo, top
            while a < b:
                mid = (a + b + 1) // 2
                end = offs[mid + 1 - seg.first_seq] if mid < seg.last_seq else seg.end
                if end - base - fmt.REC_HDR * (mid - lo + 1) <= budget:
                    a = mid
                else:
                    b = mid - 1
            k = a
            end = offs[k + 1 - seg.first_seq] if k < seg.last_seq else seg.end
            size = end - base - fmt.REC_HDR * (k - lo + 1)
            if size > budget and out:
                break
            out.extend(seg.read_entries(lo, k))
            budget -= size
            if k < top or budget <= 0:
                break
            lo = k + 1
        return out

    async def read(self, seq: int) -> Entry:
        """The record at ``seq`` (CRC-checked). ``InvalidArgumentError`` if absent."""
        self._check_open()
        self._check_range(seq)
        seg = self._locate(seq)
        try:
            if not self._reshaping and seg.offs is not None and seg.end - seg.offs[-1] < 65536:
                ent = seg.read_entries(seq, seq)[0]
                await trio.lowlevel.checkpoint()
                return ent
            await self._read_begin()
            try:
                self._check_open()  # the log may have changed while we waited
                self._check_range(seq)
                seg = self._locate(seq)
                return (await trio.to_thread.run_sync(seg.read_entries, seq, seq))[0]
            finally:
                self._read_end()
        except OSError as e:
            raise _read_error(self.path, e) from e

    async def _read_begin(self) -> None:
        while self._reshaping:
            await self._reshaped.park()
        self._reads += 1

    def _read_end(self) -> None:
        self._reads -= 1
        if not self._reads:
            self._reads_done.unpark_all()

    async def _reshape_begin(self) -> None:
        """Stop new reads in threads and wait for those running (call shielded)."""
        self._reshaping = True
        while self._reads:
            await self._reads_done.park()

    def _reshape_end(self) -> None:
        self._reshaping = False
        self._reshaped.unpark_all()

    def iter(self, start: int = 0) -> AsyncIterator[Entry]:
        """Async iterator over durable records from ``start`` (clamped to ``first_seq``),
        reading about a MiB at a time in a worker thread. Records appended while
        iterating are included."""
        self._check_open()
        return self._iter(start)

    async def _iter(self, start: int) -> AsyncIterator[Entry]:
        seq = max(start, self._first_seq)
        if seq > self._seq:
            # Nothing to read still checkpoints: a task polling for new records with
            # ``async for`` must not be able to starve the appenders it waits for.
            await trio.lowlevel.checkpoint()
        while True:
            await self._read_begin()
            try:
                self._check_open()
                if seq > self._seq:
                    return
                if seq < self._first_seq:
                    raise InvalidArgumentError(
                        f"seq {seq} was compacted away while iterating {self.path}"
                    )
                seg = self._locate(seq)
                try:
                    chunk = await trio.to_thread.run_sync(
                        self._read_step, seg, seq, min(self._seq, seg.last_seq)
                    )
                except OSError as err:
                    raise _read_error(self.path, err) from err
            finally:
                self._read_end()
            # The whole chunk is verified; entries are made as the consumer takes them.
            for e in entries_of(*chunk):
                yield e
            seq += len(chunk.starts)

    @staticmethod
    def _read_step(seg: Segment, lo: int, top: int) -> Records:
        offs = seg.ensure_offsets()
        i = lo - seg.first_seq
        limit = offs[i] + _READ_STEP
        j = bisect_right(offs, limit, i + 1, top - seg.first_seq + 1) - 1
        return seg.read_verified(lo, seg.first_seq + max(j, i))

    def __repr__(self) -> str:
        return f"<FsLog {self.path} {self._state} seq={self._seq} first_seq={self._first_seq}>"


class Txn:
    """A transaction on an ``FsLog``; see ``FsLog.txn``."""

    def __init__(self, log: FsLog) -> None:
        self._log = log
        self._items: list[Any] = []
        self._lens: list[int] = []
        self._terms: list[int] = []
        self._state = "new"
        self._first = 0

    async def __aenter__(self) -> Txn:
        await self._log._exclusive_begin()
        self._state = "open"
        self._first = self._log._next_seq
        return self

    @_ki_protected
    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        log = self._log
        try:
            if exc_type is None and self._state == "open" and self._items:
                self._state = "committing"
                log._check_writable()
                rnd = log._frame(self._items, self._lens, None, 0, self._terms, atomic=True)
                # Shielded: once framed, the batch is written whatever happens to us.
                with trio.CancelScope(shield=True):
                    await log._wait_durable(rnd)
                self._state = "committed"
        finally:
            if self._state != "committed":
                self._state = "aborted"
            log._exclusive_end()

    @property
    def seq(self) -> int:
        """Seq of the last record appended in this transaction so far (or before it)."""
        return self._first + len(self._items) - 1

    def _check(self) -> None:
        if self._state != "open":
            raise UsageError(f"transaction on {self._log.path} is {self._state}; open a new one")

    async def append(
        self, data: bytes | bytearray | memoryview, *, seq: int | None = None, term: int = 0
    ) -> int:
        """Add a record; returns its (future) seq. Durable at the end of the ``async with``."""
        self._check()
        n = _nbytes(data)
        _check_term(term)
        s = self._first + len(self._items)
        if seq is not None and seq != s:
            raise SeqMismatchError(
                f"txn append with seq={seq}, but the next seq is {s}", expected=s, got=seq
            )
        self._items.append(data if type(data) is bytes else bytes(data))
        self._lens.append(n)
        self._terms.append(term)
        await trio.lowlevel.checkpoint()
        return s

    async def append_batch(
        self,
        items: Sequence[bytes | bytearray | memoryview],
        *,
        seq: int | None = None,
        term: int | Sequence[int] = 0,
    ) -> int:
        self._check()
        items, lens, terms, _ = self._log._check_batch(items, term)
        s = self._first + len(self._items)
        if seq is not None and seq != s:
            raise SeqMismatchError(
                f"txn append with seq={seq}, but the next seq is {s}", expected=s, got=seq
            )
        self._items.extend(x if type(x) is bytes else bytes(x) for x in items)
        self._lens.extend(lens)
        self._terms.extend(terms if terms is not None else [term] * len(items))  # type: ignore[list-item]
        await trio.lowlevel.checkpoint()
        return s

    async def abort(self) -> None:
        """Drop everything appended in this transaction; nothing reaches the log."""
        if self._state == "open":
            self._items.clear()
            self._state = "aborted"
        await trio.lowlevel.checkpoint()
