"""Hostile bytes against a live TcpTransport's port, in plaintext and under mutual TLS.

Node 2 listens; node 1 is a good peer that keeps talking to it; node 0 is a peer id whose
certificate the attacker holds (so that, under TLS, it can get past the handshake and then
misbehave). Every attack must end with node 2 closing that connection and warning about it,
and with node 1's messages still getting through both ways.
"""

from __future__ import annotations

import random
import struct
from contextlib import AsyncExitStack

import msgpack
import pytest
import trio
import trustme
from test_tcp_transport import Inbox, Warnings, start, tls_for

from tinyraftplus.entry import Entry
from tinyraftplus.errors import ProtocolError
from tinyraftplus.raft.messages import AppendEntries, RequestVote, VoteResponse
from tinyraftplus.transport.tls import node_dns_name
from tinyraftplus.transport.wire import (
    FrameDecoder,
    Hello,
    decode,
    encode,
    encode_frame,
    frame,
)

MAX_FRAME = 64 * 1024
HANDSHAKE_TIMEOUT = 0.5


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(3)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] = rng.randrange(256)
        elif op == 1:
            b.insert(i, rng.randrange(256))
        elif b:
            del b[i]
    return bytes(b)


def pre_handshake_attacks(rng: random.Random, n_random: int):
    """(name, bytes, keep_open) sent by a stranger before any Hello."""
    hello = encode_frame(Hello(0, 2))
    out = []
    for k in range(n_random):
        out.append((f"random-{k}", rng.randbytes(rng.choice([1, 7, 8, 9, 100, 5000])), False))
    out += [
        ("truncated-hello-closed", hello[: rng.randrange(1, len(hello))], False),
        ("truncated-hello-silent", hello[:-1], True),
        ("header-only-silent", hello[:8], True),
        ("length-2^32-1", struct.pack(">II", 0xFFFFFFFF, 0) + b"x" * 100, False),
        ("length-over-hello-limit", struct.pack(">II", 4097, 0), False),
        ("bad-crc-hello", hello[:4] + b"\x00\x00\x00\x00" + hello[8:], False),
        ("hello-float-id", frame(msgpack.packb([1, 16, 1.5, 2])), False),
        ("hello-unknown-peer", encode_frame(Hello(99, 2)), False),
        ("hello-wrong-target", encode_frame(Hello(0, 3)), False),
        ("hello-extra-field", frame(msgpack.packb([1, 16, 0, 2, 0])), False),
        ("hello-wrong-version", frame(msgpack.packb([7, 16, 0, 2])), False),
        ("not-a-hello-first", encode_frame(VoteResponse(1, True)), False),
        ("hello-from-higher-id", encode_frame(Hello(3, 2)), False),
        ("msgpack-map", frame(msgpack.packb({"node": 0})), False),
    ]
    for k in range(6):
        out.append((f"mutated-hello-{k}", frame(mutate(rng, encode(Hello(0, 2)))), False))
    return out


def post_handshake_attacks(rng: random.Random, n_random: int):
    """(name, bytes) sent by a peer that completed the handshake as node 0."""
    ae = AppendEntries(3, 9, 3, tuple(Entry(10 + i, 3, rng.randbytes(50)) for i in range(8)), 9)
    good = encode(ae)
    out = []
    for k in range(n_random):
        out.append((f"random-{k}", rng.randbytes(rng.choice([8, 9, 100, 5000]))))
    for k in range(8):
        # Valid frames (the CRC matches) around mutated msgpack.
        p = mutate(rng, good)
        try:
            decode(p)
            continue  # a mutation that still decodes is not an attack
        except ProtocolError:
            out.append((f"mutated-msgpack-{k}", frame(p)))
    out += [
        ("oversized-length", struct.pack(">II", MAX_FRAME + 1, 0)),
        ("bad-crc", (lambda f: f[:4] + bytes([f[4] ^ 1]) + f[5:])(frame(good))),
        ("truncated-then-garbage", frame(good)[:30] + b"\xff" * 600),
        ("term-is-str", frame(msgpack.packb([1, 5, "3"]))),
        ("term-is-bool", frame(msgpack.packb([1, 1, True, 0, 0, False, False]))),
        ("entries-wrong-type", frame(msgpack.packb(
            [1, 3, 3, 9, 3, 9, 0, [3, "3"], [b"a", b"b"]], use_bin_type=True))),
        ("data-is-str", frame(msgpack.packb([1, 3, 3, 9, 3, 9, 0, [3], ["a"]],
                                            use_bin_type=True))),
        ("negative-term", frame(msgpack.packb([1, 2, -1, True, False]))),
        ("seq-too-big", frame(msgpack.packb([1, 4, 1, True, 1 << 63, 0, -1, 0]))),
        ("unknown-tag", frame(msgpack.packb([1, 42]))),
        ("wrong-version", frame(msgpack.packb([2, 5, 1]))),
        ("second-hello", encode_frame(Hello(0, 2))),
        ("ext-type", frame(msgpack.packb([1, 5, msgpack.ExtType(3, b"zz")]))),
        ("good-then-bad", encode_frame(RequestVote(4, 3, 2)) + frame(b"\xc1")),
    ]
    return out


