"""TcpTransport over real loopback sockets: mutual TLS, refusals, reconnects, back-pressure.

Timers are real (no autojump clock: it would jump past network waits), so the keepalive and
timeouts are shrunk to keep each test short; every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from contextlib import AsyncExitStack
from functools import partial

import pytest
import trio
import trustme

from tinyraftplus.entry import Entry
from tinyraftplus.errors import (
    ClosedError,
    ConfigurationError,
    InvalidArgumentError,
    ProtocolError,
    TransportError,
)
from tinyraftplus.raft.messages import (
    AppendEntries,
    AppendResponse,
    Propose,
    ProposeResponse,
    RequestVote,
    VoteResponse,
)
from tinyraftplus.transport.tcp import TcpTransport, dials
from tinyraftplus.transport.tls import TlsConfig, new_context, node_dns_name

FAST = dict(keepalive=0.1, idle_timeout=1.0, backoff_min=0.02, backoff_max=0.2,
            handshake_timeout=2.0, connect_timeout=2.0)


def tls_for(ca: trustme.CA, *names: str) -> TlsConfig:
    """A node's TlsConfig holding a certificate for ``names``, trusting only ``ca``."""
    cert = ca.issue_cert(*names)
    server, client = new_context(server=True), new_context(server=False)
    for ctx in (server, client):
        ca.configure_trust(ctx)
        cert.configure_cert(ctx)
    return TlsConfig(server, client)


class Inbox:
    """Collects (from_id, msg) per receiving node and lets a test wait for a count."""

    def __init__(self) -> None:
        self.got: dict[object, list] = defaultdict(list)
        self.changed = trio.Event()

    def handler(self, me: object):
        def handle(from_id, msg):
            self.got[me].append((from_id, msg))
            self.changed.set()
        return handle

    async def wait(self, pred) -> None:
        while not pred():
            self.changed = trio.Event()
            await self.changed.wait()


class Warnings(list):
    def __call__(self, exc) -> None:
        self.append(exc)

    def matching(self, text: str) -> list:
        return [w for w in self if text in str(w)]

    async def wait_for(self, text: str) -> None:
        while not self.matching(text):
            await trio.sleep(0.01)


async def start(stack: AsyncExitStack, node_id, peers, **kw) -> TcpTransport:
    opts = dict(FAST)
    opts.update(kw)
    t = TcpTransport(node_id, ("127.0.0.1", opts.pop("port", 0)), peers, **opts)
    return await stack.enter_async_context(t)


async def start_cluster(stack, ids, tls: dict | None, inbox: Inbox, warns: Warnings, **kw):
    ts = {}
    for i in ids:
        extra = {"tls": tls[i]} if tls is not None else {"plaintext": True}
        extra.update(kw)
        ts[i] = await start(stack, i, {j: None for j in ids}, handler=inbox.handler(i),
                            warn=warns, **extra)
    for i in ids:
        for j in ids:
            if i != j:
                ts[i].set_peer_address(j, ("127.0.0.1", ts[j].port))
    return ts


def append_entries(n: int, size: int = 100, prev: int = 9) -> AppendEntries:
    ents = tuple(Entry(prev + 1 + k, 3, os.urandom(size)) for k in range(n))
    return AppendEntries(3, prev, 2, ents, prev, 7)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


# --- happy path ------------------------------------------------------------------------------


