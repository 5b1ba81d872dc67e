"""Three "hosts": one server per network namespace, joined by veth pairs to a bridge that
lives in a namespace of its own, plus a client namespace. Nothing is added to the root
namespace; the 10.231.0.0/24 addresses exist only inside the test's namespaces, whose names
are unique per run, and everything is deleted in ``finally``.

Scenarios: cut one node off (link down) and heal; isolate the leader (the rest elect a new
one and commit, the old one cannot commit, and rejoins); 50 ms delay and 5 % loss with
``tc netem`` (skipped where the kernel has no netem).

The test process cannot reach into the namespaces, so a small driver (this file run as a
script, ``python tests/test_netns.py driver ...``) runs the client inside the client
namespace and takes JSON commands on stdin.

Needs root and iproute2 (``apt-get install -y iproute2``); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

SUBNET = "10.231.0"
CLIENT_PORT = 7101
PEER_PORT = 7001
IDS = [1, 2, 3]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as .ci/run does)"
    if shutil.which("ip") is None:
        return "the `ip` command is missing: apt-get install -y iproute2"
    probe = f"trpprobe{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _netem_unavailable(ns: str) -> str | None:
    if shutil.which("tc") is None:
        return "the `tc` command is missing: apt-get install -y iproute2"
    r = _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms", check=False)
    if r.returncode != 0:
        return (f"tc netem is unavailable here ({r.stderr.strip()}); the kernel needs the "
                f"sch_netem module (modprobe sch_netem)")
    _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    return None


class Net:
    """The namespaces and links of one test module."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.br = f"trp{tag}br"
        self.ns = {i: f"trp{tag}n{i}" for i in IDS}
        self.ns["client"] = f"trp{tag}cl"
        self.addr = {i: f"{SUBNET}.{i}" for i in IDS}
        self.addr["client"] = f"{SUBNET}.100"
        self.tag = tag
        self.created: list[str] = []

    def up(self) -> None:
        _run("ip", "netns", "add", self.br)
        self.created.append(self.br)
        _run("ip", "-n", self.br, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.br, "link", "set", "br0", "up")
        _run("ip", "-n", self.br, "link", "set", "lo", "up")
        for key, ns in self.ns.items():
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            # Both ends are created inside the namespaces they belong to: nothing, not even
            # for a moment, in the root namespace.
            _run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
                 f"b{key}"[:15], "netns", self.br)
            _run("ip", "-n", self.br, "link", "set", f"b{key}"[:15], "master", "br0")
            _run("ip", "-n", self.br, "link", "set", f"b{key}"[:15], "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr[key]}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in reversed(self.created):
            _run("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def link(self, i: Any, up: bool) -> None:
        """Cut (or restore) node ``i``'s cable, at the bridge's end."""
        _run("ip", "-n", self.br, "link", "set", f"b{i}", "up" if up else "down")

    def exec(self, key: Any) -> list[str]:
        return ["ip", "netns", "exec", self.ns[key]]


@pytest.fixture(scope="module")
def net():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    n = Net()
    try:
        n.up()
        yield n
    finally:
        n.down()
        leftover = _run("ip", "netns", "list", check=False).stdout
        assert n.tag not in leftover, f"namespaces left behind: {leftover}"


class Driver:
    """The client, running inside a namespace, driven with JSON lines."""

    def __init__(self, net: Net, where: Any, addrs: list[str], certs: dict[str, Path],
                 log: Path) -> None:
        from test_multiprocess import ROOT

        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.err = open(log, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            net.exec(where) + [sys.executable, __file__, "driver", ",".join(addrs),
                               str(certs["ca"]), str(certs["cert-client"]),
                               str(certs["key-client"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env, text=True)

    async def __call__(self, **cmd: Any) -> dict:
        import trio

        def roundtrip() -> str:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline()

        line = await trio.to_thread.run_sync(roundtrip)
        if not line:
            raise AssertionError(f"the driver died (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.err.close()


def _cluster(net: Net, tmp: Path, et: float):
    from test_multiprocess import ProcCluster

    return ProcCluster(
        tmp, IDS, election_timeout=et, hosts={i: net.addr[i] for i in IDS},
        wrap=net.exec, peer_port=PEER_PORT, client_port=CLIENT_PORT,
        extra=["--client-host", "0.0.0.0"],
    )


def _addrs(net: Net, ids: list[Any] | None = None) -> list[str]:
    return [f"{net.addr[i]}:{CLIENT_PORT}" for i in (ids or IDS)]


async def _leader(drive: Driver, net: Net, ids: list[Any], timeout: float = 30.0) -> tuple:
    """(id, term) once all of ``ids`` agree on one leader among them."""
    import trio

    with trio.fail_after(timeout):
        while True:
            st = (await drive(op="statuses", addrs=_addrs(net, ids)))["result"]
            live = [s for s in st.values() if s]
            leaders = {s["id"] for s in live if s["state"] == "leader"}
            if len(live) == len(ids) and len(leaders) == 1:
                lid = leaders.pop()
                if all(s["leader"] == lid for s in live):
                    return lid, next(s["term"] for s in live if s["id"] == lid)
            await trio.sleep(0.1)


async def _caught_up(drive: Driver, net: Net, timeout: float = 30.0) -> None:
    import trio

    with trio.fail_after(timeout):
        while True:
            st = (await drive(op="statuses", addrs=_addrs(net)))["result"]
            live = [s for s in st.values() if s]
            if len(live) == 3 and len({(s["commit_seq"], s["apply_seq"]) for s in live}) == 1 \
                    and live[0]["commit_seq"] == live[0]["apply_seq"]:
                return
            await trio.sleep(0.1)


async def _check_everywhere(drive: Driver, net: Net, acked: dict[str, str]) -> None:
    r = await drive(op="check", keys=acked, addrs=_addrs(net))
    assert r["ok"] and not r["mismatches"], r


@pytest.mark.netns
async def test_cut_one_node_off_and_heal(net, tmp_path):
    import trio

    cl = _cluster(net, tmp_path, 0.4)
    drive = Driver(net, "client", _addrs(net), cl.certs, tmp_path / "driver.err")
    try:
        with trio.fail_after(150):
            await cl.start_all()
            lead, _ = await _leader(drive, net, IDS)
            r = await drive(op="load", prefix="a", count=40, concurrency=8)
            assert r["failed"] == 0
            acked = dict(r["acked"])
            follower = next(i for i in IDS if i != lead)
            net.link(follower, up=False)
            r = await drive(op="load", prefix="b", count=40, concurrency=8)
            assert r["failed"] == 0, r  # two of three still commit
            acked.update(r["acked"])
            st = (await drive(op="statuses", addrs=_addrs(net)))["result"]
            assert st[_addrs(net, [follower])[0]] is None  # unreachable while cut
            net.link(follower, up=True)
            await _caught_up(drive, net)
            await _check_everywhere(drive, net, acked)
    finally:
        for i in IDS:
            net.link(i, True)
        drive.close()
        cl.kill_all()


@pytest.mark.netns
async def test_isolate_the_leader(net, tmp_path):
    import trio

    et = 0.4
    cl = _cluster(net, tmp_path, et)
    drive = Driver(net, "client", _addrs(net), cl.certs, tmp_path / "driver.err")
    inside = None
    try:
        with trio.fail_after(150):
            await cl.start_all()
            lead, term = await _leader(drive, net, IDS)
            r = await drive(op="load", prefix="a", count=30, concurrency=8)
            assert r["failed"] == 0
            acked = dict(r["acked"])
            # A client on the leader's own host: it still reaches the old leader, nobody else.
            inside = Driver(net, lead, [f"127.0.0.1:{CLIENT_PORT}"], cl.certs,
                            tmp_path / "inside.err")
            net.link(lead, up=False)
            rest = [i for i in IDS if i != lead]
            new, new_term = await _leader(drive, net, rest)
            assert new != lead and new_term > term
            r = await drive(op="load", prefix="b", count=30, concurrency=8)
            assert r["failed"] == 0, r
            acked.update(r["acked"])
            # The old leader cannot commit: the write fails with a clear error...
            r = await inside(op="put", key="isolated", value="x", timeout=3.0)
            assert not r["ok"] and "NoLeaderError" in r["error"], r
            st = (await inside(op="statuses", addrs=[f"127.0.0.1:{CLIENT_PORT}"]))["result"]
            old = next(iter(st.values()))
            assert old["state"] != "leader" or old["term"] == term  # stepped down, or stale
            # ... and, once its own retries have timed out, healing does not resurrect it.
            await trio.sleep(4 * et + 1.5)
            net.link(lead, up=True)
            await _caught_up(drive, net)
            st = (await drive(op="statuses", addrs=_addrs(net)))["result"]
            assert st[_addrs(net, [lead])[0]]["state"] == "follower"
            r = await drive(op="get", key="isolated", addrs=_addrs(net))
            assert r["ok"] and r["result"] is None, r
            await _check_everywhere(drive, net, acked)
    finally:
        for i in IDS:
            net.link(i, True)
        if inside is not None:
            inside.close()
        drive.close()
        cl.kill_all()


@pytest.fixture
def netem(net):
    """The network, where ``tc netem`` works (checked in a sync fixture so that the skip
    reason reaches the report)."""
    reason = _netem_unavailable(net.br)
    if reason:
        pytest.skip(reason)
    return net


@pytest.mark.netns
async def test_delay_and_loss_still_commit(netem, tmp_path):
    import trio

    net = netem
    cl = _cluster(net, tmp_path, 1.0)
    drive = Driver(net, "client", _addrs(net), cl.certs, tmp_path / "driver.err")
    shaped: list[tuple[str, str]] = []
    try:
        with trio.fail_after(240):
            await cl.start_all()
            await _leader(drive, net, IDS)
            # 50 ms and 5 % loss on every node's link, both directions.
            for i in IDS:
                for ns, dev in ((net.br, f"b{i}"), (net.ns[i], "eth0")):
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                         "netem", "delay", "50ms", "loss", "5%")
                    shaped.append((ns, dev))
            r = await drive(op="load", prefix="slow", count=60, concurrency=8, timeout=30.0)
            assert r["failed"] == 0, r
            await _caught_up(drive, net, timeout=60)
            await _check_everywhere(drive, net, dict(r["acked"]))
    finally:
        for ns, dev in shaped:
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
                 check=False)
        drive.close()
        cl.kill_all()


# --- the driver (runs inside a namespace) -------------------------------------------------


def _driver(addrs: str, ca: str, cert: str, key: str) -> None:
    import trio

    from tinyraftplus.client import Client, client_ssl_context
    from tinyraftplus.errors import TinyRaftError

    ctx = client_ssl_context(ca, cert, key)
    everyone = addrs.split(",")

    def client(a: list[str], timeout: float = 20.0) -> Client:
        return Client(a, tls=ctx, timeout=timeout, attempt_timeout=1.5, connect_timeout=1.0,
                      backoff_max=0.1)

    async def handle(c: Client, cmd: dict) -> dict:
        op = cmd["op"]
        if op in ("put", "append"):
            async with client(everyone, cmd.get("timeout", 20.0)) as one:
                return {"ok": True, "result": await getattr(one, op)(cmd["key"], cmd["value"])}
        if op == "get":
            async with client(cmd.get("addrs", everyone)) as one:
                v = await one.get(cmd["key"])
                return {"ok": True, "result": None if v is None else v.decode()}
        if op == "statuses":
            out: dict[str, Any] = {}

            async def st(a: str) -> None:
                out[a] = None
                with trio.move_on_after(1.5):
                    try:
                        out[a] = await c.status(a)
                    except TinyRaftError:
                        pass

            async with trio.open_nursery() as n:
                for a in cmd["addrs"]:
                    n.start_soon(st, a)
            return {"ok": True, "result": out}
        if op == "load":
            acked: list[tuple[str, str]] = []
            failed = 0
            t = trio.current_time()
            async with client(everyone, cmd.get("timeout", 20.0)) as one:
                async def w(k: int) -> None:
                    nonlocal failed
                    for n in range(k, cmd["count"], cmd["concurrency"]):
                        key, value = f"{cmd['prefix']}{n}", f"v{n}"
                        try:
                            await one.put(key, value)
                            acked.append((key, value))
                        except TinyRaftError:
                            failed += 1

                async with trio.open_nursery() as n:
                    for k in range(cmd["concurrency"]):
                        n.start_soon(w, k)
            return {"ok": True, "acked": acked, "failed": failed,
                    "seconds": trio.current_time() - t}
        if op == "check":
            bad = []
            for a in cmd["addrs"]:
                async with client([a]) as one:
                    for key, value in cmd["keys"].items():
                        got = await one.get(key)
                        if got != value.encode():
                            bad.append([a, key, value, None if got is None else got.decode()])
            return {"ok": True, "mismatches": bad}
        return {"ok": False, "error": f"unknown op {op}"}

    async def main() -> None:
        async with client(everyone, 5.0) as c:
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    return
                cmd = json.loads(line)
                try:
                    r = await handle(c, cmd)
                except TinyRaftError as e:
                    r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                print(json.dumps(r), flush=True)

    trio.run(main)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "driver":
    _driver(*sys.argv[2:])
