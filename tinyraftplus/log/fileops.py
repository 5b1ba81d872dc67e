"""Every file operation of the log that changes what is on disk, outside the C core.

The C core (``csrc/tplog.c``) does the hot path (``pwrite`` + ``fdatasync`` of rounds,
the cut-back after a failed write); everything else (creating, sealing and deleting
segments, truncating, index files, recovery's cuts, the state file) goes through the
functions here and nowhere else. That gives the crash-state enumeration
(``tests/crashsim.py``) one place to record them: ``start_recording`` turns on the
TEST-ONLY recording mode here and in the C core, after which every write, ``ftruncate``,
``rename``, ``unlink``, ``fsync`` and ``fdatasync`` is appended, with its file and range
(and the bytes written), to one trace file in the order they happened. Off (always,
outside those tests) each function costs one ``is None`` test.

Trace events: ``EVENT`` (40 bytes, little-endian: u32 op, u32 name length, u64 inode, u64
offset, u64 length, u64 data length), then the name (UTF-8), then the data. The C core
writes ``EV_WRITE``, ``EV_TRUNC`` and ``EV_SYNC`` events in the same format
(``tp_record_start`` in ``csrc/tplog.h``).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from .._native import lib

EVENT = struct.Struct("<IIQQQQ")
EV_WRITE = 1  # inode, offset, length, data
EV_TRUNC = 2  # inode, new size in ``offset``
EV_SYNC = 3  # inode: fdatasync / fsync of a file succeeded
EV_OPEN = 4  # name, inode: a file opened for writing (created if it did not exist)
EV_UNLINK = 5  # name
EV_RENAME = 6  # name = "SRC\0DST"
EV_FSYNC_DIR = 7  # name of the directory
EV_MARK = 8  # name = JSON from the test's workload driver (what was acknowledged)
EV_MKDIR = 9  # name

_rec_fd: int | None = None


def _event(op: int, name: str = "", ino: int = 0, off: int = 0, length: int = 0,
           data: bytes = b"") -> None:
    assert _rec_fd is not None
    raw = name.encode()
    os.write(_rec_fd, EVENT.pack(op, len(raw), ino, off, length, len(data)) + raw + data)


def _ino(fd: int) -> int:
    return os.fstat(fd).st_ino


def start_recording(trace_path: str) -> None:
    """TEST ONLY: record every file operation of every log in this process."""
    global _rec_fd
    stop_recording()
    _rec_fd = os.open(trace_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    lib.tp_record_start(_rec_fd)


def stop_recording() -> None:
    global _rec_fd
    if _rec_fd is not None:
        lib.tp_record_stop()
        os.close(_rec_fd)
        _rec_fd = None


def mark(what: dict[str, Any]) -> None:
    """TEST ONLY: put a note from the workload (an acknowledged append...) in the trace."""
    if _rec_fd is not None:
        _event(EV_MARK, json.dumps(what))


def open_fd(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a file the log may write."""
    fd = os.open(path, flags, mode)
    if _rec_fd is not None:
        _event(EV_OPEN, os.path.abspath(path), _ino(fd))
        if flags & os.O_TRUNC:
            _event(EV_TRUNC, "", _ino(fd), 0)
    return fd


def pwrite(fd: int, data: bytes, off: int) -> int:
    n = os.pwrite(fd, data, off)
    if _rec_fd is not None and n > 0:
        _event(EV_WRITE, "", _ino(fd), off, n, bytes(data[:n]))
    return n


def write_all(fd: int, data: bytes, off: int = 0) -> None:
    """Write all of ``data`` at ``off`` (looping over short writes)."""
    view = memoryview(data)
    while view:
        n = pwrite(fd, view, off)  # type: ignore[arg-type]
        view, off = view[n:], off + n


def ftruncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    if _rec_fd is not None:
        _event(EV_TRUNC, "", _ino(fd), size)


def fdatasync(fd: int) -> None:
    os.fdatasync(fd)
    if _rec_fd is not None:
        _event(EV_SYNC, "", _ino(fd))


def fsync_dir(path: str) -> None:
    """Make the directory's entries (creations, renames, unlinks in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if _rec_fd is not None:
        _event(EV_FSYNC_DIR, os.path.abspath(path))


def unlink(path: str) -> None:
    os.unlink(path)
    if _rec_fd is not None:
        _event(EV_UNLINK, os.path.abspath(path))


def replace(src: str, dst: str) -> None:
    os.replace(src, dst)
    if _rec_fd is not None:
        _event(EV_RENAME, os.path.abspath(src) + "\0" + os.path.abspath(dst))


def makedirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    if _rec_fd is not None:
        _event(EV_MKDIR, os.path.abspath(path))


def rmdir(path: str) -> None:
    os.rmdir(path)
    if _rec_fd is not None:
        _event(EV_UNLINK, os.path.abspath(path))