async def test_three_nodes_exchange_messages_over_mutual_tls(ca):
    ids = [1, 2, 3]
    tls = {i: tls_for(ca, node_dns_name(i)) for i in ids}
    inbox, warns = Inbox(), Warnings()
    big = append_entries(256)
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            ts = await start_cluster(stack, ids, tls, inbox, warns)
            sent = defaultdict(list)
            for i in ids:
                for j in ids:
                    if i != j:
                        for k in range(50):
                            m = RequestVote(k + 1, k, 0, pre_vote=bool(k % 2))
                            ts[i].send(j, m)
                            sent[j].append((i, m))
                        ts[i].send(j, big)
                        sent[j].append((i, big))
                        resp = ProposeResponse(5, -1, 0, f"no leader at {i}", "n-x")
                        ts[i].send(j, resp)
                        sent[j].append((i, resp))
            await inbox.wait(lambda: all(len(inbox.got[j]) == len(sent[j]) for j in ids))
            for j in ids:
                # Per sender, order is preserved (one connection, one FIFO queue).
                for i in ids:
                    want = [m for f, m in sent[j] if f == i]
                    got = [m for f, m in inbox.got[j] if f == i]
                    assert got == want
                for i in ids:
                    if i != j:
                        st = ts[i].stats(j)
                        assert st.sent == 52 and st.dropped == 0 and st.connects == 1
                        assert ts[j].stats(i).received == 52
                        assert ts[i].is_connected(j)
            assert warns == []
    # Stopping the cluster closes connections; the survivors may say so, politely (a peer
    # that closes while data is still unread on its side resets the connection instead).
    assert all("closed by the peer" in str(w) or "reset by peer" in str(w) for w in warns), warns


async def test_str_ids_plaintext_and_mixed_order():
    ids = ["alpha", "beta", 7]
    inbox, warns = Inbox(), Warnings()
    # ints sort before strs: 7 dials both, "alpha" dials "beta"
    assert dials(7, "alpha") and dials("alpha", "beta") and not dials("beta", "alpha")
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            ts = await start_cluster(stack, ids, None, inbox, warns)
            for i in ids:
                for j in ids:
                    if i != j:
                        ts[i].send(j, VoteResponse(4, True))
            await inbox.wait(lambda: all(len(inbox.got[j]) == 2 for j in ids))
            for j in ids:
                assert sorted(map(repr, (f for f, _ in inbox.got[j]))) == sorted(
                    repr(i) for i in ids if i != j)
                # one connection per pair: each node counts exactly one connect per peer
                for i in ids:
                    if i != j:
                        assert ts[j].stats(i).connects == 1
            assert warns == []


async def test_serve_with_callers_nursery_and_tls_from_files(ca, tmp_path):
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_path)
    cfgs = {}
    for i in (1, 2):
        cert = ca.issue_cert(node_dns_name(i))
        cert.private_key_pem.write_to_path(tmp_path / f"{i}.key")
        cert.cert_chain_pems[0].write_to_path(tmp_path / f"{i}.crt")
        cfgs[i] = TlsConfig.from_files(ca_path, tmp_path / f"{i}.crt", tmp_path / f"{i}.key")
    inbox = Inbox()
    t1 = TcpTransport(1, ("127.0.0.1", 0), {2: None}, tls=cfgs[1], handler=inbox.handler(1),
                      **FAST)
    t2 = TcpTransport(2, ("127.0.0.1", 0), {1: None}, tls=cfgs[2], handler=inbox.handler(2),
                      **FAST)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            p1 = await n.start(t1.serve)
            p2 = await n.start(t2.serve)
            assert (p1, p2) == (t1.port, t2.port)
            t1.set_peer_address(2, ("127.0.0.1", p2))
            t2.send(1, AppendResponse(1, True, 5))  # queued until the connection is up
            t1.send(2, AppendResponse(1, False, -1, 1, 0, 3))
            await inbox.wait(lambda: inbox.got[1] and inbox.got[2])
            assert inbox.got[1] == [(2, AppendResponse(1, True, 5))]
            assert inbox.got[2] == [(1, AppendResponse(1, False, -1, 1, 0, 3))]
            n.cancel_scope.cancel()
    with pytest.raises(ClosedError):
        t1.send(2, AppendResponse(1, True, 5))


def test_tls_files_that_do_not_load_say_which(tmp_path):
    bogus = tmp_path / "nothing.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(InvalidArgumentError, match="nothing.pem"):
        TlsConfig.from_files(bogus, bogus, bogus)


# --- refusals ----------------------------------------------------------------------------------


