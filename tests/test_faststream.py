"""``FastStream`` over real sockets: round trips, batching of TLS records, direct sends and
their backlog, ciphertext order, cancellation, fairness, errors and closing.

Most tests use ``socket.socketpair()`` (small, bounded kernel buffers, so "the peer does not
read" fills up after a few hundred KiB); the round trips also run over TCP on 127.0.0.1.
TLS is mutual, with the project's own context settings (``new_context``) and ``trustme``
certificates. A few tests reach into the stream's SSL object (``_obj``, ``_out_bio``) to make
TLS do what the public API cannot ask for: a post-handshake certificate request, a record cut
in half.
"""

from __future__ import annotations

import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme

from tinyraftplus.transport import faststream
from tinyraftplus.transport.faststream import FastStream
from tinyraftplus.transport.tls import new_context

SERVER_NAME = "server.test"
CLIENT_NAME = "client.test"
MiB = 1 << 20

Contexts = tuple[ssl.SSLContext, ssl.SSLContext]


def make_contexts(ca: trustme.CA, *, pha: bool = False) -> Contexts:
    """(server, client) contexts for mutual TLS, both trusting ``ca``. With ``pha`` the
    server asks for the client's certificate only after the handshake (TLS 1.3
    post-handshake authentication), when the test says so."""
    server, client = new_context(server=True), new_context(server=False)
    ca.configure_trust(server)
    ca.configure_trust(client)
    ca.issue_cert(SERVER_NAME).configure_cert(server)
    ca.issue_cert(CLIENT_NAME).configure_cert(client)
    if pha:
        server.minimum_version = ssl.TLSVersion.TLSv1_3
        server.post_handshake_auth = True
        client.post_handshake_auth = True
    return server, client


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls(ca: trustme.CA) -> Contexts:
    return make_contexts(ca)


@pytest.fixture(params=[False, True], ids=["plain", "tls"])
def ctx(request: pytest.FixtureRequest, tls: Contexts) -> Contexts | None:
    """Each test that takes it runs in plaintext and under TLS."""
    return tls if request.param else None


async def tcp_sockets() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    try:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    finally:
        await listener.aclose()
    return server, client


@asynccontextmanager
async def connected(contexts: Contexts | None, *, tcp: bool = False,
                    handshake: bool = True) -> AsyncIterator[tuple[FastStream, FastStream]]:
    """(server, client) streams over a fresh connection, handshaken unless told not to."""
    sctx, cctx = (None, None) if contexts is None else contexts
    name = None if contexts is None else SERVER_NAME
    if tcp:
        tserver, tclient = await tcp_sockets()
        srv = FastStream.from_trio(tserver, sctx, server_side=True)
        cli = FastStream.from_trio(tclient, cctx, server_hostname=name)
    else:
        a, b = socket.socketpair()
        srv = FastStream(a, sctx, server_side=True)
        cli = FastStream(b, cctx, server_hostname=name)
    try:
        if contexts is not None and handshake:
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(srv.do_handshake)
                    nursery.start_soon(cli.do_handshake)
        yield srv, cli
    finally:
        srv.close_now()
        cli.close_now()


def pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ everywhere, so a lost, doubled or moved byte shows."""
    return random.Random(seed).randbytes(n)


async def recv_exactly(stream: FastStream, n: int, max_bytes: int = 256 << 10) -> bytes:
    parts: list[bytes | bytearray] = []
    got = 0
    while got < n:
        data = await stream.receive_some(min(max_bytes, n - got))
        assert data, f"EOF after {got} of {n} bytes"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def fill(stream: FastStream, seed: int, chunk: int = 150_000) -> list[bytes]:
    """``try_send`` distinct chunks until the socket stops taking them (the peer does not
    read); the chunks handed over, in order. A chunk larger than half a Unix socket's send
    buffer goes in pieces, so the last one is usually taken in part."""
    chunks: list[bytes] = []
    rng = random.Random(seed)
    while True:
        data = rng.randbytes(chunk)
        chunks.append(data)
        if not stream.try_send(data):
            assert stream.out_pending > 0
            return chunks
        assert stream.out_pending == 0, "try_send said True with bytes left over"
        assert len(chunks) < 4096, "the socket never filled up"


# --- 1. round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("tcp", [False, True], ids=["socketpair", "tcp"])
async def test_small_round_trips_both_ways(ctx: Contexts | None, tcp: bool) -> None:
    async with connected(ctx, tcp=tcp) as (srv, cli):
        with trio.fail_after(5):
            for i in range(20):
                msg = pattern(1 + i * 37, i)
                await cli.send_all(msg)
                assert await recv_exactly(srv, len(msg)) == msg
                await srv.send_all(msg[::-1])
                assert await recv_exactly(cli, len(msg)) == msg[::-1]


async def test_4mib_each_way_at_once_arrives_complete_and_in_order(
        ctx: Contexts | None) -> None:
    """Both directions at once over TCP, each with its own sender and receiver task; the
    senders mix ``send_all`` with ``try_send`` + ``flush`` and many chunk sizes."""
    up, down = pattern(4 * MiB, 1), pattern(4 * MiB, 2)
    sizes = [1, 1000, 16384, 16385, 70000, MiB]
    got: dict[str, bytes] = {}

    async def sender(stream: FastStream, data: bytes) -> None:
        i = k = 0
        while i < len(data):
            piece = data[i:i + sizes[k % len(sizes)]]
            if k % 3 == 0:
                if not stream.try_send(piece):
                    await stream.flush()
            else:
                await stream.send_all(piece)
            i += len(piece)
            k += 1
        await stream.flush()
        assert stream.out_pending == 0

    async def receiver(name: str, stream: FastStream, n: int) -> None:
        got[name] = await recv_exactly(stream, n, max_bytes=100_000)

    async with connected(ctx, tcp=True) as (srv, cli):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver, "srv", srv, len(up))
                nursery.start_soon(receiver, "cli", cli, len(down))
                nursery.start_soon(sender, cli, up)
                nursery.start_soon(sender, srv, down)
    assert got["srv"] == up
    assert got["cli"] == down


# --- 2. every buffered TLS record in one call --------------------------------------------

async def test_one_receive_returns_every_buffered_record_up_to_max_bytes(tls: Contexts) -> None:
    data = pattern(16 * 16384, 3)  # one write: 16 records of 16 KiB
    more = pattern(4 * 16384, 4)
    async with connected(tls) as (srv, cli):
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MiB)
        with trio.fail_after(5):
            await srv.send_all(data)  # returned: every record is in the client's socket
            first = await cli.receive_some(MiB)
            assert len(first) > 8 * 16384, f"one call returned only {len(first)} bytes"
            assert first == data[:len(first)]
            assert await recv_exactly(cli, len(data) - len(first)) == data[len(first):]
            # Never more than asked for, even with whole records buffered.
            await srv.send_all(more)
            assert await cli.receive_some(1) == more[:1]  # takes all 4 records in
            assert await cli.receive_some(20000) == more[1:20001]  # 1.2 records
            assert await cli.receive_some(MiB) == more[20001:]  # the rest, in one call


# --- 3. try_send against a peer that does not read ---------------------------------------

async def test_try_send_buffers_in_order_and_a_later_send_all_goes_after(
        ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        chunks = fill(cli, seed=4)
        assert cli.out_pending > 0
        # More direct sends while the backlog waits: they queue behind it.
        extra = [pattern(5000 + i, 100 + i) for i in range(3)]
        for piece in extra:
            assert cli.try_send(piece) is False
        assert cli.out_pending > sum(map(len, extra))
        expected = b"".join(chunks + extra)
        tail = pattern(300_000, 5)
        with trio.fail_after(5):
            # The peer reads some, so the socket has room again before anyone flushes.
            head = await recv_exactly(srv, 65536)
            got: list[bytes] = []

            async def read_rest() -> None:
                got.append(await recv_exactly(srv, len(expected) + len(tail) - len(head)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_rest)
                await cli.send_all(tail)  # must go after the backlog, not beside it
                await cli.flush()
                assert cli.out_pending == 0
        assert head + got[0] == expected + tail


async def test_try_send_during_another_tasks_flush_queues_behind_it(
        ctx: Contexts | None) -> None:
    big, small = pattern(2 * MiB, 14), pattern(1000, 15)
    async with connected(ctx) as (srv, cli):
        got: list[bytes] = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cli.send_all, big)
                await trio.testing.wait_all_tasks_blocked()
                assert cli.out_pending > 0  # the writer waits for the peer
                # The peer reads a little (without yielding, so the writer has not run
                # yet): the socket has room, and still the new bytes go behind the backlog.
                got.append(await recv_exactly(srv, 65536))
                assert cli.try_send(small) is False
                got.append(await recv_exactly(srv, len(big) + len(small) - 65536))
        assert cli.out_pending == 0
        assert b"".join(got) == big + small


async def test_flush_sends_a_try_send_backlog(ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        chunks = fill(cli, seed=6)
        expected = b"".join(chunks)
        got: list[bytes] = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cli.flush)
                await trio.testing.wait_all_tasks_blocked()
                assert cli.out_pending > 0  # flush is waiting for the peer to read
                got.append(await recv_exactly(srv, len(expected)))
        assert cli.out_pending == 0
        assert got[0] == expected


async def test_flush_from_two_tasks_waits_in_turn(ctx: Contexts | None) -> None:
    """One task at a time sends the backlog; a second ``flush`` waits for it rather than
    tripping over the same socket."""
    async with connected(ctx) as (srv, cli):
        expected = b"".join(fill(cli, seed=13))
        done: list[int] = []

        async def flush() -> None:
            await cli.flush()
            done.append(cli.out_pending)

        got: list[bytes] = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush)
                nursery.start_soon(flush)
                await trio.testing.wait_all_tasks_blocked()
                assert not done
                got.append(await recv_exactly(srv, len(expected)))
        assert done == [0, 0]
        assert got[0] == expected


# --- 4. TLS output produced by a read, while application data waits ----------------------

async def _client_certificate_arrives(srv: FastStream) -> bool:
    """Let the server process whatever the client sent (no application data expected), then
    say whether it now has the client's certificate."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(srv.receive_some, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return srv.getpeercert() is not None


