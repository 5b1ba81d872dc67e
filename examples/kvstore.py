"""A replicated key-value store in three processes: ``python examples/kvstore.py``.

Starts three ``python -m tinyraftplus.kv`` nodes on loopback (plaintext, to need no
certificates; see the README for mutual TLS), writes and reads through
``tinyraftplus.kv.client.Client``, kills the leader with SIGKILL, keeps writing through the
two survivors, and stops everything (on every way out, Ctrl-C included). The state machine
is ``tinyraftplus.kv.KVStore``; the nodes' logs go to files beside their data.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    import trio

    from tinyraftplus.kv.client import Client
except KeyboardInterrupt:  # Ctrl-C while Python still loads: nothing started yet
    print("interrupted", file=sys.stderr)
    sys.exit(130)

READY = re.compile(r"ready id=(\d+) peer=\S+ client=(\S+)")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_cluster(data: str, procs: dict[int, subprocess.Popen]) -> list[str]:
    """Start the three nodes into ``procs`` (the caller's, so that whatever was started is
    stopped on every way out, Ctrl-C included); their logs go to DATA/nodeN.log."""
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip((1, 2, 3), free_ports(3), strict=True))
    addrs = []
    # A Ctrl-C inside Popen could leave a process started but not yet in `procs`: hold it
    # until all three are recorded (a few milliseconds), then act on it.
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        for i in (1, 2, 3):
            with open(f"{data}/node{i}.log", "w") as log:
                procs[i] = subprocess.Popen(
                    [sys.executable, "-m", "tinyraftplus.kv", "--id", str(i), "--peers", peers,
                     "--client-port", "0", "--data", f"{data}/node{i}", "--plaintext"],
                    stdout=subprocess.PIPE, stderr=log, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    for i in (1, 2, 3):
        line = procs[i].stdout.readline()  # the server's one line: "... ready ..."
        m = READY.search(line)
        if m is None:
            with open(f"{data}/node{i}.log") as log:
                raise SystemExit(f"node {i} did not start:\n{log.read()[-2000:]}")
        addrs.append(m.group(2))
    return addrs


async def main(procs: dict[int, subprocess.Popen], addrs: list[str]) -> None:
    async with Client(addrs, plaintext=True) as c:
        print("put  ->", await c.put("greeting", "hello"))
        print("append ->", await c.append("greeting", ", world"))
        print("get  ->", await c.get("greeting"))

        leader = (await c.status())["leader"]
        print(f"killing the leader, node {leader}")
        procs[leader].kill()
        t0 = time.monotonic()
        await c.put("after", "the failover")
        print(f"a write committed {time.monotonic() - t0:.2f}s later, without node {leader}")
        print("get  ->", await c.get("after"), "| status:", await c.status())


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        procs: dict[int, subprocess.Popen] = {}
        try:
            addrs = start_cluster(tmp, procs)
            trio.run(main, procs, addrs)
        except KeyboardInterrupt:
            print("interrupted; stopping the nodes", file=sys.stderr)
            sys.exit(130)
        finally:
            for p in procs.values():
                p.kill()
                p.wait()
