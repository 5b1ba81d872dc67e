"""The original's 3-node example, in Python: ``python -m tinyraftplus.demo``.

Three nodes in one process talk over the in-memory network, each with its own durable
``FsLog``. They elect a leader, each node appends one entry (followers forward theirs to the
leader), and every node's log ends with the same head.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import AsyncExitStack

import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus._interrupt import run_command
from tinyraftplus.transport.memory import MemoryNetwork


def to_buf(obj: object) -> bytes:
    return json.dumps(obj).encode()


def to_obj(buf: bytes | None) -> object:
    return None if buf is None else json.loads(buf)


async def main(directory: str) -> None:
    ids = [1, 2, 3]
    net = MemoryNetwork()
    nodes = []
    for i in ids:
        log = FsLog(directory, f"node{i}")
        # quorum=3 makes every append wait for all three logs (the original's
        # `minFollowers: 2`), so every head below is the same.
        node = RaftNode(i, ids, net.sender(i), log, quorum=3)
        net.attach(node)
        nodes.append(node)

    async with AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
        for node in nodes:
            await node.wait_leader()

        ok = await nodes[0].append(to_buf({"a": 1}))
        print("append", ok.seq, to_obj(ok.data))
        ok = await nodes[1].append(to_buf({"b": 2}))
        print("append", ok.seq, to_obj(ok.data))
        ok = await nodes[2].append(to_buf({"c": 3}))
        print("append", ok.seq, to_obj(ok.data))

        for node in nodes:
            print("head", to_obj(node.log.head))
    # leaving the block stops every node and closes its log


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="tinyraftplus-demo-") as d:
        trio.run(main, d)


def cli() -> None:
    """``run()`` as a command: Ctrl-C stops the nodes, removes the directory, prints one
    line and exits with status 130."""
    run_command(run, "tinyraftplus.demo")


if __name__ == "__main__":
    cli()
