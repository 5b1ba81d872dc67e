"""The client against three in-process servers (mutual TLS on both ports), and the key-value
store's sessions on their own.

In-process servers keep these tests fast; the same code runs as separate processes in
``test_multiprocess``.
"""

from __future__ import annotations

import ssl
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio
import trustme
from test_multiprocess import free_ports

from tinyraftplus.errors import (
    ConfigurationError,
    InvalidArgumentError,
    NoLeaderError,
    TransportError,
)
from tinyraftplus.kv.client import (
    Client,
    encode_register_request,
    encode_write_request,
    parse_address,
)
from tinyraftplus.kv.server import Server, ServerConfig
from tinyraftplus.kv.store import KVStore, encode_register, encode_write
from tinyraftplus.transport.tls import TlsConfig, new_context, node_dns_name
from tinyraftplus.transport.wire import FrameDecoder

FAST = dict(keepalive=0.1, idle_timeout=1.0, backoff_min=0.02, backoff_max=0.2)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def node_tls(ca: trustme.CA, i) -> TlsConfig:
    cert = ca.issue_cert(node_dns_name(i))
    server, client = new_context(server=True), new_context(server=False)
    for ctx in (server, client):
        ca.configure_trust(ctx)
        cert.configure_cert(ctx)
    return TlsConfig(server, client)


def client_ctx(ca: trustme.CA, name: str = "client.tinyraftplus") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ca.configure_trust(ctx)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


class InProc:
    """Three Servers in this Trio run; ``stop(i)`` ends one (like a crash of its process,
    but with its log closed), ``start(i)`` brings it back on the same data."""

    def __init__(self, tmp, ca, ids=(1, 2, 3), et=0.3) -> None:
        self.tmp, self.ca, self.ids, self.et = tmp, ca, list(ids), et
        ports = free_ports(2 * len(self.ids))
        self.peers = {i: ("127.0.0.1", ports[k]) for k, i in enumerate(self.ids)}
        self.cports = {i: ports[len(self.ids) + k] for k, i in enumerate(self.ids)}
        self.servers: dict = {}
        self.scopes: dict = {}
        self.tls = {i: node_tls(ca, i) for i in self.ids}

    async def _run(self, i, task_status=trio.TASK_STATUS_IGNORED):
        cfg = ServerConfig(
            node_id=i, peers=self.peers, data_dir=str(self.tmp / f"d{i}"),
            client_listen=("127.0.0.1", self.cports[i]), tls=self.tls[i], fsync=False,
            election_timeout=self.et, ping_timeout=self.et / 5, append_timeout=3.0,
            read_timeout=3.0, transport_options=FAST,
        )
        srv = self.servers[i] = Server(cfg)
        with trio.CancelScope() as self.scopes[i]:
            await srv.serve(task_status=task_status)

    async def start(self, nursery, i):
        await nursery.start(self._run, i)

    def stop(self, i):
        self.scopes[i].cancel()

    def addrs(self, ids=None):
        return [("127.0.0.1", self.cports[i]) for i in (ids or self.ids)]

    def client(self, ids=None, **kw) -> Client:
        opts = dict(timeout=10.0, attempt_timeout=1.0, connect_timeout=1.0, backoff_max=0.05)
        opts.update(kw)
        return Client(self.addrs(ids), tls=client_ctx(self.ca), **opts)

    async def leader(self):
        while True:
            ls = [s for s in self.servers.values()
                  if s.node is not None and s.node.state == "leader"]
            if len(ls) == 1 and all(s.node is None or s.node.leader == ls[0].node.node_id
                                    for s in self.servers.values()):
                return ls[0].config.node_id
            await trio.sleep(0.02)


@pytest.fixture
async def cluster(tmp_path, ca, nursery):
    c = InProc(tmp_path, ca)
    for i in c.ids:
        await c.start(nursery, i)
    yield c
    nursery.cancel_scope.cancel()


