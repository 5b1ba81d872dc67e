"""``Flusher``: runs one durable write (``pwrite`` + ``fdatasync``) at a time on a C thread.

Why a C thread and not ``trio.to_thread.run_sync``: the hand-off is paid on every durable
append, and an ``fdatasync`` here costs only ~90-140 us. Measured on the 2-core dev VM
(1 KiB records, one awaited write+fdatasync at a time, 3,000 iterations, raw Python
``os.pwrite`` + ``os.fdatasync`` loop = 11,000/s in the same run):

* ``trio.to_thread.run_sync(lib.tp_write, ...)``: 3,300-3,700/s (0.33 of raw)
* C thread, condition variable in, eventfd + ``wait_readable`` out: 5,200-7,100/s
* the same with the thread spinning 200 us for the next job before sleeping: ~6,500/s
* and the Trio side polling the completion word with checkpoints for up to 300 us before
  falling back to the eventfd: 10,700/s (0.97 of raw)

So: a C thread that spins briefly for the next job, and a Trio side that polls with
``trio.lowlevel.checkpoint()`` (other tasks keep running) before it parks on the eventfd.
Both spins are bounded, so an idle log costs no CPU, and both are adaptive: each spins only
while the waits it covers have recently been shorter than its window. On a shared 2-core VM
at load 7, a disk whose ``fdatasync`` takes 2-3 ms made the fixed spins cost 300-600 us of
CPU per append for nothing (the wait outlasts the window, so the eventfd wakes the thread
anyway), CPU the other thread needed. Both spins also yield the CPU (``sched_yield``) on
every turn: on an idle machine that returns at once, while at load 4-5 on 2 cores it took
the single appender from 0.4 to 0.75 of the raw loop (a busy-waiting thread had been
keeping the very thread it waited for off the core).

The Trio side's window follows the disk (``PollWindow``): it is about twice the typical
(median of the last few) time a write took to be seen done, at least ``poll_us`` and at most
``POLL_MAX``; with a disk slower than that, polling is skipped (waking on the eventfd then
costs a small share of the write). A fixed 300 us window suited a ~100 us ``fdatasync`` but
missed a ~300-450 us one nearly every time, so the appender parked on the eventfd on every
write (0.50-0.54 of the raw loop on such a disk; see issue 13). One polling wait per process
is enough: while one log's wait polls, the others park (the poller's checkpoints run Trio's
epoll check, which sees their eventfds at once), so three Raft nodes in one process spin one
loop, not three. The poll yields the core (``sched_yield``) only when no other Trio task is
runnable: under load a yield can lose the core for a whole time slice those tasks need.

Tried and dropped: pausing the poll, with a doubling backoff, after a poll that got less than
half the CPU time it spun for (``time.thread_time``: the cores looked contended). In the
benchmark's interleaved runs it made ``log.append.seq`` no better under load and a little
worse on a fast disk (median 0.74 against 0.77 without it, three runs each), where it parked
the appender for many writes after one busy moment. A server whose nodes share cores turns
polling off instead (``poll_us=0``, see ``kv.server``).

Writes without ``fdatasync`` (``FsLog(fsync=False)``) of at most ``INLINE_MAX`` bytes are
done on the calling thread: a ``pwrite`` into the page cache of a few hundred KiB costs less
than the two thread wake-ups of a hand-off, and blocks the event loop far less than 1 ms.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

import trio

from .._native import ffi, lib

INLINE_MAX = 256 << 10
POLL_MAX = 2e-3
"""Longest Trio-side poll, in seconds: a write expected to take longer is waited for parked."""


class PollWindow:
    """How long the Trio side polls for the write in flight before parking (pure, no I/O).

    ``window()`` before each wait: seconds to poll (0: park at once). ``observe(took)``
    after it: how long the write took to be seen done."""

    KEEP = 16  # recent latencies kept for the median

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self._recent = [0.0] * self.KEEP
        self._n = 0
        self.typical = 0.0  # median of the recent latencies (0: none yet)

    def window(self) -> float:
        if self.floor <= 0:
            return 0.0
        want = max(self.floor, 2 * self.typical + 50e-6)
        return want if want <= POLL_MAX else 0.0

    def observe(self, took: float) -> None:
        self._recent[self._n % self.KEEP] = took
        self._n += 1
        if self._n <= self.KEEP:
            self.typical = sorted(self._recent[: self._n])[(self._n - 1) // 2]
        elif self._n % 4 == 0:  # often enough to follow the disk, cheaply
            self.typical = sorted(self._recent)[self.KEEP // 2]


class Flusher:
    _polling = 0
    """Waits polling right now (on any log of this process): one is enough per thread."""

    def __init__(self, spin_us: int = 200, poll_us: int = 300) -> None:
        fp = ffi.new("tp_flusher**")
        efd = ffi.new("int*")
        rc = lib.tp_flusher_start(fp, efd, spin_us * 1000)
        if rc:
            raise OSError(-rc, f"cannot start the log's flusher thread: {errno.errorcode[-rc]}")
        self._f = fp[0]
        self._efd = efd[0]
        self._done = lib.tp_flusher_done_ptr(self._f)
        self._op = ffi.new("int*")
        self._poll = PollWindow(poll_us * 1e-6)
        self._keep: object = None
        self._inline: tuple[int, int] | None = None
        self._started = 0.0
        self._length = 0
        self._sync = False
        # For metrics (tinyraftplus.metrics); per write round, never per record.
        self.bytes_written = 0
        """Bytes of the writes that succeeded."""
        self.on_sync: Callable[[float], None] | None = None
        """Called with the seconds each successful durable write (``pwrite`` +
        ``fdatasync`` on the thread) took from submit to seen done: what its appenders
        waited for, hand-off included. Reuses the timestamps taken for the poll anyway."""

    def submit(self, fd: int, buf: object, length: int, off: int, sync: bool) -> None:
        """Start a write; ``buf`` (a cffi buffer) must stay alive until ``wait`` returns."""
        if not sync and length <= INLINE_MAX:
            rc = lib.tp_write(fd, buf, length, off, 0, self._op)
            self._inline = (rc, self._op[0])
            if rc == 0:
                self.bytes_written += length
            return
        self._keep = buf
        self._length = length
        self._sync = sync
        rc = lib.tp_flusher_submit(self._f, fd, buf, length, off, 1 if sync else 0)
        if rc:
            raise RuntimeError(f"flusher busy ({rc}): a write was submitted twice")
        self._started = time.perf_counter()

    @trio.lowlevel.enable_ki_protection
    async def wait(self) -> tuple[int, int]:
        """(rc, failed_op) of the submitted write. Not cancellable, without a shielded
        cancel scope around the common case: a shielded scope costs about 8 us to enter
        and leave, a third of the Python cost of a durable append, so only the park on the
        eventfd (the slow path) has one; the polls are schedule points that never cancel.
        A KeyboardInterrupt can still end the park: the result is then kept (the write
        stays in flight) and the next call returns it."""
        if self._inline is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            result, self._inline = self._inline, None
            return result
        done = self._done
        if not done[0]:
            window = self._poll.window()
            if window and Flusher._polling:
                # Another log's wait is polling on this thread already: its checkpoints run
                # Trio's epoll check, which sees this write's eventfd as soon as it fires.
                window = 0.0
            if window:
                Flusher._polling += 1
                clock = time.perf_counter
                until = self._started + window
                stats = trio.lowlevel.current_statistics
                try:
                    while not done[0] and clock() < until:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        if not done[0] and not stats().tasks_runnable:
                            # Idle but for us: let the flusher thread run first if it shares
                            # this core. Not while other tasks are runnable: under load the
                            # yield can lose the core for a whole time slice they need.
                            os.sched_yield()
                finally:
                    Flusher._polling -= 1
        while True:
            if not done[0] and not lib.tp_flusher_park(self._f):
                with trio.CancelScope(shield=True):
                    await trio.lowlevel.wait_readable(self._efd)
            rc = lib.tp_flusher_collect(self._f, self._op)
            if rc != -errno.EAGAIN:
                self._keep = None
                elapsed = time.perf_counter() - self._started
                self._poll.observe(elapsed)
                if rc == 0:
                    self.bytes_written += self._length
                    if self._sync and self.on_sync is not None:
                        self.on_sync(elapsed)
                return rc, self._op[0]

    def stop(self) -> None:
        if self._f is not None:
            try:
                trio.lowlevel.notify_closing(self._efd)
            except RuntimeError:  # not inside Trio (closing from a finalizer)
                pass
            lib.tp_flusher_stop(self._f)  # joins the thread, closes the eventfd
            self._f = None
