"""Issue 12, "Status and metrics": ``--metrics-port`` serves Prometheus text (read here over
HTTP from in-process servers on loopback, each with a registry of its own), the log's
fsync/bytes hooks, ``node.status()`` through ``Client.status()`` with each follower's
last-heard age, and the one-line refusal when ``prometheus_client`` is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The `test` extra installs it: a missing one fails here rather than skipping silently.
import prometheus_client.parser as prom_parser
import trio
from test_multiprocess import free_ports

from tinyraftplus import FsLog
from tinyraftplus.kv.client import Client
from tinyraftplus.kv.server import Server, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(keepalive=0.1, idle_timeout=1.0, backoff_min=0.02, backoff_max=0.2)


async def scrape(addr) -> dict:
    """GET /metrics over a plain TCP stream; {(name, labels): value} of every sample."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert b"Content-Type: text/plain; version=" in head, head
    out = {}
    for fam in prom_parser.text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


async def test_three_servers_export_their_own_metrics_over_http(tmp_path, nursery):
    ids = [1, 2, 3]
    ports = free_ports(6)
    peers = {i: ("127.0.0.1", ports[k]) for k, i in enumerate(ids)}
    infos, scopes, servers = {}, {}, {}

    async def run(i, task_status=trio.TASK_STATUS_IGNORED):
        cfg = ServerConfig(
            node_id=i, peers=peers, data_dir=str(tmp_path / f"d{i}"),
            client_listen=("127.0.0.1", ports[3 + i - 1]), plaintext=True, fsync=True,
            election_timeout=0.3, ping_timeout=0.06, append_timeout=3.0, read_timeout=3.0,
            transport_options=FAST, metrics_listen=("127.0.0.1", 0), bootstrap=True,
        )
        servers[i] = Server(cfg)
        with trio.CancelScope() as scopes[i]:
            await servers[i].serve(task_status=task_status)

    for i in ids:
        infos[i] = await nursery.start(run, i)
        assert infos[i].metrics_address is not None
        assert infos[i].ready_line().endswith(
            f" metrics=127.0.0.1:{infos[i].metrics_address[1]}")
    addrs = [infos[i].client_address for i in ids]
    with trio.fail_after(30):
        async with Client(addrs, plaintext=True, timeout=10.0) as c:
            for k in range(20):
                await c.put(f"k{k}", "v" * 100)
            st = await c.status()
            leader = st["leader"]
            before = {i: await scrape(infos[i].metrics_address) for i in ids}

            m = before[leader]
            assert value(m, "tinyraftplus_is_leader") == 1
            assert value(m, "tinyraftplus_term") == st["term"] >= 1
            assert value(m, "tinyraftplus_commit_seq") >= 20
            assert value(m, "tinyraftplus_apply_seq") >= 20
            # The client's writes came in through the leader: one observation per batch.
            assert value(m, "tinyraftplus_append_seconds_count") >= 1
            assert value(m, "tinyraftplus_log_fsync_seconds_count") >= 1
            assert value(m, "tinyraftplus_log_fsync_seconds_sum") > 0
            assert value(m, "tinyraftplus_log_written_bytes_total") >= 20 * (32 + 100)
            # One registry per server: each sees its own peers, not the others' figures.
            for i in ids:
                peers_seen = {dict(lab)["peer"] for (n, lab) in before[i]
                              if n == "tinyraftplus_peer_connected"}
                assert peers_seen == {str(j) for j in ids if j != i}
                for j in ids:
                    if j != i:
                        assert value(before[i], "tinyraftplus_peer_connected", peer=j) == 1
                        assert value(before[i], "tinyraftplus_peer_send_dropped_total",
                                     peer=j) == 0
            assert sum(value(before[i], "tinyraftplus_elections_total") for i in ids) >= 1
            assert sum(value(before[i], "tinyraftplus_is_leader") for i in ids) == 1

            # Status through the client port: per follower match, next, state, inflight and
            # how long ago the leader last heard from it.
            lst = await c.status(infos[leader].client_address)
            assert lst["role"] == "leader"
            for key in ("term", "leader", "first_seq", "last_seq", "commit_seq",
                        "apply_seq", "voters", "learners", "config_seq"):
                assert key in lst
            fol = lst["followers"]
            assert set(fol) == set(ids) - {leader}
            for f in fol.values():
                assert {"match", "next", "state", "inflight", "last_heard"} <= set(f)
                assert 0 <= f["last_heard"] < 1.0

            # A follower goes away: the leader's metrics show it down, its queue filling,
            # and the status shows its last-heard age growing.
            gone = next(i for i in ids if i != leader)
            scopes[gone].cancel()
            await trio.sleep(1.2)
            after = await scrape(infos[leader].metrics_address)
            assert value(after, "tinyraftplus_peer_connected", peer=gone) == 0
            assert value(after, "tinyraftplus_peer_send_queue_depth", peer=gone) > 0
            lst = await c.status(infos[leader].client_address)
            assert lst["followers"][gone]["last_heard"] >= 1.0
            other = next(i for i in ids if i not in (leader, gone))
            assert lst["followers"][other]["last_heard"] < 1.0
    for i in ids:
        scopes[i].cancel()


async def test_log_reports_fsync_rounds_and_bytes(tmp_path):
    seen = []
    log = FsLog(tmp_path, "m")
    log.on_sync(seen.append)  # before open: kept for the flusher the open starts
    async with log:
        for k in range(5):
            await log.append(b"x" * k + b"!")
        await log.append_batch([b"ab", b"cd"])
        assert len(seen) == 6 and all(0 < s < 10 for s in seen)
        assert log.bytes_written == sum(32 + k + 1 for k in range(5)) + 2 * (32 + 2)
        log.on_sync(None)
        await log.append(b"z")
        assert len(seen) == 6
    assert log.bytes_written == sum(32 + k + 1 for k in range(5)) + 3 * 34 - 1  # kept closed


def test_metrics_port_without_prometheus_client_is_one_line_exit_2(tmp_path):
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from tinyraftplus.kv.server import main\n"
        f"sys.exit(main(['--id', '1', '--peers', '1=127.0.0.1:0', '--plaintext', '--data', "
        f"{str(tmp_path / 'd')!r}, '--client-port', '0', '--metrics-port', '0']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "--metrics-port" in lines[0]
    assert "pip install 'tinyraftplus[metrics]'" in lines[0]
    assert not (tmp_path / "d").exists()  # refused before anything was created