async def test_put_get_append_delete(cluster):
    with trio.fail_after(20):
        async with cluster.client() as c:
            rev = await c.put("k", "v1")
            assert isinstance(rev, int) and rev >= 0
            assert await c.get("k") == b"v1"
            assert await c.put(b"k", b"v2") > rev
            assert await c.append("k", "+") == 3
            assert await c.get("k") == b"v2+"
            assert await c.append("new", b"\x00\xff") == 2
            assert await c.delete("k") is True
            assert await c.delete("k") is False
            assert await c.get("k") is None
            st = await c.status()
            assert st["state"] in ("leader", "follower") and st["keys"] == 1


async def test_client_moves_to_the_leader(cluster):
    with trio.fail_after(20):
        lead = await cluster.leader()
        # The leader listed last: the client still ends up sending to it.
        order = [i for i in cluster.ids if i != lead] + [lead]
        async with cluster.client(order) as c:
            await c.put("x", "1")
            assert c.leader_address == ("127.0.0.1", cluster.cports[lead])


async def test_every_node_serves_reads_and_writes(cluster):
    with trio.fail_after(30):
        for i in cluster.ids:
            async with cluster.client([i]) as c:
                await c.append("shared", f"<{i}>")
        for i in cluster.ids:
            async with cluster.client([i]) as c:
                got = await c.get("shared")
                assert sorted(got.decode().split(">")) == sorted(["<1", "<2", "<3", ""])


async def test_many_concurrent_writes_from_one_client_each_apply_once(cluster):
    with trio.fail_after(30):
        async with cluster.client() as c:
            async with trio.open_nursery() as n:
                for _ in range(600):
                    n.start_soon(c.append, "counter", b"x")
            assert len(await c.get("counter")) == 600
            srv = cluster.servers[cluster.ids[0]]
            sess = srv.store._sessions[c.client_id]
            assert len(sess.results) == 600  # all were in flight at once: all kept
            # The next write acknowledges them all, and every replica forgets them.
            await c.append("counter", b"y")
            await c.get("counter")
            for s in cluster.servers.values():
                await s.node.wait_apply(srv.node.commit_seq)
                assert list(s.store._sessions[c.client_id].results) == [601]


async def test_resent_request_is_applied_once_on_any_node(cluster, ca):
    """A retry of a write (same client id and seq) sent to a *different* node returns the
    first result and does not apply again -- what the client relies on after a leader
    change."""
    with trio.fail_after(20):
        answers = []
        reg = await raw_request(cluster, ca, cluster.ids[0], encode_register_request(6))
        assert reg[2] == "ok" and type(reg[3]) is int
        for i in cluster.ids:
            req = encode_write_request(7, reg[3], 1, 1, "append", b"once", b"abc")
            answers.append(await raw_request(cluster, ca, i, req))
        assert [a[2:] for a in answers] == [["ok", 3]] * 3
        async with cluster.client() as c:
            assert await c.get("once") == b"abc"
        dup = sum(s.store.duplicates for s in cluster.servers.values())
        assert dup == 2 * 3  # two resends, seen by each of the three replicas


async def raw_request(cluster, ca, i, req: bytes):
    tcp = await trio.open_tcp_stream("127.0.0.1", cluster.cports[i])
    s = trio.SSLStream(tcp, client_ctx(ca), server_hostname=None)
    await s.send_all(req)
    dec = FrameDecoder()
    while True:
        data = await s.receive_some(65536)
        assert data, "the server closed the connection"
        out = dec.feed(data)
        if out:
            await s.aclose()
            return msgpack.unpackb(out[0])


async def test_leader_loss_is_retried_transparently(cluster):
    with trio.fail_after(40):
        async with cluster.client() as c:
            for k in range(20):
                await c.put(f"a{k}", str(k))
            lead = await cluster.leader()
            cluster.stop(lead)
            for k in range(20):
                await c.put(f"b{k}", str(k))
            for k in range(20):
                assert await c.get(f"a{k}") == str(k).encode()
                assert await c.get(f"b{k}") == str(k).encode()


async def test_no_quorum_raises_a_clear_error(cluster):
    with trio.fail_after(30):
        async with cluster.client(timeout=2.0, attempt_timeout=0.5) as c:
            await c.put("k", "v")
            lead = await cluster.leader()
            for i in cluster.ids:
                if i != lead:
                    cluster.stop(i)
            t0 = trio.current_time()
            with pytest.raises(NoLeaderError, match="no quorum"):
                await c.put("k", "w")
            # It gave up near its timeout, not much later.
            assert trio.current_time() - t0 < 2.0 + 1.5


