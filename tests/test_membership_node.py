"""Membership change through ``RaftNode`` on real ``FsLog``s: the original's 5 -> 7 -> 5 done
safely with writes running throughout, replacing a node that lost its disk, leadership
transfer, and configurations that survive restarts (the log stores no entry kinds)."""

from __future__ import annotations

import random

import pytest
import trio
from cluster import FAST, Counter

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.errors import (
    InvalidArgumentError,
    LeadershipLostError,
    MembershipError,
    NoLeaderError,
    NotLeaderError,
    RaftTimeoutError,
)
from tinyraftplus.transport.memory import MemoryNetwork


class Nodes:
    """RaftNodes over one MemoryNetwork, each with its own FsLog and counter state machine."""

    def __init__(self, root, net: MemoryNetwork, nursery: trio.Nursery) -> None:
        self.root, self.net, self.nursery = root, net, nursery
        self.nodes: dict[int, RaftNode] = {}
        self.sms: dict[int, Counter] = {}

    async def start(self, i: int, nodes: list[int], **opts) -> RaftNode:
        sm = self.sms[i] = Counter()
        node = RaftNode(i, nodes, self.net.sender(i), FsLog(str(self.root), f"n{i}"),
                        apply=sm.apply, read=sm.read, **{**FAST, **opts})
        self.net.attach(node)
        self.nodes[i] = node
        await self.nursery.start(node.serve)
        return node

    def running(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if n.running]

    async def leader(self) -> RaftNode:
        with trio.fail_after(10):
            while True:
                leaders = [n for n in self.running() if n.state == "leader"]
                if len(leaders) == 1:
                    return leaders[0]
                await trio.sleep(0.01)

    async def converge(self, ids) -> None:
        with trio.move_on_after(15):
            while True:
                seqs = {self.nodes[i].apply_seq for i in ids} | {self.nodes[i].seq for i in ids}
                if len(seqs) == 1:
                    return
                await trio.sleep(0.01)
        raise AssertionError("no convergence: " + repr(
            {i: self.nodes[i].status().as_dict() for i in ids if self.nodes[i].running}))


async def _writer(c: Nodes, acked: list[int], stop: trio.Event,
                  done: trio.Event | None = None) -> None:
    """Appends through whichever node leads, retrying through elections, until ``stop``;
    sets ``done`` once it no longer touches any node."""
    try:
        await _write_until(c, acked, stop)
    finally:
        if done is not None:
            done.set()


async def _write_until(c: Nodes, acked: list[int], stop: trio.Event) -> None:
    k = 0
    while not stop.is_set():
        k += 1
        try:
            leader = await c.leader()
            r = await leader.append(b"w%d" % k)
            acked.append(r.seq)
        except (NotLeaderError, NoLeaderError, LeadershipLostError, RaftTimeoutError,
                trio.TooSlowError):
            await trio.sleep(0.01)
        await trio.sleep(0.005)


async def test_grow_5_to_7_and_shrink_back_while_writing(tmp_path):
    """The original's test/10update.js, safely: two learners join, catch up and are promoted
    together (joint consensus); then two voters leave together. Writes run all along, and
    every acknowledged one is on every member at the end; the configuration survives a
    restart of the whole cluster."""
    five = [1, 2, 3, 4, 5]
    acked: list[int] = []
    async with trio.open_nursery() as nursery:
        async with MemoryNetwork(seed=5) as net:
            c = Nodes(tmp_path, net, nursery)
            for i in five:
                await c.start(i, five, bootstrap=True)
            stop = trio.Event()
            done = trio.Event()
            nursery.start_soon(_writer, c, acked, stop, done)
            await trio.sleep(0.3)
            for i in (6, 7):
                await c.start(i, five, join=True)
            leader = await c.leader()
            await leader.add_learner(6)
            leader = await c.leader()
            await leader.add_learner(7)
            await trio.sleep(0.3)  # let them catch up while writes go on
            leader = await c.leader()
            cfg = await leader.change_membership(five + [6, 7])
            assert cfg.voters == frozenset(range(1, 8)) and not cfg.joint
            await trio.sleep(0.3)
            leader = await c.leader()
            cfg = await leader.change_membership([1, 2, 3, 6, 7])
            assert cfg.voters == frozenset({1, 2, 3, 6, 7})
            await trio.sleep(0.3)
            stop.set()
            with trio.fail_after(30):
                await done.wait()  # (an append in flight finishes before nodes stop)
            members = [1, 2, 3, 6, 7]
            await c.converge(members)
            assert len(acked) > 20
            for i in members:
                node = c.nodes[i]
                assert node.configuration.voters == frozenset(members)
                for seq in acked:
                    assert node.log.entries(seq, seq, 1 << 20)[0].data.startswith(b"w")
                assert c.sms[i].count == c.sms[1].count
            for node in c.running():
                await node.stop()
            # Restart everyone: each knows the configuration from its own state.
            for i in members:  # (6 and 7 were not among the first five)
                await c.start(i, five, join=i not in five)
            leader = await c.leader()
            assert leader.node_id in members
            r = await leader.append(b"after restart")
            await c.converge(members)
            for i in members:
                assert c.nodes[i].configuration.voters == frozenset(members)
                assert c.nodes[i].status().config_seq >= 0
            assert r.seq > max(acked)
            for node in c.running():
                await node.stop()
        nursery.cancel_scope.cancel()


