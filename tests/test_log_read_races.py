"""Issue 9.4: reads racing ``truncate`` (and ``compact``) see a consistent log.

``truncate`` did its file work in a worker thread while ``seq`` and the segment list
changed only afterwards, so the synchronous ``entries()`` opened deleted files (raw
``FileNotFoundError``) and returned records from the range being cut.
"""

from __future__ import annotations

import trio

from tinyraftplus import FsLog
from tinyraftplus.errors import InvalidArgumentError, LogError


def _payload(gen: int, seq: int) -> bytes:
    return b"gen %d seq %d " % (gen, seq) + b"p" * 150


async def test_entries_and_reads_during_truncates_and_compacts(tmp_path) -> None:
    async with FsLog(tmp_path, "x", segment_size=4096) as log:
        gen = 0
        stats = {"reads": 0, "log_errors": 0}
        done = trio.Event()

        def check(got: list, lo: int, hi: int) -> None:
            assert [e.seq for e in got] == list(range(lo, lo + len(got))), "seqs skip"
            for e in got:
                assert e.data.split(b" ")[3] == str(e.seq).encode(), e

        async def reader(use_entries: bool) -> None:
            while not done.is_set():
                lo, hi = log.first_seq, log.seq
                if hi >= lo:
                    stats["reads"] += 1
                    try:
                        if use_entries:
                            got = log.entries(lo, hi, 1 << 30)
                            assert len(got) == hi - lo + 1
                        else:
                            got = [e async for e in log.iter(lo)]
                        check(got, lo, hi)
                    except InvalidArgumentError as e:  # documented for iter
                        assert not use_entries and "compacted away" in str(e), e
                    except LogError:
                        stats["log_errors"] += 1
                await trio.sleep(0)

        async with trio.open_nursery() as n:
            n.start_soon(reader, True)
            n.start_soon(reader, False)
            for i in range(15):
                gen += 1
                base = log.seq + 1
                await log.append_batch([_payload(gen, base + k) for k in range(60)])
                cut = log.seq - 45 - i
                await log.truncate(cut)
                assert log.seq == cut
                if i % 5 == 4:
                    await log.compact(log.seq - 40)
            done.set()
        assert stats["reads"] > 50
        assert stats["log_errors"] == 0
