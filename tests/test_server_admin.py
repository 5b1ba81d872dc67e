"""The server's admin side: the status request's node fields, admin requests on the leader
(a follower answers ``not_leader`` naming it), who may send them (``--admin-allow``,
``"admin": true`` in ``--authz``), their validation on the wire, and ``--join`` /
``--bootstrap`` on the command line. (Growing and shrinking real processes with the admin
tool: ``test_membership_processes.py``.)"""

from __future__ import annotations

import json

import msgpack
import pytest
import trio
from test_client import FAST, InProc, client_ctx, raw_request

from tinyraftplus.errors import ConfigurationError, MembershipError, ProtocolError
from tinyraftplus.kv.authz import AdminPolicy, Authorization
from tinyraftplus.kv.client import (
    Client,
    ForbiddenError,
    decode_request,
    encode_admin,
)
from tinyraftplus.kv.server import Server, ServerConfig, parse_args
from tinyraftplus.transport.wire import frame


class AdminProc(InProc):
    """``InProc`` with an admin policy on every node."""

    def __init__(self, *a, admin=None, **kw) -> None:
        super().__init__(*a, **kw)
        self.admin = admin

    async def _run(self, i, task_status=trio.TASK_STATUS_IGNORED):
        cfg = ServerConfig(
            node_id=i, peers=self.peers, data_dir=str(self.tmp / f"d{i}"),
            client_listen=("127.0.0.1", self.cports[i]), tls=self.tls[i], fsync=False,
            election_timeout=self.et, ping_timeout=self.et / 5, append_timeout=3.0,
            read_timeout=3.0, transport_options=FAST, admin=self.admin,
        )
        srv = self.servers[i] = Server(cfg)
        with trio.CancelScope() as self.scopes[i]:
            await srv.serve(task_status=task_status)


@pytest.fixture(scope="module")
def ca():
    import trustme

    return trustme.CA()


async def test_status_admin_on_the_leader_and_policy(tmp_path, ca, nursery):
    cl = AdminProc(tmp_path, ca, admin=AdminPolicy(["dns:ops.*"]))
    for i in cl.ids:
        await cl.start(nursery, i)
    with trio.fail_after(30):
        lead = await cl.leader()
        async with cl.client() as c:
            await c.put("k", "v")
            st = await c.cluster_status()
            assert set(st) == {1, 2, 3}
            for i, s in st.items():
                assert s["id"] == i and s["voters"] == [1, 2, 3] and s["learners"] == []
                assert s["role"] == ("leader" if i == lead else "follower")
                assert s["leader"] == lead and s["commit_seq"] >= 1
                for k in ("term", "first_seq", "last_seq", "apply_seq", "outgoing",
                          "config_seq", "followers"):
                    assert k in s
            assert set(st[lead]["followers"]) == {1, 2, 3} - {lead}
            assert set(next(iter(st[lead]["followers"].values()))) == {
                "match", "next", "state", "inflight", "last_heard"}
            # This client's certificate (client.tinyraftplus) may not administer.
            with pytest.raises(ForbiddenError, match="admin"):
                await c.promote(2)
        ops = Client(cl.addrs(), tls=client_ctx(ca, "ops.tinyraftplus"), timeout=10.0)
        async with ops:
            with pytest.raises(MembershipError, match="not a learner"):
                await ops.promote(2)
            other = next(i for i in cl.ids if i != lead)
            r = await ops.transfer_leadership(other)
            assert r["leader"] == other and r["voters"] == [1, 2, 3]
            # A follower answers not_leader and names the leader; nothing is done.
            follower = next(i for i in cl.ids if i != other)
            ans = await raw_request(cl, ca, follower, encode_admin(7, "remove", 3))
            assert ans[2] == "forbidden"  # the raw client is client.tinyraftplus
        cl.admin = None
        cl.stop(follower)
        await trio.sleep(0.1)
        await cl.start(nursery, follower)
        assert await cl.leader() == other
        ans = await raw_request(cl, ca, follower, encode_admin(7, "remove", 3))
        assert ans[1] == 7 and ans[2] == "not_leader" and f"leader is {other}" in ans[3], ans


