"""Child process for the Ctrl-C tests (tests/test_log_ki.py).

``python ki_child.py DIR MODE``: appends from the main task and from several child tasks
until interrupted. MODE ``sigint``: the parent sends real SIGINTs. MODE ``inject``: the
flusher's wait raises KeyboardInterrupt once, right after a round was submitted (what a
Ctrl-C delivered inside ``Flusher.wait`` did). Prints ``ready`` once appending, then
``acked N`` (the highest acknowledged seq) and ``closed`` when ``close()`` returned.
"""

from __future__ import annotations

import sys

import trio

from tinyraftplus import FsLog
from tinyraftplus.log.flusher import Flusher

acked = -1


@trio.lowlevel.enable_ki_protection
async def main(directory: str, mode: str) -> None:
    """KI-protected itself, so that a Ctrl-C arriving while it prints its report (after
    ``close()`` returned or raised) waits for the next checkpoint instead of cutting the
    report short: once such a Ctrl-C landed between the two prints and the parent saw no
    ``closed`` line. Appending and closing run unprotected, as a user's code would."""
    if mode == "inject":
        real_wait = Flusher.wait
        armed = [50]

        async def wait(self: Flusher) -> tuple[int, int]:
            armed[0] -= 1
            if armed[0] == 0:
                raise KeyboardInterrupt
            return await real_wait(self)

        Flusher.wait = wait  # type: ignore[method-assign]
    log = FsLog(directory, "x", segment_size=1 << 16)
    await log.open()
    try:
        await _append_until_interrupted(log)
    finally:
        try:
            await _close(log)
        finally:
            print(f"acked {acked}", flush=True)
            print("closed" if log.closed else "NOT closed", flush=True)


@trio.lowlevel.disable_ki_protection
async def _append_until_interrupted(log: FsLog) -> None:
    async def appender(k: int) -> None:
        global acked
        i = 0
        while True:
            seq = await log.append(b"task %d record %d " % (k, i) + b"x" * 300)
            acked = max(acked, seq)
            i += 1

    async with trio.open_nursery() as n:
        for k in range(4):
            n.start_soon(appender, k)
        print("ready", flush=True)
        await appender(99)


@trio.lowlevel.disable_ki_protection
async def _close(log: FsLog) -> None:
    await log.close()


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1], sys.argv[2], strict_exception_groups=False)
    except KeyboardInterrupt:
        pass
    except BaseException as e:  # a group: KeyboardInterrupt beside other tasks' errors
        split = getattr(e, "split", None)
        if split is None or split(KeyboardInterrupt)[1] is not None:
            raise
