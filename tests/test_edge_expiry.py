"""Issue 14, "Lower 10": certificates that stop being good enough on a live connection.

(a) a peer connection does not outlive the other side's certificate: the transport closes it
    when the peer certificate expires, and the redial is refused (the expired certificate no
    longer passes the handshake);
(b) the client refuses a node whose certificate does not name the node id it reports (a
    stand-in TLS server presenting node 2's certificate at node 1's address, saying it is 1).

Real TCP + TLS on loopback, in process, with ``trustme`` certificates.
"""

from __future__ import annotations

import datetime
from contextlib import AsyncExitStack

import pytest
import trio
import trustme
from test_tcp_transport import Inbox, Warnings, start, tls_for

from tinyraftplus.errors import TransportError
from tinyraftplus.kv.client import Client, decode_request, encode_response
from tinyraftplus.raft.messages import VoteResponse
from tinyraftplus.transport.tls import TlsConfig, new_context, node_dns_name
from tinyraftplus.transport.wire import FrameDecoder, show_value

LIFETIME = 3.0  # seconds the short-lived certificate is valid for


def brief_tls(ca: trustme.CA, name: str, seconds: float) -> TlsConfig:
    """A node's TlsConfig whose certificate expires ``seconds`` from now."""
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    cert = ca.issue_cert(name, not_after=soon)
    server, client = new_context(server=True), new_context(server=False)
    for ctx in (server, client):
        ca.configure_trust(ctx)
        cert.configure_cert(ctx)
    return TlsConfig(server, client)


# --- (a) peer connections end with the peer's certificate --------------------------------------


@pytest.mark.parametrize("brief", [1, 2], ids=["dialer-expires", "acceptor-expires"])
async def test_a_peer_connection_is_closed_when_the_peer_certificate_expires(brief):
    """Node 1 dials node 2; one of them holds a certificate valid for LIFETIME seconds. The
    other side closes the connection at the expiry (with the 'expired' reason), no message
    passes afterwards, and the redial is refused in the handshake."""
    ca = trustme.CA()
    tls = {i: (brief_tls(ca, node_dns_name(i), LIFETIME) if i == brief
               else tls_for(ca, node_dns_name(i))) for i in (1, 2)}
    other = 2 if brief == 1 else 1
    inbox, warns = Inbox(), Warnings()
    with trio.fail_after(LIFETIME + 6):
        async with AsyncExitStack() as stack:
            t0 = trio.current_time()
            t2 = await start(stack, 2, {1: None}, handler=inbox.handler(2), warn=warns,
                             tls=tls[2])
            t1 = await start(stack, 1, {2: ("127.0.0.1", t2.port)}, handler=inbox.handler(1),
                             warn=warns, tls=tls[1])
            ts = {1: t1, 2: t2}
            # Connected and working before the expiry.
            t1.send(2, VoteResponse(1, True))
            t2.send(1, VoteResponse(1, False))
            await inbox.wait(lambda: inbox.got[1] and inbox.got[2])
            assert trio.current_time() - t0 < LIFETIME - 0.5, "too slow to test the expiry"
            assert ts[other].is_connected(brief)
            # The side that verified the brief certificate closes at its expiry.
            await warns.wait_for("the peer's certificate expired")
            closed_at = trio.current_time() - t0
            assert LIFETIME - 1.5 < closed_at < LIFETIME + 2.5, closed_at
            msgs = warns.matching("the peer's certificate expired")
            assert all(isinstance(w, TransportError) for w in msgs)
            assert all(f"node {other!r}: closed the connection with node {brief!r}"
                       in str(w) for w in msgs), msgs
            # And it stays closed: the redial presents (or meets) an expired certificate.
            before = {i: len(inbox.got[i]) for i in (1, 2)}
            for k in range(2, 12):
                t1.send(2, VoteResponse(k, True))
                t2.send(1, VoteResponse(k, False))
                await trio.sleep(0.1)
            assert not t1.is_connected(2) and not t2.is_connected(1)
            assert {i: len(inbox.got[i]) for i in (1, 2)} == before
            refusals = (warns.matching("handshake failed")
                        + warns.matching("certificate has expired")
                        + warns.matching("certificate expired"))
            assert len(refusals) > len(msgs), [str(w) for w in warns]


# --- (b) the client checks the node id against the certificate ---------------------------------


async def _stand_in(ca: trustme.CA, cert_name: str, says_id: int, seen: list,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A TLS server with a CA-signed certificate for ``cert_name`` that answers every status
    request 'I am node ``says_id``, the leader' and records every request it gets."""
    ctx = new_context(server=True)
    ca.configure_trust(ctx)
    ca.issue_cert(cert_name).configure_cert(ctx)

    async def serve(tcp: trio.SocketStream) -> None:
        s = trio.SSLStream(tcp, ctx, server_side=True)
        dec = FrameDecoder()
        try:
            while data := await s.receive_some(65536):
                for payload in dec.feed(data):
                    req = decode_request(payload)
                    seen.append(req)
                    rid = req[2]
                    if req[1] == 1:
                        body = {"id": says_id, "state": "leader", "role": "leader",
                                "term": 7, "leader": says_id}
                        await s.send_all(encode_response(rid, "ok", body))
                    else:
                        await s.send_all(encode_response(rid, "no_leader", "stand-in"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_tcp(serve, 0, host="127.0.0.1", task_status=task_status)


def client_ctx(ca: trustme.CA):
    ctx = new_context(server=False)
    ctx.check_hostname = False
    ca.configure_trust(ctx)
    ca.issue_cert("client-a.tinyraftplus").configure_cert(ctx)
    return ctx


async def test_the_client_refuses_a_node_whose_certificate_names_another_id():
    ca = trustme.CA()
    with trio.fail_after(8):
        async with trio.open_nursery() as n:
            seen_bad: list = []
            seen_good: list = []
            bad = (await n.start(_stand_in, ca, node_dns_name(2), 1, seen_bad))[0]
            good = (await n.start(_stand_in, ca, node_dns_name(1), 1, seen_good))[0]
            bad_addr = ("127.0.0.1", bad.socket.getsockname()[1])
            good_addr = ("127.0.0.1", good.socket.getsockname()[1])

            # Control: the same stand-in with node 1's own certificate is believed.
            async with Client([good_addr], tls=client_ctx(ca), timeout=2,
                              attempt_timeout=1) as c:
                assert (await c.status(good_addr))["id"] == 1
                assert await c._refresh()  # its leader claim is believed

            # node 2's certificate at node 1's address, saying "I am node 1": refused.
            async with Client([bad_addr], tls=client_ctx(ca), timeout=2,
                              attempt_timeout=1) as c:
                assert not await c._refresh()  # its leader claim is not believed
                with pytest.raises(TransportError, match="no status from 127.0.0.1"):
                    await c.status(bad_addr)
                why = c._connect_errors[bad_addr]
                assert why == (f"127.0.0.1:{bad_addr[1]} says it is node {show_value(1)} but its "
                               f"certificate names node-2.tinyraftplus"), why
                assert await c.cluster_status() == {}
                # Nor is it sent anything but status requests: a write gives up naming why
                # (before the fix it was sent register requests on a fresh connection).
                with pytest.raises(TransportError, match="certificate names node-2"):
                    await c.put("k", "v")
                assert seen_bad and all(r[1] == 1 for r in seen_bad), seen_bad
            n.cancel_scope.cancel()

