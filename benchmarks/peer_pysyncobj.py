"""The peer benchmark: the same shape of workload on PySyncObj (``pip install pysyncobj``).

Three PySyncObj processes on loopback replicate a dict; the process that becomes leader keeps
``concurrency`` replicated ``set`` calls of ``size``-byte values in flight (each callback issues
the next) and counts the ones that come back committed. PySyncObj has no client protocol, so
the requests are issued inside the leader's process; ours come from a separate client process
over TLS, which only makes ours harder.

Durability: PySyncObj is run with its defaults, an in-memory journal (``journalFile=None``):
nothing is written to disk, let alone fsynced. Its peer connections are not encrypted.

The leader also sums the CPU of all three processes over its window (``/proc``) and records
each call's latency (call to callback). ``benchmarks.bench_peer`` sweeps ``concurrency``.

Child usage: ``python -m benchmarks.peer_pysyncobj node SELF PARTNER,PARTNER SECONDS
CONCURRENCY SIZE PIDFILE LATFILE WINDOW_MAX`` (the leader prints ``RATE``, ``COUNT`` and ``CPU``).
"""

from __future__ import annotations

import array
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ._common import child_env, free_ports

WINDOW_ROUNDS = 3
"""The measuring window lasts at least this many pipeline round trips (as warm-up took)."""
WINDOW_MAX = 30.0


@dataclass
class PeerRun:
    rate: float
    count: int
    cpu_seconds: float | None
    """CPU of all three PySyncObj processes over the leader's window (None if unreadable)."""
    latencies: list[float]
    """Seconds from each ``set`` call to its callback, over the window."""
    failed: dict[str, int]
    """Calls that came back with an error in the window, by PySyncObj's FAIL_REASON."""
    window: float
    """Seconds measured."""


def measure(directory: Path, seconds: float, concurrency: int, size: int,
            window_max: float = WINDOW_MAX) -> PeerRun:
    """Start three PySyncObj processes, return what the leader measured (over a window of
    ``seconds`` or three pipeline rounds, whichever is longer, up to ``window_max``)."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    procs, outs = [], []
    pidfile = directory / "pids.txt"
    latfile = directory / "latencies.bin"
    try:
        for i, me in enumerate(addrs):
            out = directory / f"pso-{i}.txt"
            outs.append(out)
            partners = ",".join(a for a in addrs if a != me)
            with open(out, "wb") as o:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.peer_pysyncobj", "node", me, partners,
                     str(seconds), str(concurrency), str(size), str(pidfile), str(latfile),
                     str(window_max)],
                    stdout=o, stderr=subprocess.STDOUT, env=child_env(),
                    stdin=subprocess.DEVNULL))
        tmp = directory / "pids.tmp"
        tmp.write_text(",".join(str(p.pid) for p in procs))
        tmp.rename(pidfile)
        deadline = time.monotonic() + max(seconds, window_max) + 60
        while time.monotonic() < deadline:
            for out in outs:
                text = out.read_text()
                m = re.search(r"^RATE (\S+)\nCOUNT (\d+)\nCPU (\S+)\nFAILED (\S+)\n"
                              r"WINDOW (\S+)\n", text, re.M)
                if m:
                    lat = array.array("d")
                    with open(latfile, "rb") as f:
                        lat.frombytes(f.read())
                    cpu = None if m.group(3) == "none" else float(m.group(3))
                    failed = {} if m.group(4) == "none" else {
                        k: int(v) for k, v in (x.split("=") for x in m.group(4).split(","))}
                    return PeerRun(float(m.group(1)), int(m.group(2)), cpu, lat.tolist(),
                                   failed, float(m.group(5)))
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


def _node(me: str, partners: str, seconds: str, conc: str, size: str, pidfile: str,
          latfile: str, window_max: str) -> None:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    from ._common import CpuMeter

    class Store(SyncObj):
        def __init__(self) -> None:
            conf = SyncObjConf(appendEntriesUseBatch=True,
                               commandsQueueSize=max(100_000, 2 * int(conc)))
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
    while not os.path.exists(pidfile):
        time.sleep(0.01)
    with open(pidfile) as f:
        others = [int(p) for p in f.read().split(",") if int(p) != os.getpid()]
    value = os.urandom(int(size))
    lock = threading.Lock()
    lat = array.array("d")
    state = {"n": 0, "count": 0, "completed": 0, "measuring": False, "stop": False}
    failed: dict[str, int] = {}
    clock = time.perf_counter

    def issue() -> None:
        with lock:
            state["n"] += 1
            n = state["n"]
        t0 = clock()
        # A bounded key set, as for ours.
        obj.set(b"k%d" % (n % 262_144), value,
                callback=lambda result, error: done(result, error, t0))

    def done(result: object, error: int, t0: float) -> None:
        state["completed"] += 1  # only the warm-up reads it; a lost increment is harmless
        if error == FAIL_REASON.SUCCESS and state["measuring"]:
            with lock:
                state["count"] += 1
                lat.append(clock() - t0)
        elif error != FAIL_REASON.SUCCESS and state["measuring"]:
            with lock:
                failed[str(error)] = failed.get(str(error), 0) + 1
        if not state["stop"]:
            issue()

    started = time.monotonic()
    for _ in range(int(conc)):
        issue()
    # Warm up until one whole round of the pipeline came back (at 50,000 in flight that takes
    # seconds), then a little more, so that the window sees the steady state; and make the
    # window at least three such rounds, because deep queues commit in bursts and a window
    # shorter than a burst's period measures luck.
    give_up = time.monotonic() + 60
    while state["completed"] < int(conc) and time.monotonic() < give_up:
        time.sleep(0.05)
    window = min(max(float(seconds), WINDOW_ROUNDS * (time.monotonic() - started)),
                 float(window_max))
    time.sleep(0.5)
    meter = CpuMeter(others)
    meter.start()
    state["measuring"] = True
    t0 = time.monotonic()
    time.sleep(window)
    state["measuring"] = False
    elapsed = time.monotonic() - t0
    cpu = meter.stop()
    with lock:
        count = state["count"]
        with open(latfile, "wb") as out:
            lat.tofile(out)
    cpu_text = "none" if cpu is None else f"{cpu:.4f}"
    reasons = {v: k for k, v in vars(FAIL_REASON).items() if k.isupper()}
    fails = ",".join(f"{reasons.get(int(k), k)}={v}" for k, v in failed.items()) or "none"
    print(f"RATE {count / elapsed:.1f}\nCOUNT {count}\nCPU {cpu_text}\nFAILED {fails}\n"
          f"WINDOW {elapsed:.2f}", flush=True)
    state["stop"] = True
    time.sleep(0.2)
    os._exit(0)


if __name__ == "__main__" and len(sys.argv) == 10 and sys.argv[1] == "node":
    _node(*sys.argv[2:])
