"""The durable log on its own: ``python examples/fslog.py``"""

import tempfile

import trio

from tinyraftplus import FsLog


async def main(directory):
    async with FsLog(directory, "events") as log:  # the log lives in DIRECTORY/events/
        seq = await log.append(b"hello")  # returns once durable (fdatasync)
        first = await log.append_batch([b"a", b"b", b"c"])  # atomic across a crash
        async with log.txn() as txn:  # several appends, all or nothing
            await txn.append(b"x")
            await txn.append(b"y")
        print("appended", seq, first, log.seq)  # seqs of hello, of a, and the last one
        await log.truncate(first)  # keep records <= first
        async for entry in log.iter(0):  # Entry(seq, term, data)
            print(entry.seq, entry.data)
        print(log.seq, log.head)  # last seq (-1 when empty), its payload


with tempfile.TemporaryDirectory() as d:
    trio.run(main, d)