def test_plaintext_only_when_asked(ca):
    with pytest.raises(ConfigurationError, match="plaintext=True"):
        TcpTransport(1, ("127.0.0.1", 0), {2: None})
    with pytest.raises(ConfigurationError, match="choose one"):
        TcpTransport(1, ("127.0.0.1", 0), {2: None}, tls=tls_for(ca, node_dns_name(1)),
                     plaintext=True)
    with pytest.raises(ConfigurationError, match="could not tell them apart"):
        TcpTransport(1, ("127.0.0.1", 0), {"1": None}, tls=tls_for(ca, node_dns_name(1)))
    # A context that does not check the peer is refused rather than silently used.
    lax = new_context(server=False)
    lax.check_hostname = False
    with pytest.raises(ConfigurationError, match="check_hostname"):
        TlsConfig(new_context(server=True), lax)
    TcpTransport(1, ("127.0.0.1", 0), {2: None}, plaintext=True)  # explicit: fine


async def _pair_with(tls1, tls2, *, plaintext1=False, plaintext2=False, seconds=0.8):
    """Run nodes 1 (dialer) and 2 (acceptor) for a while; return what arrived and warnings."""
    inbox, warns = Inbox(), Warnings()
    async with AsyncExitStack() as stack:
        kw1 = {"plaintext": True} if plaintext1 else {"tls": tls1}
        kw2 = {"plaintext": True} if plaintext2 else {"tls": tls2}
        t2 = await start(stack, 2, {1: None}, handler=inbox.handler(2), warn=warns, **kw2)
        t1 = await start(stack, 1, {2: ("127.0.0.1", t2.port)}, handler=inbox.handler(1),
                         warn=warns, **kw1)
        for k in range(5):
            t1.send(2, VoteResponse(k, True))
            t2.send(1, VoteResponse(k, False))
        await trio.sleep(seconds)
        connected = t1.is_connected(2) or t2.is_connected(1)
        refused = t2.refused
    return inbox, warns, connected, refused


async def test_certificate_from_another_ca_is_refused(ca):
    rogue = trustme.CA()
    with trio.fail_after(10):
        inbox, warns, connected, refused = await _pair_with(
            tls_for(rogue, node_dns_name(1)), tls_for(ca, node_dns_name(2)))
    assert not connected and not inbox.got[1] and not inbox.got[2]
    assert refused >= 1
    assert warns.matching("refused a connection") and warns.matching("handshake failed")


async def test_certificate_for_another_node_is_refused_by_the_acceptor(ca):
    # Node 1 holds a valid certificate, but for node 3, and claims to be node 1.
    with trio.fail_after(10):
        inbox, warns, connected, refused = await _pair_with(
            tls_for(ca, node_dns_name(3)), tls_for(ca, node_dns_name(2)))
    assert not connected and not inbox.got[1] and not inbox.got[2]
    assert refused >= 1
    msgs = warns.matching("claims to be node 1 but its certificate names ['node-3.tinyraftplus']")
    assert msgs and all(isinstance(w, ProtocolError) for w in msgs)


async def test_certificate_for_another_node_is_refused_by_the_dialer(ca):
    # The acceptor at node 2's address presents node 9's (valid) certificate.
    with trio.fail_after(10):
        inbox, warns, connected, refused = await _pair_with(
            tls_for(ca, node_dns_name(1)), tls_for(ca, node_dns_name(9)))
    assert not connected and not inbox.got[1] and not inbox.got[2]
    assert warns.matching("dialing node 2") and warns.matching("node-2.tinyraftplus")


async def test_plaintext_dialer_cannot_reach_a_tls_node(ca):
    with trio.fail_after(10):
        inbox, warns, connected, refused = await _pair_with(
            None, tls_for(ca, node_dns_name(2)), plaintext1=True)
    assert not connected and not inbox.got[1] and not inbox.got[2]
    assert refused >= 1


