"""Regression tests for the driver-level defects of the Raft safety review (issue 8):
waiters keyed by seq alone, a restarted node applying its log twice, duplicated ``Propose``,
a wiped follower flooding the network, and memory that grew with payload size."""

from __future__ import annotations

import pytest
import trio
from cluster import FAST, Counter, cluster

import tinyraftplus.node as node_mod
from tinyraftplus import FsLog, RaftNode
from tinyraftplus.entry import Entry
from tinyraftplus.errors import LeadershipLostError
from tinyraftplus.raft import messages as m
from tinyraftplus.transport.memory import MemoryNetwork


def _unstarted(tmp_path) -> RaftNode:
    return RaftNode(1, [1, 2, 3], lambda to, msg: None, FsLog(str(tmp_path), "n1"))


async def test_waiters_at_one_seq_in_two_terms_lost_one_applied(tmp_path):
    """A (seq 10, term 5) is lost in a leader change; B gets (seq 10, term 6). Applying
    (10, 6) answers B with its result and fails A with LeadershipLostError (with waiters
    keyed by seq alone, B overwrote A: A timed out instead)."""
    node = _unstarted(tmp_path)
    node._apply_seq = 9
    a = node._register(10, 10, 5)
    b = node._register(10, 10, 6)
    node._finish_applied([Entry(10, 6, b"b")], ["result-b"])
    assert b.done and b.error is None and b.value == ["result-b"]
    assert a.done and isinstance(a.error, LeadershipLostError)


async def test_a_timed_out_waiter_does_not_remove_another_at_the_same_seq(tmp_path):
    """The other order: A gives up first; its cleanup must not drop B's waiter, or B is
    applied while its caller gets a timeout."""
    node = _unstarted(tmp_path)
    node._apply_seq = 9
    a = node._register(10, 10, 5)
    b = node._register(10, 10, 6)
    node._drop_waiter(a)  # A's caller timed out / was cancelled
    node._finish_applied([Entry(10, 6, b"b")], ["result-b"])
    assert b.done and b.error is None and b.value == ["result-b"]
    assert not a.done


async def test_stop_then_start_resumes_applying_where_it_left_off(tmp_path):
    """With a caller-owned log and state machine, stop() and start() of one RaftNode used
    to feed the whole log to the state machine again (a counter went 3 -> 6)."""
    sm = Counter()
    applied: list[int] = []

    def apply(bufs, seq):
        applied.extend(range(seq, seq + len(bufs)))
        return sm.apply(bufs, seq)

    log = FsLog(str(tmp_path), "solo")
    await log.open()
    try:
        node = RaftNode(1, [1], lambda to, msg: None, log, apply=apply, bootstrap=True, **FAST)
        async with trio.open_nursery() as nursery:
            await node.start(nursery)
            for _ in range(3):
                await node.append(b"+")
            await node.stop()
            assert sm.count == 3
            await node.start(nursery)
            r = await node.append(b"+")
            await node.wait_apply(r.seq)
            assert sm.count == 4
            assert applied == sorted(set(applied)), applied  # nothing applied twice
            await node.stop()
    finally:
        await log.close()


async def test_duplicated_propose_is_appended_once(tmp_path):
    """Networks duplicate messages: five appends through a follower over a network that
    duplicates every message must count five, not ten."""
    net = MemoryNetwork(seed=3, duplicate=1.0)
    async with cluster(tmp_path, 3, net=net) as c:
        leader = await c.leader()
        follower = next(n for n in c.running() if n is not leader)
        for _ in range(5):
            await follower.append(b"+")
        await c.converge()
        assert {c.sms[i].count for i in c.ids} == {5}


async def test_wiped_follower_does_not_flood_the_network(tmp_path):
    """The review's livelock: a follower restarted empty while the leader probes it. It
    recovers instead, and the leader's messages to it stay at heartbeat pace (the old code
    sent 93,358 messages in 5 s and never caught it up)."""
    async with cluster(tmp_path, 3) as c:
        leader = await c.leader()
        for i in range(50):
            await leader.append(f"x{i}".encode())
        victim = next(n for n in c.running() if n is not leader)
        vid = victim.node_id
        await c.converge()
        await c.stop(vid)
        FsLog.destroy(str(tmp_path), f"node{vid}")
        (tmp_path / f"node{vid}.raftstate").unlink()
        sent = 0
        orig = c.net._deliver

        def counting(frm, to, msg):
            nonlocal sent
            if to == vid:
                sent += 1
            orig(frm, to, msg)

        c.net._deliver = counting
        node = await c.start(vid)
        await c.converge(15)
        assert node.seq == leader.seq and not node._core.recovering
        await trio.sleep(2.0)
        # Heartbeats every 50 ms for a few seconds, plus catch-up: a few hundred at most.
        assert sent < 400, sent


async def test_send_queue_is_bounded_in_bytes(tmp_path, monkeypatch):
    """An async send that never completes: the per-peer queue drops its oldest messages
    once it holds more than the byte budget (it held up to 4,096 messages of up to 1 MiB)."""
    monkeypatch.setattr(node_mod, "_SEND_QUEUE_BYTES", 2 << 20)
    stuck = trio.Event()

    async def send(to, msg):
        await stuck.wait()

    node = RaftNode(1, [1, 2, 3], send, FsLog(str(tmp_path), "n1", fsync=False), **FAST,
                    bootstrap=True)
    async with node:
        for _ in range(12):
            node._send(2, m.AppendEntries(1, -1, 0, (Entry(0, 1, b"x" * (512 << 10)),), -1))
        await trio.sleep(0)
        assert node._send_bytes[2] <= 2 << 20
        assert node.dropped_messages >= 8
        queued = sum(node_mod._payload_bytes(x) for x in node._send_queues[2])
        assert queued == node._send_bytes[2]


async def test_result_memory_is_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(node_mod, "_RESULT_MEMORY_BYTES", 1 << 20)
    node = _unstarted(tmp_path)
    big = b"r" * (256 << 10)
    node._finish_applied([Entry(s, 1, b"x") for s in range(10)], [big] * 10)
    assert node._recent_bytes <= 1 << 20 and node._recent_count == 4
    assert [seq for seq, _, _ in node._recent(0, 9)] == [6, 7, 8, 9]  # the newest kept


async def test_late_answers_come_from_the_results_memory_across_chunks(tmp_path):
    """Results are remembered per applied chunk: an answer that spans two chunks is put
    together in order, and a term that does not match fails it."""
    node = _unstarted(tmp_path)
    node._finish_applied([Entry(s, 1, b"x") for s in range(0, 3)], [b"a0", b"a1", b"a2"])
    node._finish_applied([Entry(s, 2, b"x") for s in range(3, 6)], [b"b3", b"b4", b"b5"])
    node._apply_seq = 5
    assert await node._register(3, 4, 2).wait() == [b"b3", b"b4"]
    assert [r for _, _, r in node._recent(1, 4)] == [b"a1", b"a2", b"b3", b"b4"]
    lost = node._register(2, 3, 2)  # seq 2 was written in term 1: not this append's
    with pytest.raises(LeadershipLostError):
        await lost.wait()
