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
        crcs = set()
        for n in c.nodes.values():
            store = SnapshotStore(str(tmp_path), f"node{n.node_id}")
            store.open()
            crcs.add(store.latest().ident)  # type: ignore[union-attr]
        assert len(crcs) == 1


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
