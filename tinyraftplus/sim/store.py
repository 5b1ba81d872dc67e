"""An in-memory log + hard-state store for one simulated node that models durability honestly.

What a real disk does, and what this store therefore does:

* A write is not durable until a sync (``fdatasync``) of its file returns. The store keeps two
  images of each of its two "files" (the hard state and the log): the *current* image, which
  is what the node reads back (the page cache), and the *durable* image (the platters).
  ``sync_hard_state`` / ``sync_log`` copy the pending writes of one file into its durable
  image.
* A crash throws away the current image and reloads the durable one. With ``torn=True`` it
  first lets a random prefix of the unsynced writes reach the disk (the kernel flushed some
  dirty pages on its own before the power went), which is also what real disks do: unsynced
  data may survive or not, and nothing acknowledged may depend on it either way.
* A crash can land between any two storage steps. The driver arms one with
  :meth:`SimStore.arm_crash`; the store raises :class:`SimCrash` just before the k-th storage
  step from then on (writing the hard state, syncing it, truncating, appending, syncing the
  log), so a node can die after its vote is durable but before its entries are, after a
  truncate but before the append that should have followed it, and so on.

Snapshots: the log can be compacted (``compact``: drop a prefix behind a snapshot) or reset
(``reset``: hold nothing, continue after a snapshot's last entry); both are log writes like
the others (durable at the next sync, or maybe at a torn crash). The snapshot files live in
``snaps`` (:class:`~tinyraftplus.sim.snapfiles.SnapshotDir`, whose steps are storage steps of
this store too). ``durable_term_at`` counts a seq as held when the newest good durable
snapshot includes it.

The store also keeps, per entry, a chain hash (the hash of the previous entry's chain hash,
this entry's term and its payload). Two logs that hold the same chain hash at a seq hold the
same prefix, which is how the simulator checks Raft's Log Matching property in O(1) per entry.
A compacted log keeps the chain hash of its base entry, so the checks go on from there.

``bugs`` holds deliberate, test-only faults: ``"forget_vote"`` hands back the persisted term
without the vote on restart, as a node would that forgot to persist or fsync its vote;
``"skip_fsync"`` makes ``sync_log`` return without making anything durable (a disk that lies
about its write cache), which loses acknowledged writes at the next crash; ``"trust_wiped"``
restarts a node whose disk was wiped (:meth:`SimStore.wipe`) as the member it was (its old
incarnation, no recovery), which is what the first wave did and what ``recovery.py`` forbids.

A node's first start has no state: it bootstraps (a brand-new cluster). After a wipe it has
none either, and restarts recovering, under a new incarnation (``restart_hard_state``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import replace

from ..entry import Entry
from ..errors import InvalidArgumentError
from ..raft.recovery import new_incarnation
from ..raft.state import HardState, Recovery
from .snapfiles import SnapshotDir

__all__ = ["SimCrash", "SimStore", "STORE_BUGS"]

STORE_BUGS = frozenset({"forget_vote", "skip_fsync", "trust_wiped"})


class SimCrash(Exception):
    """Raised by a storage step at which an armed crash fires; the driver kills the node."""


def _chain(prev: int, entry: Entry) -> int:
    return hash((prev, entry.term, entry.data))


class _LogImage:
    """One image of the log file: the entries after ``base`` (``base == -1``: from seq 0;
    a compaction or a reset after a snapshot moves it) and the chain hash of each, plus the
    term and chain hash of the entry at ``base`` itself (which a snapshot holds)."""

    __slots__ = ("entries", "chain", "base", "base_term", "base_chain")

    def __init__(self, entries: list[Entry] | None = None, chain: list[int] | None = None,
                 base: int = -1, base_term: int = 0, base_chain: int = 0):
        self.entries: list[Entry] = entries if entries is not None else []
        self.chain: list[int] = chain if chain is not None else []
        self.base = base
        self.base_term = base_term
        self.base_chain = base_chain

    @property
    def last(self) -> int:
        return self.base + len(self.entries)

    def copy(self) -> _LogImage:
        return _LogImage(list(self.entries), list(self.chain), self.base, self.base_term,
                         self.base_chain)

    def term_at(self, seq: int) -> int | None:
        if seq == self.base:
            return self.base_term if seq >= 0 else 0
        i = seq - self.base - 1
        if 0 <= i < len(self.entries):
            return self.entries[i].term
        return None

    def chain_at(self, seq: int) -> int | None:
        if seq == self.base:
            return self.base_chain
        i = seq - self.base - 1
        if 0 <= i < len(self.chain):
            return self.chain[i]
        return None

    def truncate_after(self, seq: int) -> None:
        k = max(0, seq - self.base)
        del self.entries[k:]
        del self.chain[k:]

    def append(self, entries: list[Entry]) -> None:
        prev = self.chain[-1] if self.chain else self.base_chain
        for e in entries:
            prev = _chain(prev, e)
            self.entries.append(e)
            self.chain.append(prev)

    def compact(self, seq: int) -> None:
        """Drop entries ``<= seq`` (at most all of them)."""
        seq = min(seq, self.last)
        k = seq - self.base
        if k <= 0:
            return
        self.base_term = self.entries[k - 1].term
        self.base_chain = self.chain[k - 1]
        del self.entries[:k]
        del self.chain[:k]
        self.base = seq

    def reset(self, seq: int, term: int, chain: int) -> None:
        self.entries = []
        self.chain = []
        self.base, self.base_term, self.base_chain = seq, term, chain


class SimStore:
    """``LogStorage`` (for the Raft core) plus hard state, with honest durability.

    The write path, in the order the driving protocol uses it::

        set_hard_state(hs); sync_hard_state(); truncate_after(seq); append(entries); sync_log()

    Each call is one storage step (a place an armed crash can fire). Reads (``seq``,
    ``term_at``, ``entries``) see the current image, like reads through the page cache.
    """

    def __init__(self, node_id: object, *, bugs: Collection[str] = (),
                 rng: random.Random | None = None, torn: bool = True,
                 snap_rng: random.Random | None = None) -> None:
        unknown = set(bugs) - STORE_BUGS
        if unknown:
            raise InvalidArgumentError(
                f"SimStore: unknown bug name(s) {sorted(unknown)}; known: {sorted(STORE_BUGS)}"
            )
        self.node_id = node_id
        self.bugs = frozenset(bugs)
        self._rng = rng if rng is not None else random.Random(0)
        self._torn = torn
        self._log = _LogImage()
        self._durable_log = _LogImage()
        # Unsynced log writes in order: ("t", seq) or ("a", [entries]).
        self._pending_log: list[tuple[str, object]] = []
        self._hard = HardState()
        self._durable_hard = HardState()
        self._hard_dirty = False
        self._has_state = False  # no state yet (first start) or wiped
        self._started = False
        self.incarnation = 0
        self._identities = 0
        self.wipes = 0
        self._crash_in: int | None = None
        self.crash_step: str | None = None  # the step an armed crash fired before
        self.steps = 0  # storage steps performed, for traces
        self.syncs = 0
        # Snapshot files beside the log (``snapfiles.py``); their steps are storage steps.
        self.snaps = SnapshotDir(
            self._storage_step,
            snap_rng if snap_rng is not None else random.Random(f"snapfiles:{node_id}"), torn)
        # seq -> the committed term there (the simulator's canonical committed log): what a
        # snapshot that includes seq holds (``durable_term_at``).
        self.committed_term: Callable[[int], int | None] | None = None

    # --- LogStorage -----------------------------------------------------------------------
    @property
    def seq(self) -> int:
        return self._log.last

    @property
    def first_seq(self) -> int:
        return self._log.base + 1

    def _range(self) -> str:
        return f"{self.first_seq}..{self.seq}"

    def term_at(self, seq: int) -> int:
        if seq == -1:
            return 0
        t = self._log.term_at(seq)
        if t is None:
            raise InvalidArgumentError(
                f"SimStore(node {self.node_id}): term_at({seq}) outside the log "
                f"({self._range()})"
            )
        return t

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        if lo > hi:
            return []
        if lo < self.first_seq or hi > self.seq:
            raise InvalidArgumentError(
                f"SimStore(node {self.node_id}): entries({lo}, {hi}) outside the log "
                f"({self._range()})"
            )
        out: list[Entry] = []
        size = 0
        b = self._log.base + 1
        for e in self._log.entries[lo - b:hi + 1 - b]:
            if out and size + len(e.data) > max_bytes:
                break
            out.append(e)
            size += len(e.data)
        return out

    # --- reads for the driver and the invariants ---------------------------------------
    @property
    def hard_state(self) -> HardState:
        return self._hard

    def entry(self, seq: int) -> Entry | None:
        """The entry at ``seq`` in the current image, None if compacted away (or beyond)."""
        i = seq - self._log.base - 1
        return self._log.entries[i] if 0 <= i < len(self._log.entries) else None

    def chain_at(self, seq: int) -> int:
        """Chain hash of the current image at ``seq`` (0 for ``-1``), from the log's base
        (the entry a snapshot ends at) on."""
        if seq < 0:
            return 0
        h = self._log.chain_at(seq)
        if h is None:
            raise InvalidArgumentError(
                f"SimStore(node {self.node_id}): chain_at({seq}) outside the log "
                f"({self._log.base}..{self.seq})"
            )
        return h

    def chain_snapshot(self) -> tuple[int, int, list[int]]:
        """``(base, chain hash at base, chain hashes of base + 1 ..)`` of the current image."""
        return self._log.base, self._log.base_chain, list(self._log.chain)

    @property
    def durable_seq(self) -> int:
        return self._durable_log.last

    def durable_term_at(self, seq: int) -> int | None:
        """Term of what the node holds durably at ``seq``: the durable log's entry, or, for
        a seq its newest good durable snapshot includes (and no durable log entry does),
        the committed term there (``committed_term``, set by the simulator: a snapshot only
        holds committed entries). ``None`` if a crash now would leave the node without it."""
        t = self._durable_log.term_at(seq)
        if t is not None and seq >= 0:
            return t
        if 0 <= seq <= self.snaps.durable_cover() and self.committed_term is not None:
            return self.committed_term(seq)
        return None

    def covered_term(self, seq: int) -> int | None:
        """As ``durable_term_at`` for the current image (what the node holds now)."""
        t = self._log.term_at(seq)
        if t is not None and seq >= 0:
            return t
        if 0 <= seq <= self.snaps.current_cover() and self.committed_term is not None:
            return self.committed_term(seq)
        return None

    def durable_hard_state(self) -> HardState:
        return self._durable_hard

    # --- crash injection -------------------------------------------------------------------
    def arm_crash(self, after_steps: int) -> None:
        """Crash just before the ``after_steps``-th storage step from now (0: the next)."""
        if after_steps < 0:
            raise InvalidArgumentError(f"arm_crash: after_steps must be >= 0, got {after_steps}")
        self._crash_in = after_steps

    def disarm(self) -> None:
        self._crash_in = None

    @property
    def crash_armed(self) -> bool:
        return self._crash_in is not None

    def _storage_step(self, what: str) -> None:
        if self._crash_in is not None:
            if self._crash_in == 0:
                self._crash_in = None
                self.crash_step = what
                raise SimCrash(f"node {self.node_id} crashed before storage step '{what}'")
            self._crash_in -= 1
        self.steps += 1

    # --- the write path --------------------------------------------------------------------
    def set_hard_state(self, hs: HardState) -> None:
        self._storage_step("write hard state")
        self._hard = hs
        self._hard_dirty = True

    def sync_hard_state(self) -> None:
        self._storage_step("sync hard state")
        self._durable_hard = self._hard
        self._hard_dirty = False
        self._has_state = self._started = True
        self.syncs += 1

    def truncate_after(self, seq: int) -> None:
        self._storage_step("truncate")
        if seq < self._log.base:
            raise InvalidArgumentError(
                f"SimStore(node {self.node_id}): truncate_after({seq}): entries up to "
                f"{self._log.base} were compacted behind a snapshot"
            )
        if seq < self.seq:
            self._log.truncate_after(seq)
            self._pending_log.append(("t", seq))

    def append(self, entries: list[Entry]) -> None:
        self._storage_step("append")
        expect = self.seq + 1
        for i, e in enumerate(entries):
            if e.seq != expect + i:
                raise InvalidArgumentError(
                    f"SimStore(node {self.node_id}): append of seq {e.seq} where seq "
                    f"{expect + i} was next; the driver must truncate before appending"
                )
        # Like FsLog, the store keeps (seq, term, payload) only, not the entry's kind: the
        # core tells configuration entries apart by its index of them (raftlog.py).
        batch = [e if type(e) is Entry else Entry(*e) for e in entries]
        self._log.append(batch)
        self._pending_log.append(("a", batch))

    def compact(self, seq: int) -> None:
        """Drop entries ``<= seq`` (whole segment files in a real log: unlinks, durable at
        the next sync or, maybe, at a crash)."""
        self._storage_step("compact")
        if seq > self._log.base:
            self._log.compact(seq)
            self._pending_log.append(("c", seq))

    def reset(self, seq: int, term: int, chain: int) -> None:
        """Hold nothing; the log continues after ``(seq, term)`` (after a snapshot install
        whose last entry the log did not hold). ``chain``: the chain hash at ``seq``."""
        self._storage_step("log reset")
        self._log.reset(seq, term, chain)
        self._pending_log.append(("r", (seq, term, chain)))

    def sync_log(self) -> None:
        self._storage_step("sync log")
        if "skip_fsync" in self.bugs:
            return
        for op in self._pending_log:
            self._apply_to_durable(op)
        self._pending_log.clear()
        self.syncs += 1

    def _apply_to_durable(self, op: tuple[str, object], limit: int | None = None) -> None:
        kind, arg = op
        if kind == "t":
            self._durable_log.truncate_after(arg)  # type: ignore[arg-type]
        elif kind == "c":
            self._durable_log.compact(arg)  # type: ignore[arg-type]
        elif kind == "r":
            self._durable_log.reset(*arg)  # type: ignore[misc]
        else:
            batch: list[Entry] = arg  # type: ignore[assignment]
            self._durable_log.append(batch if limit is None else batch[:limit])

    # --- crash and restart -----------------------------------------------------------------
    def crash(self) -> str:
        """Lose everything unsynced (maybe keeping a random prefix of it, see ``torn``);
        returns a short description of what survived, for the trace."""
        self._crash_in = None
        self.crash_step = None
        kept = "nothing unsynced kept"
        if self._torn and (self._pending_log or self._hard_dirty):
            rng = self._rng
            n = rng.randint(0, len(self._pending_log))
            for op in self._pending_log[:n]:
                self._apply_to_durable(op)
            kept = f"{n}/{len(self._pending_log)} unsynced log writes kept"
            if n < len(self._pending_log) and rng.random() < 0.5:
                kind, arg = self._pending_log[n]
                if kind == "a":
                    part = rng.randint(0, len(arg))  # type: ignore[arg-type]
                    self._apply_to_durable((kind, arg), limit=part)
                    kept += f" + {part} entries of the next"
            if self._hard_dirty and rng.random() < 0.5:
                self._durable_hard = self._hard
                kept += ", unsynced hard state kept"
        self._pending_log.clear()
        self._hard_dirty = False
        self._log = self._durable_log.copy()
        self._hard = self._durable_hard
        snap = self.snaps.crash()
        return kept + (f", {snap}" if snap else "")

    @property
    def has_state(self) -> bool:
        return self._has_state

    def wipe(self) -> None:
        """The disk is lost while the node is down: log and hard state, durable or not."""
        self._log = _LogImage()
        self._durable_log = _LogImage()
        self._pending_log.clear()
        self.snaps.wipe()
        self._hard = self._durable_hard = HardState()
        self._hard_dirty = False
        self._has_state = False
        self.wipes += 1

    def restart_hard_state(self) -> HardState:
        """The hard state a restarting node reads back (``forget_vote`` drops the vote). With
        no state: a new identity, written durably at once as ``RaftNode`` does; bootstrapped
        at the first start, recovering after a wipe (``trust_wiped``: the old one)."""
        if not self._has_state:
            if self._started and "trust_wiped" in self.bugs:
                hs = HardState(incarnation=self.incarnation)
            else:
                self._identities += 1
                rec = Recovery() if self._started else None
                self.incarnation = new_incarnation(self._identities, rec is not None)
                hs = HardState(incarnation=self.incarnation, recovery=rec)
            self._hard = self._durable_hard = hs
            self._has_state = self._started = True
            return hs
        hs = self._durable_hard
        if "forget_vote" in self.bugs:
            hs = replace(hs, vote=None)
            self._hard = hs
        return hs