async def test_tls_dialer_refuses_a_plaintext_node(ca):
    with trio.fail_after(10):
        inbox, warns, connected, refused = await _pair_with(
            tls_for(ca, node_dns_name(1)), None, plaintext2=True)
    assert not connected and not inbox.got[1] and not inbox.got[2]
    assert refused >= 1 and warns.matching("that is a TLS ClientHello")


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("restart", [2, 1], ids=["acceptor-restarts", "dialer-restarts"])
async def test_peer_restart_reconnects(ca, restart):
    tls = {i: tls_for(ca, node_dns_name(i)) for i in (1, 2)}
    inbox, warns = Inbox(), Warnings()
    with trio.fail_after(20):
        async with AsyncExitStack() as outer:
            other = 1 if restart == 2 else 2
            port = {}
            # Reserve two ports so the restarted node can come back on the same address.
            t_other = await start(outer, other, {restart: None}, tls=tls[other],
                                  handler=inbox.handler(other), warn=warns)
            port[other] = t_other.port
            inner = AsyncExitStack()
            t_r = await start(inner, restart, {other: ("127.0.0.1", port[other])},
                              tls=tls[restart], handler=inbox.handler(restart), warn=warns)
            port[restart] = t_r.port
            t_other.set_peer_address(restart, ("127.0.0.1", port[restart]))
            t_other.send(restart, VoteResponse(1, True))
            await inbox.wait(lambda: len(inbox.got[restart]) == 1)
            await inner.aclose()  # the node stops
            await warns.wait_for("closed by the peer")
            # Messages sent while it is down wait in the queue.
            t_other.send(restart, VoteResponse(2, True))
            await trio.sleep(0.3)
            t_r2 = await start(outer, restart, {other: ("127.0.0.1", port[other])},
                               tls=tls[restart], port=port[restart],
                               handler=inbox.handler(restart), warn=warns)
            await inbox.wait(lambda: len(inbox.got[restart]) == 2)
            t_r2.send(other, VoteResponse(3, False))
            await inbox.wait(lambda: len(inbox.got[other]) == 1)
            assert [m.term for _, m in inbox.got[restart]] == [1, 2]
            assert inbox.got[other] == [(restart, VoteResponse(3, False))]
            assert t_other.stats(restart).connects == 2
    assert not [w for w in warns if isinstance(w, ProtocolError)]


async def test_dead_peer_never_blocks_send_and_drops_oldest(ca):
    # Node 2's address accepts TCP but the process never reads or answers (like SIGSTOP).
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    warns = Warnings()
    try:
        with trio.fail_after(10):
            async with AsyncExitStack() as stack:
                t1 = await start(stack, 1, {2: sink.getsockname()}, plaintext=True,
                                 warn=warns, queue_size=10)
                before = trio.current_time()
                for k in range(1000):
                    t1.send(2, VoteResponse(k, True))
                assert trio.current_time() - before < 0.5  # never waited on the network
                st = t1.stats(2)
                assert st.dropped == 990 and st.queued == 10
                # The warning names the peer and is rate limited (one a minute per peer).
                drops = warns.matching("send queue to node 2 is full")
                assert len(drops) == 1
                big = append_entries(64, 1000)
                for _ in range(5):
                    t1.send(2, big)
                assert t1.stats(2).dropped == 995
                # The handshake to the silent peer times out and is warned about.
                await warns.wait_for("handshake failed")
                assert not t1.is_connected(2)
    finally:
        sink.close()


async def test_queue_bounded_in_bytes_too():
    warns = Warnings()
    with trio.fail_after(5):
        async with AsyncExitStack() as stack:
            t1 = await start(stack, 1, {2: None}, plaintext=True, warn=warns,
                             queue_bytes=200_000)
            big = append_entries(100, 1000)  # ~100 kB a frame
            for _ in range(10):
                t1.send(2, big)
            st = t1.stats(2)
            assert st.queued == 1 and st.dropped == 9


