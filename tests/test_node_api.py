"""The small public surface a user of the original expects: ``start()`` without a nursery says
what to do, ``is_leader()``, listeners that can be removed, and a term that survives ``stop()``.
"""

from __future__ import annotations

import pytest
import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.errors import UsageError
from tinyraftplus.events import EventHub, Listener
from tinyraftplus.transport.memory import MemoryNetwork

FAST = dict(election_timeout=0.3, ping_timeout=0.05)


def _single(tmp_path, **kw):
    net = MemoryNetwork()
    node = RaftNode(1, [1], net.sender(1), FsLog(str(tmp_path), "n1"), **FAST, **kw)
    net.attach(node)
    return node


async def test_start_without_a_nursery_says_the_two_ways(tmp_path):
    node = _single(tmp_path)
    with pytest.raises(UsageError) as info:
        await node.start()  # type: ignore[call-arg]
    msg = str(info.value)
    assert "\n" not in msg
    assert "async with node:" in msg and "await node.start(nursery)" in msg
    assert not node.running
    with pytest.raises(UsageError, match="nursery"):
        await node.start("not a nursery")  # type: ignore[arg-type]


async def test_start_with_a_nursery_still_works(tmp_path):
    node = _single(tmp_path)
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        await node.wait_leader()
        assert node.is_leader()
        await node.stop()


async def test_is_leader(tmp_path):
    ids = [1, 2, 3]
    net = MemoryNetwork()
    nodes = []
    for i in ids:
        n = RaftNode(i, ids, net.sender(i), FsLog(str(tmp_path), f"n{i}"), **FAST)
        net.attach(n)
        nodes.append(n)
    assert not any(n.is_leader() for n in nodes)  # not running
    async with trio.open_nursery() as nursery:
        for n in nodes:
            await n.start(nursery)
        leader_id = await nodes[0].wait_leader()
        with trio.fail_after(10):
            while not any(n.is_leader() for n in nodes):
                await trio.sleep(0.01)
        assert [n.node_id for n in nodes if n.is_leader()] == [leader_id]
        assert all(n.is_leader() == (n.state == "leader") for n in nodes)
        for n in nodes:
            await n.stop()
    assert not any(n.is_leader() for n in nodes)


async def test_on_returns_a_handle_that_removes_the_listener(tmp_path):
    node = _single(tmp_path)
    seen = []
    handle = node.on("commit", seen.append)
    assert isinstance(handle, Listener)
    async with node:
        await node.wait_leader()
        await node.append(b"one")
        assert seen
        handle.close()
        handle.close()  # idempotent
        n = len(seen)
        r = await node.append(b"two")
        await node.wait_commit(r.seq)
        assert len(seen) == n


async def test_on_handle_is_a_context_manager(tmp_path):
    node = _single(tmp_path)
    inside, after = [], []
    async with node:
        await node.wait_leader()
        with node.on(("commit", "apply"), inside.append):
            r = await node.append(b"x")
            await node.wait_apply(r.seq)
        assert {e.kind for e in inside} == {"commit", "apply"}
        count = len(inside)
        async with node.on("apply", after.append):
            r = await node.append(b"y")
            await node.wait_apply(r.seq)
        r = await node.append(b"z")
        await node.wait_apply(r.seq)
    assert len(inside) == count
    assert [e.seq for e in after] == [r.seq - 1]


def test_hub_listener_removes_only_itself():
    hub = EventHub(1)
    a, b = [], []
    la = hub.on("warn", a.append)
    hub.on("warn", b.append)
    hub.emit("warn", message="1")
    la.close()
    hub.emit("warn", message="2")
    assert [e.message for e in a] == ["1"]
    assert [e.message for e in b] == ["1", "2"]
    # the same callback registered twice is two listeners
    c = []
    l1 = hub.on("warn", c.append)
    hub.on("warn", c.append)
    l1.close()
    hub.emit("warn", message="3")
    assert [e.message for e in c] == ["3"]
    assert hub.off("warn", c.append) is None  # the old way still works
    hub.emit("warn", message="4")
    assert [e.message for e in c] == ["3"]


async def test_term_keeps_its_value_after_stop(tmp_path):
    node = _single(tmp_path)
    assert node.term == 0  # never ran: no term yet
    async with node:
        await node.wait_leader()
        term = node.term
        assert term >= 1
    assert node.state == "stopped"
    assert node.term == term
    # a new node object over the same directory reads the same durable term before start
    again = _single(tmp_path)
    assert again.term == term
    async with again:
        await again.wait_leader()
        assert again.term > term  # a new election
        later = again.term
    assert again.term == later


async def test_a_long_replay_does_not_block_the_event_loop(tmp_path):
    """A restarted node replays its log through a sync ``apply`` in slices: other tasks
    (the transport, clients' status requests) run between them."""
    import time as _time

    from tinyraftplus import FsLog, RaftNode

    async def fill() -> None:
        node = RaftNode(1, [1], lambda *a: None, FsLog(str(tmp_path), "r"), bootstrap=True,
                        election_timeout=0.3, ping_timeout=0.05)
        async with node:
            await node.wait_leader()
            for _ in range(30):
                await node.append_batch([b"x"] * 100)

    await fill()

    def slow_apply(bufs, seq):
        _time.sleep(0.0005 * len(bufs))  # about 1.5 s for the whole log
        return None

    node = RaftNode(1, [1], lambda *a: None, FsLog(str(tmp_path), "r"), apply=slow_apply,
                    apply_max=16, election_timeout=0.3, ping_timeout=0.05)
    gaps: list[float] = []
    async with node:
        last = _time.perf_counter()
        while node.apply_seq < 3000:
            await trio.sleep(0.005)
            now = _time.perf_counter()
            gaps.append(now - last)
            last = now
    assert len(gaps) > 10
    assert max(gaps) < 0.25, f"the event loop was blocked for {max(gaps):.2f} s"
