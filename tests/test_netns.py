"""Three "hosts": one server per network namespace, joined by veth pairs to a bridge that
lives in a namespace of its own, plus a client namespace. Nothing is added to the root
namespace; the 10.231.0.0/24 addresses exist only inside the test's namespaces, whose names
are unique per run, and everything is deleted in ``finally``.

Scenarios: cut one node off (link down) and heal; isolate the leader (the rest elect a new
one and commit, the old one cannot commit, and rejoins); 50 ms delay and 5 % loss, and the
cluster still elects, commits and reads back.

Delay and loss are made one of two real ways (the test's report line says which):

* ``tc netem`` on every node's link, both ends, where the kernel has ``sch_netem``;
* otherwise (kernels built without netem, such as the CI machines'): 5 % random loss in the
  kernel, an ``iptables`` ``statistic`` rule (or an ``nft`` ``numgen`` rule) dropping packets
  that arrive on ``eth0`` in every namespace, and 50 ms delay from a userspace relay in each
  server's namespace (this file run as ``python tests/test_netns.py relay ...``). The servers
  listen on 127.0.0.1 only; their advertised peer and client addresses belong to the relay,
  which holds every chunk 50 ms, in order, in both directions, before forwarding it. So every
  byte between nodes, and between the client and a node, crosses one relay and one lossy hop.
  ``TINYRAFTPLUS_NETNS_SHAPING=relay`` forces this path where netem exists too.

The test process cannot reach into the namespaces, so a small driver (this file run as a
script, ``python tests/test_netns.py driver ...``) runs the client inside the client
namespace and takes JSON commands on stdin.

Needs root and iproute2 (``apt-get install -y iproute2``), and for the delay-and-loss test
``tc netem`` or ``iptables``/``nft`` (``apt-get install -y iptables``); skipped with the
reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from functools import partial
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
        self.ns: dict[Any, str] = {i: f"trp{tag}n{i}" for i in IDS}
        self.ns["client"] = f"trp{tag}cl"
        self.addr: dict[Any, str] = {i: f"{SUBNET}.{i}" for i in IDS}
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
    assert r["checked"] == len(acked) * len(IDS), r


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


DELAY = 0.050  # seconds, per hop and direction
LOSS = 0.05  # probability that a packet is dropped
INNER_PEER_PORT = PEER_PORT + 1  # where a server listens (on 127.0.0.1) behind its relay
INNER_CLIENT_PORT = CLIENT_PORT + 1


def _loss_tool(ns: str) -> tuple[list[str], str] | str:
    """The first of iptables / iptables-legacy / nft that can install (and remove) a random
    drop rule in ``ns``: ``(argv prefix, kind)``; otherwise the reason, as a string."""
    why = []
    for cmd in ("iptables", "iptables-legacy"):
        if shutil.which(cmd) is None:
            why.append(f"no {cmd}")
            continue
        rule = ["INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random",
                "--probability", str(LOSS), "-j", "DROP"]
        r = _run("ip", "netns", "exec", ns, cmd, "-A", *rule, check=False)
        if r.returncode == 0:
            _run("ip", "netns", "exec", ns, cmd, "-D", *rule, check=False)
            return [cmd], "iptables"
        why.append(f"{cmd}: {r.stderr.strip()}")
    if shutil.which("nft") is None:
        why.append("no nft")
    else:
        r = _run("ip", "netns", "exec", ns, "nft", "add", "table", "ip", "trploss", check=False)
        if r.returncode == 0:
            _run("ip", "netns", "exec", ns, "nft", "delete", "table", "ip", "trploss",
                 check=False)
            return ["nft"], "nft"
        why.append(f"nft: {r.stderr.strip()}")
    return "; ".join(why)


def _add_loss(ns: str, tool: tuple[list[str], str]) -> None:
    """Drop each packet arriving on ``eth0`` in ``ns`` with probability ``LOSS``. The rule is
    on input only: a drop on output makes connect() fail with EPERM at once instead of
    looking like a lost packet."""
    argv, kind = tool
    pre = ["ip", "netns", "exec", ns, *argv]
    if kind == "iptables":
        _run(*pre, "-A", "INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random",
             "--probability", str(LOSS), "-j", "DROP")
    else:
        _run(*pre, "add", "table", "ip", "trploss")
        _run(*pre, "add", "chain", "ip", "trploss", "input",
             "{ type filter hook input priority 0 ; policy accept ; }")
        _run(*pre, "add", "rule", "ip", "trploss", "input", "iifname", "eth0", "numgen",
             "random", "mod", "100", "<", str(round(LOSS * 100)), "counter", "drop")


def _dropped(ns: str, tool: tuple[list[str], str]) -> int:
    """Packets the loss rule in ``ns`` has dropped so far (its kernel counter)."""
    import re

    argv, kind = tool
    pre = ["ip", "netns", "exec", ns, *argv]
    if kind == "iptables":
        out = _run(*pre, "-L", "INPUT", "-v", "-n", "-x").stdout
        return sum(int(line.split()[0]) for line in out.splitlines()
                   if "DROP" in line and "statistic" in line)
    out = _run(*pre, "list", "chain", "ip", "trploss", "input").stdout
    return sum(int(m) for m in re.findall(r"packets (\d+)", out))


class Shaping:
    """How this run adds delay and loss: ``mechanism`` is ``"netem"`` or
    ``"relay+iptables"`` / ``"relay+nft"``."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.mechanism = ""
        self.loss_tool: tuple[list[str], str] | None = None
        self.netem: list[tuple[str, str]] = []
        self.relays: dict[Any, subprocess.Popen] = {}
        self.relay_out: dict[Any, Path] = {}

    @property
    def relayed(self) -> bool:
        return self.loss_tool is not None

    def cluster(self, tmp: Path, et: float):
        """The server processes; behind the relays, servers listen on 127.0.0.1 only, so the
        relay is the only way in."""
        if not self.relayed:
            return _cluster(self.net, tmp, et)
        from test_multiprocess import ProcCluster

        return ProcCluster(
            tmp, IDS, election_timeout=et, hosts={i: self.net.addr[i] for i in IDS},
            wrap=self.net.exec, peer_port=PEER_PORT, client_port=INNER_CLIENT_PORT,
            extra=["--client-host", "127.0.0.1", "--listen", f"127.0.0.1:{INNER_PEER_PORT}"],
        )

    async def apply(self, tmp: Path) -> None:
        import time

        import trio

        net = self.net
        if not self.relayed:
            # Both ends of every node's link: node -> bridge and bridge -> node.
            for i in IDS:
                for ns, dev in ((net.br, f"b{i}"), (net.ns[i], "eth0")):
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                         "netem", "delay", f"{round(DELAY * 1000)}ms",
                         "loss", f"{LOSS * 100:g}%")
                    self.netem.append((ns, dev))
            return
        assert self.loss_tool is not None
        for key in [*IDS, "client"]:
            _add_loss(net.ns[key], self.loss_tool)
        for i in IDS:
            out = self.relay_out[i] = tmp / f"relay-{i}.out"
            with open(out, "wb") as o, open(tmp / f"relay-{i}.err", "wb") as e:
                self.relays[i] = subprocess.Popen(
                    net.exec(i) + [
                        sys.executable, __file__, "relay", str(DELAY),
                        f"{net.addr[i]}:{PEER_PORT}=127.0.0.1:{INNER_PEER_PORT}",
                        f"{net.addr[i]}:{CLIENT_PORT}=127.0.0.1:{INNER_CLIENT_PORT}"],
                    stdin=subprocess.PIPE, stdout=o, stderr=e)
        deadline = time.monotonic() + 15
        for i, proc in self.relays.items():
            while "relay ready" not in self.relay_out[i].read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = (tmp / f"relay-{i}.err").read_text()[-2000:]
                    raise AssertionError(f"relay in {net.ns[i]} did not start: {err}")
                await trio.sleep(0.05)

    def evidence(self) -> dict[str, Any]:
        """What shows the shaping was real: packets the kernel dropped, connections each
        relay carried."""
        if not self.relayed:
            return {}
        assert self.loss_tool is not None
        return {
            "dropped": {k: _dropped(self.net.ns[k], self.loss_tool) for k in [*IDS, "client"]},
            "relayed": {i: self.relay_out[i].read_text().count("accepted ") for i in IDS},
        }

    def remove(self) -> None:
        for ns, dev in self.netem:
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root",
                 check=False)
        self.netem.clear()
        for proc in self.relays.values():
            if proc.stdin is not None:
                proc.stdin.close()  # the relay exits when its stdin closes...
            if proc.poll() is None:
                proc.kill()  # ... but do not wait on that
            proc.wait(10)
        self.relays.clear()
        # The loss rules live in the namespaces and go with them.