async def test_stalled_peer_is_detected_by_keepalive():
    """A peer that completes the handshake and then goes silent (a paused process) is
    dropped after idle_timeout and redialed."""
    from tinyraftplus.transport.wire import FrameDecoder, Hello, decode, encode_frame

    warns = Warnings()
    accepted = []

    async def fake_node2(stream):
        dec = FrameDecoder()
        hello = None
        while hello is None:
            for p in dec.feed(await stream.receive_some(4096)):
                hello = decode(p)
        await stream.send_all(encode_frame(Hello(2, hello.node_id)))
        accepted.append(trio.current_time())
        await trio.sleep_forever()  # says nothing more, ever

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            listeners = await n.start(partial(trio.serve_tcp, fake_node2, 0, host="127.0.0.1"))
            addr = listeners[0].socket.getsockname()
            async with AsyncExitStack() as stack:
                t1 = await start(stack, 1, {2: addr}, plaintext=True, warn=warns,
                                 keepalive=0.1, idle_timeout=0.5)
                while len(accepted) < 2:
                    await trio.sleep(0.02)
                assert t1.stats(2).connects >= 2
                lost = warns.matching("nothing received for 0.5 s")
                assert lost and isinstance(lost[0], TransportError)
                assert 0.4 < accepted[1] - accepted[0] < 4.0
            n.cancel_scope.cancel()


async def test_handler_exception_is_a_warning_not_a_crash():
    warns = Warnings()
    got = []

    def handler(from_id, msg):
        if msg.term == 1:
            raise RuntimeError("boom")
        got.append(msg)

    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            t2 = await start(stack, 2, {1: None}, plaintext=True, handler=handler, warn=warns)
            t1 = await start(stack, 1, {2: ("127.0.0.1", t2.port)}, plaintext=True)
            t1.send(2, VoteResponse(1, True))
            t1.send(2, VoteResponse(2, True))
            while not got:
                await trio.sleep(0.01)
            assert got == [VoteResponse(2, True)]
            assert warns.matching("handler raised RuntimeError: boom")
            assert t2.stats(1).connects == 1  # the connection survived


def test_send_refuses_bad_input_at_once():
    t = TcpTransport(1, ("127.0.0.1", 0), {2: None, 1: None}, plaintext=True, max_frame=8192)
    assert t.peer_ids == [2]  # its own id in the map is ignored
    with pytest.raises(InvalidArgumentError, match="not a peer"):
        t.send(3, VoteResponse(1, True))
    with pytest.raises(InvalidArgumentError, match="not a peer"):
        t.send(1, VoteResponse(1, True))
    with pytest.raises(InvalidArgumentError, match="VoteResponse.granted must be a bool"):
        t.send(2, VoteResponse(1, 1))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="over max_frame=8192"):
        t.send(2, Propose(1, (b"x" * 10000,)))
    assert t.stats(2).queued == 0


async def test_user_exception_in_body_is_not_wrapped():
    with trio.fail_after(5):
        with pytest.raises(KeyError):
            async with TcpTransport(1, ("127.0.0.1", 0), {2: None}, plaintext=True):
                raise KeyError("mine")


async def test_cancelled_from_outside_exits_cleanly():
    with trio.fail_after(5):
        with trio.move_on_after(0.3) as cs:
            async with TcpTransport(1, ("127.0.0.1", 0), {2: None}, plaintext=True) as t1:
                async with TcpTransport(2, ("127.0.0.1", 0), {1: ("127.0.0.1", t1.port)},
                                        plaintext=True):
                    await trio.sleep_forever()
        assert cs.cancelled_caught
        await trio.sleep(0)  # trio's state is intact: still schedulable


async def test_port_in_use_is_a_clear_error():
    with trio.fail_after(5):
        async with TcpTransport(1, ("127.0.0.1", 0), {2: None}, plaintext=True) as t:
            with pytest.raises(TransportError, match="cannot listen"):
                async with TcpTransport(2, ("127.0.0.1", t.port), {1: None}, plaintext=True):
                    pass


