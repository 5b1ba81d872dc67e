"""``transport.streamio.receive_some``: one read hands over every TLS record already
received (issue 13: a 64 KiB value crossed the event loop once per 16 KiB record)."""

from __future__ import annotations

import os
import ssl

import pytest
import trio
import trio.testing
import trustme

from tinyraftplus.transport.streamio import receive_some


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def _tls_pair(ca: trustme.CA) -> tuple[trio.SSLStream, trio.SSLStream]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("server.example").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a, b = trio.testing.memory_stream_pair()
    client = trio.SSLStream(a, client_ctx, server_hostname="server.example")
    server = trio.SSLStream(b, server_ctx, server_side=True)
    async with trio.open_nursery() as n:
        n.start_soon(client.do_handshake)
        n.start_soon(server.do_handshake)
    return client, server


async def test_one_read_returns_every_buffered_record(ca):
    client, server = await _tls_pair(ca)
    payload = os.urandom(256 << 10)  # sixteen 16 KiB TLS records
    async with trio.open_nursery() as n:
        n.start_soon(client.send_all, payload)
        got = bytearray()
        sizes = []
        while len(got) < len(payload):
            chunk = await receive_some(server, 1 << 20)
            sizes.append(len(chunk))
            got += chunk
    assert bytes(got) == payload
    # trio.SSLStream alone returns one record (<= 16 KiB) per call: 16 calls or more.
    assert max(sizes) > 16 << 10 and len(sizes) < 16, sizes


async def test_max_bytes_is_respected_and_nothing_is_lost(ca):
    client, server = await _tls_pair(ca)
    payload = os.urandom(300_000)
    async with trio.open_nursery() as n:
        n.start_soon(client.send_all, payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = await receive_some(server, 40_000)
            assert 0 < len(chunk) <= 40_000
            got += chunk
    assert bytes(got) == payload


async def test_end_of_stream_after_data(ca):
    client, server = await _tls_pair(ca)
    async with trio.open_nursery() as n:

        async def send_and_close() -> None:
            await client.send_all(b"x" * 50_000)
            await client.aclose()

        n.start_soon(send_and_close)
        got = bytearray()
        while True:
            chunk = await receive_some(server, 1 << 20)
            if not chunk:
                break
            got += chunk
    assert bytes(got) == b"x" * 50_000


async def test_plain_streams_pass_through():
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"hello")
    assert await receive_some(b, 100) == b"hello"
