"""The Raft consensus core: a pure, deterministic state machine (CONTRACT STUB).

THIS FILE IS THE CONTRACT between the core and its two drivers (``tinyraftplus.node`` with
Trio and a durable log, ``tinyraftplus.sim`` with virtual time). Signatures and semantics
here are fixed; the implementation replaces the ``NotImplementedError`` bodies.

Inputs: ``tick(now)``, ``step(from_id, msg)``, ``propose(items)``, ``read_index(read_id)``,
``campaign()``. Outputs: a ``Ready`` batch that the driver handles and then acknowledges
with ``advance(ready)``:

1. send ``ready.messages`` (may go out before anything is persisted: the leader's
   ``AppendEntries``; Raft allows the leader to write its own log in parallel);
2. persist ``ready.hard_state`` (atomically, durably), then apply ``ready.truncate_after``
   and append ``ready.entries`` to the log, durably;
3. call ``advance(ready)``;
4. send ``ready.messages_after_persist`` (votes, append responses: they promise durability);
5. apply committed entries through ``ready.commit_seq`` (reading them from the log) and
   serve ``ready.read_states`` once applied through their index.

The core is never stepped between ``ready()`` and ``advance()``: drivers are sequential.

No Trio, no I/O, no clock reads: time comes in through ``tick(now)`` (seconds, any epoch,
monotonic), randomness from the injected ``random.Random``. The same inputs give the same
outputs, which is what lets the simulator replay a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from ..entry import Entry
from .messages import CoreMessage, NodeId


class Role(str, Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash before the node acts on it: the current term and the vote
    cast in it (``None``: no vote yet in this term)."""

    term: int = 0
    vote: NodeId | None = None


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the driver reports as a "change" event."""

    role: Role
    leader: NodeId | None
    term: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """Read ``read_id`` may be served once the state machine has applied through ``index``.
    ``index == -2`` means the read failed (leadership lost / not confirmed); the driver
    retries or raises."""

    read_id: int
    index: int


@dataclass(slots=True)
class Ready:
    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    truncate_after: int | None = None
    entries: list[Entry] = field(default_factory=list)
    messages: list[tuple[NodeId, CoreMessage]] = field(default_factory=list)
    messages_after_persist: list[tuple[NodeId, CoreMessage]] = field(default_factory=list)
    commit_seq: int = -1
    read_states: list[ReadState] = field(default_factory=list)


class LogStorage(Protocol):
    """What the core reads from the durable log: synchronous and cheap (``FsLog`` keeps the
    terms in memory and reads payloads with one ``pread``; the simulator's store is a list).
    The core keeps entries it has handed out in a ``Ready`` but that were not yet
    ``advance``d in memory itself, so storage only ever sees durable writes."""

    @property
    def seq(self) -> int:
        """Last seq held, ``-1`` when empty."""

    @property
    def first_seq(self) -> int:
        """First seq held (0 unless a prefix was compacted away)."""

    def term_at(self, seq: int) -> int:
        """Term of the entry at ``seq``; 0 for ``seq == -1``."""

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries ``lo..hi`` inclusive, stopping early once ``max_bytes`` of payload are
        gathered (but always at least one entry when ``lo <= hi``)."""


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Tuning. Times are seconds. Election timeouts are drawn uniformly from
    ``[election_timeout, 2 * election_timeout)`` (scaled down for higher ``priority``)."""

    election_timeout: float = 0.5
    heartbeat_interval: float = 0.1  # the original's ``ping_timeout``
    rpc_max: int = 256  # entries per AppendEntries
    rpc_max_bytes: int = 1 << 20
    max_inflight: int = 8  # AppendEntries in flight per follower
    pre_vote: bool = True
    check_quorum: bool = True
    priorities: dict[NodeId, int] | None = None  # node id -> priority (higher preferred)


class Quorum:
    """Decides whether a set of node ids is enough to commit or to win an election.

    ``quorum``: a count (must be > n/2); ``group`` (node id -> group name) with ``group_fn``
    (``group_fn(ids) -> bool``; default with ``group`` alone: a majority in every group).
    Construction checks every two accepted sets intersect and raises ``ConfigurationError``
    naming two disjoint accepted sets otherwise."""

    def __init__(
        self,
        nodes: Sequence[NodeId],
        quorum: int | None = None,
        group: dict[NodeId, object] | None = None,
        group_fn: Callable[[frozenset[NodeId]], bool] | None = None,
    ) -> None:
        raise NotImplementedError

    def is_quorum(self, ids: Collection[NodeId]) -> bool:
        raise NotImplementedError


class RaftCore:
    """One node's Raft state machine. See the module docstring for the driving protocol.

    ``bugs`` is a TEST-ONLY hook: a set of deliberate faults the simulator switches on to
    prove its checks can fail. Known names: ``"count_vote_twice"`` (a candidate counts each
    grant twice), ``"commit_old_term"`` (a leader commits entries of earlier terms by counting
    replicas), ``"skip_append_term_check"`` (a follower accepts ``AppendEntries`` from stale
    terms). (``"forget_vote"`` lives in the simulator's store, not here.)
    """

    def __init__(
        self,
        node_id: NodeId,
        nodes: Sequence[NodeId],
        log: LogStorage,
        hard_state: HardState,
        *,
        config: RaftConfig | None = None,
        quorum: Quorum | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
        commit_seq: int = -1,
        bugs: Collection[str] = (),
    ) -> None:
        raise NotImplementedError

    # --- inputs -------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Advance the clock: elections, heartbeats, CheckQuorum, read/transfer timeouts."""
        raise NotImplementedError

    def step(self, from_id: NodeId, msg: CoreMessage) -> None:
        """Handle one message. Stale, duplicate, reordered or unknown-sender messages are
        ignored (they are normal on a network); never raises for a well-typed message."""
        raise NotImplementedError

    def propose(self, items: Sequence[bytes]) -> tuple[int, int]:
        """Leader only: append ``items`` (non-empty bytes) at the end of the log; returns
        ``(first_seq, term)``. Raises ``NotLeaderError`` (with the known leader) otherwise."""
        raise NotImplementedError

    def read_index(self, read_id: int) -> None:
        """Start a linearizable read; its ``ReadState`` comes in a later ``Ready``. On a
        follower the request is forwarded to the leader; with no leader it fails at once
        (``index == -2``)."""
        raise NotImplementedError

    def campaign(self) -> None:
        """Start an election now (skipping PreVote), e.g. in tests."""
        raise NotImplementedError

    # --- outputs ------------------------------------------------------------------------
    def has_ready(self) -> bool:
        raise NotImplementedError

    def ready(self) -> Ready:
        raise NotImplementedError

    def advance(self, ready: Ready) -> None:
        raise NotImplementedError

    # --- introspection (read-only properties) ------------------------------------------
    # node_id, nodes, role, leader, term, vote, commit_seq, last_seq, last_term,
    # next_deadline (earliest ``now`` at which ``tick`` has something to do)