async def test_silent_strangers_are_bounded_in_number_and_time():
    warns = Warnings()
    with trio.fail_after(10):
        async with AsyncExitStack() as stack:
            t = await start(stack, 2, {1: None}, plaintext=True, warn=warns, max_pending=2,
                            handshake_timeout=0.5)
            silent = [await trio.open_tcp_stream("127.0.0.1", t.port) for _ in range(3)]
            await warns.wait_for("max_pending")  # the third is turned away at once
            assert len(warns.matching("max_pending")) == 1
            await warns.wait_for("no handshake within 0.5 s")
            for s in silent:  # all three were closed by the node
                with trio.fail_after(2):
                    try:
                        assert await s.receive_some(10) == b""
                    except trio.BrokenResourceError:
                        pass
                await s.aclose()
            assert t.refused == 3
            # and the node still accepts a real peer afterwards
            t1 = await start(stack, 1, {2: ("127.0.0.1", t.port)}, plaintext=True)
            await t1.wait_connected(2)


async def test_redial_backs_off_exponentially_with_jitter_up_to_the_cap():
    """A peer that hangs up on every connection: the gaps between dials grow from about
    backoff_min to backoff_max and stay there; only the first failure is a warning."""
    import random

    accepts: list[float] = []

    async def hang_up(stream):
        accepts.append(trio.current_time())
        await stream.aclose()

    warns = Warnings()
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            listeners = await n.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
            addr = listeners[0].socket.getsockname()
            async with AsyncExitStack() as stack:
                await start(stack, 1, {2: addr}, plaintext=True, warn=warns,
                            backoff_min=0.05, backoff_max=0.4, rng=random.Random(3))
                while len(accepts) < 9:
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(accepts, accepts[1:], strict=False)]
    assert gaps[0] < 0.2  # first retry after ~[0.025, 0.05] s (+ scheduling)
    assert all(g >= 0.2 * 0.95 for g in gaps[4:])  # capped delay drawn from [0.2, 0.4]
    assert all(g < 0.4 + 0.5 for g in gaps)
    assert sum(gaps[:2]) < sum(gaps[-2:])
    assert len(warns.matching("dialing node 2")) == 1


# --- with the real consumer: RaftNodes over TcpTransport ---------------------------------------


class _Counter:
    """A state machine that records what it applied (deterministic, so replicas must agree)."""

    def __init__(self) -> None:
        self.applied: list[bytes] = []

    def apply(self, bufs, seq):
        out = []
        for b in bufs:
            if b is not None:
                self.applied.append(b)
            out.append(len(self.applied))
        return out

    def read(self, cmd):
        return len(self.applied)


async def test_raft_cluster_over_mutual_tls(ca, tmp_path):
    """Three RaftNodes talk only through TcpTransport with mutual TLS: they elect a leader,
    replicate appends made on the leader and on followers (forwarded as Propose), serve
    linearizable reads on a follower (ReadIndex), and survive the leader going away."""
    from tinyraftplus import FsLog, RaftNode

    ids = [1, 2, 3]
    tls = {i: tls_for(ca, node_dns_name(i)) for i in ids}
    warns = Warnings()
    sms = {i: _Counter() for i in ids}
    nodes, ts, scopes = {}, {}, {}
    opts = dict(election_timeout=0.3, ping_timeout=0.05, append_timeout=8.0, read_timeout=8.0)

    async def run_node(i, *, task_status=trio.TASK_STATUS_IGNORED):
        """One "process": its transport and its node, until its scope is cancelled."""
        with trio.CancelScope() as scopes[i]:
            async with TcpTransport(i, ("127.0.0.1", 0), {j: None for j in ids}, tls=tls[i],
                                    warn=warns, **FAST) as t:
                ts[i] = t
                log = FsLog(str(tmp_path), f"node{i}", fsync=False)
                nodes[i] = RaftNode(i, ids, t.send, log, apply=sms[i].apply,
                                    read=sms[i].read, **opts)
                t.set_handler(nodes[i].receive)
                async with trio.open_nursery() as inner:
                    await inner.start(nodes[i].serve)
                    task_status.started()
                    await trio.sleep_forever()

    async def leader_among(alive):
        while True:
            states = [nodes[i].state for i in alive]
            if states.count("leader") == 1:
                lead = next(nodes[i] for i in alive if nodes[i].state == "leader")
                if all(nodes[i].leader == lead.node_id for i in alive):
                    return lead
            await trio.sleep(0.02)

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for i in ids:
                await nursery.start(run_node, i)
            for i in ids:
                for j in ids:
                    if i != j:
                        ts[i].set_peer_address(j, ("127.0.0.1", ts[j].port))
            lead = await leader_among(ids)
            followers = [i for i in ids if i != lead.node_id]
            async with trio.open_nursery() as n:
                for k in range(100):
                    n.start_soon(lead.append, b"L%d" % k)
                for k in range(20):
                    n.start_soon(nodes[followers[k % 2]].append, b"F%d" % k)
            assert await nodes[followers[0]].read() == 120
            while not all(len(sms[i].applied) == 120 for i in ids):
                await trio.sleep(0.02)
            assert sms[1].applied == sms[2].applied == sms[3].applied
            assert sorted(sms[1].applied) == sorted(
                [b"L%d" % k for k in range(100)] + [b"F%d" % k for k in range(20)])

            # The leader's process goes away (node and transport); the others carry on.
            gone = lead.node_id
            scopes[gone].cancel()
            alive = [i for i in ids if i != gone]
            lead2 = await leader_among(alive)
            await lead2.append(b"after")
            other = next(i for i in alive if i != lead2.node_id)
            assert await nodes[other].read() == 121
            assert sms[lead2.node_id].applied[-1] == b"after"
            nursery.cancel_scope.cancel()
    assert not [w for w in warns if isinstance(w, ProtocolError)]


