"""The core's side of snapshots (a mixin of ``RaftCore``): InstallSnapshot, both ends.

Theory of operation
-------------------
A node compacts its log behind a snapshot of its state machine (the driver decides when;
``tinyraftplus.node_snapshot``). A leader whose follower needs an entry it no longer holds
(``next < first_seq``) sends the newest snapshot instead (``SnapshotSource``), in chunks:

1. **begin**: an ``InstallSnapshot`` without data that names the snapshot (seq, term, size,
   CRC32C) and carries its configuration and extra state. The follower answers how many
   bytes of that very snapshot it already holds (``SNAP_OK``, offset): a transfer cut by a
   dropped connection, a leader change to a leader holding the same snapshot, or the
   follower's own crash resumes there, never from byte 0.
2. **chunks** of ``snapshot_chunk`` bytes, each with its CRC32C, at most ``snapshot_window``
   bytes ahead of what the follower acknowledged, so heartbeats and other peers' traffic
   interleave with a bounded amount of snapshot bytes. A chunk that arrives out of order or
   damaged is refused (``SNAP_REJECTED`` with the follower's offset); the leader goes back
   there once (later refusals of chunks sent before it went back are ignored) and sends that
   one chunk alone until it is answered; so does a transfer reopened mid-way (after a stall),
   at the offset the follower names. A follower may keep good chunks that came early
   (``RaftNode`` does, a few, in memory) and then answer past them, so that they are not
   sent twice.
3. When all bytes are there, the follower's driver checks the whole snapshot's CRC,
   restores its state machine, makes its log start after the snapshot (keeping it only if it
   holds the snapshot's last entry), and then calls ``snapshot_installed``: the core answers
   ``SNAP_DONE`` and the leader resumes replicating after the snapshot's seq.

One transfer at a time per follower, started only for a follower heard from recently;
replication to it waits, heartbeats go on. A transfer that makes no progress for
``snapshot_timeout`` heartbeat ticks (an unanswered opening: 3) begins again, and resumes at
the follower's offset; a follower no longer heard from is dropped until it is heard again.
If the snapshot being sent is pruned from storage meanwhile, the leader starts over with the
newest one.

Safety needs nothing new: a snapshot only ever holds applied, hence committed, entries, which
every leader's log holds too; a follower whose commit seq already covers a snapshot answers
``SNAP_DONE`` at once. The driver's compaction keeps the log from being cut past a snapshot
a follower is receiving (``snapshot_floor``), so an installed snapshot is never already too
old to catch up from (the "install loop" other libraries' users meet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .._native import ffi, lib
from ..snapshot.meta import SnapshotMeta
from .membership import Config, ConfigStack
from .messages import (
    SNAP_BEGIN,
    SNAP_CORRUPT,
    SNAP_DONE,
    SNAP_REJECTED,
    CoreMessage,
    InstallSnapshot,
    NodeId,
    SnapshotResponse,
)
from .progress import Progress
from .raftlog import RaftLog


def crc32c(data: bytes) -> int:
    """CRC32C of ``data`` (the C core's; the ``crc32c`` package's convention)."""
    return int(lib.tp_crc32c(0, ffi.from_buffer(data), len(data)))


class SnapshotSource(Protocol):
    """What a leader's core reads snapshots from (the driver's store)."""

    def latest_snapshot(self) -> SnapshotMeta | None:
        """The newest complete snapshot, or None."""

    def read_chunk(self, meta: SnapshotMeta, offset: int, n: int) -> bytes | None:
        """``n`` bytes of ``meta``'s data from ``offset`` (synchronous, like
        ``LogStorage.entries``); None once that snapshot no longer exists. A source may
        also offer ``damaged(meta)``: a follower found that snapshot's bytes wrong."""


@dataclass(frozen=True)
class SnapshotBase:
    """What the core needs to know of the snapshot its log starts after: its last entry
    and the configuration in force there (with the seq and term of the entry that holds
    that configuration; -1 and 0 for the one the cluster was started with)."""

    seq: int
    term: int
    config: Config
    config_seq: int = -1
    config_term: int = 0


def base_stack(base: SnapshotBase, stack: ConfigStack, first_seq: int) -> ConfigStack:
    """A configuration stack for a log that starts after ``base``: the snapshot's
    configuration, then what ``stack`` holds after the snapshot (still in the log)."""
    later = tuple(x for x in stack.items if x[0] > base.seq and x[0] >= first_seq)
    return ConfigStack(((base.config_seq, base.config_term, base.config),) + later)