def test_admin_requests_are_validated_on_the_wire():
    ok = msgpack.unpackb(encode_admin(5, "add_learner", 4, "10.0.0.4:7001")[8:])
    assert decode_request(msgpack.packb(ok)) == [1, 5, 5, "add_learner", 4, "10.0.0.4:7001"]
    assert decode_request(msgpack.packb([1, 5, 1, "transfer_leader", None, None]))
    assert decode_request(msgpack.packb([1, 5, 1, "promote", "n" * 200, None]))
    bad = [
        [1, 5, 1, "drop_tables", 4, None],
        [1, 5, 1, "add_learner", 4, None],
        [1, 5, 1, "add_learner", 4, "no-port"],
        [1, 5, 1, "promote", 4, "10.0.0.4:7001"],
        [1, 5, 1, "promote", None, None],
        [1, 5, 1, "remove", -1, None],
        [1, 5, 1, "remove", "n" * 256, None],
        [1, 5, 1, "remove", b"4", None],
        [1, 2, 1, "get", "k", None],  # 6 elements are for admin requests only
        [1, 5, 1, "remove", 4],
    ]
    for req in bad:
        with pytest.raises(ProtocolError):
            decode_request(msgpack.packb(req, use_bin_type=True))
    # The long strings admin requests may hold are not allowed elsewhere.
    with pytest.raises(ProtocolError):
        decode_request(msgpack.packb([1, 3, 1, 1, 1, 0, "p" * 40, b"k", b"v"],
                                     use_bin_type=True))
    assert frame  # (imported for symmetry with the other wire tests)


def test_join_and_bootstrap_on_the_command_line(tmp_path):
    base = ["--data", str(tmp_path / "d"), "--client-port", "0", "--plaintext"]
    cfg = parse_args(["--id", "4", "--peers", "1=127.0.0.1:7001,2=127.0.0.1:7002", "--join",
                      "--listen", "127.0.0.1:7004", *base])
    assert cfg.join and not cfg.bootstrap and cfg.peer_listen == ("127.0.0.1", 7004)
    assert cfg.client_listen[0] == "127.0.0.1" and cfg.admin is None
    with pytest.raises(ConfigurationError, match="--listen"):
        parse_args(["--id", "4", "--peers", "1=127.0.0.1:7001", "--join", *base])
    with pytest.raises(ConfigurationError, match="without this node"):
        parse_args(["--id", "1", "--peers", "1=127.0.0.1:7001", "--join", "--listen",
                    "127.0.0.1:7001", *base])
    with pytest.raises(ConfigurationError, match="choose one"):
        parse_args(["--id", "4", "--peers", "1=127.0.0.1:7001", "--join", "--bootstrap",
                    "--listen", "127.0.0.1:7004", *base])
    with pytest.raises(ConfigurationError, match="not in --peers"):
        parse_args(["--id", "4", "--peers", "1=127.0.0.1:7001", *base])
    cfg = parse_args(["--id", "1", "--peers", "1=127.0.0.1:7001", "--bootstrap",
                      "--admin-allow", "dns:ops.example", *base])
    assert cfg.bootstrap and cfg.admin is not None
    assert cfg.admin.allows("dns:ops.example") and not cfg.admin.allows("dns:other")


def test_admin_policy_from_a_file_and_from_authz(tmp_path):
    f = tmp_path / "admins"
    f.write_text("# operators\ncn:alice\ndns:ops-*.example  # the ops hosts\n")
    p = AdminPolicy(file=str(f))
    assert p.allows("cn:alice") and p.allows("dns:ops-1.example") and not p.allows("cn:bob")
    f.write_text("cn:bob\n")
    p.reload()
    assert p.allows("cn:bob") and not p.allows("cn:alice")
    az = tmp_path / "authz.json"
    az.write_text(json.dumps({"cn:carol": {"read": [""], "admin": True},
                              "*": {"read": ["shared/"], "admin": False}}))
    a = Authorization.from_file(az)
    assert a.admins == {"cn:carol"} and a.allows("cn:carol", "read", b"x")
    p = AdminPolicy(authz=a)
    assert p.allows("cn:carol") and not p.allows("cn:dave")
    az.write_text(json.dumps({"cn:carol": {"admin": "yes"}}))
    with pytest.raises(ConfigurationError, match="true or false"):
        Authorization.from_file(az)