async def test_a_failing_peer_is_reported_per_new_reason_and_on_recovery(caplog):
    """Issue 12: repeated dial failures went to DEBUG even when the reason changed (a node
    with a wrong certificate was never diagnosed); now each new reason is a warning, the
    same reason again is not, and recovery is logged. The message names the refused connect,
    not a nested ExceptionGroup."""
    import logging
    import socket

    caplog.set_level(logging.INFO, logger="tinyraftplus.transport.tcp")
    warns = Warnings()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            t0 = trio.current_time()
            await start(stack, 1, {2: ("127.0.0.1", port)}, plaintext=True, warn=warns,
                        startup_grace=0.5)
            await warns.wait_for("cannot connect")
            # Not before the start-up grace: a peer not started yet is expected at first.
            assert trio.current_time() - t0 >= 0.5
            await trio.sleep(0.5)  # many more refused dials: the same reason, not news
            refused = warns.matching("cannot connect")
            assert len(refused) == 1
            assert "attempts since start" in str(refused[0])
            assert "ConnectionRefusedError" in str(refused[0])
            assert "ExceptionGroup" not in str(refused[0])

            async def hang_up(stream):
                await stream.aclose()

            async with trio.open_nursery() as n:
                await n.start(partial(trio.serve_tcp, hang_up, port, host="127.0.0.1"))
                await warns.wait_for("closed before the Hello")  # a new reason: news
                await trio.sleep(0.3)
                assert len(warns.matching("closed before the Hello")) == 1
                n.cancel_scope.cancel()
            t2 = await start(stack, 2, {1: None}, plaintext=True, port=port)
            await t2.wait_connected(1)
            with trio.fail_after(5):
                while "reachable again" not in caplog.text:
                    await trio.sleep(0.05)


def test_a_transport_given_another_nodes_certificate_files_refuses_to_start(tmp_path):
    """Issue 14 Lower 10 / issue 12: node 3 with node-2's certificate used to start and flood
    handshake failures; now TcpTransport refuses it at construction, naming the fix."""
    from test_multiprocess import write_certs

    from tinyraftplus.errors import ConfigurationError
    from tinyraftplus.transport.tls import TlsConfig

    certs = write_certs(tmp_path, [1, 2, 3])
    tls = TlsConfig.from_files(certs["ca"], certs["cert-2"], certs["key-2"])
    with pytest.raises(ConfigurationError, match="give each node its own certificate"):
        TcpTransport(3, ("127.0.0.1", 0), {1: None, 2: None}, tls=tls)
    TcpTransport(2, ("127.0.0.1", 0), {1: None, 3: None}, tls=tls)  # its own: fine


