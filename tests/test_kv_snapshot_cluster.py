"""Snapshots of the key-value server with real processes over mutual TLS.

* A follower SIGKILLed while the leader snapshots and compacts past it comes back and is
  caught up by a snapshot transfer (its log now starts after the snapshot, it says it
  installed one), and every acknowledged write is readable through it alone; then all three
  restart, each restoring its own snapshot.
* A restart costs in proportion to the entries after the snapshot, not the log's length:
  a node with 20,000 entries behind a snapshot against one with the same log and no
  snapshots (CPU seconds from process start until it has applied its whole log, which the
  shared machine's load does not stretch as it does wall time; and the count of entries
  each replayed, exactly).
* ``slow``: the issue's scale (1M keys, a snapshot every 10,000 entries, a follower down
  for a minute, all three restarted, each ready in under 2 s).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import trio
from test_multiprocess import ProcCluster

from tinyraftplus.errors import ConfigurationError, TinyRaftError
from tinyraftplus.kv.client import Client
from tinyraftplus.kv.server import parse_args


def test_snapshot_options_parse_and_are_checked():
    base = ["--id", "1", "--peers", "1=127.0.0.1:7001", "--client-port", "0", "--data", "d",
            "--plaintext"]
    cfg = parse_args(base)
    assert (cfg.snapshot_entries, cfg.trailing_entries, cfg.segment_size) == (
        10_000, 5_000, 64 << 20)
    cfg = parse_args(base + ["--snapshot-entries", "0", "--trailing-entries", "7",
                             "--segment-size", "65536"])
    assert (cfg.snapshot_entries, cfg.trailing_entries, cfg.segment_size) == (0, 7, 65536)
    for opt, v in (("--snapshot-entries", "-1"), ("--trailing-entries", "-5"),
                   ("--segment-size", "100")):
        with pytest.raises(ConfigurationError, match=opt):
            parse_args(base + [opt, v])


async def write_keys(c: Client, prefix: str, n: int, acked: dict[bytes, bytes],
                     concurrency: int = 64) -> int:
    """``n`` puts of distinct keys, ``concurrency`` at a time; the acknowledged ones go to
    ``acked``. Returns how many failed (each may or may not have been applied)."""
    it = iter(range(n))
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for i in it:
            key, value = f"{prefix}{i:07d}".encode(), f"v{prefix}{i}".encode()
            try:
                await c.put(key, value)
            except TinyRaftError:
                failed += 1
            else:
                acked[key] = value

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return failed


async def check_readable(cl: ProcCluster, i: Any, acked: dict[bytes, bytes],
                         concurrency: int = 64) -> None:
    """Every acknowledged write, read (linearizably) through node ``i`` alone."""
    items = iter(list(acked.items()))
    wrong: list[tuple[bytes, bytes | None]] = []
    async with cl.client([i]) as one:
        async def worker() -> None:
            for key, value in items:
                got = await one.get(key)
                if got != value:
                    wrong.append((key, got))

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    assert not wrong, f"node {i}: {len(wrong)} acknowledged writes read back wrong: {wrong[:5]}"


async def wait_applied(c: Client, cl: ProcCluster, i: Any, seq: int,
                       timeout: float = 60.0) -> dict[str, Any]:
    """Poll node ``i``'s status until it has applied through ``seq``."""
    with trio.fail_after(timeout):
        while True:
            try:
                st = await c.status(cl.client_addr[i])
            except TinyRaftError:
                st = None
            if st is not None and st["apply_seq"] >= seq:
                return st
            await trio.sleep(0.01)


