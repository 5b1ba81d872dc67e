"""Membership change with real processes: ``python -m tinyraftplus.server --join`` and the
admin tool ``python -m tinyraftplus.admin`` over mutual TLS.

A 3-node cluster grows to 5 (two nodes started with ``--join``, added as learners with
their addresses, promoted) and shrinks back to 3 (two of the original members removed, the
leader first, after a transfer to it) while a client writes without pause; a voter is
SIGKILLed in the middle of a change (the leader has appended it, not committed it) and
restarted. At the end the two removed processes are killed, and every acknowledged write is
read back through each of the three remaining nodes (each on its own). The slow variant also
restarts a node that joined during a change and checks more of the tool's answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
import trio
from test_multiprocess import ProcCluster, Writer, check_all_nodes


class GrowCluster(ProcCluster):
    """Nodes 1-3 are the first voters; 4 and 5 start with ``--join``."""

    VOTERS = [1, 2, 3]

    @property
    def peers_arg(self) -> str:
        return ",".join(f"{i}={self.hosts[i]}:{self.peer_ports[i]}" for i in self.VOTERS)

    def argv(self, i: Any) -> list[str]:
        argv = super().argv(i)
        if i not in self.VOTERS:
            argv += ["--join", "--listen", f"127.0.0.1:{self.peer_ports[i]}"]
        return argv

    def peer_addr(self, i: Any) -> str:
        return f"127.0.0.1:{self.peer_ports[i]}"

    def admin_argv(self, *args: str, ids: list[Any] | None = None) -> list[str]:
        assert self.certs is not None
        peers = ",".join(f"{h}:{p}" for h, p in self.addresses(ids))
        return [sys.executable, "-m", "tinyraftplus.admin", "--peers", peers,
                "--tls-ca", str(self.certs["ca"]), "--tls-cert", str(self.certs["cert-client"]),
                "--tls-key", str(self.certs["key-client"]), "--timeout", "20", *args]

    async def admin(self, *args: str, ids: list[Any] | None = None,
                    expect: int = 0) -> str:
        """Run the admin tool; return its stdout (checking its exit status and that a
        failure is one line on stderr, without a traceback)."""
        argv = self.admin_argv(*args, ids=ids)
        started = time.monotonic()
        p = await trio.to_thread.run_sync(lambda: subprocess.run(
            argv, capture_output=True, text=True, env=self.env(), timeout=60))
        print(f"admin {' '.join(args)} -> {p.returncode} in {time.monotonic() - started:.2f}s:"
              f" {p.stdout.strip()}{p.stderr.strip()}")
        assert p.returncode == expect, (args, p.returncode, p.stdout, p.stderr)
        if expect:
            assert "Traceback" not in p.stderr, p.stderr
            if expect == 1:  # a refusal: one line (argparse's usage mistakes print usage too)
                assert len(p.stderr.strip().splitlines()) == 1, p.stderr
            return p.stderr
        return p.stdout


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
async def test_grow_3_to_5_and_back_with_the_admin_tool_sigkill_mid_change(tmp_path, full):
    """``full`` (slow) also restarts a node that joined, checks the tool's refusals, and hands
    leadership over at the end."""
    et = 0.3
    cl = GrowCluster(tmp_path, [1, 2, 3, 4, 5], election_timeout=et)
    started = time.monotonic()
    try:
        with trio.fail_after(150):
            await cl.start_all()
            async with cl.client(timeout=30.0) as c:
                lead, _ = await cl.leader(c, [1, 2, 3])
                out = await cl.admin("status")
                assert f"node {lead}: leader" in out and "voters {1, 2, 3}" in out, out
                # The joining nodes wait as learners nobody has added yet.
                assert "node 4: follower" in out and "learners {4}" in out, out

                stop = trio.Event()
                w = Writer(c, "m")
                async with trio.open_nursery() as n:
                    n.start_soon(w.run, stop)
                    await trio.sleep(0.3)
                    out = await cl.admin("add-learner", "4", cl.peer_addr(4))
                    assert "added learner 4" in out and "learners {4}" in out, out
                    # A refusal: one line, exit 1 (more in test_server_admin.py).
                    err = await cl.admin("add-learner", "4", cl.peer_addr(4), expect=1)
                    assert "already a member" in err, err
                    if full:
                        await cl.admin("promote", "9", expect=1)
                        await cl.admin("add-learner", "6", "no-port", expect=2)
                        await cl.admin("frobnicate", expect=2)
                    out = await cl.admin("add-learner", "5", cl.peer_addr(5))
                    assert "learners {4, 5}" in out, out
                    out = await cl.admin("promote", "4")
                    assert "voters {1, 2, 3, 4}, learners {5}" in out, out

                    # SIGKILL a voter while the next change is under way (the leader has
                    # appended it: its configuration in force names 5 a voter), restart it.
                    victim = next(i for i in (2, 3, 1) if i != lead)
                    tool = subprocess.Popen(cl.admin_argv("promote", "5"), env=cl.env(),
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)
                    try:
                        while True:
                            st = await c.status(cl.client_addr[lead])
                            if 5 in st["voters"]:
                                break
                            await trio.sleep(0.005)
                        cl.kill(victim)
                        print(f"killed node {victim} with the change at seq "
                              f"{st['config_seq']} (commit seq {st['commit_seq']})")
                        out, err = await trio.to_thread.run_sync(tool.communicate, None, 60)
                    finally:
                        if tool.poll() is None:
                            tool.kill()
                            tool.wait()
                    assert tool.returncode == 0, err
                    assert "voters {1, 2, 3, 4, 5}" in out, out
                    await cl.start(victim)
                    assert len(w.acked) > 0

                    # Shrink back to three: remove two of the first members, the leader
                    # first (it leads its own removal to the end, then steps down).
                    out = await cl.admin("transfer-leader", "1")
                    assert "leadership transferred to 1" in out, out
                    # A node that joined goes down during the next change and comes back
                    # with the same command line (--join; its state now says it is a voter).
                    if full:
                        cl.kill(4)
                    out = await cl.admin("remove", "1")
                    assert "voters {2, 3, 4, 5}" in out, out
                    if full:
                        await cl.start(4)
                    out = await cl.admin("remove", "2")
                    assert "voters {3, 4, 5}" in out, out
                    if full:
                        out = await cl.admin("transfer-leader")
                        assert "leadership transferred to" in out, out
                    await trio.sleep(0.5)
                    stop.set()

                # The removed nodes go; the three left serve on their own.
                cl.kill(1)
                cl.kill(2)
                cl.ids = [3, 4, 5]
                for _ in range(10):
                    await w.one()
                st = await c.cluster_status()
                leaders = [s for s in st.values() if s.get("role") == "leader"]
                assert len(leaders) == 1 and leaders[0]["id"] in (3, 4, 5)
                assert leaders[0]["voters"] == [3, 4, 5] and leaders[0]["learners"] == []
                assert set(leaders[0]["followers"]) == {3, 4, 5} - {leaders[0]["id"]}
                for f in leaders[0]["followers"].values():
                    assert set(f) == {"match", "next", "state", "inflight", "last_heard"}
                await cl.wait_caught_up(c)
            await check_all_nodes(cl, [w])
            print(f"{len(w.acked)} acknowledged writes, {w.failed} failed; "
                  f"{time.monotonic() - started:.1f}s")
            assert len(w.acked) >= 20
    finally:
        cl.kill_all()
