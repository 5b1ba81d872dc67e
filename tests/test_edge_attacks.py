"""Attacks on the network edge of real server processes (``python -m tinyraftplus.kv`` on
loopback, mutual TLS): each one is run against the nodes and the node must stay up, keep its
memory and descriptors within the documented bounds, and keep serving (issue 14).

RSS is read from ``/proc/PID/status``; the bounds asserted are the ones the README's "Threat
model and limits" section documents.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import msgpack
import pytest
import trio
from test_client_fuzz import closed_by_server, frame, open_tls
from test_multiprocess import ProcCluster, client_context

from tinyraftplus.kv.client import encode_get, encode_status

MB = 1 << 20


def rss(pid: int) -> int:
    """Resident set size of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def flood_without_reading(s: trio.SSLStream, request: bytes, pid: int, *,
                                max_bytes: int, rss_limit: int) -> tuple[int, int]:
    """Send ``request`` over and over without ever reading an answer, until the server
    stops reading (a send blocks for 2 s: backpressure), ``max_bytes`` were sent, or the
    server's RSS passed ``rss_limit``. Returns (bytes sent, highest RSS seen)."""
    batch = request * max(1, (64 * 1024) // len(request))
    sent = 0
    peak = rss(pid)
    while sent < max_bytes:
        with trio.move_on_after(2.0) as blocked:
            await s.send_all(batch)
        peak = max(peak, rss(pid))
        if blocked.cancelled_caught or peak > rss_limit:
            break
        sent += len(batch)
    await trio.sleep(0.5)  # let it process what it read
    return sent, max(peak, rss(pid))


@pytest.mark.parametrize("kind", ["get-1MiB", "status"])
async def test_a_client_that_never_reads_its_answers_cannot_grow_the_leader(tmp_path, kind):
    """High 1: gets of a 1 MiB value (or status requests) sent without reading the answers.
    Before the fix the leader buffered every answer (43 MB -> 3.2 GB in 9 s, lost its
    leadership); now it stops reading that connection (backpressure), stays within its
    answer budget, and closes the connection after --answer-timeout."""
    cl = ProcCluster(tmp_path, extra=["--answer-timeout", "3"])
    await cl.start_all()
    try:
        async with cl.client() as c:
            lid, _ = await cl.leader(c)
            await c.put(b"big", b"v" * MB)
            pid = cl.procs[lid].pid
            before = rss(pid)
            req = encode_get(1, b"big") if kind == "get-1MiB" else encode_status(1)
            s = await open_tls(cl.client_addr[lid], client_context(cl.certs))
            sent, peak = await flood_without_reading(
                s, req, pid, max_bytes=40 * MB, rss_limit=before + 150 * MB)
            print(f"{kind} flood: leader RSS {before / MB:.0f} -> {peak / MB:.0f} MB "
                  f"after {sent} bytes sent")
            assert peak - before < 100 * MB, (
                f"the leader grew by {(peak - before) / MB:.0f} MB after {sent} bytes of "
                f"{kind} requests whose answers were never read")
            # It stopped reading well before all of it: a send blocked.
            assert sent < 40 * MB
            # ... and it hangs up on a client that does not read for --answer-timeout.
            assert await closed_by_server(s, timeout=10.0)
            # The node is up and the cluster serves (it normally keeps its leadership too;
            # on a loaded test machine an election may happen, which is not the point here).
            assert cl.procs[lid].poll() is None
            await c.put(b"after", b"ok")
            assert await c.get(b"after") == b"ok"
    finally:
        cl.kill_all()


def ulimit(n: int):
    return lambda i: ["sh", "-c", f'ulimit -n {n} && exec "$@"', "sh"]


async def test_descriptor_exhaustion_on_the_client_port_never_stops_the_node(tmp_path):
    """High 2: a node whose descriptor limit is 256 gets 300 idle connections (authenticated
    TLS and plain TCP) on its client port, then has to win an election (which writes its
    state file). Before the fix it accepted until EMFILE and died in StateFile.save; now
    connections past the cap are closed at once and the node keeps a reserve."""
    cl = ProcCluster(tmp_path, wrap=ulimit(256), extra=["--fd-reserve", "64"])
    await cl.start_all()
    held: list = []
    try:
        async with cl.client() as c:
            lid, _ = await cl.leader(c)
            victim = next(i for i in cl.ids if i != lid)
            other = next(i for i in cl.ids if i not in (lid, victim))
            addr = cl.client_addr[victim]
            ctx = client_context(cl.certs)
            for _ in range(150):
                with trio.move_on_after(2):
                    held.append(await open_tls(addr, ctx))
            for _ in range(150):
                sock = socket.create_connection(addr)
                held.append(sock)
            await trio.sleep(0.5)
            vpid = cl.procs[victim].pid
            assert nfds(vpid) < 256
            # Force an election: the victim must persist a vote or a term.
            cl.kill(lid)
            async with cl.client([victim, other]) as c2:
                await c2.put(b"k", b"after the leader died")
                assert await c2.get(b"k") == b"after the leader died"
            assert cl.procs[victim].poll() is None, cl.stderr(victim)[-2000:]
            assert "Too many open files" not in cl.stderr(victim)
    finally:
        for h in held:
            try:
                h.close() if isinstance(h, socket.socket) else h.transport_stream.socket.close()
            except OSError:
                pass
        cl.kill_all()


async def test_connection_caps_per_source_and_idle_timeout(tmp_path):
    """High 2: one address may hold at most --max-clients-per-source connections (the next
    is closed at once, others keep working); an idle connection is closed after
    --client-idle-timeout."""
    cl = ProcCluster(tmp_path, ids=[1], extra=["--max-clients-per-source", "4",
                                               "--client-idle-timeout", "3"])
    await cl.start(1)
    try:
        ctx = client_context(cl.certs)
        addr = cl.client_addr[1]
        first = [await open_tls(addr, ctx) for _ in range(4)]
        # The fifth from the same address is refused.
        tcp = await trio.open_tcp_stream(*addr)
        fifth = trio.SSLStream(tcp, ctx, server_hostname=None)
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
            with trio.fail_after(5):
                await fifth.do_handshake()
                await fifth.send_all(encode_status(1))
                assert not await fifth.receive_some(1000)
                raise trio.BrokenResourceError
        # The four work.
        for s in first:
            await s.send_all(encode_status(7))
            with trio.fail_after(5):
                assert await s.receive_some(65536)
        # ... until they sit idle.
        with trio.fail_after(10):
            for s in first:
                assert await closed_by_server(s, timeout=8)
        assert "refused a client connection from 127.0.0.1" in cl.stderr(1)
        # After they are gone, new ones are welcome again.
        s = await open_tls(addr, ctx)
        await s.send_all(encode_status(8))
        with trio.fail_after(5):
            assert await s.receive_some(65536)
    finally:
        cl.kill_all()


async def test_a_frame_trickled_byte_by_byte_is_cut_at_the_frame_deadline(tmp_path):
    """Medium 7: the frame deadline is per frame, not per read: one byte every 0.4 s with
    --frame-timeout 1.5 was never cut before (each read restarted the clock)."""
    cl = ProcCluster(tmp_path, ids=[1], extra=["--frame-timeout", "1.5"])
    await cl.start(1)
    try:
        s = await open_tls(cl.client_addr[1], client_context(cl.certs))
        data = frame(msgpack.packb([1, 2, 5, b"k" * 100]))
        closed_at = None
        t0 = trio.current_time()
        for b in data:
            try:
                await s.send_all(bytes([b]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed_at = trio.current_time() - t0
                break
            with trio.move_on_after(0.4):
                try:
                    got = await s.receive_some(100)
                except trio.BrokenResourceError:
                    got = b""
                if not got:
                    closed_at = trio.current_time() - t0
                    break
        assert closed_at is not None and closed_at < 4.0, closed_at
        assert "was not complete 1.5s after it began" in cl.stderr(1)
    finally:
        cl.kill_all()