class Harness:
    def __init__(self, tls: bool) -> None:
        self.tls = tls
        self.inbox, self.warns = Inbox(), Warnings()
        self.rounds = 0

    async def __aenter__(self) -> Harness:
        self.stack = AsyncExitStack()
        if self.tls:
            ca = trustme.CA()
            self.cfg = {i: tls_for(ca, node_dns_name(i)) for i in (0, 1, 2)}
            kw = lambda i: {"tls": self.cfg[i]}  # noqa: E731
        else:
            kw = lambda i: {"plaintext": True}  # noqa: E731
        self.t2 = await start(self.stack, 2, {0: None, 1: None}, handler=self.inbox.handler(2),
                              warn=self.warns, max_frame=MAX_FRAME,
                              handshake_timeout=HANDSHAKE_TIMEOUT, **kw(2))
        self.t1 = await start(self.stack, 1, {2: ("127.0.0.1", self.t2.port)},
                              handler=self.inbox.handler(1), **kw(1))
        await self.check_alive()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stack.aclose()

    async def check_alive(self) -> None:
        """Node 1 and node 2 still exchange messages in both directions."""
        self.rounds += 1
        marker = VoteResponse(self.rounds, True)
        self.t1.send(2, marker)
        self.t2.send(1, marker)
        with trio.fail_after(5):
            await self.inbox.wait(lambda: (1, marker) in self.inbox.got[2]
                                  and (2, marker) in self.inbox.got[1])

    async def connect(self, *, as_node0: bool) -> trio.abc.Stream:
        s: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", self.t2.port)
        if not as_node0:
            return s
        if self.tls:
            s = trio.SSLStream(s, self.cfg[0].client_context,
                               server_hostname=node_dns_name(2))
            await s.do_handshake()
        await s.send_all(encode_frame(Hello(0, 2)))
        dec = FrameDecoder()
        while True:
            payloads = dec.feed(await s.receive_some(65536))
            if payloads:
                assert decode(payloads[0]) == Hello(2, 0)
                return s

    async def expect_closed(self, s: trio.abc.Stream) -> None:
        """Node 2 must close the connection (EOF or reset) without our help."""
        with trio.fail_after(HANDSHAKE_TIMEOUT + 3):
            try:
                while await s.receive_some(65536):
                    pass  # keepalive pings may come first
            except (trio.BrokenResourceError, OSError):
                pass
        await trio.aclose_forcefully(s)

    async def attack(self, name: str, data: bytes, *, as_node0: bool,
                     keep_open: bool = True) -> None:
        before = len(self.warns)
        s = await self.connect(as_node0=as_node0)
        try:
            await s.send_all(data)
            if not keep_open and not self.tls:
                await s.send_eof()  # type: ignore[attr-defined]
        except (trio.BrokenResourceError, OSError):
            pass  # node 2 may already have hung up on us mid-write
        await self.expect_closed(s)
        with trio.fail_after(5):
            while not any("node 2:" in str(w) for w in self.warns[before:]):
                await trio.sleep(0.01)
        await self.check_alive()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_strangers_sending_garbage_are_cut_off(tls):
    rng = random.Random(5 + tls)
    async with Harness(tls) as h:
        attacks = pre_handshake_attacks(rng, n_random=6)
        if tls:
            # A stranger cannot even start a TLS session: everything above is garbage to
            # TLS; add a TLS client without any certificate.
            attacks = attacks[:8]
        for name, data, keep_open in attacks:
            await h.attack(name, data, as_node0=False, keep_open=keep_open)
        refused = h.t2.refused
        assert refused >= len(attacks)
        if tls:
            await _tls_client_without_certificate(h)
            assert h.t2.refused == refused + 1
        assert h.t2.stats(1).connects == 1  # the good peer's connection was never disturbed
        assert h.t2.stats(1).bad_connections == 0


async def _tls_client_without_certificate(h: Harness) -> None:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the attacker does not care who we are
    before = len(h.warns)
    s = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", h.t2.port), ctx,
                       server_hostname="node-2.tinyraftplus")
    try:
        await s.do_handshake()
        await s.send_all(encode_frame(Hello(0, 2)))
    except trio.BrokenResourceError:
        pass
    await h.expect_closed(s)
    with trio.fail_after(5):
        while not h.warns.matching("refused") or len(h.warns) == before:
            await trio.sleep(0.01)
    await h.check_alive()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_peer_sending_bad_frames_after_handshake_is_cut_off(tls):
    rng = random.Random(11 + tls)
    async with Harness(tls) as h:
        attacks = post_handshake_attacks(rng, n_random=4)
        for name, data in attacks:
            await h.attack(name, data, as_node0=True)
        st0 = h.t2.stats(0)
        assert st0.bad_connections == len(attacks) and st0.connects == len(attacks)
        assert all(isinstance(w, ProtocolError) for w in h.warns
                   if "closed the connection with node 0" in str(w))
        assert h.t2.stats(1).connects == 1 and h.t2.stats(1).bad_connections == 0
        # node 0 can still connect and be heard when it behaves
        s = await h.connect(as_node0=True)
        await s.send_all(encode_frame(VoteResponse(77, False)))
        with trio.fail_after(5):
            await h.inbox.wait(lambda: (0, VoteResponse(77, False)) in h.inbox.got[2])
        await trio.aclose_forcefully(s)


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_long_fuzz(tls):
    rng = random.Random(1234 + tls)
    async with Harness(tls) as h:
        for _round in range(10):
            for name, data in post_handshake_attacks(rng, n_random=10):
                await h.attack(name, data, as_node0=True)
            for name, data, _keep in pre_handshake_attacks(rng, n_random=10)[:10]:
                await h.attack(name, data, as_node0=False, keep_open=False)
