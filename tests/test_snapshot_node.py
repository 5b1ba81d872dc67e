"""Snapshots through ``RaftNode``: policy, compaction, restart from a snapshot, and a
follower behind the leader's compaction caught up by InstallSnapshot (real FsLog and
snapshot files, in-memory network)."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
import trio
from cluster import FAST, Cluster, cluster

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.errors import InvalidArgumentError
from tinyraftplus.snapshot import SnapshotStore


class ListSM:
    """Keeps every payload applied; snapshots them as msgpack, in pieces."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.restored: list[int] = []

    def apply(self, bufs: list[bytes | None], seq: int) -> list[Any]:
        for b in bufs:
            if b is not None:
                self.items.append(b)
        return [len(self.items)] * len(bufs)

    def read(self, cmd: Any) -> int:
        return len(self.items)

    def snapshot(self) -> Any:
        captured = list(self.items)  # capture: a copy of references

        def chunks() -> Any:
            for i in range(0, len(captured), 100):
                yield msgpack.packb(captured[i:i + 100])

        return chunks()

    def restore(self, meta: Any, stream: Any) -> None:
        items: list[bytes] = []
        unpacker = msgpack.Unpacker(stream, read_size=4096)
        for part in unpacker:
            items.extend(part)
        self.items = items
        self.restored.append(meta.seq)


class SnapCluster(Cluster):
    def make(self, i: Any, **extra: Any) -> RaftNode:
        log = FsLog(str(self.root), f"node{i}", fsync=self.fsync, segment_size=4096)
        opts = {**FAST, **self.opts, **extra}
        opts.setdefault("bootstrap", i not in self.nodes)
        sm = self.sms[i] = ListSM()  # type: ignore[assignment]
        opts.setdefault("apply", sm.apply)
        opts.setdefault("read", sm.read)
        opts.setdefault("snapshot", sm.snapshot)
        opts.setdefault("restore", sm.restore)
        node = RaftNode(i, self.ids, self.net.sender(i), log, **opts)
        self.net.attach(node)
        self.nodes[i] = node
        return node


async def _write(node: RaftNode, n: int, start: int = 0) -> None:
    for k in range(start, start + n):
        await node.append(b"v%06d" % k + b"." * 60)


@pytest.fixture
def snapc(monkeypatch: pytest.MonkeyPatch) -> Any:
    import cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "Cluster", SnapCluster)
    return cluster


async def test_policy_snapshots_at_aligned_seqs_and_compacts(tmp_path, snapc) -> None:
    async with snapc(tmp_path, snapshot_entries=50, trailing_entries=10) as c:
        leader = await c.leader()
        await _write(leader, 230)
        await c.converge()
        await trio.sleep(0.3)
        for n in c.nodes.values():
            store = SnapshotStore(str(tmp_path), f"node{n.node_id}")
            store.open()
            seqs = [m.seq for m in store.list()]
            assert seqs and all((s + 1) % 50 == 0 for s in seqs), seqs
            assert len(seqs) <= 2  # keep=2
            assert n.log.first_seq > 0, "the log was never compacted"
            assert n.log.first_seq - 1 <= seqs[-1]  # never past the snapshot
        # identical bytes on every replica at the same seq
        by_seq: dict[int, set] = {}
        for n in c.nodes.values():
            store = SnapshotStore(str(tmp_path), f"node{n.node_id}")
            store.open()
            for meta in store.list():
                by_seq.setdefault(meta.seq, set()).add(meta.ident)
        assert all(len(v) == 1 for v in by_seq.values()), by_seq


async def test_on_demand_snapshot_and_restart_restores_it(tmp_path, snapc) -> None:
    async with snapc(tmp_path, snapshot_entries=0) as c:
        leader = await c.leader()
        await _write(leader, 120)
        await c.converge()
        metas = {i: await n.snapshot() for i, n in c.nodes.items()}
        assert all(m.seq == leader.apply_seq for m in metas.values())
        again = await leader.snapshot()  # nothing new: the same snapshot
        assert again.ident == metas[leader.node_id].ident
        await _write(leader, 7, start=120)
        await c.converge()
        ids = list(c.nodes)
        for i in ids:
            await c.stop(i)
        for i in ids:
            await c.start(i)
        new = await c.leader()
        await _write(new, 1, start=127)
        await c.converge()
        for i in ids:
            sm = c.sms[i]
            assert sm.restored == [metas[i].seq]  # type: ignore[attr-defined]
            assert len(sm.items) == 128  # type: ignore[attr-defined]
            assert sm.items[-1].startswith(b"v000127")  # type: ignore[attr-defined]


