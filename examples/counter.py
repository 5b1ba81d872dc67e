"""A replicated state machine: a counter on three nodes. ``python examples/counter.py``"""

import sys
import tempfile
from contextlib import AsyncExitStack

import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.transport.memory import MemoryNetwork


class Counter:
    def __init__(self):
        self.count = 0

    def apply(self, bufs, seq):  # deterministic: every replica computes the same
        out = []
        for buf in bufs:  # bufs[i] is the entry at seq + i
            if buf is not None:  # None is a leader's no-op entry
                self.count += 1
            out.append(self.count)
        return out  # one result per entry

    def read(self, cmd):
        return self.count


async def main(directory):
    ids = [1, 2, 3]
    net = MemoryNetwork()
    nodes = []
    for i in ids:
        sm = Counter()
        node = RaftNode(i, ids, net.sender(i), FsLog(directory, f"n{i}"),
                        apply=sm.apply, read=sm.read)
        net.attach(node)
        nodes.append(node)
    async with AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
        for node in nodes:  # any node takes appends: a follower forwards to the leader
            result = await node.append(b"+1")
            print(f"node {node.node_id} appended seq {result.seq}: count is {result.result}")
        for node in nodes:  # linearizable reads, from any node
            print(f"node {node.node_id} reads {await node.read()}")


if __name__ == "__main__":
    try:
        with tempfile.TemporaryDirectory() as d:
            trio.run(main, d)
    except KeyboardInterrupt:  # Ctrl-C: the nodes have stopped, the directory is gone
        print("interrupted", file=sys.stderr)
        sys.exit(130)
