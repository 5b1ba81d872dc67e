"""A small harness for node tests: N ``RaftNode``s over a ``MemoryNetwork``, each with its own
``FsLog`` in a temporary directory, started and stopped one by one inside a nursery."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.transport.memory import MemoryNetwork

FAST = dict(election_timeout=0.3, ping_timeout=0.05, append_timeout=8.0, read_timeout=8.0)


class Counter:
    """A deterministic state machine: counts entries; ``read`` returns the count."""

    def __init__(self) -> None:
        self.count = 0
        self.seen: list[tuple[int, bytes | None]] = []

    def apply(self, bufs: list[bytes | None], seq: int) -> list[Any]:
        out: list[Any] = []
        for i, b in enumerate(bufs):
            self.seen.append((seq + i, b))
            if b is None:
                out.append(None)
            else:
                self.count += 1
                out.append(self.count)
        return out

    def read(self, cmd: Any) -> int:
        return self.count


class Cluster:
    def __init__(self, root: Path, ids: list[Any], net: MemoryNetwork, nursery: trio.Nursery,
                 fsync: bool, machines: bool, opts: dict[str, Any]) -> None:
        self.root, self.ids, self.net, self.nursery = root, ids, net, nursery
        self.fsync, self.machines, self.opts = fsync, machines, opts
        self.nodes: dict[Any, RaftNode] = {}
        self.sms: dict[Any, Counter] = {}

    def make(self, i: Any, **extra: Any) -> RaftNode:
        log = FsLog(str(self.root), f"node{i}", fsync=self.fsync)
        opts = {**FAST, **self.opts, **extra}
        # A new cluster is bootstrapped explicitly; a node started again (a restart, or a
        # restart after its data was deleted) is not, so a wiped node recovers.
        opts.setdefault("bootstrap", i not in self.nodes)
        if self.machines:
            sm = self.sms[i] = Counter()
            opts.setdefault("apply", sm.apply)
            opts.setdefault("read", sm.read)
        node = RaftNode(i, self.ids, self.net.sender(i), log, **opts)
        self.net.attach(node)
        self.nodes[i] = node
        return node

    async def start(self, i: Any, **extra: Any) -> RaftNode:
        node = self.make(i, **extra)
        await self.nursery.start(node.serve)
        return node

    async def stop(self, i: Any) -> None:
        await self.nodes[i].stop()

    def running(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if n.running]

    async def leader(self, timeout: float = 10.0) -> RaftNode:
        """Wait until exactly one running node is leader and all running nodes agree on it."""
        with trio.fail_after(timeout):
            while True:
                up = self.running()
                leaders = [n for n in up if n.state == "leader"]
                if len(leaders) == 1 and all(n.leader == leaders[0].node_id for n in up):
                    return leaders[0]
                await trio.sleep(0.01)

    async def converge(self, timeout: float = 10.0) -> None:
        """Wait until every running node has applied the same last seq as the leader."""
        with trio.fail_after(timeout):
            while True:
                up = self.running()
                seqs = {n.apply_seq for n in up} | {n.seq for n in up}
                if len(seqs) == 1:
                    return
                await trio.sleep(0.01)


@asynccontextmanager
async def cluster(
    root: Path,
    n: int = 3,
    *,
    start: list[Any] | None = None,
    fsync: bool = False,
    machines: bool = True,
    net: MemoryNetwork | None = None,
    **opts: Any,
) -> AsyncIterator[Cluster]:
    ids = list(range(1, n + 1))
    async with trio.open_nursery() as nursery:
        network = net or MemoryNetwork(seed=1)
        async with network:
            c = Cluster(root, ids, network, nursery, fsync, machines, opts)
            for i in ids if start is None else start:
                await c.start(i)
            try:
                yield c
            finally:
                for node in list(c.nodes.values()):
                    await node.stop()
        nursery.cancel_scope.cancel()