async def test_admin_tool_exit_statuses(tmp_path, ca, nursery, capsys):
    """``main()`` of the tool against an in-process cluster: a change prints the new
    configuration (0), a refusal one line (1), a usage mistake exits 2, --json parses."""
    import trustme  # noqa: F401  (the fixture's CA issues the tool's files)

    from tinyraftplus.kv.admin import main

    cl = InProc(tmp_path, ca)
    for i in cl.ids:
        await cl.start(nursery, i)
    ca_file, cert_file = tmp_path / "ca.pem", tmp_path / "ops.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("ops.tinyraftplus").private_key_and_cert_chain_pem.write_to_path(
        str(cert_file))
    base = ["--peers", ",".join(f"{h}:{p}" for h, p in cl.addrs()), "--tls-ca", str(ca_file),
            "--tls-cert", str(cert_file), "--timeout", "10"]

    async def run(*args: str) -> tuple[int, str, str]:
        rc = await trio.to_thread.run_sync(main, [*base, *args])
        out, err = capsys.readouterr()
        return rc, out, err

    with trio.fail_after(30):
        lead = await cl.leader()
        rc, out, err = await run("--json", "status")
        assert rc == 0, err
        st = json.loads(out)
        assert st[str(lead)]["role"] == "leader" and st[str(lead)]["voters"] == [1, 2, 3]
        rc, out, err = await run("remove", "9")
        assert rc == 1 and err.count("\n") == 1 and "not a member" in err, err
        rc, out, err = await run("promote", "2")
        assert rc == 1 and "not a learner" in err and "Traceback" not in err, err
        rc, out, err = await run("add-learner", "6", "no-port")
        assert rc == 2 and "no-port" in err, err
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "frobnicate"])
        assert exit_info.value.code == 2
        other = next(i for i in cl.ids if i != lead)
        rc, out, err = await run("transfer-leader", str(other))
        assert rc == 0 and f"leadership transferred to {other}" in out, err


async def test_in_process_join_promote_and_remove_the_leader(tmp_path, ca, nursery):
    """Servers in this Trio run: a node started with join=True is added with its address,
    promoted, and the leader removes itself; the transports follow (the new node becomes a
    peer everywhere, the removed leader is dropped only after its removal committed, which
    it could not have led otherwise)."""
    from test_client import node_tls
    from test_multiprocess import free_ports

    cl = InProc(tmp_path, ca)
    for i in cl.ids:
        await cl.start(nursery, i)
    p4, c4 = free_ports(2)
    cfg4 = ServerConfig(
        node_id=4, peers=dict(cl.peers), data_dir=str(tmp_path / "d4"),
        client_listen=("127.0.0.1", c4), peer_listen=("127.0.0.1", p4), tls=node_tls(ca, 4),
        fsync=False, election_timeout=cl.et, ping_timeout=cl.et / 5, append_timeout=3.0,
        read_timeout=3.0, transport_options=FAST, join=True,
    )
    s4 = Server(cfg4)
    await nursery.start(s4.serve)
    with trio.fail_after(30):
        lead = await cl.leader()
        async with cl.client() as c:
            for k in range(20):
                await c.put(f"k{k}", f"v{k}")
            r = await c.add_learner(4, f"127.0.0.1:{p4}")
            assert r["learners"] == [4] and r["addrs"] == {4: f"127.0.0.1:{p4}"}
            while s4.node.apply_seq < cl.servers[lead].node.commit_seq:
                await trio.sleep(0.02)
            r = await c.promote(4)
            assert r["voters"] == [1, 2, 3, 4]
            for i in cl.ids:
                assert 4 in cl.servers[i].transport.peer_ids
            r = await c.remove_node(lead)
            assert lead not in r["voters"] and len(r["voters"]) == 3
            await c.put("after", "removal")
            rest = [i for i in (1, 2, 3, 4) if i != lead]
            while True:
                roles = {i: (s4 if i == 4 else cl.servers[i]).node.state for i in rest}
                if "leader" in roles.values():
                    break
                await trio.sleep(0.02)
            assert cl.servers[lead].node.state != "leader"
            while any(lead in cl.servers[i].transport.peer_ids for i in rest if i != 4) or \
                    lead in s4.transport.peer_ids:
                await trio.sleep(0.02)
        async with Client([("127.0.0.1", c4)], tls=client_ctx(ca), timeout=10.0) as one:
            assert await one.get("k7") == b"v7" and await one.get("after") == b"removal"
