"""What a leader knows about one follower's log, and how hard it may push it.

Two states, as in etcd's raft:

* **probe**: the leader does not know where the follower's log matches its own. It sends
  one ``AppendEntries`` at ``next - 1`` and waits for the answer (or the next heartbeat)
  before sending another, moving ``next`` back by the follower's conflict hint on each
  rejection. The first success switches to replicate.
* **replicate**: the match is known; the leader streams batches optimistically, advancing
  ``next`` as it sends, with up to ``max_inflight`` batches unacknowledged. A rejection
  (a lost or reordered batch) drops back to probe.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..snapshot.meta import SnapshotMeta


class Progress:
    __slots__ = ("match", "next", "probe", "probe_sent", "inflight", "last_progress", "lost",
                 "hb_floor", "idle_beats", "snap", "snap_sent", "snap_acked", "snap_idle",
                 "snap_rewound")

    def __init__(self, next_seq: int, now: float) -> None:
        self.match = -1  # highest seq known to be durable on the follower and matching us
        self.next = next_seq  # next seq to send; invariant: match < next
        self.probe = True
        self.probe_sent = False  # probe state: a probe is out, wait for it or a heartbeat
        # replicate state: last seq of each unacknowledged batch, oldest first
        self.inflight: deque[int] = deque()
        self.last_progress = now  # when match last advanced (or streaming (re)started)
        self.idle_beats = 0  # heartbeat ticks with batches out and no progress
        # The follower reported a log shorter than ``match`` without changing incarnation:
        # it lost acknowledged entries, so it is not counted (``recovery.py``).
        self.lost = False
        # Only a heartbeat numbered at least this (sent to the current incarnation) tells
        # of lost data when it is rejected.
        self.hb_floor = 0
        # snapshot state (``snapshot.py``): the snapshot being sent instead of entries the
        # leader no longer has; replication waits until it is installed.
        self.snap: SnapshotMeta | None = None
        self.snap_sent = 0  # bytes sent
        self.snap_acked = -1  # bytes the follower said it holds; -1: the opening unanswered
        self.snap_idle = 0  # heartbeat ticks without an answer
        self.snap_rewound = False  # went back after a refused chunk; ignore older refusals

    def forget(self, next_seq: int, now: float, hb_floor: int) -> None:
        """The follower is a new incarnation: nothing it acknowledged before counts, and
        heartbeats sent to its old incarnation say nothing about the new one."""
        self.match = -1
        self.lost = False
        self.hb_floor = hb_floor
        self.snap = None
        self.last_progress = now
        self.become_probe(next_seq)

    def become_probe(self, next_seq: int) -> None:
        self.probe = True
        self.probe_sent = False
        self.next = max(next_seq, self.match + 1)
        self.inflight.clear()

    def become_replicate(self, now: float) -> None:
        self.probe = False
        self.probe_sent = False
        self.next = self.match + 1
        self.inflight.clear()
        self.last_progress = now
        self.idle_beats = 0

    def __repr__(self) -> str:
        state = "probe" if self.probe else f"replicate inflight={len(self.inflight)}"
        if self.snap is not None:
            state = f"snapshot {self.snap.seq} sent={self.snap_sent} acked={self.snap_acked}"
        if self.lost:
            state += " LOST"
        return f"Progress(match={self.match}, next={self.next}, {state})"
