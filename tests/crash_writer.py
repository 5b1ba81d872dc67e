"""Child process for ``tests/test_log_crash.py``: append to an ``FsLog`` until SIGKILLed.

Run as ``python tests/crash_writer.py DIR NAME GEN SEED SEGMENT_SIZE REPORT_FD``. It imports
everything, waits for a ``go`` line on stdin (so the parent can start it ahead of time), opens
the log, reports ``R <seq> <first_seq>``, then runs several concurrent Trio tasks that do single
appends, batches and transactions (some aborted, some rolled back by an exception), and after
every acknowledgement writes one line to ``REPORT_FD``:

* ``A <op> <first_seq> <count>``: the operation's records are durable at those seqs;
* ``X <op>``: a transaction was aborted (its records must never become visible).

Each report is a single ``os.write`` of one line, so it is out of the process the moment the
call returns: the parent can never see an acknowledgement the child had not yet received, and
never misses one the child had received before it was killed (the pipe survives the writer).

Every payload describes itself (see ``make_payload``): which child generation, task and
operation wrote it, the operation's kind and size, and the record's index inside it, plus
filler and a digest derived from those fields. The parent regenerates the exact bytes from the
fields, so any record the log returns can be checked even if its acknowledgement never left
the child, and a partial batch or transaction shows up as an operation with missing indexes.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

# Kinds of operation. Aborted kinds must never be visible in the log.
SINGLE = "s"
BATCH = "b"
TXN = "t"
TXN_ABORTED = "a"  # explicit ``await txn.abort()``
TXN_RAISED = "e"  # an exception escapes the ``async with`` block

ABORTED_KINDS = frozenset({TXN_ABORTED, TXN_RAISED})
MAGIC = b"TRPCRASH"
TASK_STRIDE = 1_000_000  # op id = task * TASK_STRIDE + n; ops are unique within a generation


def make_payload(gen: int, op: int, kind: str, count: int, idx: int) -> bytes:
    """The exact bytes of record ``idx`` of operation ``op`` in generation ``gen``.

    Sizes vary (about 30 B to 1.2 KiB) so that segment rolls land at many different points
    of batches and transactions; the filler and digest come from the header so that a record
    whose bytes changed anywhere no longer regenerates.
    """
    head = b"%s %d %d %s %d %d " % (MAGIC, gen, op, kind.encode(), count, idx)
    digest = hashlib.blake2b(head, digest_size=16).digest()
    size = digest[0] | (digest[1] & 3) << 8  # 0..1023 bytes of filler
    filler = (digest * (size // 16 + 1))[:size]
    return head + filler + hashlib.blake2b(head + filler, digest_size=8).digest()


def parse_payload(data: bytes) -> tuple[int, int, str, int, int]:
    """Return ``(gen, op, kind, count, idx)`` of a payload made by ``make_payload``.

    Raises ``ValueError`` if ``data`` is not exactly such a payload (wrong fields, torn or
    altered bytes): the caller treats that as a corrupt record returned by the log.
    """
    parts = data.split(b" ", 6)
    if len(parts) != 7 or parts[0] != MAGIC:
        raise ValueError(f"not a crash-test payload: {data[:60]!r}")
    gen, op, count, idx = int(parts[1]), int(parts[2]), int(parts[4]), int(parts[5])
    kind = parts[3].decode()
    if make_payload(gen, op, kind, count, idx) != data:
        raise ValueError(f"payload bytes do not match their header: {data[:60]!r}")
    return gen, op, kind, count, idx


class _Rollback(Exception):
    """Raised inside a transaction to check that an exception rolls it back."""


async def _run(directory: str, name: str, gen: int, seed: int, segment_size: int, fd: int) -> None:
    import trio

    from tinyraftplus.log import FsLog  # already imported by main(): no delay here

    def report(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    log = FsLog(directory, name, segment_size=segment_size, fsync=True)
    await log.open()
    report(f"R {log.seq} {log.first_seq}")

    async def singles(task: int) -> None:
        rng = random.Random(seed * 31 + task)
        n = 0
        while True:
            op = task * TASK_STRIDE + n
            seq = await log.append(make_payload(gen, op, SINGLE, 1, 0), term=gen)
            report(f"A {op} {seq} 1")
            n += 1
            if rng.random() < 0.05:
                await trio.sleep(0)

    async def batches(task: int) -> None:
        rng = random.Random(seed * 31 + task)
        n = 0
        while True:
            op = task * TASK_STRIDE + n
            count = rng.choice((1, 2, 3, 5, 8, 13, 21, 34))
            items = [make_payload(gen, op, BATCH, count, i) for i in range(count)]
            first = await log.append_batch(items, term=gen)
            report(f"A {op} {first} {count}")
            n += 1

    async def txns(task: int) -> None:
        rng = random.Random(seed * 31 + task)
        n = 0
        while True:
            op = task * TASK_STRIDE + n
            count = rng.randint(1, 12)
            roll = rng.random()
            kind = TXN if roll < 0.7 else TXN_ABORTED if roll < 0.85 else TXN_RAISED
            seqs: list[object] = []
            try:
                async with log.txn() as txn:
                    for i in range(count):
                        data = make_payload(gen, op, kind, count, i)
                        seqs.append(await txn.append(data, term=gen))
                        if rng.random() < 0.2:
                            await trio.sleep(0)
                    if kind == TXN_ABORTED:
                        await txn.abort()
                    elif kind == TXN_RAISED:
                        raise _Rollback()
            except _Rollback:
                pass
            if kind == TXN:
                first = seqs[0]
                if not isinstance(first, int) or seqs != list(range(first, first + count)):
                    raise AssertionError(f"txn.append returned {seqs!r}, not consecutive seqs")
                report(f"A {op} {first} {count}")
            else:
                report(f"X {op}")
            n += 1

    async with trio.open_nursery() as nursery:
        # Task numbers start at 1 so that op ids never collide with another task's.
        nursery.start_soon(singles, 1)
        nursery.start_soon(singles, 2)
        nursery.start_soon(singles, 3)
        nursery.start_soon(batches, 4)
        nursery.start_soon(batches, 5)
        nursery.start_soon(txns, 6)
        nursery.start_soon(txns, 7)


def main(argv: list[str]) -> None:
    import trio

    import tinyraftplus.log  # noqa: F401  (import before "go": the parent times from there)

    directory, name, gen, seed, segment_size, fd = argv
    if sys.stdin.buffer.readline() != b"go\n":
        sys.exit("crash_writer: the parent went away before saying go")
    trio.run(_run, directory, name, int(gen), int(seed), int(segment_size), int(fd))


if __name__ == "__main__":
    main(sys.argv[1:])
