"""RaftNode over real FsLogs and the in-memory network: the original's scenarios and more."""

from __future__ import annotations

import pytest
import trio
from cluster import FAST, Counter, cluster

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.errors import (
    ClosedError,
    ConfigurationError,
    InvalidArgumentError,
    LeadershipLostError,
    MemberStateLostError,
    NoLeaderError,
    RaftTimeoutError,
)
from tinyraftplus.log.state import StateFile
from tinyraftplus.raft.state import decode_hard_state
from tinyraftplus.transport.memory import MemoryNetwork


async def _one_leader(c, timeout=10.0):
    leader = await c.leader(timeout)
    assert sum(n.state == "leader" for n in c.running()) == 1
    return leader


# --- elections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,offline",
    [(3, 0), (3, 1), (5, 0), (5, 1), (5, 2)],
    ids=["n3", "n3-one-offline", "n5", "n5-one-offline", "n5-two-offline"],
)
async def test_elect(tmp_path, n, offline):
    ids = list(range(1, n + 1))
    async with cluster(tmp_path, n, start=ids[offline:]) as c:
        leader = await _one_leader(c)
        assert leader.node_id in ids[offline:]
        for node in c.running():
            assert await node.wait_leader() == leader.node_id
            assert node.term == leader.term


@pytest.mark.parametrize("delayed", [1, 2])
async def test_elect_n5_with_delayed_nodes(tmp_path, delayed):
    async with cluster(tmp_path, 5) as c:
        slow = set(range(1, delayed + 1))
        # Messages to and from the slow nodes take longer than a heartbeat interval.
        orig = c.net._deliver

        def deliver(frm, to, msg):
            if frm in slow or to in slow:
                c.nursery.start_soon(_later, 0.08, orig, frm, to, msg)
            else:
                orig(frm, to, msg)

        c.net._deliver = deliver
        leader = await _one_leader(c)
        r = await leader.append(b"x")
        for node in c.running():
            await node.wait_apply(r.seq)
            assert node.log.entries(r.seq, r.seq, 1 << 20)[0].data == b"x"


async def _later(delay, fn, *args):
    await trio.sleep(delay)
    fn(*args)


async def test_no_quorum_no_leader(tmp_path):
    async with cluster(tmp_path, 3, start=[1], append_timeout=0.5) as c:
        await trio.sleep(1.0)
        assert c.nodes[1].state != "leader"
        with pytest.raises(NoLeaderError):
            await c.nodes[1].append(b"x")


# --- replication -------------------------------------------------------------------------


async def test_append_through_leader_and_followers(tmp_path):
    async with cluster(tmp_path, 3, fsync=True) as c:
        leader = await _one_leader(c)
        followers = [n for n in c.running() if n is not leader]
        seqs = []
        for i, node in enumerate([leader, *followers, leader, *followers]):
            r = await node.append(f"e{i}".encode())
            assert r.data == f"e{i}".encode()
            seqs.append(r.seq)
        assert seqs == sorted(seqs) and len(set(seqs)) == 6
        batch = [f"b{i}".encode() for i in range(10)]
        r = await followers[0].append_batch(batch)
        assert r.data == batch and len(r.result) == 10
        await c.converge()
        heads = {n.head for n in c.running()}
        assert heads == {b"b9"}
        assert {n.seq for n in c.running()} == {r.seq + 9}
        # Every log holds the same entries.
        logs = []
        for node in c.running():
            logs.append([(e.seq, e.term, e.data) for e in node.log.entries(0, node.seq, 1 << 20)])
        assert logs[0] == logs[1] == logs[2]


async def test_state_machine_results_and_reads(tmp_path):
    async with cluster(tmp_path, 3) as c:
        leader = await _one_leader(c)
        nodes = c.running()
        results = []
        for i in range(6):
            r = await nodes[i % 3].append(b"+1")
            results.append(r.result)
        assert results == [1, 2, 3, 4, 5, 6]
        r = await nodes[1].append_batch([b"+1"] * 4)
        assert r.result == [7, 8, 9, 10]
        for node in nodes:
            assert await node.read() == 10  # linearizable from any node
        assert leader.commit_seq >= r.seq + 3


async def test_concurrent_appends_from_every_node(tmp_path):
    async with cluster(tmp_path, 3) as c:
        await _one_leader(c)
        got = []

        async def client(node, k):
            for j in range(20):
                r = await node.append(f"{k}-{j}".encode())
                got.append(r.seq)

        async with trio.open_nursery() as n:
            for k, node in enumerate(c.running() * 3):
                n.start_soon(client, node, k)
        assert len(got) == len(set(got)) == 180
        await c.converge()
        counts = {c.sms[i].count for i in c.nodes}
        assert counts == {180}


