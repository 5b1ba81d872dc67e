"""Raw loops: what the disk and the kernel give a plain Python program, with no log around it.

These are the baselines the log's figures are divided by. They use ``os.write`` +
``os.fdatasync`` on a file in the same directory the log uses, appending (so the file grows
and its size must be made durable, as for the log). The Python overhead per call is a few
microseconds against ~100 us or more for ``fdatasync``, so a C loop would not measure a
different limit on a real disk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ._common import rate_for


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)


def write_fdatasync_rate(directory: Path, record_size: int, duration: float) -> float:
    """Durable appends per second: one ``write`` of ``record_size`` bytes + ``fdatasync``."""
    path = directory / "raw-append.dat"
    fd = _open_append(path)
    buf = os.urandom(record_size)
    try:

        def step() -> None:
            os.write(fd, buf)
            os.fdatasync(fd)

        n, elapsed = rate_for(duration, step)
    finally:
        os.close(fd)
        path.unlink()
    return n / elapsed


def batch_write_fdatasync_rate(
    directory: Path, record_size: int, batch: int, duration: float
) -> float:
    """Bytes per second: ``batch`` records of ``record_size`` in one write, one fdatasync.

    The batch is one ready-made buffer, the best case for the raw loop; the log has to frame
    each record and gather them, which is part of what the ratio measures.
    """
    path = directory / "raw-batch.dat"
    fd = _open_append(path)
    buf = os.urandom(record_size) * batch
    try:

        def step() -> None:
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)

        n, elapsed = rate_for(duration, step)
    finally:
        os.close(fd)
        path.unlink()
    return n * len(buf) / elapsed


def sequential_read_rate(paths: list[Path], chunk: int = 1 << 20) -> float:
    """Bytes per second reading ``paths`` front to back in ``chunk``-sized ``os.read`` calls."""
    total = 0
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                data = os.read(fd, chunk)
                if not data:
                    break
                total += len(data)
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start)


def open_fstat_seconds(directory: Path) -> float:
    """Seconds to list ``directory`` and open, ``fstat`` and close every file in it: the least
    any log open must do."""
    start = time.perf_counter()
    for entry in os.scandir(directory):
        fd = os.open(entry.path, os.O_RDONLY)
        os.fstat(fd)
        os.close(fd)
    return time.perf_counter() - start