@pytest.fixture
def shaping(net):
    """Delay and loss by netem where the kernel has it, by a relay and a kernel drop rule
    where it does not; skipped (with both reasons) only when neither can be set up. Decided in
    a sync fixture so that a skip reason reaches the report."""
    forced = os.environ.get("TINYRAFTPLUS_NETNS_SHAPING", "")
    if forced not in ("", "netem", "relay"):
        pytest.fail(f"TINYRAFTPLUS_NETNS_SHAPING={forced!r}: use netem, relay or nothing")
    sh = Shaping(net)
    netem_reason = (_netem_unavailable(net.br) if forced != "relay"
                    else "not tried (TINYRAFTPLUS_NETNS_SHAPING=relay)")
    if netem_reason is None:
        sh.mechanism = "netem"
    elif forced == "netem":
        pytest.skip(netem_reason)
    else:
        tool = _loss_tool(net.br)
        if isinstance(tool, str):
            pytest.skip(f"no way to add delay and loss: {netem_reason}; and the fallback "
                        f"(relay + kernel drop rule) needs iptables with the statistic match "
                        f"or nft ({tool}): apt-get install -y iptables")
        sh.loss_tool = tool
        sh.mechanism = f"relay+{tool[1]}"
    try:
        yield sh
    finally:
        sh.remove()


