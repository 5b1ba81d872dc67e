"""Issue 9.5: an ``FsLog`` across ``fork()``, across ``exec``, and dropped without ``close()``."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings

import pytest
import trio

from tinyraftplus import FsLog
from tinyraftplus.errors import ClosedError


def _threads() -> int:
    """Threads of this process that Python did not start (the log's C flusher threads):
    Trio's worker threads come and go (an idle one exits after a while), so counting every
    thread made this flaky."""
    import threading

    python = {t.native_id for t in threading.enumerate()}
    return len([t for t in os.listdir("/proc/self/task") if int(t) not in python])


async def test_child_after_fork_refuses_use_and_does_not_hold_the_lock(tmp_path) -> None:
    log = FsLog(tmp_path, "x")
    await log.open()
    await log.append(b"parent")
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Trio here, only synchronous calls
        try:
            msgs = []
            for call in (
                lambda: log.entries(0, 0, 100),
                lambda: log.append(b"child").send(None),
                lambda: log.truncate(-1).send(None),
            ):
                try:
                    call()
                    msgs.append("no error")
                except ClosedError as e:
                    msgs.append("fork" if "fork()" in str(e) else str(e))
            os.write(w, ("|".join(msgs) + "\n").encode())
            os.read(go_r, 1)  # stay alive while the parent closes and reopens the log
        finally:
            os._exit(0)
    try:
        os.close(w)
        with os.fdopen(r) as f:
            line = f.readline().strip()
        assert line == "fork|fork|fork", line
        await log.append(b"parent again")  # the parent's copy is unaffected
        await log.close()
        # Before: the child's inherited descriptor kept the flock, so this raised
        # LogLockedError for as long as the child lived.
        async with FsLog(tmp_path, "x") as again:
            assert [e.data async for e in again.iter()] == [b"parent", b"parent again"]
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)


async def test_descriptors_are_not_inherited_across_exec(tmp_path) -> None:
    async with FsLog(tmp_path, "x", segment_size=4096) as log:
        for i in range(20):
            await log.append(b"%d" % i * 100)
        probe = (
            "import os\n"
            "for fd in os.listdir('/proc/self/fd'):\n"
            "    try: print(os.readlink('/proc/self/fd/' + fd))\n"
            "    except OSError: pass\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], close_fds=False, capture_output=True, text=True
        ).stdout
        assert str(tmp_path) not in out and "eventfd" not in out, out




async def test_dropped_log_stops_its_thread_and_releases_the_lock(tmp_path) -> None:
    before = _threads()
    log = FsLog(tmp_path, "x")
    await log.open()
    await log.append(b"a")
    assert _threads() == before + 1
    # A round in flight when it is dropped: its buffer must outlive the C thread's write.
    big = b"z" * (24 << 20)
    rnd = log._frame([big], [len(big)], None, 0, None, atomic=True)
    log._queue.popleft()
    log._submit(rnd)
    del rnd
    with pytest.warns(ResourceWarning, match="dropped without close"):
        del log
        gc.collect()
    assert _threads() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recovery warning: the write completed whole
        async with FsLog(tmp_path, "x") as again:  # before: LogLockedError
            got = [e.data async for e in again.iter()]
    assert got == [b"a", big]


async def test_close_detaches_the_finalizer(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        log = FsLog(tmp_path, "x")
        await log.open()
        await log.close()
        del log
        gc.collect()
    await trio.lowlevel.checkpoint()
