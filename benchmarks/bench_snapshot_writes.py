"""What snapshots cost the write path: ``raft.append.concurrent`` with a state machine that
is snapshotted every ``SNAPSHOT_ENTRIES`` entries and a log compacted behind it, beside the
same cluster without snapshots, measured alternately in the same run (target: the ratio
stays >= 0.9, i.e. writes drop by at most 10%)."""

from __future__ import annotations

import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgpack
import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.transport.memory import MemoryNetwork

from ._common import Context, Result, Target, median

TITLE = "Snapshots: what they cost the write path"
CONCURRENCY = 256


class _KV:
    """A map of 16-byte keys; snapshot = a captured copy, msgpacked in pieces."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def apply(self, bufs: list[bytes | None], seq: int) -> None:
        d = self.data
        for b in bufs:
            if b is not None:
                d[b[:16]] = b[16:]

    def snapshot(self) -> Any:
        items = list(self.data.items())

        def chunks() -> Any:
            for i in range(0, len(items), 4096):
                yield msgpack.packb(items[i:i + 4096])

        return chunks()

    def restore(self, meta: Any, stream: Any) -> None:
        self.data = {k: v for part in msgpack.Unpacker(stream) for k, v in part}


async def _rate(directory: Path, snapshots: bool, duration: float,
                snapshot_entries: int) -> tuple[float, int]:
    ids = [1, 2, 3]
    async with AsyncExitStack() as stack:
        net = MemoryNetwork()
        await stack.enter_async_context(net)
        nodes = []
        sms = []
        for i in ids:
            sm = _KV()
            sms.append(sm)
            opts: dict[str, Any] = {}
            if snapshots:
                opts = dict(snapshot=sm.snapshot, restore=sm.restore,
                            snapshot_entries=snapshot_entries,
                            trailing_entries=snapshot_entries // 2)
            node = RaftNode(i, ids, net.sender(i),
                            FsLog(str(directory), f"n{i}", segment_size=4 << 20),
                            election_timeout=0.5, ping_timeout=0.1, append_timeout=30,
                            bootstrap=True, apply=sm.apply, **opts)
            net.attach(node)
            nodes.append(node)
        for node in nodes:
            await stack.enter_async_context(node)
        with trio.fail_after(20):
            while not any(n.state == "leader" for n in nodes):
                await trio.sleep(0.01)
        leader = next(n for n in nodes if n.state == "leader")
        await leader.wait_leader(commit=True)
        clock = time.perf_counter
        count = 0
        end = clock() + duration

        async def client(c: int) -> None:
            nonlocal count
            k = 0
            while clock() < end:
                key = b"%08d%08d" % (c, k % 100)
                await leader.append(key + os.urandom(84))
                k += 1
                count += 1

        start = clock()
        async with trio.open_nursery() as nursery:
            for c in range(CONCURRENCY):
                nursery.start_soon(client, c)
        rate = count / (clock() - start)
        taken = sum(1 for _ in os.scandir(directory / "n1.snap")) if snapshots else 0
    return rate, taken


async def run(ctx: Context) -> list[Result]:
    name = "raft.append.concurrent.snapshots"
    if not ctx.wants(name):
        return []
    dur = ctx.duration
    every = 2_000 if ctx.quick else 10_000
    with_s: list[float] = []
    without: list[float] = []
    taken = 0
    for r in range(ctx.repeats):
        for snaps in ((False, True) if r % 2 == 0 else (True, False)):
            d = ctx.subdir(f"snapw-{r}-{int(snaps)}")
            rate, n = await _rate(d, snaps, dur, every)
            ctx.remove(d)
            (with_s if snaps else without).append(rate)
            taken = max(taken, n)
    return [Result(
        name, median(with_s), "entries/s", baseline=median(without),
        baseline_name="the same without snapshots", target=Target(">=", 0.9, "ratio"),
        samples=with_s, baseline_samples=without,
        notes=f"{CONCURRENCY} clients, 100 B puts into a map; a snapshot every {every:,} "
              f"entries and the log compacted behind it (snapshot files seen: {taken})",
    )]
