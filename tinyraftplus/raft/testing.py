"""A deterministic in-memory cluster of ``RaftCore``s, for tests (not for production).

It drives each core exactly as the contract in ``core.py`` says (send ``messages``, persist
hard state then truncate/append to a ``MemoryLog``, ``advance``, send
``messages_after_persist``, apply through ``commit_seq``) over a message queue, with a fake
clock that jumps from one core's deadline to the next. Crashes keep what was "on disk" (the
``MemoryLog`` and the last persisted ``HardState``) and drop the core.

Every run checks two of Raft's safety properties as it goes and records violations in
``violations`` (``strict=True``, the default, raises ``AssertionError`` at once):

* election safety: at most one leader per term;
* state machine safety: every node applies the same entry at each seq.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..entry import Entry
from .core import HardState, RaftConfig, RaftCore, ReadState, Ready, Role
from .memory import MemoryLog
from .messages import CoreMessage, NodeId
from .quorum import Quorum

DropFn = Callable[[NodeId, NodeId, CoreMessage], bool]


class Cluster:
    def __init__(
        self,
        ids: Sequence[NodeId],
        *,
        seed: int = 0,
        config: RaftConfig | None = None,
        quorum: Quorum | None = None,
        bugs: dict[NodeId, Iterable[str]] | None = None,
        strict: bool = True,
        start: bool = True,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
    ) -> None:
        self.ids = tuple(ids)
        self.seed = seed
        self.config = config or RaftConfig()
        self.quorum = quorum or Quorum(self.ids)
        self.bugs = {i: tuple(b) for i, b in (bugs or {}).items()}
        self.strict = strict
        self.now = 0.0
        self.rng = random.Random(seed)
        self.logs: dict[NodeId, MemoryLog] = {i: MemoryLog() for i in self.ids}
        self.hard: dict[NodeId, HardState] = {i: HardState() for i in self.ids}
        self.applied: dict[NodeId, list[Entry]] = {i: [] for i in self.ids}
        self.reads: dict[NodeId, dict[int, int]] = {i: {} for i in self.ids}
        self.cores: dict[NodeId, RaftCore] = {}
        self.net: deque[tuple[NodeId, NodeId, CoreMessage]] = deque()
        self.sent: list[tuple[NodeId, NodeId, CoreMessage]] = []  # every message, for checks
        self.groups: list[frozenset[NodeId]] | None = None
        self.drop: DropFn | None = None
        self.rewrite: Callable[[NodeId, NodeId, CoreMessage], CoreMessage | None] | None = None
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        # node -> one-way delay (seconds) added to every message it sends or receives
        self.delay: dict[NodeId, float] = {}
        self._later: list[tuple[float, int, NodeId, NodeId, CoreMessage]] = []
        self._order = itertools.count()
        self.committed: list[Entry] = []  # the one true sequence of applied entries
        self.leaders: dict[int, set[NodeId]] = {}
        self.violations: list[str] = []
        self.votes_cast: dict[NodeId, dict[int, NodeId]] = {i: {} for i in self.ids}
        self._starts = 0
        if start:
            for i in self.ids:
                self.start(i)

    # --- membership -------------------------------------------------------------------
    def start(self, i: NodeId) -> RaftCore:
        self._starts += 1
        core = RaftCore(
            i, self.ids, self.logs[i], self.hard[i], config=self.config, quorum=self.quorum,
            rng=random.Random(self.seed * 7919 + self._starts), now=self.now,
            commit_seq=len(self.applied[i]) - 1, bugs=self.bugs.get(i, ()),
        )
        self.cores[i] = core
        return core

    def crash(self, i: NodeId) -> None:
        """Stop node ``i``: its core (volatile state) is gone, its log and hard state stay.
        Messages to it in flight are lost."""
        self.cores.pop(i, None)
        self.net = deque(x for x in self.net if x[1] != i)
        self._later = [x for x in self._later if x[3] != i]
        heapq.heapify(self._later)

    def restart(self, i: NodeId) -> RaftCore:
        self.crash(i)
        return self.start(i)

    def up(self) -> list[NodeId]:
        return [i for i in self.ids if i in self.cores]

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Only nodes in the same group can talk (nodes in no group talk to nobody)."""
        self.groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def connected(self, a: NodeId, b: NodeId) -> bool:
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    # --- driving ----------------------------------------------------------------------
    def _send(self, frm: NodeId, to: NodeId, msg: CoreMessage) -> None:
        self.sent.append((frm, to, msg))
        d = self.delay.get(frm, 0.0) + self.delay.get(to, 0.0)
        if d > 0:
            heapq.heappush(self._later, (self.now + d, next(self._order), frm, to, msg))
        else:
            self.net.append((frm, to, msg))

    def _release_due(self) -> None:
        later = self._later
        while later and later[0][0] <= self.now:
            _, _, frm, to, msg = heapq.heappop(later)
            self.net.append((frm, to, msg))

    def _fail(self, what: str) -> None:
        self.violations.append(what)
        if self.strict:
            raise AssertionError(what)

    def handle(self, i: NodeId) -> None:
        """Process node ``i``'s Ready batches until it has none."""
        core = self.cores[i]
        while core.has_ready():
            self.handle_ready(i, core.ready())

    def handle_ready(self, i: NodeId, rd: Ready) -> None:
        core = self.cores[i]
        log = self.logs[i]
        for to, m in rd.messages:
            self._send(i, to, m)
        if rd.hard_state is not None:
            old = self.hard[i]
            hs = rd.hard_state
            if hs.term < old.term:
                self._fail(f"{i!r} persisted term {hs.term} after term {old.term}")
            # Recovery's fence records a vote for itself in a term it does not campaign in:
            # a vote nobody can count, so not one of the votes this check is about.
            fence = hs.vote == i and hs.recovery is not None
            if hs.vote is not None and not fence:
                prev = self.votes_cast[i].get(hs.term)
                if prev is not None and prev != hs.vote:
                    self._fail(f"{i!r} voted for {prev!r} and {hs.vote!r} in term {hs.term}")
                self.votes_cast[i][hs.term] = hs.vote
            self.hard[i] = hs
        if rd.truncate_after is not None:
            log.truncate_after(rd.truncate_after)
        if rd.entries:
            log.append(rd.entries)
        core.advance(rd)
        for to, m in rd.messages_after_persist:
            self._send(i, to, m)
        if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
            who = self.leaders.setdefault(rd.soft_state.term, set())
            who.add(i)
            if len(who) > 1:
                self._fail(f"two leaders in term {rd.soft_state.term}: {sorted(who, key=repr)}")
        self._apply(i, rd.commit_seq)
        for rs in rd.read_states:
            self._read_done(i, rs)

    def _apply(self, i: NodeId, commit: int) -> None:
        applied = self.applied[i]
        log = self.logs[i]
        if commit > log.seq:
            self._fail(f"{i!r} commit {commit} beyond its durable log {log.seq}")
            commit = log.seq
        for seq in range(len(applied), commit + 1):
            e = log.entries(seq, seq, 1 << 30)[0]
            if seq < len(self.committed):
                if self.committed[seq] != e:
                    self._fail(
                        f"{i!r} applied {e} at seq {seq} but another node applied "
                        f"{self.committed[seq]}"
                    )
            else:
                self.committed.append(e)
            applied.append(e)

    def _read_done(self, i: NodeId, rs: ReadState) -> None:
        self.reads[i][rs.read_id] = rs.index

    def deliver(self, n: int | None = None) -> int:
        """Deliver queued messages (all, or ``n``) in order; returns how many."""
        count = 0
        net = self.net
        rng = self.rng
        chaos = self.loss or self.duplicate or self.reorder
        while net and (n is None or count < n):
            if chaos and self.reorder and len(net) > 1 and rng.random() < self.reorder:
                net.rotate(-rng.randrange(len(net)))  # a random message overtakes the rest
            frm, to, m = net.popleft()
            count += 1
            core = self.cores.get(to)
            if core is None or frm not in self.cores or not self.connected(frm, to):
                continue
            if self.drop is not None and self.drop(frm, to, m):
                continue
            if chaos:
                if self.loss and rng.random() < self.loss:
                    continue
                if self.duplicate and rng.random() < self.duplicate:
                    net.append((frm, to, m))
            if self.rewrite is not None:
                m2 = self.rewrite(frm, to, m)
                if m2 is None:
                    continue
                m = m2
            core.step(frm, m)
            self.handle(to)
        return count

    def stabilize(self, limit: int = 100000) -> None:
        self._release_due()
        for i in self.up():
            self.handle(i)
        for _ in range(limit):
            if not self.net:
                return
            self.deliver()
        raise AssertionError("the cluster did not stabilize")

    def tick_all(self) -> None:
        for i in self.up():
            self.cores[i].tick(self.now)
            self.handle(i)

    def advance(self, dt: float) -> None:
        """Let ``dt`` seconds pass: tick the cores at each deadline, stabilizing between."""
        target = self.now + dt
        self.stabilize()
        while True:
            up = self.up()
            if not up:
                break
            nd = min(self.cores[i].next_deadline for i in up)
            if self._later and self._later[0][0] < nd:
                nd = self._later[0][0]
            if nd > target:
                break
            self.now = max(self.now, nd)
            self.tick_all()
            self.stabilize()
        self.now = target
        self.tick_all()
        self.stabilize()

    def run_until(self, pred: Callable[[], bool], timeout: float = 30.0,
                  step: float = 0.01) -> float:
        """Advance in ``step`` increments until ``pred()``; returns the time it took.
        Raises ``AssertionError`` after ``timeout`` seconds of cluster time."""
        start = self.now
        while not pred():
            if self.now - start > timeout:
                raise AssertionError(f"condition not reached within {timeout}s of cluster time")
            self.advance(step)
        return self.now - start

    # --- queries and actions ----------------------------------------------------------
    def leader(self) -> NodeId | None:
        """The up node that leads in the highest term, if any."""
        best: RaftCore | None = None
        for i in self.up():
            c = self.cores[i]
            if c.role is Role.LEADER and (best is None or c.term > best.term):
                best = c
        return best.node_id if best is not None else None

    def wait_leader(self, timeout: float = 30.0) -> NodeId:
        self.run_until(lambda: self.leader() is not None, timeout)
        leader = self.leader()
        assert leader is not None
        return leader

    def propose(self, items: Sequence[bytes], at: NodeId | None = None) -> tuple[int, int]:
        node = at if at is not None else self.leader()
        assert node is not None, "no leader"
        out = self.cores[node].propose(items)
        self.handle(node)
        return out

    def read(self, at: NodeId, read_id: int) -> None:
        self.cores[at].read_index(read_id)
        self.handle(at)

    def commit_seqs(self) -> dict[NodeId, int]:
        return {i: self.cores[i].commit_seq for i in self.up()}

    def data(self, i: NodeId) -> list[bytes]:
        """The payloads node ``i`` has applied, without the leaders' no-op entries."""
        return [e.data for e in self.applied[i] if e.data]

    def check_log_matching(self) -> None:
        """Log matching: if two logs hold an entry with the same seq and term, they are
        identical up to it (over the seqs both still hold: compaction drops a prefix)."""
        logs = {i: {e.seq: e for e in self.logs[i].all()} for i in self.ids}
        for a in self.ids:
            for b in self.ids:
                if repr(a) >= repr(b):
                    continue
                la, lb = logs[a], logs[b]
                both = sorted(set(la) & set(lb))
                top = -1
                for s in reversed(both):
                    if la[s].term == lb[s].term:
                        top = s
                        break
                if any(la[s] != lb[s] for s in both if s <= top):
                    self._fail(f"logs of {a!r} and {b!r} differ before seq {top}")


def messages_of(sent: Iterable[tuple[NodeId, NodeId, Any]], kind: type) -> list[tuple]:
    return [x for x in sent if type(x[2]) is kind]