async def test_certificate_sent_by_a_read_goes_after_the_direct_send_backlog(
        ca: trustme.CA) -> None:
    """TLS 1.3 post-handshake authentication: the client's *read* of the server's
    CertificateRequest produces handshake records. The client has a ``try_send`` backlog and
    its socket has room again; those records must still go after the backlog, or the server
    sees records out of sequence and the connection dies."""
    async with connected(make_contexts(ca, pha=True)) as (srv, cli):
        assert srv.getpeercert() is None  # not asked for yet
        chunks = fill(cli, seed=7)
        expected = b"".join(chunks)
        with trio.fail_after(5):
            srv._obj.verify_client_post_handshake()  # type: ignore[union-attr]
            await srv.send_all(b"request")
            head = await recv_exactly(srv, 65536)  # room in the client's socket again
            assert await cli.receive_some(100) == b"request"  # answers the request
            got: list[bytes] = []

            async def read_rest() -> None:
                got.append(await recv_exactly(srv, len(expected) - len(head)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_rest)
                await cli.flush()
            assert head + got[0] == expected
            assert await _client_certificate_arrives(srv)
            await cli.send_all(b"tail")
            assert await srv.receive_some(100) == b"tail"
        assert CLIENT_NAME in str(srv.getpeercert())


async def test_certificate_sent_by_a_read_while_a_writer_is_mid_flush(ca: trustme.CA) -> None:
    """The same, with a ``send_all`` blocked half-way (``_flushing``): the read's records join
    the end of the backlog and the flushing writer sends them, without another write."""
    big = pattern(2 * MiB, 8)
    async with connected(make_contexts(ca, pha=True)) as (srv, cli):
        got: list[bytes] = []
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cli.send_all, big)
                await trio.testing.wait_all_tasks_blocked()
                assert cli._flushing and cli.out_pending > 0
                srv._obj.verify_client_post_handshake()  # type: ignore[union-attr]
                await srv.send_all(b"request")
                assert await cli.receive_some(100) == b"request"
                got.append(await recv_exactly(srv, len(big)))
            assert got[0] == big
            assert cli.out_pending == 0
            assert await _client_certificate_arrives(srv)
            await cli.send_all(b"tail")
            assert await srv.receive_some(100) == b"tail"