async def test_follower_behind_compaction_catches_up_by_install(tmp_path, snapc) -> None:
    async with snapc(tmp_path, snapshot_entries=40, trailing_entries=5,
                     snapshot_chunk=512) as c:
        leader = await c.leader()
        lag = next(i for i in c.nodes if i != leader.node_id)
        await _write(leader, 10)
        await c.converge()
        await c.stop(lag)
        await _write(leader, 300, start=10)
        await trio.sleep(0.3)
        assert leader.log.first_seq > 20, "the leader did not compact"
        node = await c.start(lag)
        await _write(leader, 5, start=310)
        await c.converge(timeout=20)
        assert node.snapshots_installed == 1
        sm = c.sms[lag]
        assert sm.items == c.sms[leader.node_id].items  # type: ignore[attr-defined]
        assert len(sm.items) == 315  # type: ignore[attr-defined]
        assert node.log.first_seq > 0
        # and it restarts from what it installed
        await c.stop(lag)
        node = await c.start(lag)
        await c.converge(timeout=20)
        assert c.sms[lag].items == c.sms[leader.node_id].items  # type: ignore[attr-defined]


def test_bad_snapshot_options(tmp_path) -> None:
    log = FsLog(str(tmp_path), "x")
    sm = ListSM()
    with pytest.raises(InvalidArgumentError, match="both snapshot= and restore="):
        RaftNode(1, [1], lambda *a: None, log, snapshot=sm.snapshot)
    with pytest.raises(InvalidArgumentError, match="snapshot_entries"):
        RaftNode(1, [1], lambda *a: None, log, snapshot_entries=10)
    with pytest.raises(InvalidArgumentError, match="trailing_entries"):
        RaftNode(1, [1], lambda *a: None, log, snapshot=sm.snapshot, restore=sm.restore,
                 trailing_entries=-1)


async def test_damaged_newest_snapshot_falls_back_to_the_previous(tmp_path, snapc) -> None:
    async with snapc(tmp_path, n=1, snapshot_entries=0) as c:
        node = c.nodes[1]
        await c.leader()
        await _write(node, 20)
        first = await node.snapshot()
        await _write(node, 20, start=20)
        second = await node.snapshot()
        await c.stop(1)
        # flip a bit in the newest snapshot's data
        store = SnapshotStore(str(tmp_path), "node1")
        store.open()
        path = os.path.join(str(tmp_path), "node1.snap")
        name = sorted(os.listdir(path))[-1]
        with open(os.path.join(path, name), "r+b") as f:
            f.seek(-3, os.SEEK_END)
            b = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([b[0] ^ 0x10]))
        warned: list[str] = []
        events: list = []
        node = c.make(1)
        node.on("warn", lambda ev: warned.append(ev.message))
        node.on("snapshot", events.append)
        await c.nursery.start(node.serve)
        await c.leader()
        await c.converge()
        sm = c.sms[1]
        assert sm.restored == [first.seq]  # type: ignore[attr-defined]
        assert len(sm.items) == 40  # type: ignore[attr-defined]
        assert second.seq > first.seq
        assert any("damaged" in w for w in warned), warned
        await node.snapshot()
        assert events and events[-1].seq == node.apply_seq and events[-1].installed is False


class AsyncListSM(ListSM):
    """The same, with async apply, snapshot and restore (an apply that awaits midway)."""

    async def apply(self, bufs: list[bytes | None], seq: int) -> list[Any]:  # type: ignore[override]
        await trio.sleep(0)
        return super().apply(bufs, seq)

    async def snapshot(self) -> Any:  # type: ignore[override]
        captured = list(self.items)
        await trio.sleep(0)

        async def chunks() -> Any:
            for i in range(0, len(captured), 100):
                await trio.sleep(0)
                yield msgpack.packb(captured[i:i + 100])

        return chunks()

    async def restore(self, meta: Any, stream: Any) -> None:  # type: ignore[override]
        await trio.sleep(0)
        super().restore(meta, stream)