async def test_unreachable_cluster_is_a_transport_error():
    ports = free_ports(2)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    with trio.fail_after(10):
        async with Client([("127.0.0.1", p) for p in ports], tls=ctx, timeout=10,
                          connect_timeout=0.2) as c:
            t0 = trio.current_time()
            # Nothing listens: said at once, not after the 10 s timeout.
            with pytest.raises(TransportError, match="every node refused the connection"):
                await c.get("k")
            assert trio.current_time() - t0 < 1.0


async def test_client_argument_errors():
    with pytest.raises(ConfigurationError, match="plaintext=True"):
        Client(["127.0.0.1:1"])
    with pytest.raises(InvalidArgumentError):
        Client([], plaintext=True)
    with pytest.raises(InvalidArgumentError, match="port"):
        parse_address("host:x")
    assert parse_address("[::1]:80") == ("::1", 80)
    async with Client(["127.0.0.1:9"], plaintext=True, timeout=0.2,
                      connect_timeout=0.1) as c:
        with pytest.raises(InvalidArgumentError, match="key"):
            await c.put("", "v")
        with pytest.raises(InvalidArgumentError, match="bytes value"):
            await c.put("k", b"x" * ((1 << 20) + 1))
        with pytest.raises(InvalidArgumentError):
            await c.put("k", 5)  # type: ignore[arg-type]


# --- the store alone -------------------------------------------------------------------


def test_store_sessions_dedupe_and_forget():
    kv = KVStore()
    assert kv.apply([None] * 9 + [encode_register()], 0)[-1] == ("ok", 9)  # session 9
    a1 = encode_write(9, 1, 1, "append", b"k", b"ab")
    a2 = encode_write(9, 2, 1, "append", b"k", b"cd")
    assert kv.apply([a1, a2, a1, None], 0) == [("ok", 2), ("ok", 4), ("ok", 2), None]
    assert kv.data[b"k"] == b"abcd" and kv.duplicates == 1
    # Out of order completion: seq 4 before 3, both kept until acknowledged.
    a4 = encode_write(9, 4, 3, "put", b"x", b"4")
    a3 = encode_write(9, 3, 3, "put", b"x", b"3")
    assert kv.apply([a4, a3], 4) == [("ok", 4), ("ok", 5)]
    assert kv.data[b"x"] == b"3"
    # ack=5 forgets 3 and 4: a late copy of 3 is refused, not applied again.
    a5 = encode_write(9, 5, 5, "delete", b"x", None)
    assert kv.apply([a5], 6) == [("ok", True)]
    late = kv.apply([a3], 7)[0]
    assert late[0] == "err" and late[1] == "stale"
    assert b"x" not in kv.data


def test_store_is_deterministic_and_never_raises():
    import random

    rng = random.Random(5)
    cmds = []
    registered = [0]
    for n in range(2000):
        if rng.random() < 0.02:
            registered.append(len(cmds))  # its session id: its seq (cmds[i] is at seq i)
            cmds.append(encode_register(max_sessions=8))
            continue
        cid = rng.choice(registered) if rng.random() < 0.9 else rng.randrange(1, 2000)
        seq = rng.randrange(1, 60)
        op = rng.choice(["put", "append", "delete"])
        cmds.append(encode_write(cid, seq, rng.randrange(1, seq + 1), op,
                                 b"k%d" % rng.randrange(10),
                                 None if op == "delete" else b"v%d" % n))
    cmds += [b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb(["a", 1, 1, "put", b"k", b"v"])]
    a, b = KVStore(max_sessions=8, max_results=16), KVStore(max_sessions=8, max_results=16)
    ra = [a.apply(cmds[i:i + 37], i) for i in range(0, len(cmds), 37)]
    rb = b.apply(cmds, 0)
    assert [r for chunk in ra for r in chunk] == rb
    assert a.data == b.data
    assert [r[1] for r in rb[-3:]] == ["bad_command"] * 3
    assert len(a._sessions) <= 8