async def test_follower_behind_compaction_catches_up_by_snapshot_then_all_restart(tmp_path):
    et = 0.4
    cl = ProcCluster(tmp_path, election_timeout=et, extra=[
        "--snapshot-entries", "200", "--trailing-entries", "100", "--segment-size", "16384"])
    acked: dict[bytes, bytes] = {}
    try:
        with trio.fail_after(150):
            await cl.start_all()
            async with cl.client(timeout=30.0) as c:
                lead, _ = await cl.leader(c)
                await write_keys(c, "a", 300, acked)
                victim = next(i for i in cl.ids if i != lead)
                st = await wait_applied(c, cl, victim, (await c.status(cl.client_addr[lead]))
                                        ["commit_seq"])
                victim_last = st["last_seq"]
                cl.kill(victim)
                # Several snapshots later the leader's log starts past what the victim holds.
                await write_keys(c, "b", 2000, acked)
                lst = await c.status(cl.client_addr[lead])
                assert lst["snapshots_taken"] >= 5, lst
                assert lst["first_seq"] > victim_last + 1, (lst["first_seq"], victim_last)
                await cl.start(victim)
                await cl.wait_caught_up(c)
                vst = await c.status(cl.client_addr[victim])
                assert vst["snapshots_installed"] >= 1, vst
                assert vst["first_seq"] > victim_last + 1, vst  # its log restarts after it
                assert "installed snapshot" in cl.stderr(victim)
                await check_readable(cl, victim, acked)
                await write_keys(c, "c", 50, acked)

            # All three down, all three up: each restores its own newest snapshot.
            for i in cl.ids:
                cl.kill(i)
            times: dict[Any, float] = {}

            async def start(i: Any) -> None:
                t0 = time.monotonic()
                await cl.start(i)
                times[i] = time.monotonic() - t0

            async with trio.open_nursery() as nursery:
                for i in cl.ids:
                    nursery.start_soon(start, i)
            print("ready after restart:", {i: f"{t:.2f}s" for i, t in times.items()})
            async with cl.client(timeout=30.0) as c:
                await cl.leader(c)
                st = await cl.wait_caught_up(c)
                for i in cl.ids:
                    assert st[i]["start_seq"] >= 2000, (i, st[i])  # restored, not replayed
                    assert "store restored from snapshot" in cl.stderr(i)
                for i in cl.ids:
                    await check_readable(cl, i, acked)
            assert len(acked) >= 2300
    finally:
        cl.kill_all()


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _restart_cost(cl: ProcCluster, i: Any, last: int) -> tuple[float, float, dict]:
    """Restart node ``i`` (SIGKILL first); return (CPU seconds of the new process, wall
    seconds, its status) from ``Popen`` until it has applied through ``last``."""
    cl.kill(i)
    t0 = time.monotonic()
    await cl.start(i)
    pid = cl.procs[i].pid
    async with cl.client([i], timeout=30.0) as c:
        st = await wait_applied(c, cl, i, last)
    cpu = proc_cpu_seconds(pid)
    return cpu, time.monotonic() - t0, st


async def test_restart_cost_follows_the_entries_after_the_snapshot(tmp_path):
    n = 20_000
    every = 1000
    common = ["--bootstrap", "--trailing-entries", str(n + 100)]  # the log keeps everything
    (tmp_path / "snap").mkdir()
    (tmp_path / "plain").mkdir()
    snap = ProcCluster(tmp_path / "snap", [1], election_timeout=0.2, fsync=False,
                       extra=[*common, "--snapshot-entries", str(every)])
    plain = ProcCluster(tmp_path / "plain", [1], election_timeout=0.2, fsync=False,
                        extra=[*common, "--snapshot-entries", "0"])
    try:
        with trio.fail_after(150):
            lasts = {}
            for cl in (snap, plain):
                await cl.start(1)
                async with cl.client(timeout=30.0) as c:
                    acked: dict[bytes, bytes] = {}
                    assert await write_keys(c, "k", n, acked, concurrency=128) == 0
                    st = await c.status(cl.client_addr[1])
                    lasts[cl] = st["commit_seq"]
                    assert st["last_seq"] >= n and st["first_seq"] == 0  # nothing compacted
            costs: dict[str, list[tuple[float, float, dict]]] = {"snap": [], "plain": []}
            for _ in range(3):  # interleaved, so both see the same load
                costs["snap"].append(await _restart_cost(snap, 1, lasts[snap]))
                costs["plain"].append(await _restart_cost(plain, 1, lasts[plain]))
        cpu = {k: min(x[0] for x in v) for k, v in costs.items()}
        wall = {k: min(x[1] for x in v) for k, v in costs.items()}
        replayed = {k: v[-1][2]["apply_seq"] - v[-1][2]["start_seq"] for k, v in costs.items()}
        print(f"restart with {n} entries in the log: CPU {cpu}, wall {wall}, entries "
              f"replayed {replayed}")
        # Exactly: one replays only what follows its newest snapshot, the other everything.
        assert costs["plain"][-1][2]["start_seq"] == -1
        assert replayed["snap"] < every + 10
        assert replayed["plain"] >= n
        assert cpu["plain"] > 1.5 * cpu["snap"], cpu
    finally:
        snap.kill_all()
        plain.kill_all()
