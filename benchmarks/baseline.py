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


def prealloc_write_fdatasync_rate(directory: Path, record_size: int, duration: float) -> float:
    """``write_fdatasync_rate`` into a file grown ahead of the writes (a sparse
    ``ftruncate``, as the log grows its tail): what the same loop gets when no
    ``fdatasync`` must make a new file size durable. The third baseline of
    ``log.append.seq``, which writes that way and beats the plain loop by that much."""
    path = directory / "raw-prealloc.dat"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = os.urandom(record_size)
    off = 0
    size = 0
    try:

        def step() -> None:
            nonlocal off, size
            if off + record_size > size:
                size = off + record_size + (4 << 20)
                os.ftruncate(fd, size)
            os.pwrite(fd, buf, off)
            os.fdatasync(fd)
            off += record_size

        n, elapsed = rate_for(duration, step)
    finally:
        os.close(fd)
        path.unlink()
    return n / elapsed


def parallel_write_fdatasync_rate(directory: Path, record_size: int, writers: int,
                                  duration: float) -> float:
    """Durable appends per second *per writer* with ``writers`` threads each running the
    ``write_fdatasync_rate`` loop on its own file at once: each one's share of a disk that
    several replicas on one machine write to (``os.write`` and ``os.fdatasync`` release
    the GIL, so the threads overlap as processes would)."""
    import threading

    rates = [0.0] * writers

    def one(i: int) -> None:
        sub = directory / f"raw-parallel-{i}"
        sub.mkdir(exist_ok=True)
        try:
            rates[i] = write_fdatasync_rate(sub, record_size, duration)
        finally:
            sub.rmdir()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates) / writers


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
    """Seconds to list ``directory`` (and the directories under it: a log keeps its files in
    a subdirectory named after it) and open, ``fstat`` and close every file in it: the least
    any log open must do."""
    start = time.perf_counter()
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fstat(fd)
            os.close(fd)
    return time.perf_counter() - start


async def handoff_write_fdatasync_rate(
    directory: Path, record_size: int, duration: float
) -> tuple[float, list[float]]:
    """Durable appends per second through a plain Python thread hand-off, and each one's
    latency in seconds.

    The shape every durable log on an event loop pays: the caller (a Trio task) hands the
    record to a worker thread, the thread does ``write`` + ``fdatasync`` and signals an
    eventfd (a pipe where there is none), and the caller waits for it through Trio's epoll.
    One record in flight, as in ``log.append.seq``. The gap between this and the raw loop is
    the cost of waking a thread and the event loop twice per record on this machine; the
    log, which does the same hand-off in C, should reach at least this.
    """
    import queue
    import threading

    import trio

    path = directory / "raw-handoff.dat"
    fd = _open_append(path)
    buf = os.urandom(record_size)
    if hasattr(os, "eventfd"):
        rfd = wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        def signal() -> None:
            os.eventfd_write(wfd, 1)

        def drain() -> bool:
            try:
                os.eventfd_read(rfd)
                return True
            except BlockingIOError:
                return False
    else:  # pragma: no cover (not Linux)
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)

        def signal() -> None:
            os.write(wfd, b"x")

        def drain() -> bool:
            try:
                return bool(os.read(rfd, 64))
            except BlockingIOError:
                return False

    requests: queue.SimpleQueue[bool] = queue.SimpleQueue()

    def worker() -> None:
        while requests.get():
            os.write(fd, buf)
            os.fdatasync(fd)
            signal()

    thread = threading.Thread(target=worker, name="handoff-baseline", daemon=True)
    thread.start()
    latencies: list[float] = []
    try:
        n = 0
        clock = time.perf_counter
        start = clock()
        end = start + duration
        while True:
            t0 = clock()
            requests.put(True)
            while not drain():
                await trio.lowlevel.wait_readable(rfd)
            now = clock()
            latencies.append(now - t0)
            n += 1
            if now >= end:
                break
    finally:
        requests.put(False)
        thread.join()
        os.close(fd)
        os.close(rfd)
        if wfd != rfd:
            os.close(wfd)
        path.unlink()
    return n / (now - start), latencies