async def test_read_without_read_fn_and_bad_input(tmp_path):
    async with cluster(tmp_path, 3, machines=False) as c:
        leader = await _one_leader(c)
        with pytest.raises(Exception, match="read="):
            await leader.read()
        with pytest.raises(InvalidArgumentError, match="empty"):
            await leader.append(b"")
        with pytest.raises(InvalidArgumentError, match="bytes"):
            await leader.append("text")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            await leader.append_batch([])
        with pytest.raises(InvalidArgumentError, match=r"items\[1\]"):
            await leader.append_batch([b"a", 3])  # type: ignore[list-item]
    with pytest.raises(ClosedError):
        await leader.append(b"x")


def test_bad_construction(tmp_path):
    log = FsLog(str(tmp_path), "x")
    send = lambda to, msg: None  # noqa: E731
    with pytest.raises(InvalidArgumentError, match="must be in nodes"):
        RaftNode(4, [1, 2, 3], send, log)
    with pytest.raises(InvalidArgumentError, match="unique"):
        RaftNode(1, [1, 1, 2], send, log)
    with pytest.raises(InvalidArgumentError, match="heartbeats"):
        RaftNode(1, [1, 2, 3], send, log, election_timeout=0.1, ping_timeout=0.2)
    with pytest.raises(ConfigurationError):
        RaftNode(1, [1, 2, 3, 4], send, log, quorum=2)


# --- restarts, lost disks ----------------------------------------------------------------


async def test_restart_all_nothing_lost_and_no_double_vote(tmp_path):
    acked = []
    votes: dict[int, dict[int, object]] = {}  # node -> term -> vote seen in hard state

    def record_votes(c):
        for i in c.ids:
            raw = StateFile(str(tmp_path / f"node{i}.raftstate")).load()
            if raw is None:
                continue
            hs = decode_hard_state(raw)
            term, vote = hs.term, hs.vote
            if vote is not None:
                prev = votes.setdefault(i, {}).setdefault(term, vote)
                assert prev == vote, f"node {i} voted for {prev} and {vote} in term {term}"

    for round_ in range(3):
        async with cluster(tmp_path, 3, fsync=True) as c:
            leader = await _one_leader(c)
            for k in range(5):
                r = await c.running()[k % 3].append(f"r{round_}-{k}".encode())
                acked.append((r.seq, r.data))
            record_votes(c)
            # Force another election inside the round too.
            await c.stop(leader.node_id)
            await _one_leader(c)
            record_votes(c)
            await c.start(leader.node_id)
            await c.converge()
            record_votes(c)
    async with cluster(tmp_path, 3, fsync=True) as c:
        await _one_leader(c)
        await c.converge()
        for node in c.running():
            for seq, data in acked:
                e = node.log.entries(seq, seq, 1 << 20)[0]
                assert e.data == data, f"node {node.node_id} lost acknowledged seq {seq}"


@pytest.mark.parametrize("which", ["follower", "leader"])
async def test_deleted_log_recovers_before_it_counts(tmp_path, which):
    """The original's "delete a follower's / the leader's log", on the safe path: the node
    restarted without its data recovers (asks every other member, votes for nobody) before
    it counts again, the cluster keeps committing meanwhile, and it ends with every entry."""
    async with cluster(tmp_path, 3) as c:
        leader = await _one_leader(c)
        for i in range(20):
            await leader.append(f"x{i}".encode())
        victim = leader if which == "leader" else next(n for n in c.running() if n is not leader)
        vid = victim.node_id
        old_inc = victim._core.incarnation
        await c.stop(vid)
        FsLog.destroy(str(tmp_path), f"node{vid}")
        (tmp_path / f"node{vid}.raftstate").unlink(missing_ok=True)
        new_leader = await _one_leader(c)
        await new_leader.append(b"after")
        node = c.make(vid)
        recovering = []
        node.on("change", lambda ev: recovering.append(node._core.recovering))
        await c.nursery.start(node.serve)
        assert node._core.incarnation > old_inc  # a new member identity, not the old one
        await c.converge(15)
        assert node.head == b"after"
        assert c.sms[vid].count == 21
        assert not node._core.recovering
        # It counts again: with the other follower gone, the leader still commits with it.
        leader = await c.leader()
        other = next(n for n in c.running() if n not in (leader, node))
        await c.stop(other.node_id)
        r = await leader.append(b"with the recovered node")
        await node.wait_apply(r.seq)


async def test_deleted_log_with_state_kept_is_refused(tmp_path):
    """A node whose log is gone but whose hard state survived is not the member it was:
    it refuses to start, and says how to bring it back."""
    async with cluster(tmp_path, 3) as c:
        leader = await _one_leader(c)
        await leader.append(b"x")
        victim = next(n for n in c.running() if n is not leader)
        await c.converge()
        await c.stop(victim.node_id)
        FsLog.destroy(str(tmp_path), f"node{victim.node_id}")
        node = c.make(victim.node_id)
        with pytest.raises(MemberStateLostError, match="lost its log.*without bootstrap"):
            await c.nursery.start(node.serve)


