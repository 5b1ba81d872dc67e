"""Three ``python -m tinyraftplus.server`` processes on loopback, real signals.

SIGKILL the leader: a new leader commits writes within 3 x election timeout, the killed node
restarts and catches up, and no acknowledged write is lost (every key is read back through
every node). SIGSTOP the leader and SIGCONT it later: it steps down and rejoins, at most one
node ever claims to lead a term, and a write sent to the paused leader is applied once.

The process-cluster helper here (:class:`ProcCluster`) is also used by ``test_netns`` and
``test_client_fuzz``. Every child is SIGKILLed in ``finally``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio
import trustme

from tinyraftplus.errors import TinyRaftError
from tinyraftplus.kv.client import Client

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"tinyraftplus-server ready id=(\S+) peer=(\S+):(\d+) client=(\S+):(\d+)")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_certs(directory: Path, ids: list[Any], ca: trustme.CA | None = None) -> dict[str, Path]:
    """PEM files for a cluster: ``ca``, ``cert-<id>``/``key-<id>`` per node (named
    ``node-<id>.tinyraftplus``) and ``client-cert``/``client-key``."""
    ca = ca or trustme.CA()
    directory.mkdir(parents=True, exist_ok=True)
    out = {"ca": directory / "ca.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    for name, san in [(str(i), f"node-{i}.tinyraftplus") for i in ids] + [
            ("client", "client.tinyraftplus")]:
        cert = ca.issue_cert(san)
        out[f"cert-{name}"] = directory / f"{name}.crt"
        out[f"key-{name}"] = directory / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(out[f"cert-{name}"]))
        cert.private_key_pem.write_to_path(str(out[f"key-{name}"]))
    return out


def client_context(certs: dict[str, Path]):
    from tinyraftplus.kv.client import client_ssl_context

    return client_ssl_context(certs["ca"], certs["cert-client"], certs["key-client"])


class ProcCluster:
    """Server processes for one test. ``hosts[i]`` is node i's address (loopback by default);
    ``wrap(i)`` returns an argv prefix (``ip netns exec NS``) to run node i elsewhere."""

    def __init__(self, tmp: Path, ids: list[Any] | None = None, *, tls: bool = True,
                 election_timeout: float = 0.4, hosts: dict[Any, str] | None = None,
                 wrap=None, fsync: bool = True, extra: list[str] | None = None,
                 peer_port: int | None = None, client_port: int | None = None) -> None:
        self.tmp = tmp
        self.ids = ids or [1, 2, 3]
        self.et = election_timeout
        self.hosts = hosts or {i: "127.0.0.1" for i in self.ids}
        self.wrap = wrap
        self.fsync = fsync
        self.extra = extra or []
        if peer_port is None:
            ports = free_ports(len(self.ids))
            self.peer_ports = dict(zip(self.ids, ports, strict=True))
        else:
            self.peer_ports = {i: peer_port for i in self.ids}
        self.fixed_client_port = client_port
        self.certs = write_certs(tmp / "certs", self.ids) if tls else None
        self.procs: dict[Any, subprocess.Popen] = {}
        self.client_addr: dict[Any, tuple[str, int]] = {}
        self.starts: dict[Any, int] = defaultdict(int)

    @property
    def peers_arg(self) -> str:
        return ",".join(f"{i}={self.hosts[i]}:{self.peer_ports[i]}" for i in self.ids)

    def argv(self, i: Any) -> list[str]:
        cp = self.fixed_client_port if self.fixed_client_port is not None else (
            self.client_addr[i][1] if i in self.client_addr else 0)
        argv = [sys.executable, "-m", "tinyraftplus.kv", "--id", str(i),
                "--peers", self.peers_arg, "--client-port", str(cp),
                "--data", str(self.tmp / f"data-{i}"),
                "--election-timeout", str(self.et), "--append-timeout", str(4 * self.et + 1),
                "--read-timeout", str(4 * self.et + 1)]
        if self.certs is not None:
            argv += ["--tls-ca", str(self.certs["ca"]), "--tls-cert",
                     str(self.certs[f"cert-{i}"]), "--tls-key", str(self.certs[f"key-{i}"])]
        else:
            argv.append("--plaintext")
        if not self.fsync:
            argv.append("--no-fsync")
        argv += self.extra
        return (self.wrap(i) if self.wrap else []) + argv

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    async def start(self, i: Any, timeout: float = 30.0) -> None:
        """Start node ``i`` (again, after a kill: same ports, same data) and wait for its
        ready line."""
        self.starts[i] += 1
        out = self.tmp / f"out-{i}-{self.starts[i]}.txt"
        err = self.tmp / f"err-{i}-{self.starts[i]}.txt"
        with open(out, "wb") as o, open(err, "wb") as e:
            self.procs[i] = subprocess.Popen(self.argv(i), stdout=o, stderr=e, env=self.env(),
                                             stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            m = READY.search(out.read_text())
            if m:
                self.client_addr[i] = (m.group(4), int(m.group(5)))
                return
            if self.procs[i].poll() is not None:
                raise AssertionError(f"node {i} exited with {self.procs[i].returncode}:\n"
                                     f"{err.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"node {i} not ready in {timeout}s:\n"
                                     f"{err.read_text()[-3000:]}")
            await trio.sleep(0.01)  # (a start is waited for ~100 times in the suite)

    async def start_all(self) -> None:
        async with trio.open_nursery() as n:
            for i in self.ids:
                n.start_soon(self.start, i)

    def signal(self, i: Any, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def kill(self, i: Any) -> None:
        p = self.procs[i]
        if p.poll() is None:
            p.kill()
            # Resume first in case it was stopped, so the kill is delivered at once.
            try:
                p.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        p.wait(10)

    def kill_all(self) -> None:
        for i in list(self.procs):
            try:
                self.kill(i)
            except Exception:  # keep killing the others
                pass

    def stderr(self, i: Any) -> str:
        return (self.tmp / f"err-{i}-{self.starts[i]}.txt").read_text()

    def addresses(self, ids: list[Any] | None = None) -> list[tuple[str, int]]:
        return [self.client_addr[i] for i in (ids or self.ids)]

    def client(self, ids: list[Any] | None = None, **kw: Any) -> Client:
        opts: dict[str, Any] = dict(timeout=20.0, attempt_timeout=max(1.0, 2 * self.et),
                                    connect_timeout=1.0, backoff_max=0.05)
        opts.update(kw)
        if self.certs is not None:
            return Client(self.addresses(ids), tls=client_context(self.certs), **opts)
        return Client(self.addresses(ids), plaintext=True, **opts)

    async def statuses(self, c: Client, ids: list[Any] | None = None,
                       timeout: float = 1.0) -> dict[Any, dict]:
        """Status of each node that answers within ``timeout`` (paused ones do not)."""
        got: dict[Any, dict] = {}

        async def one(i: Any) -> None:
            with trio.move_on_after(timeout):
                try:
                    got[i] = await c.status(self.client_addr[i])
                except TinyRaftError:
                    pass

        async with trio.open_nursery() as n:
            for i in ids or self.ids:
                n.start_soon(one, i)
        return got

    async def leader(self, c: Client, ids: list[Any] | None = None,
                     timeout: float = 20.0) -> tuple[Any, int]:
        """(id, term) of the node that all of ``ids`` agree leads."""
        ids = ids or self.ids
        with trio.fail_after(timeout):
            while True:
                st = await self.statuses(c, ids)
                leaders = {s["id"] for s in st.values() if s["state"] == "leader"}
                if len(st) == len(ids) and len(leaders) == 1:
                    lid = leaders.pop()
                    if all(s["leader"] == lid for s in st.values()):
                        return lid, st[lid]["term"]
                await trio.sleep(0.02)

    async def wait_caught_up(self, c: Client, ids: list[Any] | None = None,
                             timeout: float = 30.0) -> dict[Any, dict]:
        """Wait until every node of ``ids`` has applied everything the leader committed."""
        ids = ids or self.ids
        with trio.fail_after(timeout):
            while True:
                st = await self.statuses(c, ids)
                if len(st) == len(ids):
                    commits = {s["commit_seq"] for s in st.values()}
                    applied = {s["apply_seq"] for s in st.values()}
                    if len(commits) == 1 and applied == commits:
                        return st
                await trio.sleep(0.02)


class Writer:
    """A background writer: unique keys with ``put`` and tokens appended to one key, so a
    lost acknowledged write or a write applied twice shows up when reading back."""

    def __init__(self, c: Client, prefix: str) -> None:
        self.c = c
        self.prefix = prefix
        self.acked: dict[str, str] = {}
        self.tokens: list[str] = []
        self.failed = 0
        self.ack_times: list[tuple[float, float]] = []  # (sent, acknowledged) per put
        self.n = 0

    async def one(self) -> None:
        n = self.n
        self.n += 1
        key, value = f"{self.prefix}-k{n}", f"v{n}"
        try:
            started = trio.current_time()
            await self.c.put(key, value)
            self.acked[key] = value
            self.ack_times.append((started, trio.current_time()))
            token = f"<{self.prefix}{n}>"
            await self.c.append(f"{self.prefix}-log", token)
            self.tokens.append(token)
        except TinyRaftError:
            self.failed += 1

    async def run(self, stop: trio.Event, concurrency: int = 4) -> None:
        async def loop() -> None:
            while not stop.is_set():
                await self.one()
                await trio.sleep(0.005)

        async with trio.open_nursery() as n:
            for _ in range(concurrency):
                n.start_soon(loop)


async def _get_all(c: Client, acked: dict[str, str], at: Any) -> None:
    """Get every key of ``acked`` through ``c``, 32 at a time, and check each value (one
    after the other they took seconds per node)."""
    wrong: list[tuple[Any, str, bytes | None]] = []
    limit = trio.CapacityLimiter(32)

    async def get(key: str, value: str) -> None:
        async with limit:
            got = await c.get(key)
        if got != value.encode():
            wrong.append((at, key, got))

    async with trio.open_nursery() as n:
        for key, value in acked.items():
            n.start_soon(get, key, value)
    assert not wrong, f"acknowledged writes read back wrong (node, key, got): {wrong[:5]}"


async def check_all_nodes(cl: ProcCluster, writers: list[Writer]) -> None:
    """Every acknowledged key through every node, and every token exactly once."""
    for i in cl.ids:
        async with cl.client([i]) as one:
            for w in writers:
                await _get_all(one, w.acked, i)
                log = (await one.get(f"{w.prefix}-log") or b"").decode()
                found = re.findall(r"<[^>]*>", log)
                assert len(found) == len(set(found)), f"node {i}: a token applied twice"
                assert set(w.tokens) <= set(found), f"node {i}: lost acknowledged appends"


async def test_sigkill_leader_failover_catch_up_no_lost_writes(tmp_path):
    et = 0.4
    cl = ProcCluster(tmp_path, election_timeout=et)
    try:
        with trio.fail_after(120):
            await cl.start_all()
            async with cl.client() as c:
                lead, term = await cl.leader(c)
                w1 = Writer(c, "a")
                for _ in range(30):
                    await w1.one()
                assert len(w1.acked) == 30 and w1.failed == 0

                # Kill the leader while writes are in flight; time until one is acknowledged.
                stop = trio.Event()
                w2 = Writer(c, "b")
                async with trio.open_nursery() as n:
                    n.start_soon(w2.run, stop)
                    await trio.sleep(0.5)
                    cl.kill(lead)
                    killed_at = trio.current_time()
                    # Fresh writes, one every 20 ms, each on its own: the first one sent after
                    # the kill that is acknowledged had to be committed by a new leader.
                    probe = Writer(c, "p")
                    async with trio.open_nursery() as pn:
                        while not probe.ack_times and trio.current_time() < killed_at + 20:
                            pn.start_soon(probe.one)
                            await trio.sleep(0.02)
                    recovered = min(e for s, e in probe.ack_times) - killed_at
                    await trio.sleep(0.5)
                    stop.set()
                alive = [i for i in cl.ids if i != lead]
                new, new_term = await cl.leader(c, alive)
                assert new != lead and new_term > term
                print(f"writes resumed {recovered:.3f}s after the kill")
                assert recovered <= 3 * et, f"writes resumed after {recovered:.2f}s"

                # The killed node restarts on its data and catches up.
                await cl.start(lead)
                for _ in range(10):
                    await w2.one()
                await cl.wait_caught_up(c)
                await check_all_nodes(cl, [w1, w2, probe])
                st = await cl.statuses(c)
                assert st[lead]["state"] == "follower"
    finally:
        cl.kill_all()


async def test_sigstop_leader_steps_down_and_rejoins_without_split_brain(tmp_path):
    et = 0.4
    cl = ProcCluster(tmp_path, election_timeout=et)
    claims: dict[int, set] = defaultdict(set)  # term -> nodes seen claiming to lead it

    async def observe(c: Client, stop: trio.Event) -> None:
        while not stop.is_set():
            for s in (await cl.statuses(c, timeout=0.3)).values():
                if s["state"] == "leader":
                    claims[s["term"]].add(s["id"])
            await trio.sleep(0.02)

    try:
        with trio.fail_after(120):
            await cl.start_all()
            async with cl.client() as c, cl.client(timeout=3.0) as probe:
                lead, term = await cl.leader(c)
                stop_obs = trio.Event()
                async with trio.open_nursery() as n:
                    n.start_soon(observe, probe, stop_obs)
                    w = Writer(c, "s")
                    for _ in range(10):
                        await w.one()
                    cl.signal(lead, signal.SIGSTOP)
                    paused_at = trio.current_time()
                    alive = [i for i in cl.ids if i != lead]
                    new, new_term = await cl.leader(c, alive)
                    assert new_term > term
                    for _ in range(20):
                        await w.one()
                    assert w.failed == 0
                    # Resume it after a while; a client bound to it alone sends a write at
                    # once: whatever the old leader believes, the write is applied once.
                    await trio.sleep(max(0.0, 4 * et - (trio.current_time() - paused_at)))
                    cl.signal(lead, signal.SIGCONT)
                    async with cl.client([lead]) as old:
                        n_after = await old.append("s-log", "<old-leader>")
                        assert n_after > 0
                    # It steps down and follows the new term's leader.
                    with trio.fail_after(10 * et + 5):
                        while True:
                            st = await cl.statuses(c)
                            if (len(st) == 3 and st[lead]["state"] == "follower"
                                    and st[lead]["term"] >= new_term
                                    and st[lead]["leader"] is not None):
                                break
                            await trio.sleep(0.05)
                    for _ in range(10):
                        await w.one()
                    stop_obs.set()
                await cl.wait_caught_up(c)
                await check_all_nodes(cl, [w])
                async with cl.client([new]) as one:
                    log = (await one.get("s-log")).decode()
                    assert log.count("<old-leader>") == 1
        split = {t: ids for t, ids in claims.items() if len(ids) > 1}
        assert not split, f"two leaders in one term: {split}"
        assert claims, "the observer saw no leader at all"
    finally:
        cl.kill_all()
