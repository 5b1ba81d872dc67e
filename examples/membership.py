"""Grow a 3-node cluster to 5 and shrink it back to 3 while it serves, then hand leadership
over: membership changes through the log (joint consensus when two voters change at once).

    python examples/membership.py
"""

from __future__ import annotations

import tempfile

import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.transport.memory import MemoryNetwork


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def apply(self, bufs: list[bytes | None], seq: int) -> list[int | None]:
        out: list[int | None] = []
        for b in bufs:
            if b is None:  # a leader's no-op or a configuration entry
                out.append(None)
            else:
                self.count += 1
                out.append(self.count)
        return out


async def main(directory: str) -> None:
    net = MemoryNetwork()
    nodes: dict[int, RaftNode] = {}
    counters: dict[int, Counter] = {}

    async def start(i: int, peers: list[int], **opts: object) -> RaftNode:
        counters[i] = Counter()
        node = RaftNode(i, peers, net.sender(i), FsLog(directory, f"node{i}"),
                        apply=counters[i].apply, **opts)  # type: ignore[arg-type]
        net.attach(node)
        nodes[i] = node
        await nursery.start(node.serve)
        return node

    async with net, trio.open_nursery() as nursery:
        for i in (1, 2, 3):
            await start(i, [1, 2, 3])
        leader = nodes[await nodes[1].wait_leader(commit=True)]
        if leader.node_id != 1:  # (so that what this prints is always the same)
            leader = nodes[await leader.transfer_leadership(1)]
        await leader.append(b"+")

        for i in (4, 5):  # new machines join as learners, catch up, then vote
            await start(i, [1, 2, 3], join=True)
            await leader.add_learner(i)
        cfg = await leader.change_membership([1, 2, 3, 4, 5])  # two voters: joint consensus
        print("grown:", cfg.describe())
        await leader.append(b"+")

        keep = [1, 4, 5]
        cfg = await leader.change_membership(keep)  # two voters leave together
        print("shrunk:", cfg.describe())

        new = await leader.transfer_leadership(4)
        print("leader now:", new)
        r = await nodes[new].append(b"+")
        for i in keep:
            await nodes[i].wait_apply(r.seq)
        print("counts:", [counters[i].count for i in keep])
        for node in nodes.values():
            await node.stop()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="tinyraftplus-membership-") as d:
        trio.run(main, d)
