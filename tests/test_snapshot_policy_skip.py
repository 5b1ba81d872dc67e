"""Found while testing InstallSnapshot (SNAP_BUGS.md 1; fixed on main by 37b601e): a policy
boundary (``snapshot_entries``) crossed while the previous snapshot was still being written
was skipped for good, so replicas whose writes take different times ended up with snapshots
at different seqs, and a burst left the log uncompacted behind the last boundary. Now
applying waits at the boundary for the write in progress."""

from __future__ import annotations

from typing import Any

import trio
from cluster import FAST

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.transport.memory import MemoryNetwork


class SlowSnapshotSM:
    """Counts entries; its snapshot's writer waits for ``release`` (a slow disk, a big state)."""

    def __init__(self) -> None:
        self.count = 0
        self.release = trio.Event()

    def apply(self, bufs: list[bytes | None], seq: int) -> list[Any]:
        self.count += sum(b is not None for b in bufs)
        return [self.count] * len(bufs)

    def snapshot(self) -> Any:
        captured = self.count
        release = self.release

        async def chunks() -> Any:
            await release.wait()
            yield b"%d" % captured

        return chunks()

    def restore(self, meta: Any, stream: Any) -> None:
        self.count = int(stream.read())


async def test_boundary_crossed_during_a_snapshot_write_is_not_skipped(tmp_path) -> None:
    sm = SlowSnapshotSM()
    async with MemoryNetwork(seed=1) as net, trio.open_nursery() as nursery:
        log = FsLog(str(tmp_path), "node1", fsync=False, segment_size=4096)
        node = RaftNode(1, [1], net.sender(1), log, apply=sm.apply, snapshot=sm.snapshot,
                        restore=sm.restore, snapshot_entries=10, trailing_entries=0,
                        bootstrap=True, **FAST)
        net.attach(node)
        seqs: list[int] = []
        node.on("snapshot", lambda ev: seqs.append(ev.seq))
        await nursery.start(node.serve)
        async def release_later() -> None:
            await trio.sleep(0.5)
            sm.release.set()

        with trio.fail_after(10):
            while node.state != "leader":
                await trio.sleep(0.01)
            nursery.start_soon(release_later)  # the first snapshot is written for 0.5 s
            for k in range(30):  # the apply seq goes past 9 (snapshot starts), 19 and 29
                await node.append(b"x%d" % k)
            while not seqs:
                await trio.sleep(0.01)
            await trio.sleep(0.3)  # idle: nothing else will be applied
        await node.stop()
        nursery.cancel_scope.cancel()
    assert seqs[0] == 9
    # 20+ entries were applied since the snapshot at 9 with snapshot_entries=10: the policy
    # ("take one after this many applied entries since the last") owes one at 19 (or 29).
    assert seqs[:3] == [9, 19, 29], f"snapshots taken at {seqs}, apply seq 30"
