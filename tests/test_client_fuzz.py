"""Bad input on a live node's client port (three server processes, mutual TLS).

Every bad connection -- random bytes, a truncated frame, an oversized length prefix, a valid
frame around mutated msgpack, valid msgpack of the wrong shape or types -- is closed by the
server with one warning on its stderr and counted; the node stays up, keeps serving, and the
cluster stays consistent. Clients without a valid certificate never get in.
"""

from __future__ import annotations

import random
import ssl
import struct

import msgpack
import pytest
import trio
from crc32c import crc32c
from test_multiprocess import ProcCluster, client_context

from tinyraftplus.errors import ProtocolError
from tinyraftplus.kv.client import decode_request, encode_write_request

WARNING = "closed the connection with client"


def frame(payload: bytes) -> bytes:
    # Built here with the crc32c package, not with the library's framer: an independent oracle.
    return struct.pack(">II", len(payload), crc32c(payload)) + payload


def is_valid(payload: bytes) -> bool:
    try:
        decode_request(payload)
    except ProtocolError:
        return False
    return True


async def open_tls(addr, ctx: ssl.SSLContext) -> trio.SSLStream:
    tcp = await trio.open_tcp_stream(*addr)
    s = trio.SSLStream(tcp, ctx, server_hostname=None)
    await s.do_handshake()
    return s


async def closed_by_server(s: trio.abc.Stream, timeout: float = 5.0) -> bool:
    """Read (discarding answers) until the server closes; False if it did not in time."""
    with trio.move_on_after(timeout):
        while True:
            try:
                if not await s.receive_some(65536):
                    return True
            except trio.BrokenResourceError:
                return True
    return False


def wrong_shapes(rng: random.Random) -> list[object]:
    """Valid msgpack that is not a valid request."""
    rid = rng.randrange(1 << 20)
    good = [1, 3, rid, 77, 5, 1, "put", b"k", b"v"]
    out: list[object] = [
        {"op": "put"}, "put", 12, None, [], [1], [1, 3], [2, 1, rid], [1, 1, rid, "extra"],
        [1, 9, rid], [1, True, rid], [1, 1, -1], [1, 1, True], [1, 1, 1 << 63],
        [1, 2, rid], [1, 2, rid, "str-key"], [1, 2, rid, b""], [1, 2, rid, b"k" * 5000],
        [1, 3, rid, "77", 5, 1, "put", b"k", b"v"], [1, 3, rid, 77, 0, 1, "put", b"k", b"v"],
        [1, 3, rid, 77, 5, 6, "put", b"k", b"v"], [1, 3, rid, 77, 5, 1, "drop", b"k", b"v"],
        [1, 3, rid, 77, 5, 1, "put", b"k", "v"], [1, 3, rid, 77, 5, 1, "put", b"k", None],
        [1, 3, rid, 77, 5, 1, "delete", b"k", b"v"], [1, 3, rid, 77, 5, 1, "put", [b"k"], b"v"],
        [1, 3, rid, 77, 5, 1, "put", b"k", b"v", b"more"], [1.0, 1, rid], [1, 1.0, rid],
        [1, 3, rid, -77, 5, 1, "put", b"k", b"v"], [[[[[[[[[[]]]]]]]]]],
    ]
    for _ in range(10):
        g = list(good)
        i = rng.randrange(len(g))
        g[i] = rng.choice([None, -1, 2.5, "x", b"x", [], {}, True, 1 << 62])
        out.append(g)
    return out


async def test_client_port_survives_bad_input(tmp_path):
    rng = random.Random(20240611)
    cl = ProcCluster(tmp_path, election_timeout=0.4)
    try:
        with trio.fail_after(180):
            await cl.start_all()
            ctx = client_context(cl.certs)
            target = cl.client_addr[1]
            async with cl.client() as c:
                for k in range(20):
                    await c.put(f"before{k}", f"v{k}")
                base = (await c.status(target))["bad_connections"]

            bad = 0
            sent_valid = 0
            cases: list[tuple[str, bytes, bool]] = []  # (kind, bytes, close our side after)
            for _ in range(25):
                cases.append(("random", rng.randbytes(rng.randrange(1, 300)), True))
            for n in range(10):
                payload = msgpack.packb([1, 2, n, b"key"])
                f = frame(payload)
                cases.append(("truncated", f[:rng.randrange(1, len(f))], True))
            for length in (0xFFFFFFFF, (2 << 20) + 1, 1 << 30):
                cases.append(("oversized", struct.pack(">II", length, 0) + b"x" * 64, False))
            cases.append(("bad crc", struct.pack(">II", 3, 12345) + b"abc", False))
            valid = encode_write_request(1, 99, 1, 1, "put", b"fuzz-key", b"value")[8:]
            for _ in range(40):
                m = bytearray(valid)
                for _ in range(rng.randrange(1, 4)):
                    m[rng.randrange(len(m))] = rng.randrange(256)
                cases.append(("mutated", bytes(m), False))
            for obj in wrong_shapes(rng):
                cases.append(("wrong types", msgpack.packb(obj, use_bin_type=True), False))

            for kind, data, close_ours in cases:
                s = await open_tls(target, ctx)
                if kind in ("mutated", "wrong types"):
                    expect_bad = not is_valid(data)
                    await s.send_all(frame(data))
                else:
                    expect_bad = True
                    await s.send_all(data)
                if close_ours:
                    # Random bytes may be a frame still waiting for the rest: hang up; the
                    # server must still call it a bad connection (it ended inside a frame).
                    if kind == "random" and len(data) >= 8:
                        length = struct.unpack(">I", data[:4])[0]
                        expect_bad = True
                        if length > (2 << 20):
                            assert await closed_by_server(s), (kind, data[:16])
                            bad += 1
                            continue
                    await trio.sleep(0.05)
                    await s.aclose()
                    bad += 1
                    continue
                if expect_bad:
                    assert await closed_by_server(s), (kind, data[:40])
                    bad += 1
                else:
                    sent_valid += 1
                    await s.aclose()

            # Wait until the node has counted every bad connection, once each.
            async with cl.client() as c:
                with trio.fail_after(20):
                    while (await c.status(target))["bad_connections"] - base < bad:
                        await trio.sleep(0.1)
                await trio.sleep(0.3)
                assert (await c.status(target))["bad_connections"] - base == bad
                # Up, serving, consistent across the cluster.
                await c.put("after", "yes")
                await cl.wait_caught_up(c)
            for i in cl.ids:
                assert cl.procs[i].poll() is None, f"node {i} died"
                async with cl.client([i]) as one:
                    for k in range(20):
                        assert await one.get(f"before{k}") == f"v{k}".encode()
                    assert await one.get("after") == b"yes"
            warnings = cl.stderr(1).count(WARNING)
            assert warnings == bad, (warnings, bad)
            assert "Traceback" not in cl.stderr(1)
            assert sent_valid + bad == len(cases)
    finally:
        cl.kill_all()