async def test_add_peer_while_serving_then_remove_it(ca):
    """A node added to the configuration becomes a peer of running transports (both
    directions of dialing), authenticated by its certificate; a removed one is cut off."""
    ids = [2, 3]
    tls = {i: tls_for(ca, node_dns_name(i)) for i in [1, 2, 3, 4]}
    inbox, warns = Inbox(), Warnings()
    with trio.fail_after(20):
        async with AsyncExitStack() as stack:
            ts = await start_cluster(stack, ids, tls, inbox, warns)
            # Node 1 dials 2 and 3 (lower id); node 4 is dialed by them.
            t1 = await start(stack, 1, {2: ("127.0.0.1", ts[2].port),
                                        3: ("127.0.0.1", ts[3].port)},
                             tls=tls[1], handler=inbox.handler(1), warn=warns)
            t4 = await start(stack, 4, {}, tls=tls[4], handler=inbox.handler(4), warn=warns)
            with pytest.raises(InvalidArgumentError):
                ts[2].send(1, RequestVote(1, 0, 0))
            for i in ids:
                assert ts[i].add_peer(1) is True
                assert ts[i].add_peer(4, ("127.0.0.1", t4.port)) is True
                assert ts[i].add_peer(4, ("127.0.0.1", t4.port)) is False
                t4.add_peer(i)
            for i in ids:
                ts[i].send(1, RequestVote(5, 0, 0))
                ts[i].send(4, RequestVote(6, 0, 0))
            await inbox.wait(lambda: len(inbox.got[1]) == 2 and len(inbox.got[4]) == 2)
            assert sorted(f for f, _ in inbox.got[4]) == [2, 3]
            # Removed: the connection closes, sending is refused, it cannot come back.
            assert ts[2].remove_peer(4) is True and ts[2].remove_peer(4) is False
            with pytest.raises(InvalidArgumentError):
                ts[2].send(4, RequestVote(7, 0, 0))
            while t4.is_connected(2):
                await trio.sleep(0.01)
            ts[2].remove_peer(1)
            t1.send(2, RequestVote(8, 0, 0))
            await warns.wait_for("which is not a peer")
            assert ts[3].is_connected(4) and ts[3].is_connected(1)
            with pytest.raises(InvalidArgumentError):
                ts[2].add_peer(2)


def test_a_big_payload_is_queued_beside_its_header_and_sent_in_order():
    """A payload over ``BIG_FRAME`` waits as (header, payload), never joined to its header;
    ``take`` joins the small frames around it and keeps every byte in order, within
    ``WRITE_BATCH_BYTES`` (at least one frame)."""
    from tinyraftplus.transport import tcp as tcp_mod
    from tinyraftplus.transport.wire import FrameDecoder, frame, frame_header

    peer = tcp_mod._Peer(2, None, True)
    big = os.urandom(tcp_mod.BIG_FRAME + 1)
    items = [frame(b"a"), frame(b"bb"), (frame_header(big), big), frame(b"c")]
    for it in items:
        peer.queue.append(it)
        peer.queued_bytes += tcp_mod._nbytes(it)
    parts, n = peer.take()
    assert n == 4 and peer.queued_bytes == 0 and not peer.queue
    assert any(p is big for p in parts)  # not copied
    assert FrameDecoder(1 << 20).feed(b"".join(parts)) == [b"a", b"bb", big, b"c"]
    # Past the batch size: what fits, the rest stays queued, and one frame always goes.
    huge = os.urandom(tcp_mod.WRITE_BATCH_BYTES)
    peer.queue.extend([frame(b"x"), (frame_header(huge), huge)])
    peer.queued_bytes = sum(map(tcp_mod._nbytes, peer.queue))
    parts, n = peer.take()
    assert n == 1 and parts == [frame(b"x")] and len(peer.queue) == 1
    parts, n = peer.take()
    assert n == 1 and parts[1] is huge and peer.queued_bytes == 0
