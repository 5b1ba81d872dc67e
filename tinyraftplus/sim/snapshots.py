"""Snapshots in the simulator: what one simulated node's driver does with them.

This is the simulator's model of the node driver's snapshot code, with every storage step a
place a crash can land (``snapfiles.py`` models what survives):

* **Taking** (``on_applied``): after applying a seq that ends a multiple of
  ``snapshot_entries`` entries, the node captures its state machine (``snapshot()``: every
  node captures the same bytes at the same seq, which the simulator checks) and writes it
  in the background, one storage step per event while the node goes on applying: temp
  write, fsync, rename, directory fsync, prune (keep the newest two), then compaction of
  the log to ``min(snapshot seq, applied - trailing_entries, core.snapshot_floor())``.
* **Serving** (``latest_snapshot`` / ``read_chunk``): the core's ``SnapshotSource``.
* **Receiving** (``on_piece``): pieces of an ``InstallSnapshot`` go to a partial file,
  fsynced every ``SYNC_EVERY`` bytes, that survives restarts as far as it reached the disk
  (what follows the last fsync may be lost or garbage); the begin message is answered with
  its length (so the transfer resumes there); each chunk's CRC is checked; once whole, the
  snapshot's CRC is checked (a partial damaged by a crash fails it: discarded and answered
  ``SNAP_CORRUPT``, as the real driver does: every chunk passed, so it blames the leader's
  copy, which the leader sets aside (``damaged``) before taking a new snapshot), then:
  fsync, rename, directory fsync, restore the state machine, make the log start after the
  snapshot (kept only if it holds the snapshot's last entry), tell the core
  (``snapshot_installed``).
* **Restarting** (``restore_at_start``): the newest snapshot whose CRC is good (damaged ones
  are removed, never restored), then the log after it; a log that starts after the
  snapshot's seq + 1 means entries were lost: reported as a violation.

Faults of its own (``_Profile.snap_crash`` / ``snap_rot``, drawn from the seed when
snapshots are on): a crash placed at a random step of a snapshot being written or
installed, and a bit flipped at rest in a node's newest snapshot while the node is down
(only where an older snapshot and the log can stand in for it, the damage the design
claims to survive). The network may damage ``InstallSnapshot`` chunks
(``NetworkFaults.snap_corrupt``).

Planted bugs (test-only): ``compact_past_snapshot`` compacts the log without bounding it by
the snapshot's seq; ``restore_unchecked`` restores what it holds without checking chunk or
snapshot CRCs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from ..entry import Entry
from ..raft.membership import Config
from ..raft.messages import SNAP_BEGIN, SNAP_CORRUPT, SNAP_OK, SNAP_REJECTED, InstallSnapshot
from ..raft.snapshot import SnapshotBase, crc32c
from ..snapshot.meta import SnapshotMeta
from .snapfiles import PARTIAL, final_name, good
from .store import SimCrash

if TYPE_CHECKING:
    from .cluster import SimNode

__all__ = ["NodeSnapshots", "SNAPSHOT_BUGS", "KEEP"]

SNAPSHOT_BUGS = frozenset({"compact_past_snapshot", "restore_unchecked"})
KEEP = 2  # complete snapshots kept
SYNC_EVERY = 1024  # bytes: a follower fsyncs its partial snapshot each time it passes one
EARLY_MAX = 8  # chunks a follower keeps that overtook a missing one (as RaftNode does)


def _meta_extra(config_seq: int, config_term: int) -> bytes:
    return msgpack.packb([config_seq, config_term])


def base_of(meta: SnapshotMeta) -> SnapshotBase:
    """The core's view of a snapshot: its last entry and the configuration in force there
    (``extra`` holds the seq and term of the entry that carries that configuration)."""
    assert meta.config is not None
    cseq, cterm = msgpack.unpackb(meta.extra) if meta.extra else (-1, 0)
    return SnapshotBase(meta.seq, meta.term, Config.decode(meta.config), int(cseq), int(cterm))


class _Job:
    """A snapshot being written: the remaining steps, one per event."""

    __slots__ = ("meta", "data", "steps", "crash_at", "gen")

    def __init__(self, meta: SnapshotMeta, data: bytes, gen: int, crash_at: int) -> None:
        self.meta = meta
        self.data = data
        self.steps = ["snapshot temp write", "snapshot fsync", "snapshot rename",
                      "snapshot dir fsync", "snapshot prune", "compact"]
        self.crash_at = crash_at  # index of the step before which the node crashes, or -1
        self.gen = gen


class NodeSnapshots:
    """One node's snapshots for one life of the node (a restart makes a new one)."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.sim = node.sim
        self.store = node.store
        self.every = node.sim.snapshot_entries
        self.unchecked = "restore_unchecked" in node.sim.config.bugs
        self.job: _Job | None = None
        self.early: dict[tuple[tuple[int, int, int, int], int], bytes] = {}
        """Chunks received ahead of a missing one, by (snapshot ident, offset); lost with
        this life of the node, as the real driver's are."""
        self.bad: set[tuple[int, int, int, int]] = set()  # idents a follower found damaged
        self.requested = False  # a new snapshot is wanted once the one being written is
        self.last = -1  # seq of the newest snapshot taken or installed
        # the configuration in force at the applied seq: (seq, term, Config) of its entry
        self.config: tuple[int, int, Config] = (-1, 0, Config(frozenset(node.sim.voter_ids)))

    # --- SnapshotSource (the core reads these) ------------------------------------------
    def latest_snapshot(self) -> SnapshotMeta | None:
        finals = self.store.snaps.finals()
        if not finals or finals[0][0].ident in self.bad:
            return None  # set aside until a new one is taken
        return finals[0][0]

    def damaged(self, meta: SnapshotMeta) -> None:
        """A follower found this snapshot's bytes wrong (``SNAP_CORRUPT``): no longer
        offered; a new one is taken now (as the real driver does)."""
        self.bad.add(meta.ident)
        self.sim.snap_stats["set aside"] += 1
        self.sim.trace("snap-set-aside", self.node.id, meta.seq)
        if self.job is None:
            self._take_now()
        else:
            self.requested = True

    def read_chunk(self, meta: SnapshotMeta, offset: int, n: int) -> bytes | None:
        data = self.store.snaps.read(final_name(meta))
        return None if data is None else data[offset:offset + n]

    # --- restart --------------------------------------------------------------------------
    def restore_at_start(self) -> SnapshotBase | None:
        """Restore the newest good snapshot and make the log continue after it; returns the
        core's ``snapshot_base`` (None: no snapshot, the log starts at seq 0)."""
        node, sim, store = self.node, self.sim, self.store
        snaps = store.snaps
        for name in snaps.names():
            if name.startswith("tmp-"):
                snaps.unlink(name, "snapshot prune")  # a crash interrupted its writing
        first = store.first_seq
        chosen: tuple[SnapshotMeta, bytes] | None = None
        for meta, name in snaps.finals():
            data = snaps.read(name)
            assert data is not None
            if not self.unchecked and not good(meta, data):
                sim.snap_stats["damaged"] += 1
                sim.trace("snap-damaged", node.id, name, "removed, not restored")
                snaps.unlink(name, "snapshot prune")
                continue
            chosen = (meta, data)
            break
        if chosen is None:
            if first > 0:
                sim.fail("snapshot restart",
                         f"node {node.id} cannot restart: its log starts at seq {first} and "
                         "it has no good snapshot (entries 0.." f"{first - 1} are lost)",
                         [node.id])
            return None
        meta, data = chosen
        if meta.seq < first - 1:
            sim.fail("snapshot restart",
                     f"node {node.id} cannot restart: its log starts at seq {first} but its "
                     f"newest good snapshot ends at seq {meta.seq} (entries {meta.seq + 1}.."
                     f"{first - 1} are lost: the log was compacted past the newest snapshot that "
                     "survived)",
                     [node.id])
        self._install_state(meta, data, "restored at restart")
        sim.snap_stats["restores"] += 1
        sim.trace("snap-restore", node.id, meta.seq, meta.term, f"log {store.first_seq}.."
                  f"{store.seq}")
        return base_of(meta)

    def _install_state(self, meta: SnapshotMeta, data: bytes, how: str) -> None:
        """State machine and log to snapshot ``meta`` (the bytes are what the driver
        holds: checked, or not with the planted bug)."""
        node, sim, store = self.node, self.sim, self.store
        sim.inv.on_snapshot(node.id, meta.seq, crc32c(data), how)
        assert node.sm is not None
        node.sm.restore(data)
        s = meta.seq
        if not (store.first_seq - 1 <= s <= store.seq and store.term_at(s) == meta.term):
            committed = sim.inv.committed
            chain = committed[s][1] if s < len(committed) else 0
            store.reset(s, meta.term, chain)
            store.sync_log()
        node.applied = s
        self.last = max(self.last, s)
        b = base_of(meta)
        self.config = (b.config_seq, b.config_term, b.config)

    # --- taking ------------------------------------------------------------------------------
    def on_applied(self, e: Entry) -> None:
        """The node applied ``e``: follow the configuration; snapshot if one is due."""
        if e.kind:
            self.config = (e.seq, e.term, Config.decode(e.data))
        n = self.every
        if not n or (e.seq + 1) % n or e.seq <= self.last:
            return
        self._capture(e.seq, e.term)

    def _take_now(self) -> None:
        node = self.node
        if node.applied >= 0 and node.sm is not None:
            self._capture(node.applied, self.store.term_at(node.applied))

    def _capture(self, seq: int, term: int) -> None:
        node, sim = self.node, self.sim
        assert node.sm is not None
        data = node.sm.snapshot()  # type: ignore[attr-defined]
        cseq, cterm, cfg = self.config
        meta = SnapshotMeta(seq, term, len(data), crc32c(data), cfg.encode(),
                            _meta_extra(cseq, cterm))
        self.last = max(self.last, seq)
        sim.inv.on_snapshot(node.id, seq, meta.crc, "took")
        if self.job is not None:
            sim.snap_stats["skipped"] += 1  # the previous one is still being written
            return
        sim.snap_stats["taken"] += 1
        r = sim.snap_rng
        crash_at = -1
        if not sim.stopping and r.random() < sim.profile.snap_crash:
            crash_at = r.randrange(6)
        self.job = job = _Job(meta, data, node.crash_gen, crash_at)
        sim.trace("snap-take", node.id, seq, term, len(data))
        sim.queue.after(r.uniform(0.0, 0.004), self._job_step, job)

    def _job_step(self, job: _Job) -> None:
        node, sim = self.node, self.sim
        if self.job is not job or not node.up or node.crash_gen != job.gen:
            return
        what = job.steps.pop(0)
        if job.crash_at == 5 - len(job.steps) and not sim.stopping and sim._can_crash_one():
            sim.snap_stats["crash " + what] += 1
            self.job = None
            node.crash(f"crash before snapshot step '{what}'")
            return
        try:
            self._do(job, what)
        except SimCrash as crash:
            node.crash(str(crash))
            return
        if job.steps:
            sim.queue.after(sim.snap_rng.uniform(0.0, 0.004), self._job_step, job)
        else:
            self.job = None
            self.bad.discard(job.meta.ident)  # (a damaged one, taken again)
            if self.requested:
                self.requested = False
                self._take_now()
            if node.core is not None:
                node.process()  # the core may now send this snapshot to someone

    def _do(self, job: _Job, what: str) -> None:
        store = self.store
        snaps = store.snaps
        meta = job.meta
        final = final_name(meta)
        tmp = "tmp-" + final
        if what == "snapshot temp write":
            snaps.create(tmp, meta, job.data, what)
        elif what == "snapshot fsync":
            snaps.fsync(tmp, what)
        elif what == "snapshot rename":
            snaps.rename(tmp, final, what)
        elif what == "snapshot dir fsync":
            snaps.dir_fsync(what)
        elif what == "snapshot prune":
            self._prune()
        else:
            self._compact(meta.seq)

    def _prune(self) -> None:
        snaps = self.store.snaps
        for _meta, name in snaps.finals()[KEEP:]:
            snaps.unlink(name, "snapshot prune")

    def _compact(self, snap_seq: int) -> None:
        node, sim, store = self.node, self.sim, self.store
        core = node.core
        upto = node.applied - sim.trailing_entries
        if "compact_past_snapshot" not in sim.config.bugs:
            upto = min(upto, snap_seq)
        floor = core.snapshot_floor() if core is not None else None
        if floor is not None:
            upto = min(upto, floor)
        if upto > store.first_seq - 1:
            store.compact(upto)
            sim.snap_stats["compactions"] += 1
            sim.trace("compact", node.id, upto, store.first_seq)

    # --- receiving -----------------------------------------------------------------------------
    def on_piece(self, frm: Any, m: InstallSnapshot) -> None:
        """One piece of a snapshot from the leader ``frm`` (``Ready.snapshot_in``)."""
        node, sim, store = self.node, self.sim, self.store
        core = node.core
        assert core is not None
        snaps = store.snaps
        ident = (m.seq, m.snap_term, m.size, m.crc)
        pm = snaps.meta(PARTIAL)
        if m.begin:
            if pm is None or pm.ident != ident:
                if pm is not None:
                    snaps.unlink(PARTIAL, "partial discard")
                snaps.create(PARTIAL, SnapshotMeta(m.seq, m.snap_term, m.size, m.crc,
                                                   m.config, m.extra), b"", "partial create")
                snaps.dir_fsync("partial dir fsync")
            elif snaps.size(PARTIAL) > 0:
                sim.snap_stats["resumed"] += 1  # (after a restart, a new leader, a stall)
            core.snapshot_reply(frm, m, SNAP_OK, snaps.size(PARTIAL))
        elif pm is None or pm.ident != ident:
            core.snapshot_reply(frm, m, SNAP_BEGIN, 0)
            return
        else:
            held = snaps.size(PARTIAL)
            good_chunk = self.unchecked or crc32c(m.data) == m.chunk_crc
            if m.offset != held and good_chunk:
                # As the real driver does: a chunk held already is answered with the offset,
                # one that overtook a missing one is kept in memory (a few) and refused.
                if m.offset < held:
                    core.snapshot_reply(frm, m, SNAP_OK, held)
                    return
                if len(self.early) < EARLY_MAX:
                    self.early[(ident, m.offset)] = m.data
            if m.offset != held:
                core.snapshot_reply(frm, m, SNAP_REJECTED, held)
                return
            if not good_chunk:
                sim.snap_stats["damaged"] += 1
                sim.trace("snap-chunk-damaged", node.id, m.seq, m.offset)
                core.snapshot_reply(frm, m, SNAP_REJECTED, held)
                return
            snaps.append(PARTIAL, m.data)
            now = held + len(m.data)
            while (ident, now) in self.early:
                piece = self.early.pop((ident, now))
                snaps.append(PARTIAL, piece)
                now += len(piece)
                sim.snap_stats["early"] += 1
            if now // SYNC_EVERY > held // SYNC_EVERY:
                snaps.fsync(PARTIAL, "partial fsync")  # what a restart resumes from
            core.snapshot_reply(frm, m, SNAP_OK, now)
        if snaps.size(PARTIAL) < m.size:
            return
        meta = snaps.meta(PARTIAL)
        data = snaps.read(PARTIAL)
        assert meta is not None and data is not None
        if not self.unchecked and not good(meta, data):
            # (in the simulator: a partial damaged by a crash, its unsynced bytes reached
            # the disk as garbage; every chunk passed, so the real driver blames the
            # leader's copy: SNAP_CORRUPT, and the leader takes a new snapshot)
            sim.snap_stats["damaged"] += 1
            sim.trace("snap-partial-damaged", node.id, m.seq, "discarded, SNAP_CORRUPT")
            snaps.unlink(PARTIAL, "partial discard")
            core.snapshot_reply(frm, m, SNAP_CORRUPT, 0)
            return
        r = sim.snap_rng
        armed = False
        if (not sim.stopping and not store.crash_armed and r.random() < sim.profile.snap_crash
                and sim._can_crash_one()):
            store.arm_crash(r.randrange(6))  # somewhere in the install's storage steps
            armed = True
        snaps.fsync(PARTIAL, "partial fsync")
        name = final_name(meta)
        snaps.rename(PARTIAL, name, "partial rename")
        snaps.dir_fsync("partial dir fsync")
        self._install_state(meta, data, "received")
        self._prune()
        if armed:
            store.disarm()
        sim.snap_stats["installs"] += 1
        sim.trace("snap-install", node.id, meta.seq, meta.term, "from", frm,
                  f"log {store.first_seq}..{store.seq}")
        core.snapshot_installed(base_of(meta), frm, (meta.crc, meta.size))
        node.after_install(meta.seq)

    # --- faults ----------------------------------------------------------------------------------
    def rot(self) -> bool:
        """While the node is down: flip a bit of its newest snapshot if an older good one
        and the log can stand in for it (see the module docstring). True if done."""
        store = self.store
        snaps = store.snaps
        finals = snaps.finals()
        if not finals:
            return False
        first = store.first_seq
        ok = first == 0 or any(
            m.seq >= first - 1 and good(m, snaps.read(n) or b"") for m, n in finals[1:]
        )
        if not ok:
            return False
        snaps.rot(finals[0][1])
        self.sim.trace("snap-rot", self.node.id, finals[0][1])
        return True
