"""InstallSnapshot in the sans-io core, driven by the deterministic test cluster: a follower
behind the leader's compaction catches up by a snapshot sent in chunks; interrupted
transfers resume from the follower's offset; damaged chunks are refused and resent; a
snapshot over a conflicting log replaces it; compaction never strands anyone."""

from __future__ import annotations

import msgpack
import pytest

from tinyraftplus.entry import Entry
from tinyraftplus.raft.core import RaftConfig, Ready
from tinyraftplus.raft.messages import (
    SNAP_BEGIN,
    SNAP_DONE,
    SNAP_OK,
    SNAP_REJECTED,
    AppendEntries,
    InstallSnapshot,
    SnapshotResponse,
)
from tinyraftplus.raft.snapshot import SnapshotBase, crc32c
from tinyraftplus.raft.testing import Cluster
from tinyraftplus.snapshot import SnapshotMeta

CHUNK = 64


class _Source:
    """One node's snapshots (in memory), as the core reads them."""

    def __init__(self) -> None:
        self.snaps: dict[tuple[int, int, int, int], bytes] = {}
        self.latest: SnapshotMeta | None = None

    def latest_snapshot(self) -> SnapshotMeta | None:
        return self.latest

    def read_chunk(self, meta: SnapshotMeta, offset: int, n: int) -> bytes | None:
        data = self.snaps.get(meta.ident)
        return None if data is None else data[offset:offset + n]