async def test_wiped_node_started_with_bootstrap_is_ignored(tmp_path):
    """The operator error the explicit bootstrap invites: a wiped node started again with
    bootstrap=True. Its peers know its old identity, ignore the new one and warn."""
    async with cluster(tmp_path, 3) as c:
        leader = await _one_leader(c)
        await leader.append(b"x")
        victim = next(n for n in c.running() if n is not leader)
        vid = victim.node_id
        await c.converge()
        await c.stop(vid)
        FsLog.destroy(str(tmp_path), f"node{vid}")
        (tmp_path / f"node{vid}.raftstate").unlink()
        warnings = []
        leader.on("warn", lambda ev: warnings.append(ev.message))
        node = await c.start(vid, bootstrap=True)
        with trio.fail_after(5):
            while not any("without recovering" in w for w in warnings):
                await trio.sleep(0.01)
        await leader.append(b"y")  # the cluster goes on without it
        assert node.seq < leader.seq


# --- partitions --------------------------------------------------------------------------


async def test_check_quorum_partitioned_leader_steps_down(tmp_path):
    async with cluster(tmp_path, 3) as c:
        leader = await _one_leader(c)
        c.net.isolate(leader.node_id)
        t0 = trio.current_time()
        with trio.fail_after(10):
            while leader.state == "leader":
                await trio.sleep(0.01)
        took = trio.current_time() - t0
        # CheckQuorum: within about one election timeout (2x for the randomised window
        # plus scheduling slack on a busy machine).
        assert took <= 3 * FAST["election_timeout"] + 0.5, took
        others = [n for n in c.running() if n is not leader]
        with trio.fail_after(10):
            while not any(n.state == "leader" for n in others):
                await trio.sleep(0.01)
        c.net.heal()
        await c.leader()


async def test_prevote_rejoining_node_does_not_disrupt(tmp_path):
    async with cluster(tmp_path, 3) as c:
        leader = await _one_leader(c)
        term = leader.term
        lonely = next(n for n in c.running() if n is not leader)
        c.net.isolate(lonely.node_id)
        await trio.sleep(6 * FAST["election_timeout"])  # it would have campaigned many times
        assert leader.state == "leader"
        c.net.heal()
        r = await leader.append(b"y")
        await lonely.wait_apply(r.seq)
        assert leader.state == "leader" and leader.term == term
        assert lonely.term == term


# --- replication groups ------------------------------------------------------------------


def majority_in_each(groups):
    def fn(ids):
        return all(sum(1 for i in ids if i in g) * 2 > len(g) for g in groups)

    return fn


async def test_groups_commit_stalls_and_resumes(tmp_path):
    a, b = {1, 2, 3}, {4, 5, 6}
    group = {i: ("A" if i in a else "B") for i in a | b}
    opts = dict(group=group, group_fn=majority_in_each([a, b]), append_timeout=1.0)
    async with cluster(tmp_path, 6, **opts) as c:
        leader = await _one_leader(c)
        await leader.append(b"ok")
        # Take two of group B down (leaving B without a majority).
        victims = [i for i in sorted(b) if i != leader.node_id][:2]
        for v in victims:
            c.net.down(v)
        with pytest.raises((RaftTimeoutError, NoLeaderError)):
            await leader.append(b"stalled")
        for v in victims:
            c.net.up(v)
        leader = await _one_leader(c)
        r = await leader.append(b"resumed")
        await c.converge()
        assert all(n.head == b"resumed" for n in c.running())
        assert r.seq == leader.seq


def test_unsafe_group_fn_refused(tmp_path):
    group = {1: "A", 2: "A", 3: "A", 4: "B", 5: "B", 6: "B"}
    log = FsLog(str(tmp_path), "x")
    with pytest.raises(ConfigurationError) as ei:
        # "a majority in either group" lets {1,2} and {4,5} both commit: unsafe.
        RaftNode(1, list(group), lambda t, m: None, log, group=group,
                 group_fn=lambda ids: len(ids & {1, 2, 3}) >= 2 or len(ids & {4, 5, 6}) >= 2)
    assert "disjoint" in str(ei.value) or "intersect" in str(ei.value)


# --- events ------------------------------------------------------------------------------


