"""``python -m tinyraftplus.server`` as a program: ready line, SIGTERM, a locked data
directory, command-line mistakes, and a TLS client port that refuses strangers."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from test_multiprocess import READY, ROOT, ProcCluster, free_ports, write_certs

from tinyraftplus.errors import TransportError
from tinyraftplus.kv.client import Client
from tinyraftplus.kv.server import EXIT_LOCKED, EXIT_USAGE, parse_args, parse_peers


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def server(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tinyraftplus.server", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            stdin=subprocess.DEVNULL, text=True, **kw)


def wait_ready(p: subprocess.Popen, timeout: float = 30) -> list[str]:
    """Read stdout lines until the ready line (the server prints nothing else there)."""
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    line = p.stdout.readline()
    while not READY.search(line):
        if p.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no ready line; stderr:\n{p.stderr.read() if p.stderr else ''}")
        line = p.stdout.readline()
    return READY.search(line).groups()


def one_node(tmp: Path, *extra: str) -> list[str]:
    return ["--id", "1", "--peers", "1=127.0.0.1:0", "--client-port", "0",
            "--data", str(tmp / "data"), "--election-timeout", "0.2", *extra]


async def test_single_node_ready_line_ports_serve_then_sigterm_stops_cleanly(tmp_path):
    p = server(*one_node(tmp_path, "--plaintext"))
    try:
        nid, ph, pp, ch, cp = await trio.to_thread.run_sync(wait_ready, p)
        assert nid == "1" and ph == ch == "127.0.0.1" and int(pp) > 0 and int(cp) > 0
        with trio.fail_after(20):
            async with Client([f"{ch}:{cp}"], plaintext=True) as c:
                await c.put("k", "v")
                assert await c.get("k") == b"v"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert "SIGTERM received, stopping" in err and "stopped cleanly" in err
    finally:
        p.kill()
        p.wait()
    # The data survived the clean stop: a new process reads it back.
    p = server(*one_node(tmp_path, "--plaintext"))
    try:
        _, _, _, ch, cp = await trio.to_thread.run_sync(wait_ready, p)
        with trio.fail_after(20):
            async with Client([f"{ch}:{cp}"], plaintext=True) as c:
                assert await c.get("k") == b"v"
    finally:
        p.kill()
        p.wait()


async def test_refuses_a_data_directory_another_process_holds(tmp_path):
    first = server(*one_node(tmp_path, "--plaintext"))
    try:
        await trio.to_thread.run_sync(wait_ready, first)
        second = server(*one_node(tmp_path, "--plaintext"))
        _, err = second.communicate(timeout=30)
        assert second.returncode == EXIT_LOCKED
        assert "in use by another process" in err and str(tmp_path / "data") in err
        assert first.poll() is None  # the first one is unaffected
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "1", "--peers", "1=127.0.0.1:7000", "--client-port", "0", "--data", "d"],
         "--plaintext"),
        (["--id", "4", "--peers", "1=127.0.0.1:7000", "--client-port", "0", "--data", "d",
          "--plaintext"], "is not in --peers"),
        (["--id", "1", "--peers", "1:7000", "--client-port", "0", "--data", "d",
          "--plaintext"], "ID=HOST:PORT"),
        (["--id", "1", "--peers", "1=127.0.0.1:7000", "--client-port", "0", "--data", "d",
          "--tls-ca", "/nonexistent/ca.pem", "--tls-cert", "/nonexistent/c.pem"],
         "/nonexistent/ca.pem"),
    ],
)
def test_command_line_mistakes_exit_2_with_a_reason(tmp_path, args, message):
    p = subprocess.run([sys.executable, "-m", "tinyraftplus.server", *args], env=env(),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_USAGE
    assert message in p.stderr


def test_parse_peers_and_args():
    assert parse_peers("1=a:1, 2=b:2,x=[::1]:3") == {1: ("a", 1), 2: ("b", 2), "x": ("::1", 3)}
    with pytest.raises(ValueError, match="twice"):
        parse_peers("1=a:1,1=b:2")
    cfg = parse_args(["--id", "2", "--peers", "1=h1:7001,2=h2:7002", "--client-port", "7102",
                      "--data", "d", "--plaintext", "--election-timeout", "1.0"])
    assert cfg.node_id == 2 and cfg.client_listen == ("h2", 7102)
    assert cfg.ping_timeout == pytest.approx(0.2) and cfg.fsync is True


async def test_tls_client_port_needs_a_certificate_from_the_cluster_ca(tmp_path):
    import trustme

    cl = ProcCluster(tmp_path, [1])
    try:
        with trio.fail_after(60):
            await cl.start(1)
            host, port = cl.client_addr[1]
            # The right certificate works.
            async with cl.client() as c:
                await c.put("k", "v")
            # No client certificate: the handshake fails, nothing is served.
            bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            bare.check_hostname = False
            bare.load_verify_locations(cafile=str(cl.certs["ca"]))
            # A certificate from another CA (the client itself trusts the cluster's): refused.
            other = write_certs(tmp_path / "other", [1], trustme.CA())
            stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            stranger.check_hostname = False
            stranger.load_verify_locations(cafile=str(cl.certs["ca"]))
            stranger.load_cert_chain(str(other["cert-client"]), str(other["key-client"]))
            for ctx in (bare, stranger):
                async with Client([(host, port)], tls=ctx, timeout=1.0,
                                  connect_timeout=0.5) as c:
                    with pytest.raises(TransportError, match="no node answered"):
                        await c.get("k")
            async with cl.client() as c:
                assert (await c.status())["bad_connections"] >= 2
        assert "TLS handshake failed" in cl.stderr(1)
    finally:
        cl.kill_all()


def test_old_module_names_are_aliases_of_the_kv_package():
    import tinyraftplus.client as old_client
    import tinyraftplus.kv
    import tinyraftplus.kv.client as kv_client
    import tinyraftplus.kv.server as kv_server
    import tinyraftplus.server as old_server

    assert old_client.Client is kv_client.Client
    assert old_client.client_ssl_context is kv_client.client_ssl_context
    assert old_server.Server is kv_server.Server and old_server.main is kv_server.main
    assert tinyraftplus.kv.KVStore.__module__ == "tinyraftplus.kv.store"


def _run(tmp_path, args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tinyraftplus.server", *args], env=env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


BASE = ["--client-port", "0", "--data", "d"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # space-separated --peers, quoted: it used to listen on "127.0.0.1:7001 2=..."
        (["--id", "1", "--peers", "1=127.0.0.1:7001 2=127.0.0.1:7002", *BASE, "--plaintext"],
         "separate the nodes with commas"),
        (["--id", "1", "--peers", "1=127.0.0.1:7001", "2=127.0.0.1:7002", *BASE,
          "--plaintext"], "separate the nodes with commas"),
        (["--id", "1", "--peers", "1=127.0.0.1,2=127.0.0.1:7002", *BASE, "--plaintext"],
         "--peers: node 1 has address '127.0.0.1'; give HOST:PORT"),
        (["--id", "1", "--peers", "1=127.0.0.1:7000", *BASE, "--tls-ca", "CA",
          "--tls-cert", "missing.crt", "--tls-key", "KEY"], "--tls-cert missing.crt: no such file"),
        (["--id", "1", "--peers", "1=127.0.0.1:7000", *BASE, "--tls-min-version", "1.1",
          "--plaintext"], "--tls-min-version"),
        (["--id", "1", "--peers", "1=127.0.0.1:7000", *BASE, "--plaintext",
          "--max-inflight", "0"], "--max-inflight 0"),
    ],
)
def test_command_line_mistakes_are_one_line_naming_the_option(tmp_path, args, message):
    (tmp_path / "CA").write_text("x")
    (tmp_path / "KEY").write_text("x")
    p = _run(tmp_path, args)
    assert p.returncode == EXIT_USAGE, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr and "key must match" not in p.stderr


def test_a_node_with_another_nodes_certificate_is_refused_at_start(tmp_path):
    certs = write_certs(tmp_path / "certs", [1, 2, 3])
    p = _run(tmp_path, ["--id", "3", "--peers", "1=127.0.0.1:7001,2=127.0.0.1:7002,"
                        "3=127.0.0.1:7003", *BASE, "--tls-ca", str(certs["ca"]),
                        "--tls-cert", str(certs["cert-2"]), "--tls-key", str(certs["key-2"])])
    assert p.returncode == EXIT_USAGE
    assert "names node-2.tinyraftplus, but this is node 3" in p.stderr
    assert "give each node its own certificate" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("which", ["peer", "client"])
def test_a_port_in_use_is_one_line_and_exit_1(tmp_path, which):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        peer_port = port if which == "peer" else free_ports(1)[0]
        client_port = port if which == "client" else 0
        p = _run(tmp_path, ["--id", "1", "--peers", f"1=127.0.0.1:{peer_port}", "--client-port",
                            str(client_port), "--data", "d", "--plaintext"])
        assert p.returncode == 1, p.stderr
        assert "Traceback" not in p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert f"127.0.0.1:{port}" in last and "is another process using that port?" in last
        if which == "client":
            assert "--client-port" in last
        # --debug shows the traceback
        p = _run(tmp_path, ["--id", "1", "--peers", f"1=127.0.0.1:{peer_port}", "--client-port",
                            str(client_port), "--data", "d2", "--plaintext", "--debug"])
        assert p.returncode == 1 and "Traceback" in p.stderr
    finally:
        taken.close()


def test_every_server_option_has_help_text():
    from tinyraftplus.kv.server import build_parser

    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


async def test_client_errors_say_what_happened(tmp_path):
    """Issue 12: a plaintext client against a TLS node is told so at once (it used to say
    'could not connect' after 10 s); a TLS client against a plaintext node is told the node
    does not speak TLS; a get that cannot be served does not talk about writes."""
    from tinyraftplus.errors import ConfigurationError, NoLeaderError
    from tinyraftplus.kv.client import client_ssl_context

    for d in ("tls", "plain", "two"):
        (tmp_path / d).mkdir()
    cl = ProcCluster(tmp_path / "tls", [1])
    plain = ProcCluster(tmp_path / "plain", [1], tls=False)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as n:  # the two start together
                n.start_soon(cl.start, 1)
                n.start_soon(plain.start, 1)
            t0 = trio.current_time()
            async with Client([cl.client_addr[1]], plaintext=True, timeout=10) as c:
                with pytest.raises(ConfigurationError, match="speaks TLS"):
                    await c.put("k", "v")
            assert trio.current_time() - t0 < 3
            ctx = client_ssl_context(cl.certs["ca"], cl.certs["cert-client"],
                                     cl.certs["key-client"])
            async with Client([plain.client_addr[1]], tls=ctx, timeout=1.5,
                              connect_timeout=0.5) as c:
                with pytest.raises(TransportError, match="does not speak TLS"):
                    await c.get("k")
        # A get with no quorum: a two-node cluster with one node.
        two = ProcCluster(tmp_path / "two", [1, 2])
        try:
            await two.start(1)
            async with two.client([1], timeout=1.5) as c:
                with pytest.raises(NoLeaderError) as ei:
                    await c.get("k")
                assert "write" not in str(ei.value) and "read was not served" in str(ei.value)
        finally:
            two.kill_all()
    finally:
        cl.kill_all()
        plain.kill_all()
