"""RaftCore over the real durable log: ``FsLog`` as ``LogStorage``, driven exactly as the
contract says (a minimal sequential driver, no RaftNode), so that the core's assumptions
about storage (``term_at(-1) == 0``, ``entries`` byte limits, truncation) meet the real
thing, across a close and reopen."""

from __future__ import annotations

import random

from tinyraftplus.entry import Entry
from tinyraftplus.log import FsLog
from tinyraftplus.raft.core import HardState, RaftConfig, RaftCore, Role


class MiniDriver:
    def __init__(self, root, ids, fsync=False, rpc_max_bytes=1 << 20):
        self.root, self.ids, self.fsync = root, ids, fsync
        self.cfg = RaftConfig(rpc_max=64, rpc_max_bytes=rpc_max_bytes)
        self.logs: dict = {}
        self.hard = {i: HardState() for i in ids}
        self.cores: dict = {}
        self.net: list = []
        self.now = 0.0

    async def open(self, i):
        log = FsLog(str(self.root), f"n{i}", fsync=self.fsync)
        await log.open()
        self.logs[i] = log
        self.cores[i] = RaftCore(i, self.ids, log, self.hard[i], config=self.cfg,
                                 rng=random.Random(hash(i) + 1), now=self.now)

    async def close(self, i):
        self.cores.pop(i)
        await self.logs.pop(i).close()

    async def handle(self, i):
        core, log = self.cores[i], self.logs[i]
        while core.has_ready():
            rd = core.ready()
            self.net += [(i, to, m) for to, m in rd.messages]
            if rd.hard_state is not None:
                self.hard[i] = rd.hard_state
            if rd.truncate_after is not None:
                await log.truncate(rd.truncate_after)
            if rd.entries:
                await log.append_batch([e.data for e in rd.entries], seq=rd.entries[0].seq,
                                       term=[e.term for e in rd.entries])
            core.advance(rd)
            self.net += [(i, to, m) for to, m in rd.messages_after_persist]

    async def pump(self):
        for i in list(self.cores):
            await self.handle(i)
        while self.net:
            batch, self.net = self.net, []
            for frm, to, m in batch:
                if to in self.cores and frm in self.cores:
                    self.cores[to].step(frm, m)
                    await self.handle(to)

    async def advance(self, dt):
        end = self.now + dt
        while self.now < end:
            self.now = min(end, min(c.next_deadline for c in self.cores.values()))
            for c in self.cores.values():
                c.tick(self.now)
            await self.pump()

    def leader(self):
        ls = [i for i, c in self.cores.items() if c.role is Role.LEADER]
        return max(ls, key=lambda i: self.cores[i].term) if ls else None


async def test_core_over_fslog_replicates_truncates_and_survives_reopen(tmp_path):
    d = MiniDriver(tmp_path, [1, 2, 3], rpc_max_bytes=4000)
    for i in d.ids:
        await d.open(i)
    while d.leader() is None:
        await d.advance(0.05)
    leader = d.leader()
    for k in range(300):
        d.cores[leader].propose([b"%04d" % k + b"x" * 200])
        if k % 50 == 0:
            await d.pump()
    await d.advance(0.3)
    top = d.logs[leader].seq
    want = [(e.seq, e.term, e.data) for e in d.logs[leader].entries(0, top, 1 << 30)]
    assert len(want) == 301
    for i in d.ids:
        log = d.logs[i]
        assert [tuple(e) for e in log.entries(0, log.seq, 1 << 30)] == want
        assert d.cores[i].commit_seq == 300

    # A follower cut off with a stale leader's extra entries gets them truncated on disk.
    f = next(i for i in d.ids if i != leader)
    other = next(i for i in d.ids if i not in (leader, f))
    await d.close(other)  # only leader and f are up; now cut f off as well
    saved_f = d.cores.pop(f)
    d.cores[leader].propose([b"lost-1", b"lost-2"])
    await d.pump()  # the leader persists them; nobody acknowledges
    assert d.logs[leader].seq == 302
    d.cores[f] = saved_f
    await d.close(leader)
    await d.open(other)
    await d.advance(3.0)  # f and other elect a new leader without the lost entries
    new = d.leader()
    assert new in (f, other)
    d.cores[new].propose([b"after"])
    await d.pump()
    await d.open(leader)  # the old leader returns: its two extra entries must go
    await d.advance(1.0)
    logs = {i: [tuple(e) for e in d.logs[i].entries(0, d.logs[i].seq, 1 << 30)]
            for i in d.ids}
    assert logs[1] == logs[2] == logs[3]
    datas = [x[2] for x in logs[1]]
    assert b"lost-1" not in datas and datas[-1] == b"after"

    # Close everything and reopen: hard state and logs carry the cluster on.
    terms = {i: d.hard[i].term for i in d.ids}
    for i in list(d.cores):
        await d.close(i)
    for i in d.ids:
        await d.open(i)
        assert d.cores[i].term == terms[i]
        assert d.cores[i].last_seq == len(datas) - 1
    while d.leader() is None:
        await d.advance(0.05)
    d.cores[d.leader()].propose([b"reopened"])
    await d.advance(0.3)
    for i in d.ids:
        assert d.logs[i].entries(d.logs[i].seq, d.logs[i].seq, 100)[0].data == b"reopened"
    for i in list(d.cores):
        await d.close(i)


async def test_fslog_entries_honour_the_byte_limit_the_core_relies_on(tmp_path):
    log = FsLog(str(tmp_path), "b", fsync=False)
    await log.open()
    await log.append_batch([b"a" * 100] * 10, term=[1] * 10)
    assert log.term_at(-1) == 0 and log.first_seq == 0
    assert len(log.entries(0, 9, 250)) == 2
    assert len(log.entries(0, 9, 10)) == 1  # at least one
    assert log.entries(3, 3, 1)[0] == Entry(3, 1, b"a" * 100)
    await log.close()