async def test_events_and_slow_subscriber(tmp_path):
    async with cluster(tmp_path, 3) as c:
        leader = await _one_leader(c)
        seen = []
        leader.on("commit", lambda ev: seen.append(ev.seq))
        sub = leader.subscribe("apply", maxlen=4)  # never read while appending: a slow reader
        async with sub:
            for i in range(30):
                await leader.append(b"e%d" % i)
            got = []
            with trio.move_on_after(0.2):
                async for ev in sub:
                    got.append(ev)
            assert len(got) == 4
            assert got[0].dropped > 0
            assert got[-1].seq == leader.apply_seq
        assert seen and seen == sorted(seen) and seen[-1] == leader.commit_seq


async def test_send_failures_become_warnings(tmp_path):
    net = MemoryNetwork(seed=3)
    flaky = {"on": True}
    real = net.send

    def send(frm, to, msg):
        if flaky["on"] and to == 3:
            raise ConnectionError("peer 3 unreachable")
        real(frm, to, msg)

    net.send = send
    async with cluster(tmp_path, 3, net=net) as c:
        warns = []
        for node in c.running():
            node.on("warn", lambda ev: warns.append(ev.message))
        # Node 3 hears nothing, so only 1 and 2 agree on a leader.
        leader = c.nodes[await c.nodes[1].wait_leader()]
        await leader.append(b"x")
        await trio.sleep(0.2)
        assert any("unreachable" in w for w in warns)
        flaky["on"] = False
        await c.converge()


async def test_async_send_is_supported(tmp_path):
    net = MemoryNetwork(seed=5)
    ids = [1, 2, 3]
    nodes = []
    for i in ids:
        async def send(to, msg, _i=i):
            await trio.sleep(0)
            net.send(_i, to, msg)

        sm = Counter()
        node = RaftNode(i, ids, send, FsLog(str(tmp_path), f"n{i}", fsync=False),
                        apply=sm.apply, read=sm.read, **FAST)
        net.attach(node)
        nodes.append(node)
    async with net, nodes[0], nodes[1], nodes[2]:
        r = await nodes[2].append(b"x")
        assert r.result == 1
        assert await nodes[1].read() == 1


async def test_cancelled_async_with_stops_cleanly(tmp_path):
    """Cancelling the block that owns a node must stop it and close its log, with Trio's
    scopes intact; the log can then be opened again."""
    with trio.move_on_after(0.3):
        async with RaftNode(1, [1], lambda t, msg: None, FsLog(str(tmp_path), "a")) as node:
            await node.append(b"one")
            await trio.sleep_forever()
    assert node.state == "stopped" and not node.running
    async with RaftNode(1, [1], lambda t, msg: None, FsLog(str(tmp_path), "a")) as node:
        r = await node.append(b"two")
        assert node.log.entries(0, r.seq, 1 << 20)[-1].data == b"two"
        assert b"one" in [e.data for e in node.log.entries(0, r.seq, 1 << 20)]


async def test_lossy_network_stays_consistent(tmp_path):
    """Drops, duplicates, delays and reordering: appends still succeed (with retries for the
    ones a leader change lost) and every log ends identical."""
    net = MemoryNetwork(seed=11, drop=0.05, duplicate=0.1, reorder=0.2, delay=(0.0, 0.01))
    async with cluster(tmp_path, 3, net=net, append_timeout=1.5) as c:
        acked = []
        for i in range(30):
            for _attempt in range(10):
                try:
                    r = await c.running()[i % 3].append(b"m%d" % i)
                except (RaftTimeoutError, NoLeaderError, LeadershipLostError):
                    continue
                acked.append((r.seq, r.data))
                break
            else:
                raise AssertionError(f"append {i} never succeeded")
        net.drop = net.duplicate = net.reorder = 0.0
        await c.leader()
        await c.converge(20)
        logs = [[(e.seq, e.term, e.data) for e in n.log.entries(0, n.seq, 1 << 22)]
                for n in c.running()]
        assert logs[0] == logs[1] == logs[2]
        held = {s: d for s, _, d in logs[0]}
        assert all(held[s] == d for s, d in acked)
        counts = {c.sms[i].count for i in c.nodes}
        assert len(counts) == 1


async def test_forwarded_append_fails_fast_when_the_leader_changes(tmp_path):
    """A follower's forwarded append whose leader dies unanswered fails with
    LeadershipLostError at the leader change, not after append_timeout."""
    from tinyraftplus.raft.messages import Propose

    net = MemoryNetwork(seed=2)
    real = net._deliver

    def deliver(frm, to, msg):
        if type(msg) is Propose:
            return  # the leader never sees the forwarded append
        real(frm, to, msg)

    net._deliver = deliver
    async with cluster(tmp_path, 3, net=net, append_timeout=30.0) as c:
        leader = await _one_leader(c)
        follower = next(n for n in c.running() if n is not leader)
        t0 = trio.current_time()
        c.nursery.start_soon(c.stop, leader.node_id)
        with pytest.raises(LeadershipLostError, match="may or may not"):
            await follower.append(b"orphan")
        assert trio.current_time() - t0 < 10.0