# --- 5. cancellation and fairness --------------------------------------------------------

LIMIT = 2 * faststream._YIELD_EVERY
"""Calls without waiting after which another runnable task must have run: the stream yields
every ``_YIELD_EVERY`` calls, and Trio may run the yielding task first in the next batch (it
reverses batches at random), so the other task is sure to run by the second yield."""

async def test_cancelled_receive_and_send_raise_even_when_they_could_complete(
        ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        with trio.fail_after(5):
            await srv.send_all(b"ready")
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as cs:
                cs.cancel()
                await cli.receive_some(100)
            assert cs.cancelled_caught
            with trio.CancelScope() as cs:
                cs.cancel()
                await cli.send_all(b"never")
            assert cs.cancelled_caught
            # Nothing was consumed or sent by the cancelled calls.
            assert await cli.receive_some(100) == b"ready"
            await cli.send_all(b"after")
            assert await srv.receive_some(100) == b"after"


async def calls_until_another_task_runs(step: Callable[[], Awaitable[None]],
                                        what: str) -> int:
    """Call ``step`` until a task started beside it has run (at most ``LIMIT`` calls)."""
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    calls = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        while not ran:
            assert calls < LIMIT, f"{calls} {what}; no other task ran"
            await step()
            calls += 1
    return calls


async def test_a_reader_that_always_finds_data_lets_other_tasks_run(
        ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        await srv.send_all(b"x" * 4096)  # far more than the reads below take
        await trio.testing.wait_all_tasks_blocked()

        async def read() -> None:
            assert await cli.receive_some(1) == b"x"

        await calls_until_another_task_runs(read, "reads found data ready")


async def test_a_cancel_that_lands_on_the_fairness_yield_loses_no_data(
        ctx: Contexts | None) -> None:
    """The yield comes after the read took its bytes: a cancellation delivered there must
    not throw them away (the next call raises ``Cancelled`` instead)."""
    data = pattern(4096, 12)
    async with connected(ctx) as (srv, cli):
        with trio.fail_after(5):
            await srv.send_all(data)
            await trio.testing.wait_all_tasks_blocked()
            got = bytearray()
            with trio.CancelScope() as cs:

                async def cancel() -> None:  # runs only when the reader yields
                    cs.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel)
                    while True:
                        got += await cli.receive_some(7)
            assert cs.cancelled_caught
            assert 0 < len(got) <= 7 * LIMIT
            got += await recv_exactly(cli, len(data) - len(got))
        assert got == data


async def test_a_writer_that_never_waits_lets_other_tasks_run(ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):

        async def write() -> None:
            await cli.send_all(b"y")

        calls = await calls_until_another_task_runs(write, "sends went out at once")
        assert await recv_exactly(srv, calls) == b"y" * calls


# --- 6. errors and closing ---------------------------------------------------------------

async def test_untrusted_certificate_fails_the_handshake_with_the_ssl_error_as_cause(
        ca: trustme.CA) -> None:
    rogue_server, _ = make_contexts(trustme.CA())
    _, client = make_contexts(ca)
    errors: dict[str, BaseException] = {}

    async def shake(name: str, stream: FastStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            errors[name] = e

    async with connected((rogue_server, client), handshake=False) as (srv, cli):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shake, "srv", srv)
                nursery.start_soon(shake, "cli", cli)
    assert isinstance(errors["cli"].__cause__, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(errors["cli"])
    assert isinstance(errors["srv"].__cause__, ssl.SSLError)  # the client's alert


async def test_the_peer_closing_cleanly_reads_as_eof_after_its_data(
        ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        with trio.fail_after(5):
            await srv.send_all(b"last words")
            await srv.aclose()
            assert await recv_exactly(cli, 10) == b"last words"
            assert await cli.receive_some(100) == b""
            assert await cli.receive_some(100) == b""  # and stays so


async def test_a_connection_cut_inside_a_tls_record_is_broken(tls: Contexts) -> None:
    async with connected(tls) as (srv, cli):
        srv._obj.write(b"z" * 1000)  # type: ignore[union-attr]
        record = srv._out_bio.read()
        srv._sock.send(record[:len(record) // 2])  # type: ignore[union-attr]
        srv.close_now()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await cli.receive_some(100)


async def test_a_tls_peer_vanishing_without_close_notify_is_broken(tls: Contexts) -> None:
    async with connected(tls) as (srv, cli):
        await srv.send_all(b"data")
        srv.close_now()  # whole records, then a bare TCP close
        with trio.fail_after(5):
            assert await cli.receive_some(100) == b"data"
            with pytest.raises(trio.BrokenResourceError):
                await cli.receive_some(100)


async def test_operations_after_aclose_raise_closed(ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        with trio.fail_after(5):
            await srv.send_all(b"unread data, some of it already inside the stream")
            assert await cli.receive_some(5) == b"unrea"
            await cli.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await cli.receive_some(100)
            with pytest.raises(trio.ClosedResourceError):
                await cli.send_all(b"more")
            with pytest.raises(trio.ClosedResourceError):
                cli.try_send(b"more")
            with pytest.raises(trio.ClosedResourceError):
                await cli.wait_send_all_might_not_block()
            with pytest.raises(trio.ClosedResourceError):
                cli.getpeername()
            await cli.aclose()  # closing twice is fine


async def test_aclose_wakes_a_blocked_reader_with_closed(ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                async def read() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await cli.receive_some(100)

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                await cli.aclose()


async def test_aclose_never_waits_for_a_peer_that_does_not_read(ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        fill(cli, seed=9)
        assert cli.out_pending > 0
        with trio.fail_after(1):
            await cli.aclose()  # backlog, nobody flushing
    async with connected(ctx) as (srv, cli):
        fill(cli, seed=10)
        with trio.fail_after(1):
            async with trio.open_nursery() as nursery:
                async def flush() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await cli.flush()

                nursery.start_soon(flush)
                await trio.testing.wait_all_tasks_blocked()
                await cli.aclose()  # a writer waiting in flush: it is woken, not waited for


async def test_first_read_and_first_write_may_run_the_handshake_together(
        tls: Contexts) -> None:
    """The handshake runs on the first read or write; a reader task and a writer task that
    start together must not trip over each other (one handshake, the other waits)."""
    async with connected(tls, handshake=False) as (srv, cli):
        got: dict[str, bytes | bytearray] = {}

        async def srv_side() -> None:
            got["srv"] = await srv.receive_some(100)
            await srv.send_all(b"back")

        async def cli_read() -> None:
            got["cli"] = await cli.receive_some(100)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(srv_side)
                nursery.start_soon(cli_read)
                nursery.start_soon(cli.send_all, b"hello")
    assert got == {"srv": b"hello", "cli": b"back"}


# --- 7. wait_send_all_might_not_block, getpeercert ---------------------------------------

async def test_wait_send_all_might_not_block_waits_for_the_backlog(
        ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        with trio.fail_after(5):
            await cli.wait_send_all_might_not_block()  # fresh connection: at once
            chunks = fill(cli, seed=11)
            expected = b"".join(chunks)
            pending_when_done: list[int] = []

            async def waiter() -> None:
                await cli.wait_send_all_might_not_block()
                pending_when_done.append(cli.out_pending)

            got: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert not pending_when_done  # the peer reads nothing: still waiting
                got.append(await recv_exactly(srv, len(expected)))
        assert pending_when_done == [0]
        assert got[0] == expected


async def test_getpeercert(ctx: Contexts | None) -> None:
    async with connected(ctx) as (srv, cli):
        if ctx is None:
            assert cli.getpeercert() is None and srv.getpeercert() is None
            assert not cli.tls
        else:
            assert cli.tls
            assert ("DNS", SERVER_NAME) in cli.getpeercert()["subjectAltName"]  # type: ignore[index]
            assert ("DNS", CLIENT_NAME) in srv.getpeercert()["subjectAltName"]  # type: ignore[index]