@pytest.mark.netns
async def test_delay_and_loss_still_commit(shaping, tmp_path, record_property):
    """50 ms delay and 5 % loss on every hop (netem; or a delaying relay and a kernel drop
    rule, see the module docstring): the cluster elects, commits every write through the
    client and every node reads them all back."""
    import trio

    net = shaping.net
    record_property("shaping", shaping.mechanism)
    print(f"delay and loss by: {shaping.mechanism}")
    cl = shaping.cluster(tmp_path, 1.0)
    drive = Driver(net, "client", _addrs(net), cl.certs, tmp_path / "driver.err")
    t0 = trio.current_time()

    def phase(name: str) -> None:
        print(f"{trio.current_time() - t0:6.1f}s {name}")

    try:
        with trio.fail_after(120):
            # Shaped from the start: the election, too, happens over the slow, lossy network.
            await shaping.apply(tmp_path)
            await cl.start_all()
            await _leader(drive, net, IDS)
            phase("elected")
            # A write crosses at least client -> node, a round trip to a follower, and back:
            # four one-way hops, each at least DELAY late. Unshaped, it takes milliseconds.
            r = await drive(op="put", key="probe", value="p", timeout=30.0)
            assert r["ok"], r
            assert r["seconds"] >= 4 * DELAY, (shaping.mechanism, r)
            phase(f"one write took {r['seconds']:.3f}s")
            r = await drive(op="load", prefix="slow", count=60, concurrency=8, timeout=30.0)
            assert r["failed"] == 0, r
            acked = dict(r["acked"], probe="p")
            assert len(acked) == 61
            phase(f"61 writes committed (load: {r['seconds']:.1f}s)")
            await _caught_up(drive, net, timeout=60)
            phase("all caught up")
            await _check_everywhere(drive, net, acked)
            phase("all read back from every node")
            ev = shaping.evidence()
            print(f"evidence: {ev}")
            if shaping.relayed:
                assert sum(ev["dropped"].values()) > 0, ev  # the loss was real
                assert all(n > 0 for n in ev["relayed"].values()), ev  # every relay carried
    finally:
        drive.close()
        cl.kill_all()


async def test_relay_delays_keeps_order_and_closes(tmp_path):
    """The fallback's relay, on loopback (no root needed): bytes arrive complete and in
    order, each direction at least ``DELAY`` late, the hold does not throttle a stream, and a
    close on either side closes the other."""
    import random
    import time

    import trio
    from test_multiprocess import free_ports

    got = bytearray()
    closed = trio.Event()
    conns: list[trio.SocketStream] = []

    async def echo(stream: trio.SocketStream) -> None:
        conns.append(stream)
        try:
            while data := await stream.receive_some(65536):
                got.extend(data)
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        closed.set()

    relay_port, dead_port, nobody = free_ports(3)
    async with trio.open_nursery() as n:
        listeners = await n.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        target = listeners[0].socket.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, __file__, "relay", str(DELAY),
             f"127.0.0.1:{relay_port}=127.0.0.1:{target}",
             f"127.0.0.1:{dead_port}=127.0.0.1:{nobody}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line.startswith(b"relay ready"), (line, proc.stderr.read() if proc.stderr
                                                     else b"")
            c = await trio.open_tcp_stream("127.0.0.1", relay_port)
            # One small round trip: two holds.
            t = time.monotonic()
            await c.send_all(b"x")
            assert await c.receive_some(10) == b"x"
            assert time.monotonic() - t >= 2 * DELAY
            # 2 MB in chunks of random sizes, read back while sending: same bytes, same
            # order, and not one hold per chunk (that would take 20+ s).
            rng = random.Random(5)
            blob = rng.randbytes(2_000_000)
            back = bytearray()
            t = time.monotonic()

            async def send() -> None:
                i = 0
                while i < len(blob):
                    k = rng.randint(1, 20_000)
                    await c.send_all(blob[i:i + k])
                    i += k

            async def receive() -> None:
                while len(back) < len(blob):
                    back.extend(await c.receive_some(65536))

            async with trio.open_nursery() as m:
                m.start_soon(send)
                m.start_soon(receive)
            assert bytes(back) == blob
            assert bytes(got) == b"x" + blob
            assert time.monotonic() - t < 10
            # The client closes: the relay closes the target's side (after the hold).
            await c.aclose()
            with trio.fail_after(5):
                await closed.wait()
            # The target closes: the client sees EOF.
            closed = trio.Event()
            c = await trio.open_tcp_stream("127.0.0.1", relay_port)
            await c.send_all(b"hello")
            with trio.fail_after(5):
                while len(conns) < 2:
                    await trio.sleep(0.01)
                assert await c.receive_some(10) == b"hello"
                await conns[1].aclose()
                assert await c.receive_some(10) == b""
            await c.aclose()
            # Nothing behind the relay: the caller is closed on, the relay lives on.
            d = await trio.open_tcp_stream("127.0.0.1", dead_port)
            with trio.fail_after(5):
                assert await d.receive_some(10) == b""
            await d.aclose()
            assert proc.poll() is None
        finally:
            assert proc.stdin is not None
            proc.stdin.close()  # the relay exits on its own when stdin closes
            code = await trio.to_thread.run_sync(proc.wait, 10)
            n.cancel_scope.cancel()
        assert code == 0, proc.stderr.read() if proc.stderr else b""