async def test_async_state_machine_snapshots_at_the_boundary(tmp_path, snapc,
                                                             monkeypatch) -> None:
    monkeypatch.setattr(__import__(__name__), "ListSM", AsyncListSM)
    async with snapc(tmp_path, snapshot_entries=30, trailing_entries=5,
                     snapshot_chunk=256) as c:
        leader = await c.leader()
        lag = next(i for i in c.nodes if i != leader.node_id)
        await c.stop(lag)
        for k in range(150):
            await leader.append(b"a%05d" % k)
        await trio.sleep(0.3)
        node = await c.start(lag)
        await leader.append(b"last")
        await c.converge(timeout=20)
        assert node.snapshots_installed == 1
        for n in c.nodes.values():
            assert c.sms[n.node_id].items == c.sms[leader.node_id].items  # type: ignore[attr-defined]
        # every snapshot holds exactly the entries through its seq (captured at the boundary)
        store = SnapshotStore(str(tmp_path), f"node{leader.node_id}")
        store.open()
        for meta in store.list():
            with store.open_data(meta) as f:
                got = [x for part in msgpack.Unpacker(f) for x in part]
            assert (meta.seq + 1) % 30 == 0
            assert len(got) == meta.seq, (len(got), meta.seq)  # seq 0 is the no-op


async def test_log_deleted_beside_its_snapshot_is_refused(tmp_path, snapc) -> None:
    import shutil

    from tinyraftplus.errors import MemberStateLostError

    async with snapc(tmp_path, n=3, snapshot_entries=0) as c:
        leader = await c.leader()
        await _write(leader, 30)
        await c.converge()
        victim = next(i for i in c.nodes if i != leader.node_id)
        await c.nodes[victim].snapshot()
        await _write(leader, 5, start=30)
        await c.converge()
        await c.stop(victim)
        shutil.rmtree(os.path.join(str(tmp_path), f"node{victim}"))
        node = c.make(victim)
        with pytest.raises(MemberStateLostError, match="lost its log"):
            await node.serve()


async def test_boundary_reached_while_writing_waits_instead_of_skipping(tmp_path) -> None:
    # Found by a review: a boundary passed while the previous snapshot was still being
    # written was skipped, so replicas could hold snapshots at different seqs.
    release = trio.Event()
    sm = ListSM()

    async def slow_snapshot() -> Any:
        chunks = sm.snapshot()

        async def gen() -> Any:
            await release.wait()
            for c in chunks:
                yield c

        return gen()

    taken: list[int] = []
    net_log = FsLog(str(tmp_path), "solo")
    node = RaftNode(1, [1], lambda *a: None, net_log, **FAST, bootstrap=True, apply=sm.apply,
                    snapshot=slow_snapshot, restore=sm.restore, snapshot_entries=10)
    node.on("snapshot", lambda ev: taken.append(ev.seq))
    async with node:
        await node.wait_leader()
        async with trio.open_nursery() as nursery:
            for k in range(30):
                nursery.start_soon(node.append, b"x%d" % k)
            await trio.sleep(0.3)
            assert node.apply_seq == 19  # waits at the second boundary for the first write
            release.set()
        with trio.fail_after(5):
            while len(taken) < 3:
                await trio.sleep(0.01)
    assert taken == [9, 19, 29]


async def test_idempotency_keys_survive_a_restart_from_snapshot(tmp_path, snapc) -> None:
    async with snapc(tmp_path, n=1, snapshot_entries=0) as c:
        node = c.nodes[1]
        await c.leader()
        first = await node.append(b"keyed", key=("client-a", 7))
        await _write(node, 5)
        await node.snapshot()
        await c.stop(1)
        node = await c.start(1)
        await c.leader()
        again = await node.append(b"keyed", key=("client-a", 7))
        assert again.result == first.result
        assert c.sms[1].items.count(b"keyed") == 1  # type: ignore[attr-defined]


def test_snapshot_chunk_must_fit_a_frame(tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="snapshot_chunk"):
        RaftNode(1, [1], lambda *a: None, FsLog(str(tmp_path), "x"), snapshot_chunk=64 << 20)