async def test_clients_without_a_valid_certificate_are_refused(tmp_path):
    import trustme
    from test_multiprocess import write_certs

    cl = ProcCluster(tmp_path, [1], election_timeout=0.3)
    try:
        with trio.fail_after(60):
            await cl.start(1)
            addr = cl.client_addr[1]
            no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            no_cert.check_hostname = False
            no_cert.load_verify_locations(cafile=str(cl.certs["ca"]))
            other = write_certs(tmp_path / "other", [1], trustme.CA())
            wrong_ca = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            wrong_ca.check_hostname = False
            wrong_ca.load_verify_locations(cafile=str(cl.certs["ca"]))
            wrong_ca.load_cert_chain(str(other["cert-client"]), str(other["key-client"]))
            request = encode_write_request(1, 5, 1, 1, "put", b"intruder", b"x")
            for ctx in (no_cert, wrong_ca):
                try:
                    s = await open_tls(addr, ctx)
                    await s.send_all(request)
                    got = b""
                    with trio.move_on_after(3):
                        while True:
                            chunk = await s.receive_some(65536)
                            if not chunk:
                                break
                            got += chunk
                    assert got == b"", "the server answered a client it should have refused"
                except (trio.BrokenResourceError, OSError):
                    pass  # refused during the handshake: what we want
            # Plaintext bytes on the TLS port: refused too.
            tcp = await trio.open_tcp_stream(*addr)
            await tcp.send_all(request)
            with trio.move_on_after(5):
                while True:
                    try:
                        if not await tcp.receive_some(65536):
                            break
                    except trio.BrokenResourceError:
                        break
            await tcp.aclose()
            async with cl.client() as c:
                assert await c.get("intruder") is None
                with trio.fail_after(10):
                    while (await c.status())["bad_connections"] < 3:
                        await trio.sleep(0.1)
    finally:
        cl.kill_all()


@pytest.mark.parametrize("seed", range(3))
def test_decode_request_never_raises_anything_but_protocol_error(seed):
    rng = random.Random(seed)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 64))
        try:
            decode_request(data)
        except ProtocolError:
            pass
        obj = [rng.choice([1, 2, 0, "1", None]), rng.choice([1, 2, 3, 4, "x"]),
               rng.choice([0, 5, -1, 1 << 63, "r"])]
        obj += [rng.choice([b"k", "k", 1, -1, None, [], 1 << 62, "put", "append"])
                for _ in range(rng.randrange(0, 8))]
        try:
            decode_request(msgpack.packb(obj, use_bin_type=True))
        except ProtocolError:
            pass


async def test_half_a_frame_is_not_waited_for_forever(tmp_path):
    """A client that sends part of a frame and stalls is cut off after ``frame_timeout``
    (with a warning), while an idle client between frames is left alone."""
    from test_client import client_ctx, node_tls
    from test_multiprocess import free_ports

    from tinyraftplus.kv.server import Server, ServerConfig

    ca = trustme_ca()
    peer, cport = free_ports(2)
    cfg = ServerConfig(node_id=1, peers={1: ("127.0.0.1", peer)}, data_dir=str(tmp_path / "d"),
                       client_listen=("127.0.0.1", cport), tls=node_tls(ca, 1), fsync=False,
                       election_timeout=0.2, ping_timeout=0.04, frame_timeout=0.5)
    srv = Server(cfg)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(srv.serve)
            half = await open_tls(("127.0.0.1", cport), client_ctx(ca))
            idle = await open_tls(("127.0.0.1", cport), client_ctx(ca))
            f = frame(msgpack.packb([1, 1, 5]))
            await half.send_all(f[:6])
            t0 = trio.current_time()
            assert await closed_by_server(half, timeout=5)
            assert 0.4 <= trio.current_time() - t0 < 3
            assert srv.bad_connections == 1
            await idle.send_all(f)  # the idle one still works
            got = await idle.receive_some(65536)
            assert got and srv.bad_connections == 1
            n.cancel_scope.cancel()


def trustme_ca():
    import trustme

    return trustme.CA()