# --- the relay (runs inside a server's namespace) ------------------------------------------


def _relay(delay: str, *mappings: str) -> None:
    """Accept on each ``LISTEN_HOST:PORT`` and forward to its ``TARGET_HOST:PORT``, holding
    every chunk ``delay`` seconds, in order, in both directions. When one side closes or
    fails, what it sent before is still delivered (late, like everything), then both sides
    are closed. Exits when stdin closes (the test ended, or died)."""
    import trio

    hold = float(delay)
    broken = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)

    def addr(s: str) -> tuple[str, int]:
        host, _, port = s.rpartition(":")
        return host, int(port)

    async def pump(src: trio.SocketStream, dst: trio.SocketStream,
                   done: trio.CancelScope) -> None:
        # One reader, one writer, one FIFO: order is kept, and the reader keeps reading while
        # the writer waits, so the hold is latency, not a cap on throughput.
        send, recv = trio.open_memory_channel[tuple[float, bytes]](1024)

        async def reader() -> None:
            async with send:
                try:
                    while True:
                        try:
                            data = await src.receive_some(65536)
                        except broken:
                            data = b""  # a reset ends this direction like an EOF
                        await send.send((trio.current_time() + hold, data))
                        if not data:
                            return
                except trio.BrokenResourceError:
                    return  # the writer gave up: there is nobody left to carry it to

        async def writer() -> None:
            async with recv:
                try:
                    async for due, data in recv:
                        await trio.sleep_until(due)
                        if not data:
                            break
                        await dst.send_all(data)
                except broken:
                    pass
            done.cancel()

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(writer)

    async def serve(listen: str, target: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async def handle(down: trio.SocketStream) -> None:
            try:
                up = await trio.open_tcp_stream(*addr(target))
            except OSError:
                await down.aclose()  # nobody home yet: the caller sees a close and retries
                return
            print(f"accepted {listen} -> {target}", flush=True)
            try:
                async with down, up:
                    with trio.CancelScope() as done:
                        async with trio.open_nursery() as n:
                            n.start_soon(pump, down, up, done)
                            n.start_soon(pump, up, down, done)
            except Exception as e:  # one connection's trouble must not stop the relay
                print(f"relay {listen} -> {target}: {e!r}", file=sys.stderr, flush=True)

        host, port = addr(listen)
        await trio.serve_tcp(handle, port, host=host, task_status=task_status)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for m in mappings:
                listen, _, target = m.partition("=")
                await n.start(serve, listen, target)
            print("relay ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.buffer.read)
            n.cancel_scope.cancel()

    trio.run(main)


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
                t = trio.current_time()  # connected (and the leader found) already
                result = await getattr(one, op)(cmd["key"], cmd["value"])
                return {"ok": True, "result": result, "seconds": trio.current_time() - t}
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
            keys = list(cmd["keys"].items())

            async def check(a: str) -> None:
                # Concurrent reads: on a slow network one at a time would take minutes.
                async with client([a]) as one:
                    async def reader(k: int) -> None:
                        for key, value in keys[k::16]:
                            got = await one.get(key)
                            if got != value.encode():
                                bad.append([a, key, value,
                                            None if got is None else got.decode()])

                    async with trio.open_nursery() as n:
                        for k in range(16):
                            n.start_soon(reader, k)

            async with trio.open_nursery() as n:
                for a in cmd["addrs"]:
                    n.start_soon(check, a)
            return {"ok": True, "mismatches": bad, "checked": len(keys) * len(cmd["addrs"])}
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
elif __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "relay":
    _relay(*sys.argv[2:])
