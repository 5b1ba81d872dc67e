"""The peer benchmark: the same shape of workload on PySyncObj (``pip install pysyncobj``).

Three PySyncObj processes on loopback replicate a dict; the process that becomes leader keeps
``concurrency`` replicated ``set`` calls of ``size``-byte values in flight (each callback issues
the next) and counts the ones that come back committed. PySyncObj has no client protocol, so
the requests are issued inside the leader's process; ours come from a separate client process
over TLS, which only makes ours harder.

Durability: PySyncObj is run with its defaults, an in-memory journal (``journalFile=None``):
nothing is written to disk, let alone fsynced. Its peer connections are not encrypted.

Child usage: ``python -m benchmarks.peer_pysyncobj node SELF PARTNER,PARTNER SECONDS
CONCURRENCY SIZE`` (prints ``RATE <writes/s>`` from the leader).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from ._common import child_env, free_ports


def measure(directory: Path, seconds: float, concurrency: int, size: int) -> float:
    """Start three PySyncObj processes, return the leader's committed writes per second."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    procs, outs = [], []
    try:
        for i, me in enumerate(addrs):
            out = directory / f"pso-{i}.txt"
            outs.append(out)
            partners = ",".join(a for a in addrs if a != me)
            with open(out, "wb") as o:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.peer_pysyncobj", "node", me, partners,
                     str(seconds), str(concurrency), str(size)],
                    stdout=o, stderr=subprocess.STDOUT, env=child_env(),
                    stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + seconds + 60
        while time.monotonic() < deadline:
            for out in outs:
                m = re.search(r"^RATE (\S+)", out.read_text(), re.M)
                if m:
                    return float(m.group(1))
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        raise RuntimeError("PySyncObj run gave no rate:\n" +
                           "\n".join(o.read_text()[-1500:] for o in outs))
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _node(me: str, partners: str, seconds: str, conc: str, size: str) -> None:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    class Store(SyncObj):
        def __init__(self) -> None:
            conf = SyncObjConf(appendEntriesUseBatch=True, commandsQueueSize=100_000)
            super().__init__(me, partners.split(","), conf)
            self._data: dict[bytes, bytes] = {}

        @replicated
        def set(self, key: bytes, value: bytes) -> bool:
            self._data[key] = value
            return True

    obj = Store()
    while obj._getLeader() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    if not obj._isLeader():
        time.sleep(3600)  # a follower: replicate until killed
        return
    value = os.urandom(int(size))
    lock = threading.Lock()
    state = {"n": 0, "count": 0, "measuring": False, "stop": False}

    def issue() -> None:
        with lock:
            state["n"] += 1
            n = state["n"]
        obj.set(b"k%d" % n, value, callback=done)

    def done(result: object, error: int) -> None:
        if error == FAIL_REASON.SUCCESS and state["measuring"]:
            with lock:
                state["count"] += 1
        if not state["stop"]:
            issue()

    for _ in range(int(conc)):
        issue()
    time.sleep(1.0)  # warm up
    state["measuring"] = True
    t0 = time.monotonic()
    time.sleep(float(seconds))
    state["measuring"] = False
    elapsed = time.monotonic() - t0
    print(f"RATE {state['count'] / elapsed:.1f}", flush=True)
    state["stop"] = True
    time.sleep(0.2)
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "node":
    _node(*sys.argv[2:])