class SnapCluster(Cluster):
    """The test cluster plus snapshots: a node's state machine is the list of entries it
    applied; its snapshot is that list, msgpacked."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("config", RaftConfig(snapshot_chunk=CHUNK, snapshot_window=2,
                                           snapshot_timeout=5))
        self.sources: dict = {}
        self.partials: dict = {}  # node -> (meta, bytearray)
        self.installs: dict = {}
        self.corrupt_next: set = set()
        self.freeze_at: dict = {}  # node -> bytes held at which its transfer stops arriving
        self.frozen: set = set()
        super().__init__(*args, start=False, **kw)
        for i in self.ids:
            self.sources[i] = _Source()
            self.installs[i] = 0
        for i in self.ids:
            self.start(i)

    def start(self, i):
        import random

        from tinyraftplus.raft.core import RaftCore

        self._starts += 1
        src = self.sources[i]
        base = None
        if src.latest is not None:
            m = src.latest
            base = SnapshotBase(m.seq, m.term, self.cores_config(m))
        core = RaftCore(
            i, self.ids, self.logs[i], self.hard[i], config=self.config, quorum=self.quorum,
            rng=random.Random(self.seed * 7919 + self._starts), now=self.now,
            commit_seq=len(self.applied[i]) - 1, snapshots=src, snapshot_base=base,
        )
        self.cores[i] = core
        return core

    @staticmethod
    def cores_config(meta):
        from tinyraftplus.raft.membership import Config

        return Config.decode(meta.config)

    def take_snapshot(self, i, trailing: int = 0) -> SnapshotMeta:
        applied = self.applied[i]
        seq = len(applied) - 1
        data = msgpack.packb([[e.seq, e.term, e.data] for e in applied])
        core = self.cores[i]
        meta = SnapshotMeta(seq, applied[-1].term, len(data), crc32c(data),
                            core.configuration.encode())
        src = self.sources[i]
        src.snaps[meta.ident] = data
        src.latest = meta
        floor = core.snapshot_floor()
        upto = min(seq, seq - trailing)
        if floor is not None:
            upto = min(upto, floor)
        self.logs[i].compact(upto)
        return meta

    def handle_ready(self, i, rd: Ready) -> None:
        super().handle_ready(i, rd)
        core = self.cores[i]
        for frm, m in rd.snapshot_in:
            self._receive_piece(i, core, frm, m)

    def _receive_piece(self, i, core, frm, m: InstallSnapshot) -> None:
        ident = (m.seq, m.snap_term, m.size, m.crc)
        held = self.partials.get(i)
        if m.begin:
            if held is None or held[0] != ident:
                held = self.partials[i] = (ident, bytearray(), m.config)
            core.snapshot_reply(frm, m, SNAP_OK, len(held[1]))
        elif held is None or held[0] != ident:
            core.snapshot_reply(frm, m, SNAP_BEGIN, 0)
            return
        else:
            buf = held[1]
            data = m.data
            if i in self.corrupt_next:
                self.corrupt_next.discard(i)
                data = bytes([data[0] ^ 1]) + data[1:]
            if m.offset != len(buf) or crc32c(data) != m.chunk_crc:
                core.snapshot_reply(frm, m, SNAP_REJECTED, len(buf))
                return
            buf += data
            core.snapshot_reply(frm, m, SNAP_OK, len(buf))
            if len(buf) >= self.freeze_at.get(i, m.size + 1):
                del self.freeze_at[i]
                self.frozen.add(i)  # nothing more of it arrives until the test says so
        ident, buf, cfg = self.partials[i]
        if len(buf) < m.size:
            return
        assert crc32c(bytes(buf)) == m.crc
        del self.partials[i]
        # install: the state machine, then the log, then the core
        entries = [Entry(s, t, d) for s, t, d in msgpack.unpackb(bytes(buf))]
        self.applied[i] = entries
        log = self.logs[i]
        if not (log.first_seq - 1 <= m.seq <= log.seq and log.term_at(m.seq) == m.snap_term):
            log.reset(m.seq, m.snap_term)
        meta = SnapshotMeta(m.seq, m.snap_term, m.size, m.crc, cfg)
        src = self.sources[i]
        src.snaps[meta.ident] = bytes(buf)
        src.latest = meta
        self.installs[i] += 1
        core.snapshot_installed(SnapshotBase(m.seq, m.snap_term, self.cores_config(meta)),
                                frm, (m.crc, m.size))

    def _apply(self, i, commit):
        # Entries behind a node's snapshot are applied already.
        applied = self.applied[i]
        log = self.logs[i]
        if len(applied) < log.first_seq:
            self._fail(f"{i!r} applied {len(applied)} entries, its log starts at {log.first_seq}")
        super()._apply(i, commit)


def _write(c: SnapCluster, n: int, size: int = 40) -> None:
    for k in range(n):
        c.propose([f"v{k:05d}".encode().ljust(size, b".")])
        c.stabilize()


def _bytes_sent(c: SnapCluster, to) -> int:
    return sum(len(m.data) for f, t, m in c.sent if t == to and type(m) is InstallSnapshot)


def _caught_up(c: SnapCluster, i, leader) -> bool:
    return c.applied[i] == c.applied[leader] and len(c.applied[i]) > 0


def _lagging_follower(c: SnapCluster, writes: int = 30):
    leader = c.wait_leader()
    lag = next(i for i in c.ids if i != leader)
    c.stabilize()
    c.crash(lag)
    _write(c, writes)
    meta = c.take_snapshot(leader)
    assert c.logs[leader].first_seq == meta.seq + 1
    return leader, lag, meta


def test_follower_behind_compaction_catches_up_by_snapshot() -> None:
    c = SnapCluster([1, 2, 3])
    leader, lag, meta = _lagging_follower(c)
    _write(c, 5)  # entries after the snapshot too
    c.start(lag)
    c.run_until(lambda: _caught_up(c, lag, leader))
    assert c.installs[lag] == 1
    assert c.logs[lag].first_seq == meta.seq + 1
    # every byte sent once, in chunks of at most CHUNK
    assert _bytes_sent(c, lag) == meta.size
    sizes = {len(m.data) for f, t, m in c.sent if t == lag and type(m) is InstallSnapshot}
    assert max(sizes) <= CHUNK
    # it replicates normally afterwards, and the cluster still commits with it alone
    c.crash(next(i for i in c.ids if i not in (leader, lag)))
    _write(c, 3)
    c.run_until(lambda: _caught_up(c, lag, leader))
    assert len(c.applied[lag]) == len(c.applied[leader]) == meta.seq + 9
    c.check_log_matching()


@pytest.mark.parametrize("cut", ["connection", "leader_crash", "follower_crash"])
def test_interrupted_transfer_resumes_from_its_offset(cut: str) -> None:
    c = SnapCluster([1, 2, 3])
    leader = c.wait_leader()
    lag = next(i for i in c.ids if i != leader)
    other = next(i for i in c.ids if i not in (leader, lag))
    c.stabilize()
    c.crash(lag)
    _write(c, 60)
    # Both snapshot the same state: a new leader holds the very same bytes.
    c.run_until(lambda: c.applied[other] == c.applied[leader])
    meta = c.take_snapshot(leader)
    assert c.take_snapshot(other) == meta
    half = meta.size // 2
    c.freeze_at[lag] = half
    c.drop = lambda f, t, m: t in c.frozen and type(m) is InstallSnapshot
    c.start(lag)
    c.run_until(lambda: lag in c.frozen)
    held = len(c.partials[lag][1])
    assert half <= held < meta.size
    before = _bytes_sent(c, lag)
    if cut == "connection":
        c.partition([leader], [i for i in c.ids if i != leader])
        c.advance(0.3)
        c.heal()
    elif cut == "leader_crash":
        c.crash(leader)
    else:
        c.crash(lag)
        c.advance(0.3)
        c.start(lag)  # the partial survives: the driver keeps it on disk
    c.frozen.clear()
    new_leader = c.wait_leader() if cut == "leader_crash" else leader
    c.run_until(lambda: _caught_up(c, lag, new_leader))
    assert c.installs[lag] == 1
    resent = _bytes_sent(c, lag) - before - (meta.size - held)
    assert resent < 2 * CHUNK, f"re-sent {resent} bytes"


def test_damaged_chunk_is_refused_and_resent() -> None:
    c = SnapCluster([1, 2, 3])
    leader, lag, meta = _lagging_follower(c)
    c.corrupt_next.add(lag)
    c.start(lag)
    c.run_until(lambda: _caught_up(c, lag, leader))
    rejected = [m for f, t, m in c.sent if f == lag and type(m) is SnapshotResponse
                and m.status == SNAP_REJECTED]
    assert rejected
    assert c.installs[lag] == 1
    assert _bytes_sent(c, lag) < meta.size + 3 * CHUNK


def test_snapshot_over_a_conflicting_log_replaces_it() -> None:
    c = SnapCluster([1, 2, 3])
    leader = c.wait_leader()
    c.stabilize()
    lag = next(i for i in c.ids if i != leader)
    # The old leader appends entries nobody else gets, then is cut off.
    c.partition([leader], [i for i in c.ids if i != leader])
    for k in range(5):
        c.cores[leader].propose([b"lost%d" % k])
        c.handle(leader)
    lag = leader
    c.advance(2.0)
    new_leader = c.wait_leader()
    assert new_leader != lag
    c.partition([lag], [i for i in c.ids if i != lag])
    _write(c, 20)
    c.take_snapshot(new_leader)
    c.heal()
    c.run_until(lambda: _caught_up(c, lag, new_leader))
    assert c.installs[lag] == 1
    assert all(not e.data.startswith(b"lost") for e in c.logs[lag].all())
    c.check_log_matching()


def test_follower_already_covering_the_snapshot_answers_done_at_once() -> None:
    c = SnapCluster([1, 2, 3])
    leader = c.wait_leader()
    _write(c, 10)
    lag = next(i for i in c.ids if i != leader)
    meta = c.take_snapshot(leader)
    c.run_until(lambda: c.cores[lag].commit_seq >= meta.seq)
    core = c.cores[lag]
    core.step(leader, InstallSnapshot(core.term, meta.seq, meta.term, meta.size, meta.crc, 0,
                                      b"", 0, True, meta.config, b"", c.hard[leader].incarnation))
    rd = core.ready()
    done = [m for _, m in rd.messages if type(m) is SnapshotResponse]
    assert done and done[0].status == SNAP_DONE and not rd.snapshot_in
    core.advance(rd)


def test_stale_leader_snapshot_is_refused_with_the_newer_term() -> None:
    c = SnapCluster([1, 2, 3])
    leader = c.wait_leader()
    _write(c, 3)
    f = next(i for i in c.ids if i != leader)
    core = c.cores[f]
    core.step(leader, InstallSnapshot(core.term - 1 if core.term > 1 else 0, 100, 0, 10, 0, 0,
                                      b"", 0, True, None, b"", c.hard[leader].incarnation))
    rd = core.ready()
    assert not rd.snapshot_in
    core.advance(rd)


def test_heartbeats_flow_while_a_snapshot_is_sent() -> None:
    c = SnapCluster([1, 2, 3])
    leader, lag, meta = _lagging_follower(c, writes=80)
    since = len(c.sent)
    c.start(lag)
    c.freeze_at[lag] = 1
    c.drop = lambda f, t, m: t in c.frozen and type(m) is InstallSnapshot
    c.run_until(lambda: lag in c.frozen)
    c.advance(0.5)
    c.frozen.clear()
    n_hb = sum(1 for f, t, m in c.sent if t == lag and type(m) is AppendEntries)
    c.run_until(lambda: _caught_up(c, lag, leader))
    assert sum(1 for f, t, m in c.sent if t == lag and type(m) is AppendEntries) > n_hb
    # no entries were sent to it while it needed the snapshot
    ents = [m for f, t, m in c.sent[since:] if t == lag and type(m) is AppendEntries and m.entries
            and m.entries[0].seq <= meta.seq]
    assert not ents


def test_restart_from_snapshot_keeps_configuration_and_commit() -> None:
    c = SnapCluster([1, 2, 3])
    leader = c.wait_leader()
    _write(c, 12)
    for i in c.ids:
        c.take_snapshot(i)
    for i in c.ids:
        c.crash(i)
    for i in c.ids:
        c.start(i)
    new = c.wait_leader()
    _write(c, 3)
    assert c.cores[new].configuration.voters == frozenset(c.ids)
    for i in c.ids:
        c.run_until(lambda i=i: _caught_up(c, i, new))
    assert c.cores[leader].commit_seq >= 14


def test_restart_with_the_configuration_entry_compacted_away() -> None:
    # Found by the simulator: a restart from a snapshot whose configuration entry was
    # compacted away asked the log for that entry's term.
    from tinyraftplus.raft.core import RaftCore
    from tinyraftplus.raft.membership import Config

    c = SnapCluster([1, 2, 3])
    leader = c.wait_leader()
    _write(c, 3)
    core = c.cores[leader]
    core.propose_config(core.configuration.voters, frozenset())  # a configuration entry
    c.stabilize()
    cseq = core.config_seq
    cterm = core.term_at(cseq)
    _write(c, 10)
    meta = c.take_snapshot(leader)
    log = c.logs[leader]
    assert log.first_seq > cseq >= 0 and c.hard[leader].configs is not None
    base = SnapshotBase(meta.seq, meta.term, Config.decode(meta.config), cseq, cterm)
    c.crash(leader)
    again = RaftCore(leader, c.ids, log, c.hard[leader], config=c.config,
                     snapshots=c.sources[leader], snapshot_base=base)
    assert again.config_seq == cseq
    assert again.configuration.voters == frozenset(c.ids)


def test_conflict_hint_below_the_leaders_compaction_point() -> None:
    # Found by the simulator: a follower's conflict hint pointing below the leader's
    # compacted prefix made the leader ask its log for a term it no longer holds.
    c = SnapCluster([1, 2, 3])
    a = c.wait_leader()
    _write(c, 3)
    k = c.logs[a].seq
    c.partition([a], [i for i in c.ids if i != a])
    for n in range(30):
        c.cores[a].propose([b"lost%d" % n])
        c.handle(a)
    c.advance(2.0)
    b = c.wait_leader()
    _write(c, 40)
    others = [i for i in c.ids if i != a]
    c.run_until(lambda: all(c.applied[i] == c.applied[b] for i in others))
    for i in others:
        c.take_snapshot(i, trailing=c.logs[i].seq - (k + 10))
        c.crash(i)
    for i in others:
        c.start(i)
    lead = c.wait_leader()
    c.heal()
    c.run_until(lambda: c.applied[a] == c.applied[lead])
    assert not any(e.data.startswith(b"lost") for e in c.applied[a])


def test_install_keeps_the_config_index_of_a_kept_log() -> None:
    # Found by the simulator: installing a snapshot over a log that is kept forgot which of
    # its entries are configurations (storage keeps no entry kinds).
    from tinyraftplus.entry import ConfigEntry
    from tinyraftplus.raft.core import RaftCore
    from tinyraftplus.raft.membership import Config, ConfigStack
    from tinyraftplus.raft.memory import MemoryLog
    from tinyraftplus.raft.state import HardState

    cfg = Config(frozenset({1, 2, 3}))
    log = MemoryLog([Entry(0, 1, b""), Entry(1, 1, b"a"), Entry(2, 1, cfg.encode()),
                     Entry(3, 1, b"b"), Entry(4, 1, b"c")])
    hs = HardState(term=1, configs=ConfigStack(((2, 1, cfg),)), config_index=((2, 1),))
    core = RaftCore(2, [1, 2, 3], log, hs)
    assert type(core.read_entries(2, 2, 1 << 20)[0]) is ConfigEntry
    core.snapshot_installed(SnapshotBase(3, 1, cfg, 2, 1), None)
    assert type(core.read_entries(2, 2, 1 << 20)[0]) is ConfigEntry
