"""Issue 12, "A healthy cluster is quiet": the log volume of a normal start, a peer stopped
for 10 s and back, and a clean stop (three in-process servers on loopback, their log records
captured and counted); and ``examples/kvstore.py`` interrupted early leaves no process."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from test_multiprocess import free_ports

from tinyraftplus.kv.client import Client
from tinyraftplus.kv.server import Server, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(keepalive=0.1, idle_timeout=1.0, backoff_min=0.02, backoff_max=0.2,
            queue_size=32)  # a small queue: a dead peer's messages are dropped within 10 s


def loud(records) -> list[str]:
    return [r.getMessage() for r in records
            if r.levelno >= logging.WARNING and r.name.startswith("tinyraftplus")]


async def test_start_dead_peer_and_clean_stop_log_little(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    ids = [1, 2, 3]
    ports = free_ports(6)
    peers = {i: ("127.0.0.1", ports[k]) for k, i in enumerate(ids)}
    scopes: dict = {}
    addrs = [("127.0.0.1", ports[3 + k]) for k in range(3)]

    async def run(i, task_status=trio.TASK_STATUS_IGNORED):
        cfg = ServerConfig(  # what `python -m tinyraftplus.kv` builds, without --bootstrap
            node_id=i, peers=peers, data_dir=str(tmp_path / f"d{i}"),
            client_listen=addrs[i - 1], plaintext=True, fsync=False,
            election_timeout=0.3, ping_timeout=0.06, append_timeout=3.0, read_timeout=3.0,
            transport_options=FAST)
        with trio.CancelScope() as scopes[i]:
            await Server(cfg).serve(task_status=task_status)

    def phase() -> list:
        got = list(caplog.records)
        caplog.clear()
        return got

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in ids:  # one after the other, as an operator starts them
                await nursery.start(run, i)
                await trio.sleep(0.3)
            async with Client(addrs, plaintext=True, timeout=10.0) as c:
                await c.put("k", "v")
            start = phase()
            assert loud(start) == [], loud(start)

            scopes[2].cancel()  # a clean stop of one node; then 10 s away
            await trio.sleep(10)
            away = phase()
            warned = loud(away)
            # Reported when it starts failing, by both others (node 1 dials node 2, node 3
            # waits for node 2 to dial it), and not again within the reminder interval.
            assert any("node 1: dialing node 2" in m for m in warned), warned
            assert any(m.startswith("node 3: node 2") for m in warned), warned
            assert len(warned) <= 4, warned
            shapes = Counter(re.sub(r"\d+", "#", m) for m in warned)
            assert max(shapes.values()) == 1, shapes
            # Everything said about node 2 in 10 s, at any level: a few lines, not one a
            # second (the drops went on all the time: the queue holds 32 messages).
            assert len([r for r in away if r.levelno >= logging.INFO]) <= 12, \
                [r.getMessage() for r in away]
            assert any("closed the connection" in r.getMessage() and r.levelno == logging.INFO
                       for r in away)

            await nursery.start(run, 2)
            async with Client(addrs, plaintext=True, timeout=10.0) as c:
                await c.put("k", "w")
                with trio.fail_after(10):
                    while (await c.status(addrs[1]))["apply_seq"] < \
                            (await c.status(addrs[0]))["commit_seq"]:
                        await trio.sleep(0.05)
            await trio.sleep(0.5)
            back = phase()
            assert loud(back) == [], loud(back)
            said = [r.getMessage() for r in back]
            assert any("node 1: node 2 reachable again" in m for m in said), said
            assert any("node 3: node 2 is back" in m for m in said), said

            nursery.cancel_scope.cancel()  # a clean stop of the whole cluster
    stop = phase()
    assert loud(stop) == [], loud(stop)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_kvstore_example_interrupted_early_leaves_no_process(tmp_path):
    """Ctrl-C while the example starts its servers: its process group gets SIGINT (what a
    terminal sends), it exits 130 with one line, and no server outlives it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    p = subprocess.Popen([sys.executable, str(ROOT / "examples" / "kvstore.py")], cwd=tmp_path,
                         env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _servers(p.pid):
            time.sleep(0.005)  # the first server process is starting
        assert _servers(p.pid), "the example started no server"
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:  # pragma: no cover
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().splitlines() == ["interrupted; stopping the nodes"], err
    assert "WARNING" not in out
    time.sleep(0.2)
    left = _in_group(p.pid)
    assert left == [], left
    assert not any(tmp_path.iterdir()) or all(
        not x.name.startswith("tmp") for x in tmp_path.iterdir())  # its directory is gone


def _servers(pid: int) -> list[int]:
    """The example's children that are servers (not a helper an import runs)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"tinyraftplus.kv" in f.read():
                    out.append(k)
        except OSError:
            pass
    return out


def _in_group(pgid: int) -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(f"{d}: {cmd}")
    return out