def test_store_reads():
    kv = KVStore()
    kv.apply([None, encode_register(), encode_write(1, 1, 1, "put", b"a", b"1")], 0)
    assert kv.read(("get", b"a")) == b"1"
    assert kv.read(("get", b"b")) is None
    assert kv.read(("len",)) == 1
    with pytest.raises(InvalidArgumentError):
        kv.read("get")


async def test_in_process_cluster_survives_restart_of_a_node(tmp_path, ca):
    """A node stopped and started again on its data rebuilds its store from the log."""
    c = InProc(tmp_path, ca)
    with trio.fail_after(40):
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            for i in c.ids:
                await c.start(nursery, i)
            async with c.client() as cl:
                for k in range(30):
                    await cl.put(f"k{k}", f"v{k}")
                lead = await c.leader()
                victim = next(i for i in c.ids if i != lead)
                c.stop(victim)
                await trio.sleep(0.2)
                for k in range(30, 40):
                    await cl.put(f"k{k}", f"v{k}")
                await c.start(nursery, victim)
                async with c.client([victim]) as one:
                    for k in range(40):
                        assert await one.get(f"k{k}") == f"v{k}".encode()
                assert c.servers[victim].store.data[b"k35"] == b"v35"
            nursery.cancel_scope.cancel()


async def test_errors_inside_the_client_block_are_not_wrapped_in_groups():
    with pytest.raises(TransportError):  # not an ExceptionGroup around it
        async with Client(["127.0.0.1:9"], plaintext=True, timeout=0.2,
                          connect_timeout=0.1) as c:
            await c.get("k")


async def test_client_never_runs_a_session_window_ahead_of_its_oldest_write(monkeypatch):
    """The store forgets results beyond a bound; the client never issues a seq so far ahead
    of its oldest unanswered write that the store could have forgotten that write's result."""
    import tinyraftplus.kv.client as client_mod

    monkeypatch.setattr(client_mod, "SESSION_WINDOW", 3)
    release = trio.Event()
    seen: list[int] = []

    async def fake_call(self, build):
        if build is client_mod.encode_register_request:
            return 1
        seq = self._next_seq - 1
        seen.append(seq)
        if seq == 1:
            await release.wait()  # the oldest write is stuck (retrying, say)
        return 0

    monkeypatch.setattr(Client, "_call", fake_call)
    with trio.fail_after(10):
        await _window_scenario(release, seen)


async def _window_scenario(release, seen):
    async with Client(["127.0.0.1:9"], plaintext=True, connect_timeout=0.1) as c:
        async with trio.open_nursery() as n:
            n.start_soon(c.put, "k", "1")
            await trio.sleep(0.05)
            for _ in range(5):
                n.start_soon(c.put, "k", "x")
            await trio.sleep(0.2)
            assert seen == [1, 2, 3]  # seq 4 would be a window ahead of seq 1
            release.set()
        assert seen == [1, 2, 3, 4, 5, 6]


async def test_client_keeps_at_most_max_inflight_writes(monkeypatch):
    inflight = peak = 0

    async def fake_call(self, build):
        nonlocal inflight, peak
        if build is encode_register_request:
            return 1
        inflight += 1
        peak = max(peak, inflight)
        await trio.sleep(0.01)
        inflight -= 1
        return 0

    monkeypatch.setattr(Client, "_call", fake_call)
    with trio.fail_after(10):
        async with Client(["127.0.0.1:9"], plaintext=True, connect_timeout=0.1,
                          max_inflight=3) as c:
            async with trio.open_nursery() as n:
                for _ in range(20):
                    n.start_soon(c.put, "k", "x")
    assert peak == 3


def test_store_replays_a_log_written_before_sessions_were_registered():
    """Commands of the older form [client, seq, ack, op, key, value] (client-chosen ids, no
    register) are applied as they were, so an upgraded node rebuilds the same data; the
    duplicate is still recognised."""
    old = [msgpack.packb([77, 1, 1, "put", b"a", b"1"], use_bin_type=True),
           msgpack.packb([77, 2, 1, "append", b"a", b"2"], use_bin_type=True),
           msgpack.packb([77, 2, 1, "append", b"a", b"2"], use_bin_type=True)]
    kv = KVStore()
    assert kv.apply(old, 0) == [("ok", 0), ("ok", 2), ("ok", 2)]
    assert kv.data[b"a"] == b"12" and kv.duplicates == 1