async def test_replace_a_node_that_lost_its_disk(tmp_path):
    """The supported path end to end: node 2 loses its disk; it is removed, started again
    empty as a joining learner under a new identity, catches up, and is promoted."""
    three = [1, 2, 3]
    async with trio.open_nursery() as nursery:
        async with MemoryNetwork(seed=7) as net:
            c = Nodes(tmp_path, net, nursery)
            for i in three:
                await c.start(i, three, bootstrap=True)
            leader = await c.leader()
            for k in range(30):
                await leader.append(b"x%d" % k)
            victim = 2 if leader.node_id != 2 else 3
            await c.nodes[victim].stop()
            FsLog.destroy(str(tmp_path), f"n{victim}")
            (tmp_path / f"n{victim}.raftstate").unlink()
            leader = await c.leader()
            cfg = await leader.remove_node(victim)
            assert victim not in cfg.members
            others = sorted(cfg.voters)
            node = await c.start(victim, others, join=True)
            assert node.status().recovering  # no state: it recovers first, as a learner
            cfg = await leader.add_learner(victim)
            assert victim in cfg.learners
            with trio.fail_after(10):
                while node.apply_seq < leader.commit_seq:
                    await trio.sleep(0.01)
            cfg = await leader.promote(victim)
            assert cfg.voters == frozenset(three)
            await c.converge(three)
            assert c.sms[victim].count == 30
            # It counts now: with the third node gone, the leader commits with it.
            third = next(i for i in three if i not in (leader.node_id, victim))
            await c.nodes[third].stop()
            r = await leader.append(b"with the replaced node")
            await node.wait_apply(r.seq)
            for n in c.running():
                await n.stop()
        nursery.cancel_scope.cancel()


async def test_refusals_and_transfer(tmp_path):
    three = [1, 2, 3]
    async with trio.open_nursery() as nursery:
        async with MemoryNetwork(seed=9) as net:
            c = Nodes(tmp_path, net, nursery)
            for i in three:
                await c.start(i, three, bootstrap=True)
            leader = await c.leader()
            await leader.append(b"x")
            follower = next(n for n in c.running() if n is not leader)
            with pytest.raises(NotLeaderError) as ei:
                await follower.change_membership(three)
            assert ei.value.leader == leader.node_id
            seq = leader.status().config_seq
            with pytest.raises(MembershipError, match="expected_config_seq"):
                await leader.change_membership(three, [4], expected_config_seq=seq + 5)
            with pytest.raises(InvalidArgumentError, match="learner|not a member"):
                await leader.transfer_leadership(4)
            with pytest.raises(InvalidArgumentError, match="not a learner"):
                await leader.promote(2)
            to = random.Random(1).choice([n.node_id for n in c.running() if n is not leader])
            new = await leader.transfer_leadership(to)
            assert new == to
            assert (await c.leader()).node_id == to
            assert leader.state == "follower"
            st = c.nodes[to].status()
            assert st.role == "leader" and set(st.followers) == set(three) - {to}
            assert st.voters == tuple(three)
            r = await leader.append(b"through the new leader")
            assert r.seq > 0
            for n in c.running():
                await n.stop()
        nursery.cancel_scope.cancel()