class SnapshotReplication:
    """Mixed into ``RaftCore``; the fields it uses are declared here."""

    _id: NodeId
    _term: int
    _inc: int
    _now: float
    _commit: int
    _log: RaftLog
    _prs: dict[NodeId, Progress]
    _dirty: set[NodeId]
    _msgs: list[tuple[NodeId, CoreMessage]]
    _warnings: list[str]
    _recent_active: set[NodeId]
    _prev_active: set[NodeId]
    _configs: ConfigStack
    _hs_changed: bool
    _leader: NodeId | None
    _last_leader_contact: float
    _snapshots: SnapshotSource | None
    _snapshot_in: list[tuple[NodeId, InstallSnapshot]]
    _snapshot_chunk: int
    _snapshot_window: int
    _snapshot_timeout: int
    _recovery: Any
    _has_log: bool

    # --- leader -------------------------------------------------------------------------
    def _send_snapshot(self, p: NodeId, pr: Progress) -> None:
        """Replace replication to ``p`` by a snapshot transfer (or carry one on)."""
        if pr.snap is None:
            src = self._snapshots
            meta = src.latest_snapshot() if src is not None else None
            if meta is None or meta.seq < self._log.first_seq - 1:
                if pr.snap_acked != -2:  # warn once per follower
                    pr.snap_acked = -2
                    self._warnings.append(
                        f"node {p!r} needs entries from seq {pr.next}, which were compacted "
                        "away, and there is no snapshot to send it instead"
                    )
                return
            if p not in self._recent_active and p not in self._prev_active:
                return  # not heard from recently: do not stream to the void
            pr.snap = meta
            pr.probe = True
            pr.probe_sent = False
            pr.inflight.clear()
            self._snapshot_begin(p, pr)
            return
        self._snapshot_stream(p, pr)

    def _snapshot_begin(self, p: NodeId, pr: Progress) -> None:
        meta = pr.snap
        assert meta is not None
        pr.snap_sent = 0
        pr.snap_acked = -1
        pr.snap_idle = 0
        pr.snap_rewound = False
        self._msgs.append((p, InstallSnapshot(
            self._term, meta.seq, meta.term, meta.size, meta.crc, 0, b"", 0, True,
            meta.config, meta.extra, self._inc,
        )))

    def _snapshot_stream(self, p: NodeId, pr: Progress) -> None:
        meta = pr.snap
        if meta is None or pr.snap_acked < 0:
            return  # waiting for the answer to the opening
        src = self._snapshots
        assert src is not None
        chunk = self._snapshot_chunk
        # Gone back to a refused offset: that one chunk alone until it is answered. The
        # chunks sent after the lost one may have arrived, and a follower that kept them
        # answers past them (the driver's ``_snap_stash``): a whole window would send them
        # again for nothing.
        limit = pr.snap_acked + (chunk if pr.snap_rewound else self._snapshot_window * chunk)
        while pr.snap_sent < meta.size and pr.snap_sent < limit:
            off = pr.snap_sent
            data = src.read_chunk(meta, off, min(chunk, meta.size - off))
            if data is None:  # pruned meanwhile: start over with the newest snapshot
                pr.snap = None
                pr.snap_acked = -1
                self._send_snapshot(p, pr)
                return
            self._msgs.append((p, InstallSnapshot(
                self._term, meta.seq, meta.term, meta.size, meta.crc, off, data, crc32c(data),
                False, None, b"", self._inc,
            )))
            pr.snap_sent = off + len(data)

    def _on_snapshot_response(self, frm: NodeId, m: SnapshotResponse) -> None:
        if m.term > self._term:
            self._become_follower(m.term, None)
            return
        if m.term < self._term or not self._leading():
            return
        pr = self._prs.get(frm)
        if pr is None or pr.lost:
            return
        self._recent_active.add(frm)
        meta = pr.snap
        if m.status == SNAP_DONE:
            log = self._log
            # The follower's log now matches ours through m.seq (committed entries).
            if m.seq > pr.match and m.seq <= self._commit:
                pr.match = m.seq
                pr.last_progress = self._now
            if meta is not None and meta.seq <= m.seq:
                pr.snap = None
                pr.snap_acked = -1
                pr.become_replicate(self._now)
                if pr.match < log.last_seq:
                    self._dirty.add(frm)
                self._maybe_commit()
            return
        if meta is None or (m.seq, m.snap_term, m.crc) != (meta.seq, meta.term, meta.crc):
            return  # about another transfer
        pr.snap_idle = 0
        off = m.offset
        if m.status == SNAP_CORRUPT:
            # Every chunk passed its check, the whole did not: our file is damaged.
            pr.snap = None
            pr.snap_acked = -1
            pr.become_probe(pr.match + 1)
            self._warnings.append(
                f"node {frm!r} received snapshot {meta.seq} whole and found its CRC32C "
                "wrong: this node's copy is damaged; it is set aside and a new one taken"
            )
            src = self._snapshots
            if src is not None and hasattr(src, "damaged"):
                src.damaged(meta)
            return
        if m.status == SNAP_BEGIN or off > meta.size:
            self._snapshot_begin(frm, pr)
            return
        if m.status == SNAP_REJECTED:
            if pr.snap_acked < 0 or off < pr.snap_acked or pr.snap_rewound:
                return  # stale, or the refusal of a chunk sent before we went back
            pr.snap_acked = off
            pr.snap_sent = off
            pr.snap_rewound = True
        else:  # SNAP_OK
            if pr.snap_acked >= 0 and off <= pr.snap_acked:
                return  # nothing new (reordered, or a repeated answer)
            opening = pr.snap_acked < 0
            if opening:
                pr.snap_sent = off  # the answer to the opening: resume where it is
            pr.snap_acked = off
            # Resuming mid-way (a reopening after a stall or a dropped connection): one chunk
            # first, as after a refusal, since the follower may hold chunks past a gap.
            pr.snap_rewound = opening and off > 0
            if pr.snap_sent < off:
                pr.snap_sent = off
        self._snapshot_stream(frm, pr)

    def _snapshot_tick(self, p: NodeId, pr: Progress) -> None:
        """Once per heartbeat for a follower in snapshot state."""
        if p not in self._recent_active and p not in self._prev_active:
            # Gone quiet: drop the transfer; it begins again (and resumes) when heard from.
            pr.snap = None
            pr.snap_acked = -1
            pr.become_probe(pr.match + 1)
            return
        pr.snap_idle += 1
        # An unanswered opening is asked again soon (it carries no data); a stream that
        # stalled after ``snapshot_timeout`` ticks (its answers were lost with a
        # connection, or the follower restarted): open again, it says where it is.
        if pr.snap_idle >= (3 if pr.snap_acked < 0 else self._snapshot_timeout):
            self._snapshot_begin(p, pr)

    def snapshot_floor(self) -> int | None:
        """The lowest seq of a snapshot being sent to a follower: the driver must not
        compact the log past it, or the follower would need another snapshot right after
        installing this one."""
        seqs = [pr.snap.seq for pr in self._prs.values() if pr.snap is not None]
        return min(seqs) if seqs else None

    # --- follower -----------------------------------------------------------------------
    def _on_install_snapshot(self, frm: NodeId, m: InstallSnapshot) -> None:
        if m.term < self._term:
            # A stale leader: our term makes it step down.
            self._msgs.append((frm, SnapshotResponse(
                self._term, m.seq, m.snap_term, m.crc, 0, SNAP_REJECTED, self._inc,
            )))
            return
        # As for an AppendEntries of a leader of this term (or a newer one).
        if not self._accept_leader(frm, m.term):
            return
        if m.seq <= self._commit:
            # Everything the snapshot holds is committed here already.
            self._msgs.append((frm, SnapshotResponse(
                self._term, m.seq, m.snap_term, m.crc, m.size, SNAP_DONE, self._inc,
            )))
            return
        self._snapshot_in.append((frm, m))

    def snapshot_reply(self, to: NodeId, m: InstallSnapshot, status: int, offset: int) -> None:
        """Driver: answer ``m`` (a piece the driver handled) with ``status`` and the bytes
        of that snapshot it now holds."""
        self._msgs.append((to, SnapshotResponse(
            self._term, m.seq, m.snap_term, m.crc, offset, status, self._inc,
        )))

    def snapshot_installed(self, base: SnapshotBase, to: NodeId | None,
                           ident: tuple[int, int] | None = None) -> None:
        """Driver: the state machine holds snapshot ``base`` and storage was made to start
        after it (its entries kept only if storage held ``(base.seq, base.term)``). Call
        between two ``Ready``s, with everything handed out persisted. ``to``: the leader
        that sent it (answered ``SNAP_DONE``); ``ident``: the answer's (crc, size)."""
        log = self._log
        log.restored(base.seq)
        if log.storage.seq == base.seq and self._has_log:
            self._has_log = False  # (the driver persisted this before it reset the log)
        # Configuration entries storage still holds keep their index (a kept log).
        first = log.first_seq
        self._log.config_index = [x for x in log.config_index if x[0] >= first]
        self._use_configs(base_stack(base, self._configs, log.first_seq))
        self._hs_changed = True
        if base.seq > self._commit:
            self._commit = base.seq
        self._last_leader_contact = self._now
        self._reset_election_timer()
        if self._recovery is not None:
            self._maybe_recovered()
        if to is not None:
            crc, size = ident if ident is not None else (0, 0)
            self._msgs.append((to, SnapshotResponse(
                self._term, base.seq, base.term, crc, size, SNAP_DONE, self._inc,
            )))

    # --- helpers shared with the core ----------------------------------------------------
    def _heartbeat_prev(self, pr: Progress) -> int:
        """``prev`` for a heartbeat: the follower's match when we still hold its term, else
        -1 (which always matches, so the heartbeat is never refused)."""
        match = pr.match
        if pr.lost or match < self._log.first_seq - 1:
            return -1
        return match

    # (RaftCore's)
    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        raise NotImplementedError

    def _leading(self) -> bool:
        raise NotImplementedError

    def _maybe_commit(self) -> None:
        raise NotImplementedError

    def _reset_election_timer(self) -> None:
        raise NotImplementedError

    def _maybe_recovered(self) -> None:
        raise NotImplementedError

    def _use_configs(self, stack: ConfigStack) -> None:
        raise NotImplementedError

    def _accept_leader(self, frm: NodeId, term: int) -> bool:
        raise NotImplementedError


__all__ = ["SnapshotSource", "SnapshotBase", "SnapshotReplication", "base_stack", "crc32c"]
