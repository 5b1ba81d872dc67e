"""The Raft consensus core: a pure, deterministic state machine.

THIS FILE IS THE CONTRACT between the core and its two drivers (``tinyraftplus.node`` with
Trio and a durable log, ``tinyraftplus.sim`` with virtual time).

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
Drivers should ``tick(now)`` before stepping a batch of messages: the core has no clock, and
the "heard from a leader recently" check that refuses disruptive votes uses the last tick.

No Trio, no I/O, no clock reads: time comes in through ``tick(now)`` (seconds, any epoch,
monotonic), randomness from the injected ``random.Random``. The same inputs give the same
outputs, which is what lets the simulator replay a seed.

Theory of operation
-------------------
Roles change in one place each (``_become_follower``, ``_start_election``,
``_become_leader``). Messages are dispatched on their type; anything stale (an older term),
from an unknown sender, or answering a request we no longer track is dropped silently: on a
network those are normal. A message with a newer term makes the node a follower in that term
first, except a vote request arriving while this node still hears from a live leader
(PreVote/CheckQuorum "lease"), which is ignored so a rejoining node cannot depose a healthy
leader.

The leader keeps a ``Progress`` per follower (see ``progress.py``) and sends nothing while
stepping: it marks followers dirty and sends once per ``ready()``, so a burst of proposals
or acknowledgements becomes one batch per follower. It counts its own log only as far as it
is durable (``advance``) and commits by the quorum rule, and only entries of its own term
(Raft section 5.4.2).

ReadIndex: a read records the commit seq, then waits for a heartbeat round numbered
``read_id`` to be acknowledged by a quorum; reads that arrive between two ``ready()`` calls
share one round.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..entry import Entry
from ..errors import ConfigurationError, InvalidArgumentError, NotLeaderError, UsageError
from .membership import Config, ConfigStack, JointQuorum, QuorumRule, quorum_of
from .messages import (
    AppendEntries,
    AppendResponse,
    CoreMessage,
    InstallSnapshot,
    NodeId,
    ReadIndex,
    ReadIndexResponse,
    Recover,
    RecoverResponse,
    RequestVote,
    SnapshotResponse,
    TimeoutNow,
    VoteResponse,
)
from .progress import Progress
from .quorum import Quorum
from .raftlog import RaftLog
from .reconfig import Reconfiguration
from .recovery import MemberIdentity
from .snapshot import SnapshotBase, SnapshotReplication, SnapshotSource, base_stack
from .state import LEARN_TERM, HardState, Recovery
from .storage import LogStorage


class Role(str, Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


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
    # Pieces of a snapshot from the leader for the driver to store (``snapshot.py``); the
    # driver answers each with ``snapshot_reply`` and, once whole, ``snapshot_installed``.
    snapshot_in: list[tuple[NodeId, InstallSnapshot]] = field(default_factory=list)
    # Things an operator should hear about (a peer that lost its data, ...): the driver
    # reports each as a warning event.
    warnings: list[str] = field(default_factory=list)


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
    snapshot_chunk: int = 1 << 20  # bytes of snapshot per InstallSnapshot
    snapshot_window: int = 4  # chunks sent ahead of the follower's acknowledgement
    snapshot_timeout: int = 10  # heartbeat ticks without progress before a transfer reopens


KNOWN_BUGS = frozenset({
    "count_vote_twice", "commit_old_term", "skip_append_term_check",
    # membership: a configuration takes effect when committed instead of when appended;
    # a leader proposes a change before an entry of its own term is committed
    "config_on_commit", "skip_own_term_rule",
})

_NEVER = float("inf")


class _Read:
    """A ReadIndex request on the leader. ``origin`` is None for a local read, else the
    follower to answer with ``ReadIndexResponse``."""

    __slots__ = ("read_id", "origin", "index", "round", "deadline")

    def __init__(self, read_id: int, origin: NodeId | None, deadline: float) -> None:
        self.read_id = read_id
        self.origin = origin
        self.index = -2
        self.round = 0
        self.deadline = deadline


def _check_config(cfg: RaftConfig) -> None:
    def positive(name: str, v: object, kind: type | tuple[type, ...]) -> None:
        if isinstance(v, bool) or not isinstance(v, kind) or not v > 0:  # type: ignore[operator]
            raise InvalidArgumentError(f"RaftConfig.{name}={v!r}: must be a positive number")

    positive("election_timeout", cfg.election_timeout, (int, float))
    positive("heartbeat_interval", cfg.heartbeat_interval, (int, float))
    positive("rpc_max", cfg.rpc_max, int)
    positive("rpc_max_bytes", cfg.rpc_max_bytes, int)
    positive("max_inflight", cfg.max_inflight, int)
    positive("snapshot_chunk", cfg.snapshot_chunk, int)
    positive("snapshot_window", cfg.snapshot_window, int)
    positive("snapshot_timeout", cfg.snapshot_timeout, int)
    if cfg.heartbeat_interval >= cfg.election_timeout:
        raise InvalidArgumentError(
            f"RaftConfig: heartbeat_interval={cfg.heartbeat_interval} must be below "
            f"election_timeout={cfg.election_timeout}, or followers time out between heartbeats"
        )


class RaftCore(MemberIdentity, Reconfiguration, SnapshotReplication):
    """One node's Raft state machine. See the module docstring for the driving protocol.

    ``bugs`` is a TEST-ONLY hook: a set of deliberate faults the simulator switches on to
    prove its checks can fail. Known names: ``"count_vote_twice"`` (a candidate counts each
    grant twice), ``"commit_old_term"`` (a leader commits entries of earlier terms by counting
    replicas), ``"skip_append_term_check"`` (a follower accepts ``AppendEntries`` from stale
    terms). (``"forget_vote"`` lives in the simulator's store, not here.)

    Raises ``ConfigurationError`` if ``node_id`` is not in ``nodes`` or ``quorum`` was built
    for other nodes, ``InvalidArgumentError`` for a bad config, hard state or bug name.
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
        join: bool = False,
        snapshots: SnapshotSource | None = None,
        snapshot_base: SnapshotBase | None = None,
    ) -> None:
        ids = tuple(nodes)
        if node_id not in ids and not join:
            raise ConfigurationError(f"node id {node_id!r} is not among the nodes {ids!r}")
        if quorum is None:
            quorum = Quorum([i for i in ids if i != node_id] if join else ids)
        elif set(quorum.nodes) != set(ids) - ({node_id} if join else set()):
            raise ConfigurationError(
                f"the quorum was built for nodes {quorum.nodes!r}, not {ids!r}"
            )
        cfg = config if config is not None else RaftConfig()
        _check_config(cfg)
        unknown = set(bugs) - KNOWN_BUGS
        if unknown:
            raise InvalidArgumentError(
                f"unknown bug hook(s) {sorted(unknown)!r}; known: {sorted(KNOWN_BUGS)!r}"
            )
        if not isinstance(hard_state, HardState) or hard_state.term < 0:
            raise InvalidArgumentError(f"bad hard state {hard_state!r}: need HardState(term>=0)")
        # (A vote may name any node: with membership changes, one removed since, or added
        # after the configuration this node was started with.)

        self._id = node_id
        self._cfg = cfg
        self._rng = rng if rng is not None else random.Random()
        self._bugs = frozenset(bugs)
        # The follower's refusal to overwrite committed entries would hide exactly the faults
        # these hooks inject from the simulator's checks, so they switch it off.
        self._unguarded = bool(self._bugs & {"commit_old_term", "skip_append_term_check"})
        self._now = float(now)
        # The cache holds two windows of AppendEntries in flight (entries and bytes alike).
        self._log = RaftLog(log, cache_max=max(4096, 2 * cfg.rpc_max * cfg.max_inflight),
                            cache_max_bytes=2 * cfg.rpc_max_bytes * cfg.max_inflight)
        last = self._log.last_seq
        first = self._log.first_seq
        self._log.config_index = [
            (s, t) for s, t in hard_state.config_index
            if first <= s <= last and log.term_at(s) == t
        ]
        self._snapshots = snapshots
        self._snapshot_in: list[tuple[NodeId, InstallSnapshot]] = []
        self._snapshot_chunk = cfg.snapshot_chunk
        self._snapshot_window = cfg.snapshot_window
        self._snapshot_timeout = cfg.snapshot_timeout
        if snapshot_base is not None:
            commit_seq = max(commit_seq, snapshot_base.seq)

        # membership (reconfig.py): the configurations that may still be in force, the
        # latest of which is; without any in the hard state, the one given by ``nodes``
        # (a joining node: the others as voters, itself as a learner).
        self._rule = QuorumRule.of(quorum)
        configs = hard_state.configs
        if configs is None:
            voters = frozenset(ids) - ({node_id} if join else frozenset())
            boot = Config(voters, frozenset({node_id}) if join else frozenset(),
                          groups=quorum.groups or {})
            configs = ConfigStack(((-1, 0, boot),))
        else:
            if snapshot_base is not None:
                configs = base_stack(snapshot_base, configs, first)
            configs = configs.matching(self._log.term_at, self._log.last_seq, first)
            configs = configs.committed_through(min(commit_seq, self._log.last_seq))
        if hard_state.configs is None and snapshot_base is not None:
            configs = base_stack(snapshot_base, configs, first)
        self._configs = configs
        self._config = configs.latest[2]
        self._quorum: JointQuorum = quorum_of(self._config, self._rule)
        self._prs: dict[NodeId, Progress] = {}
        self._dirty: set[NodeId] = set()
        self._role = Role.FOLLOWER
        self._transfer_target: NodeId | None = None
        self._hs_changed = configs is not hard_state.configs and hard_state.configs is not None
        self._use_configs(configs)

        self._term = hard_state.term
        self._vote: NodeId | None = hard_state.vote
        # identity (recovery.py): ours, the peers' as last seen, and recovery progress
        self._inc = hard_state.incarnation
        self._peer_inc: dict[NodeId, int] = dict(hard_state.peers)
        self._recovery: Recovery | None = hard_state.recovery
        self._recover_replies: dict[NodeId, RecoverResponse] = {}
        self._recover_also: set[NodeId] = set()
        self._has_log = hard_state.has_log
        self._role = Role.FOLLOWER
        self._leader: NodeId | None = None
        self._commit = max(-1, min(commit_seq, self._log.last_seq))

        # The election timeout window of this node: [lo, lo + width). Priorities split
        # [T, 2T) into one slice per distinct priority, highest first, so that after a
        # leader fails the highest-priority live node times out first.
        self._prio = dict(cfg.priorities or {})
        levels = sorted(set(self._prio.values()) | {0}, reverse=True)
        width = cfg.election_timeout / len(levels)
        self._timeout_lo = (
            cfg.election_timeout + levels.index(self._prio.get(node_id, 0)) * width
        )
        self._timeout_width = width

        self._election_deadline = _NEVER
        self._last_leader_contact = -_NEVER
        self._votes: dict[NodeId, bool] = {}
        self._transfer_campaign = False

        # leader state
        self._bcast = False
        self._heartbeat_deadline = _NEVER
        self._check_quorum_deadline = _NEVER
        self._recent_active: set[NodeId] = set()
        self._prev_active: set[NodeId] = set()
        self._transfer_deadline = _NEVER
        self._transfer_sent = False
        self._reads_waiting: deque[_Read] = deque()  # until an entry of this term commits
        self._reads_pending: deque[_Read] = deque()  # in a heartbeat round, by round
        # The round reads arriving now will join. Heartbeats carry the last round sent
        # (``_read_round - 1``, from 1 on), so that a rejected heartbeat is recognisable.
        self._read_round = 2
        self._read_round_open = False  # reads joined the round that was not sent yet
        self._read_acks: dict[NodeId, int] = {}
        # follower state: read_id -> (leader asked, deadline)
        self._reads_forwarded: dict[int, tuple[NodeId, float]] = {}

        # outputs
        self._msgs: list[tuple[NodeId, CoreMessage]] = []
        self._msgs_after: list[tuple[NodeId, CoreMessage]] = []
        self._read_states: list[ReadState] = []
        self._warnings: list[str] = []
        self._emitted_hs = hard_state
        self._emitted_soft = SoftState(self._role, None, self._term)
        self._emitted_commit = self._commit
        self._unadvanced: Ready | None = None

        self._handlers: dict[type, Callable[[NodeId, Any], None]] = {
            RequestVote: self._on_request_vote,
            VoteResponse: self._on_vote_response,
            AppendEntries: self._on_append,
            AppendResponse: self._on_append_response,
            TimeoutNow: self._on_timeout_now,
            ReadIndex: self._on_read_index,
            ReadIndexResponse: self._on_read_index_response,
            Recover: self._on_recover,
            RecoverResponse: self._on_recover_response,
            InstallSnapshot: self._on_install_snapshot,
            SnapshotResponse: self._on_snapshot_response,
        }
        if self._voters == () and self._is_voter:
            self._election_deadline = self._now  # alone: elect itself at the first tick
        else:
            self._reset_election_timer()
        if self._recovery is not None:
            self._election_deadline = self._now  # start (or resume) recovering at once

    # --- introspection ----------------------------------------------------------------
    @property
    def node_id(self) -> NodeId:
        return self._id

    @property
    def nodes(self) -> tuple[NodeId, ...]:
        """Members of the configuration in force."""
        return self._nodes

    @property
    def peers(self) -> tuple[NodeId, ...]:
        """Everyone this node replicates to or hears from: the members of every
        configuration that may still be in force, but itself."""
        return self._peers

    @property
    def first_seq(self) -> int:
        return self._log.first_seq

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader(self) -> NodeId | None:
        return self._leader

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> NodeId | None:
        return self._vote

    @property
    def incarnation(self) -> int:
        return self._inc

    @property
    def hard_state(self) -> HardState:
        configs = self._configs
        return HardState(
            self._term, self._vote, self._inc, tuple(self._peer_inc.items()), self._recovery,
            self._has_log, None if configs.latest[0] < 0 else configs,
            tuple(self._log.config_index),
        )

    @property
    def commit_seq(self) -> int:
        return self._commit

    @property
    def last_seq(self) -> int:
        return self._log.last_seq

    @property
    def last_term(self) -> int:
        return self._log.last_term

    @property
    def stable_seq(self) -> int:
        """Last seq the driver has confirmed durable (``advance``)."""
        return self._log.stable

    @property
    def config(self) -> RaftConfig:
        return self._cfg

    @property
    def quorum(self) -> JointQuorum:
        return self._quorum

    @property
    def active_followers(self) -> list[NodeId]:
        """On the leader: followers heard from within about the last election timeout
        (this CheckQuorum window or the previous one)."""
        if self._role is not Role.LEADER:
            return []
        seen = self._recent_active | self._prev_active
        return [p for p in self._peers if p in seen]

    @property
    def progress(self) -> dict[NodeId, Progress]:
        """On the leader: each follower's replication progress (read-only; for tests and
        introspection)."""
        return dict(self._prs)

    @property
    def transfer_target(self) -> NodeId | None:
        return self._transfer_target

    @property
    def next_deadline(self) -> float:
        """Earliest ``now`` at which ``tick`` has something to do."""
        if self._role is Role.LEADER:
            d = self._heartbeat_deadline
            if self._cfg.check_quorum and self._check_quorum_deadline < d:
                d = self._check_quorum_deadline
            if self._transfer_deadline < d:
                d = self._transfer_deadline
            for q in (self._reads_waiting, self._reads_pending):
                if q and q[0].deadline < d:
                    d = q[0].deadline
        else:
            d = self._election_deadline
        for _, deadline in self._reads_forwarded.values():
            if deadline < d:
                d = deadline
            break  # insertion order is deadline order
        return d

    def read_entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Durable entries ``lo..hi`` from storage (at least one, about ``max_bytes``), with
        configuration entries as ``ConfigEntry`` (storage does not keep entry kinds)."""
        return self._log.from_storage(lo, hi, max_bytes)

    def term_at(self, seq: int) -> int:
        return self._log.term_at(seq)

    # --- inputs -----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Advance the clock: elections, heartbeats, CheckQuorum, read/transfer timeouts."""
        if now > self._now:
            self._now = now
        now = self._now
        if self._role is Role.LEADER:
            if now >= self._heartbeat_deadline:
                self._heartbeat_deadline = now + self._cfg.heartbeat_interval
                self._broadcast_heartbeat()
            if self._cfg.check_quorum and now >= self._check_quorum_deadline:
                active = self._recent_active
                active.add(self._id)
                if self._quorum.is_quorum(active):
                    self._prev_active = active
                    self._recent_active = set()
                    self._check_quorum_deadline = now + self._cfg.election_timeout
                else:
                    # Cut off from a quorum for a whole election timeout: another leader may
                    # exist by now, so stop serving (the original's "leader expiration").
                    self._become_follower(self._term, None)
        if self._role is Role.LEADER:
            if now >= self._transfer_deadline:
                self._transfer_target = None  # it did not take over in time; keep leading
                self._transfer_deadline = _NEVER
            self._expire_leader_reads(now)
        elif now >= self._election_deadline:
            if self._recovery is not None:
                self._recovery_tick()
            elif not self._is_voter:
                self._reset_election_timer()  # a learner (or removed node) never campaigns
            else:
                self._start_election(pre_vote=self._cfg.pre_vote)
        if self._reads_forwarded:
            self._expire_forwarded_reads(now)

    def step(self, from_id: NodeId, msg: CoreMessage) -> None:
        """Handle one message. Stale, duplicate, reordered or unknown-sender messages are
        ignored (they are normal on a network); never raises for a well-typed message.

        A sender outside this node's configuration is not refused: a node that has not yet
        seen the latest configuration must still follow a leader it does not know (thesis
        4.2). What counts is decided by the configuration (votes and acknowledgements only
        from its voters); the driver decides which nodes may talk to it at all."""
        if from_id == self._id:
            return
        t = type(msg)
        handler = self._handlers.get(t)
        if handler is None:
            return
        if msg.inc != self._peer_inc.get(from_id, 0) and not self._check_inc(from_id, msg):
            return
        rec = self._recovery
        if rec is not None and rec.phase == LEARN_TERM and t is not Recover and (
            t is not RecoverResponse
        ):
            return  # until the term is known this node acts on nothing (recovery.py)
        handler(from_id, msg)

    def propose(self, items: Sequence[bytes]) -> tuple[int, int]:
        """Leader only: append ``items`` (non-empty bytes) at the end of the log; returns
        ``(first_seq, term)``. Raises ``NotLeaderError`` (with the known leader) otherwise,
        including while this leader hands leadership to a higher-priority node."""
        if self._role is not Role.LEADER:
            raise NotLeaderError(
                f"node {self._id!r} is not the leader (role {self._role.value}, "
                f"leader {self._leader!r}); send the append there",
                leader=self._leader,
            )
        if self._transfer_target is not None:
            raise NotLeaderError(
                f"node {self._id!r} is handing leadership to {self._transfer_target!r}; "
                "retry once it leads",
                leader=None,
            )
        log = self._log
        first = log.last_seq + 1
        term = self._term
        if len(items) == 1:  # the common case (one client, one append): no loops
            d = items[0]
            if type(d) is not bytes or not d:
                self._bad_items(items)
            log.mem.append(Entry(first, term, d))
        else:
            if not items or not all(type(d) is bytes and d for d in items):
                self._bad_items(items)
            log.append([Entry(first + i, term, d) for i, d in enumerate(items)])
        self._bcast = True
        return first, term

    @staticmethod
    def _bad_items(items: Sequence[object]) -> None:
        if not items:
            raise InvalidArgumentError("propose([]): nothing to append")
        for i, d in enumerate(items):
            if type(d) is not bytes or not d:
                raise InvalidArgumentError(
                    f"propose: item {i} is {type(d).__name__} of length "
                    f"{len(d) if hasattr(d, '__len__') else '?'}; items must be non-empty "
                    "bytes (b'' is reserved for the leader's no-op entry)"
                )

    def read_index(self, read_id: int) -> None:
        """Start a linearizable read; its ``ReadState`` comes in a later ``Ready``. On a
        follower the request is forwarded to the leader; with no leader it fails at once
        (``index == -2``)."""
        if self._role is Role.LEADER:
            self._leader_read(read_id, None)
        elif self._leader is not None:
            leader = self._leader
            self._reads_forwarded[read_id] = (leader, self._now + self._cfg.election_timeout)
            self._msgs.append((leader, ReadIndex(self._term, read_id, self._inc)))
        else:
            self._read_states.append(ReadState(read_id, -2))

    def campaign(self) -> None:
        """Start an election now (skipping PreVote), e.g. in tests. A recovering node
        does not campaign."""
        if self._role is not Role.LEADER and self._recovery is None and self._is_voter:
            self._start_election(pre_vote=False)

    # --- outputs ----------------------------------------------------------------------
    def has_ready(self) -> bool:
        self._flush()
        return bool(
            self._msgs
            or self._msgs_after
            or self._read_states
            or self._warnings
            or self._snapshot_in
            or self._hs_changed
            or self._log.has_unstable()
            or self._commit > self._emitted_commit
            or self._emitted_hs.term != self._term
            or self._emitted_hs.vote != self._vote
            or self._emitted_soft.role is not self._role
            or self._emitted_soft.leader != self._leader
            or self._emitted_soft.term != self._term
        )

    def ready(self) -> Ready:
        if self._unadvanced is not None:
            raise UsageError(
                f"RaftCore {self._id!r}: ready() called again before advance(); handle each "
                "Ready and advance it first"
            )
        self._flush()
        rd = Ready(commit_seq=self._commit)
        soft = self._emitted_soft
        if soft.role is not self._role or soft.leader != self._leader or soft.term != self._term:
            rd.soft_state = self._emitted_soft = SoftState(self._role, self._leader, self._term)
        rd.truncate_after, rd.entries = self._log.take_unstable()
        if rd.entries and not self._has_log:
            self._has_log = self._hs_changed = True
        hs = self._emitted_hs
        if self._hs_changed or hs.term != self._term or hs.vote != self._vote:
            rd.hard_state = self._emitted_hs = self.hard_state
            self._hs_changed = False
        if self._msgs:
            rd.messages, self._msgs = self._msgs, []
        if self._msgs_after:
            rd.messages_after_persist, self._msgs_after = self._msgs_after, []
        if rd.hard_state is not None and rd.messages:
            # Nothing that depends on a hard state leaves before it is durable, whatever
            # the quorum: a one-node quorum wins inside one step, and its first appends
            # carry the new term (etcd's rule).
            rd.messages_after_persist[:0] = rd.messages
            rd.messages = []
        if self._warnings:
            rd.warnings, self._warnings = self._warnings, []
        if self._read_states:
            rd.read_states, self._read_states = self._read_states, []
        if self._snapshot_in:
            rd.snapshot_in, self._snapshot_in = self._snapshot_in, []
        self._emitted_commit = self._commit
        self._unadvanced = rd
        return rd

    def advance(self, ready: Ready) -> None:
        if ready is not self._unadvanced:
            raise UsageError(
                f"RaftCore {self._id!r}: advance() got a Ready that is not the last one "
                "ready() returned"
            )
        self._unadvanced = None
        if ready.entries:
            last = ready.entries[-1]
            self._log.stable_to(last.seq, last.term)
            if self._role is Role.LEADER:
                self._maybe_commit()
            elif self._recovery is not None:
                self._maybe_recovered()
            if len(self._configs.items) > 1:
                self._configs_committed()

    # --- roles ------------------------------------------------------------------------
    def _reset_election_timer(self) -> None:
        self._election_deadline = (
            self._now + self._timeout_lo + self._rng.random() * self._timeout_width
        )

    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        if term > self._term:
            self._term = term
            self._vote = None
        if self._role is Role.LEADER:
            self._end_leadership()
        self._role = Role.FOLLOWER
        self._leader = leader
        self._votes = {}
        self._transfer_campaign = False
        self._reset_election_timer()

    def _start_election(self, pre_vote: bool, transfer: bool = False) -> None:
        if self._role is Role.LEADER:
            self._end_leadership()
        self._leader = None
        self._votes = {self._id: True}
        self._transfer_campaign = transfer
        self._reset_election_timer()
        log = self._log
        if pre_vote:
            self._role = Role.PRE_CANDIDATE
            req = RequestVote(
                self._term + 1, log.last_seq, log.last_term, pre_vote=True, inc=self._inc
            )
            out = self._msgs  # asks for nothing durable
        else:
            self._role = Role.CANDIDATE
            self._term += 1
            self._vote = self._id
            req = RequestVote(
                self._term, log.last_seq, log.last_term, transfer=transfer, inc=self._inc
            )
            out = self._msgs_after  # only once term and vote are on disk
        for p in self._voters:
            out.append((p, req))
        self._tally()

    def _tally(self) -> None:
        """Count the votes of the current (pre-)election: win, lose or keep waiting."""
        votes = self._votes
        granted = [i for i, v in votes.items() if v]
        if "count_vote_twice" in self._bugs:
            extra = [p for p in self._voters if p not in votes]
            granted += extra[: len(granted) - 1]  # every grant but our own counts again
        q = self._quorum
        if q.is_quorum(granted):
            if self._role is Role.PRE_CANDIDATE:
                self._start_election(pre_vote=False, transfer=self._transfer_campaign)
            else:
                self._become_leader()
            return
        possible = [i for i in (self._id, *self._voters) if votes.get(i, True)]
        if not q.is_quorum(possible):
            self._become_follower(self._term, None)

    def _become_leader(self) -> None:
        now = self._now
        log = self._log
        self._role = Role.LEADER
        self._leader = self._id
        self._votes = {}
        self._transfer_campaign = False
        self._election_deadline = _NEVER
        nxt = log.last_seq + 1
        self._prs = {p: Progress(nxt, now) for p in self._peers}
        self._recent_active = set()
        self._prev_active = set()
        self._heartbeat_deadline = now + self._cfg.heartbeat_interval
        self._check_quorum_deadline = now + self._cfg.election_timeout
        self._transfer_target = None
        self._transfer_deadline = _NEVER
        self._read_acks = {}
        log.append([Entry(nxt, self._term, b"")])  # the no-op: commits earlier terms' entries
        self._bcast = True

    def _leading(self) -> bool:
        return self._role is Role.LEADER

    def _election_timeout(self) -> float:
        return self._cfg.election_timeout

    def _heartbeat_interval(self) -> float:
        return self._cfg.heartbeat_interval

    def _step_down_removed(self) -> None:
        # A configuration without this node is committed: it led the change to the end and
        # now leaves (thesis 4.2.2); a voter of the new configuration times out and wins.
        self._become_follower(self._term, None)

    def _end_leadership(self) -> None:
        for r in self._reads_waiting:
            self._fail_read(r)
        for r in self._reads_pending:
            self._fail_read(r)
        self._reads_waiting.clear()
        self._reads_pending.clear()
        self._read_round_open = False
        self._prs = {}
        self._dirty.clear()
        self._bcast = False
        self._recent_active = set()
        self._heartbeat_deadline = _NEVER
        self._check_quorum_deadline = _NEVER
        self._transfer_target = None
        self._transfer_deadline = _NEVER

    def _in_lease(self) -> bool:
        """Whether this node still follows (or is) a live leader, so a vote request is a
        disruption to refuse rather than an election to join."""
        if not (self._cfg.pre_vote or self._cfg.check_quorum):
            return False
        if self._role is Role.LEADER:
            return True
        return (
            self._leader is not None
            and self._now - self._last_leader_contact < self._cfg.election_timeout
        )

    # --- elections --------------------------------------------------------------------
    def _log_ok(self, last_seq: int, last_term: int) -> bool:
        my_term = self._log.last_term
        return last_term > my_term or (last_term == my_term and last_seq >= self._log.last_seq)

    def _on_request_vote(self, frm: NodeId, m: RequestVote) -> None:
        if m.pre_vote:
            # A pre-vote changes nothing here: it only says whether a vote would be granted.
            grant = (
                m.term > self._term
                and self._may_vote_for(m.last_seq, m.last_term)
                and (m.transfer or not self._in_lease())
                and self._log_ok(m.last_seq, m.last_term)
            )
            resp = VoteResponse(m.term if grant else self._term, grant, True, self._inc)
            self._msgs_after.append((frm, resp))
            return
        if m.term > self._term:
            if not m.transfer and self._in_lease():
                return  # a disruptive candidate; its term must not depose a live leader
            self._become_follower(m.term, None)
        if m.term < self._term:
            self._msgs_after.append((frm, VoteResponse(self._term, False, inc=self._inc)))
            return
        grant = (
            (self._vote is None or self._vote == frm)
            and self._may_vote_for(m.last_seq, m.last_term)
            and self._log_ok(m.last_seq, m.last_term)
        )
        if grant:
            self._vote = frm
            self._reset_election_timer()
        self._msgs_after.append((frm, VoteResponse(self._term, grant, inc=self._inc)))

    def _on_vote_response(self, frm: NodeId, m: VoteResponse) -> None:
        if m.pre_vote:
            if self._role is not Role.PRE_CANDIDATE:
                return
            if m.granted:
                if m.term != self._term + 1:
                    return  # answers an older pre-vote
                self._votes[frm] = True
            elif m.term > self._term:
                self._become_follower(m.term, None)  # we are behind; catch up quietly
                return
            else:
                self._votes[frm] = False
            self._tally()
            return
        if m.term > self._term:
            self._become_follower(m.term, None)
            return
        if m.term < self._term or self._role is not Role.CANDIDATE:
            return
        self._votes[frm] = m.granted
        self._tally()

    def _on_timeout_now(self, frm: NodeId, m: TimeoutNow) -> None:
        # Only from the leader of our current term, and so only once: campaigning moves
        # this node to the next term, where a duplicate is stale. A TimeoutNow from anyone
        # else would start an election that bypasses PreVote and the lease check.
        if m.term != self._term or self._leader != frm or self._role is not Role.FOLLOWER:
            return
        if self._recovery is not None or not self._is_voter:
            return  # a learner (or a node removed meanwhile) never leads
        self._start_election(pre_vote=False, transfer=True)

    # --- replication: follower side ---------------------------------------------------
    def _on_append(self, frm: NodeId, m: AppendEntries) -> None:
        term = self._term
        if m.term < term:
            if "skip_append_term_check" in self._bugs:
                self._accept_append(frm, m)
                return
            # Tell the stale leader about the newer term so that it steps down.
            self._msgs_after.append(
                (frm, AppendResponse(term, False, m.prev_seq, read_id=m.read_id, inc=self._inc))
            )
            return
        if self._accept_leader(frm, m.term):
            self._accept_append(frm, m)

    def _accept_leader(self, frm: NodeId, term: int) -> bool:
        """A message from the leader of ``term`` (>= ours): follow it. False if this node
        leads that term itself (two leaders in one term cannot happen; do not make it
        worse)."""
        if term > self._term:
            self._become_follower(term, frm)
        elif self._role is not Role.FOLLOWER:
            if self._role is Role.LEADER:
                return False
            self._become_follower(term, frm)
        else:
            if self._leader != frm:
                self._leader = frm
            self._reset_election_timer()
        self._last_leader_contact = self._now
        return True

    def _accept_append(self, frm: NodeId, m: AppendEntries) -> None:
        log = self._log
        prev = m.prev_seq
        entries = m.entries
        n = len(entries)
        if prev < -1 or (n and (entries[0].seq != prev + 1 or entries[-1].seq != prev + n)):
            return  # not a contiguous run after prev: malformed, drop
        base = log.first_seq - 1
        if prev < base:
            # Entries up to ``base`` are in our snapshot: committed, so they match any
            # leader's. Start after them.
            k = min(base - prev, n)
            entries = entries[k:]
            n -= k
            if not n and prev + k < base:
                # Nothing past the snapshot: say how far it goes (a heartbeat at prev = -1
                # to a follower that installed a snapshot lands here).
                self._msgs_after.append((frm, AppendResponse(
                    self._term, True, self._heartbeat_match(m), read_id=m.read_id, inc=self._inc,
                )))
                return
            prev = base
        last = log.last_seq
        if prev > last:
            self._msgs_after.append((frm, AppendResponse(
                self._term, False, prev, conflict_term=0, conflict_seq=last + 1,
                read_id=m.read_id, inc=self._inc,
            )))
            return
        if prev >= log.first_seq and log.term_at(prev) != m.prev_term:
            ct = log.term_at(prev)
            cs = log.first_of_term(prev, floor=self._commit + 1)
            self._msgs_after.append((frm, AppendResponse(
                self._term, False, prev, conflict_term=ct, conflict_seq=cs, read_id=m.read_id,
                inc=self._inc,
            )))
            return
        if n:
            start = 0
            if entries[0].seq <= last:
                # Skip what we already hold; find the first new or conflicting entry.
                term_at = log.term_at
                start = n
                for i in range(n):
                    e = entries[i]
                    if e.seq > last or term_at(e.seq) != e.term:
                        start = i
                        break
            if start < n:
                first_new = entries[start].seq
                if first_new <= last:
                    if first_new <= self._commit and not self._unguarded:
                        return  # would rewrite committed entries: impossible from a true leader
                    log.truncate_after(first_new - 1)
                    self._configs_truncated(first_new - 1)
                new = entries[start:] if start else entries
                log.append(new)
                for e in new:
                    if e.kind:
                        self._config_appended(e)  # in force from now on, committed or not
        last_new = prev + n
        if log.last_term == m.term and log.last_seq > last_new:
            # Entries of the leader's own term can only have come from it, so they match
            # its log: say how far we hold them (a heartbeat then tells the leader of a lost
            # last batch at once).
            last_new = log.last_seq
        commit = m.commit_seq if m.commit_seq < last_new else last_new
        if commit > self._commit:
            self._commit = commit
            if len(self._configs.items) > 1:
                self._configs_committed()
        self._msgs_after.append(
            (frm, AppendResponse(self._term, True, last_new, read_id=m.read_id, inc=self._inc))
        )

    def _heartbeat_match(self, m: AppendEntries) -> int:
        """How far our log surely matches the leader's, for an append that ends inside our
        snapshot: through our commit seq (committed entries match every leader's), or our
        whole log if it ends in the leader's term (only the leader wrote those)."""
        log = self._log
        return log.last_seq if log.last_term == m.term else min(self._commit, log.last_seq)

    # --- replication: leader side -----------------------------------------------------
    def _on_append_response(self, frm: NodeId, m: AppendResponse) -> None:
        if m.term > self._term:
            self._become_follower(m.term, None)
            return
        if m.term < self._term or self._role is not Role.LEADER:
            return
        pr = self._prs.get(frm)
        if pr is None or pr.lost:
            return  # not a member, or lost until it comes back as a new incarnation
        if not m.success and m.read_id and m.conflict_seq >= 0:
            # (conflict_seq -1: the answer to a message of an older term of ours, which a
            # follower refuses whatever its log holds)
            if m.read_id < pr.hb_floor:
                return  # answers a heartbeat sent to its previous incarnation
            # Heartbeats go at prev = match, which this follower acknowledged in this term:
            # rejecting one means it lost entries it promised to keep.
            self._read_acks.pop(frm, None)
            self._lost_member(frm, m)
            return
        self._recent_active.add(frm)
        if m.read_id:
            if m.read_id > self._read_acks.get(frm, 0):
                self._read_acks[frm] = m.read_id
                self._release_reads()
        log = self._log
        if pr.snap is not None:
            # A snapshot is on its way: heartbeats' answers only tell how far it matches.
            if m.success and pr.match < m.match_seq <= log.last_seq:
                pr.match = m.match_seq
                self._maybe_commit()
            return
        if m.success:
            ms = m.match_seq
            if ms > log.last_seq:
                return  # claims entries we never had
            if ms > pr.match:
                pr.match = ms
                pr.last_progress = self._now
                pr.idle_beats = 0
                if pr.probe:
                    pr.become_replicate(self._now)
                else:
                    infl = pr.inflight
                    while infl and infl[0] <= ms:
                        infl.popleft()
                    if pr.next <= ms:
                        pr.next = ms + 1
                self._maybe_commit()
                if self._role is not Role.LEADER or frm not in self._prs:
                    return  # (its own acknowledgement committed its removal)
            elif pr.probe:
                if ms < pr.next - 1:
                    return  # a read round's heartbeat, not the probe: keep probing
                pr.become_replicate(self._now)
            if self._transfer_target is not None:
                self._maybe_send_timeout_now(frm)
            if pr.match < log.last_seq:
                self._dirty.add(frm)
            elif (
                self._transfer_target is None
                and self._prio.get(frm, 0) > self._prio.get(self._id, 0)
                and self._transfer_deadline == _NEVER
                and frm in self._voters
            ):
                self._start_transfer(frm)  # an up-to-date voter we prefer as leader
            return
        rejected = m.match_seq
        if rejected > log.last_seq or rejected <= pr.match:
            # Rejects an append we never sent, or one overtaken by later acknowledgements
            # (reordered). A follower that really lost acknowledged entries is found by
            # the next heartbeat (above), so this never resends in a loop.
            return
        if pr.probe and rejected != pr.next - 1:
            return  # answers an older probe
        if m.conflict_term > 0:
            # Skip the follower's whole conflicting term: resume after our last entry of
            # that term if we have one, else at the first seq the follower has of it.
            s = log.last_at_or_below_term(pr.match, min(rejected, log.last_seq), m.conflict_term)
            # (s below our compaction point: not found; the hint then leads to a snapshot)
            if (s >= pr.match and s >= 0 and s >= log.first_seq - 1
                    and log.term_at(s) == m.conflict_term):
                nxt = s + 1
            else:
                nxt = m.conflict_seq
        else:
            nxt = m.conflict_seq
        if nxt > rejected:
            nxt = rejected  # the hint may not send us forward
        pr.become_probe(nxt)
        self._dirty.add(frm)

    def _maybe_commit(self) -> None:
        log = self._log
        matches = {p: pr.match for p, pr in self._prs.items() if not pr.lost}
        if self._is_voter:  # a leader being removed leads the change without counting
            matches[self._id] = log.stable
        n = self._quorum.highest(matches)
        if n <= self._commit:
            return
        if log.term_at(n) != self._term and "commit_old_term" not in self._bugs:
            return  # section 5.4.2: only the current term's entries commit by counting
        self._commit = n
        if self._configs.latest[0] >= 0:
            self._configs_committed()
            if self._role is not Role.LEADER:
                return
        if self._reads_waiting and log.term_at(n) == self._term:
            # The leader now knows the commit seq of its term: waiting reads can start.
            waiting = self._reads_waiting
            self._reads_waiting = deque()
            for r in waiting:
                self._start_read_round(r)

    def _send_append(self, p: NodeId, pr: Progress) -> None:
        log = self._log
        last = log.last_seq
        cfg = self._cfg
        term = self._term
        if pr.lost:
            return
        if pr.snap is not None or pr.next < log.first_seq:
            self._send_snapshot(p, pr)
            return
        if pr.probe:
            if pr.probe_sent:
                return
            nxt = pr.next
            ents = (
                log.slice(nxt, min(last, nxt + cfg.rpc_max - 1), cfg.rpc_max_bytes)
                if nxt <= last else []
            )
            # At prev = match (a seq it acknowledged) a rejection means lost data: mark it
            # as a heartbeat so that the answer is recognised.
            rid = self._read_round - 1 if nxt - 1 == pr.match >= 0 else 0
            self._msgs.append((p, AppendEntries(
                term, nxt - 1, log.term_at(nxt - 1), tuple(ents), self._commit, rid, self._inc
            )))
            pr.probe_sent = True
            return
        infl = pr.inflight
        max_inflight = cfg.max_inflight
        while len(infl) < max_inflight and pr.next <= last:
            nxt = pr.next
            if nxt < log.first_seq:  # compacted under a slow follower
                pr.become_probe(nxt)
                self._send_snapshot(p, pr)
                return
            ents = log.slice(nxt, min(last, nxt + cfg.rpc_max - 1), cfg.rpc_max_bytes)
            if not infl:
                pr.last_progress = self._now  # the stall clock starts with the first batch
            self._msgs.append((p, AppendEntries(
                term, nxt - 1, log.term_at(nxt - 1), tuple(ents), self._commit, 0, self._inc
            )))
            pr.next = nxt + len(ents)
            infl.append(pr.next - 1)

    def _heartbeat(self, p: NodeId, pr: Progress, read_id: int) -> None:
        # prev = match: the follower is known to hold it, so a heartbeat never causes a
        # rejection (and a fallback to probing) just because batches are still in flight;
        # if it is rejected all the same, the follower lost data (``_on_append_response``).
        # A lost member gets prev = -1: it keeps following, and nothing it says counts.
        match = self._heartbeat_prev(pr)
        self._msgs.append((p, AppendEntries(
            self._term, match, self._log.term_at(match), (), self._commit, read_id, self._inc
        )))

    def _broadcast_heartbeat(self) -> None:
        # A follower that acknowledged nothing for three heartbeat ticks while batches were
        # out lost them (a lost batch in mid-stream shows up sooner, as a rejection of the
        # next one; a lost last batch shows up in a heartbeat's answer, which says how far
        # the follower holds this term's entries). Probe again from what it has. Ticks are
        # counted, not timed: heartbeat times are sums of floats.
        rnd = self._read_round - 1  # the last read round sent: acknowledging it again is true
        first = self._log.first_seq
        for p, pr in self._prs.items():
            if pr.snap is not None:
                self._snapshot_tick(p, pr)
                if pr.snap is not None:
                    self._heartbeat(p, pr, rnd)
                    continue
            if pr.next < first and not pr.lost:
                # Needs a snapshot: start one if it was heard from lately, and in any case
                # a heartbeat, so that it is heard from.
                self._send_snapshot(p, pr)
                if pr.snap is None or pr.snap_acked < 0:
                    self._heartbeat(p, pr, rnd)
                continue
            if pr.probe and not pr.lost:
                if pr.probe_sent:
                    # No answer to the last probe yet: ask again without entries, so a dead
                    # follower costs a heartbeat, not a batch.
                    nxt = pr.next
                    rid = rnd if nxt - 1 == pr.match >= 0 else 0
                    self._msgs.append((p, AppendEntries(
                        self._term, nxt - 1, self._log.term_at(nxt - 1), (), self._commit, rid,
                        self._inc,
                    )))
                else:
                    self._send_append(p, pr)
                continue
            if pr.inflight:
                pr.idle_beats += 1
                if pr.idle_beats >= 3:
                    pr.become_probe(pr.match + 1)
                    self._send_append(p, pr)
                    continue
            self._heartbeat(p, pr, rnd)

    def _flush(self) -> None:
        """Send what stepping queued: appends to dirty followers and a read round."""
        if self._role is not Role.LEADER:
            return
        if self._bcast:
            self._bcast = False
            self._dirty.clear()
            for p, pr in self._prs.items():
                self._send_append(p, pr)
        elif self._dirty:
            prs = self._prs
            for p in self._dirty:
                self._send_append(p, prs[p])
            self._dirty.clear()
        if self._read_round_open:
            self._read_round_open = False
            rnd = self._read_round
            self._read_round += 1
            for p, pr in self._prs.items():
                self._heartbeat(p, pr, rnd)
            self._release_reads()

    # --- ReadIndex --------------------------------------------------------------------
    def _leader_read(self, read_id: int, origin: NodeId | None) -> None:
        r = _Read(read_id, origin, self._now + self._cfg.election_timeout)
        if self._log.term_at(self._commit) != self._term:
            self._reads_waiting.append(r)  # until the no-op of this term commits
        else:
            self._start_read_round(r)

    def _start_read_round(self, r: _Read) -> None:
        r.index = self._commit
        r.round = self._read_round
        self._read_round_open = True
        self._reads_pending.append(r)

    def _release_reads(self) -> None:
        pending = self._reads_pending
        if not pending:
            return
        acks = self._read_acks
        quorum = self._quorum
        while pending:
            r = pending[0]
            if r.round >= self._read_round and self._read_round_open:
                break  # its round has not been sent yet
            rnd = r.round
            ids = [self._id] + [p for p, a in acks.items() if a >= rnd]
            if not quorum.is_quorum(ids):
                break
            pending.popleft()
            self._answer_read(r, r.index)

    def _answer_read(self, r: _Read, index: int) -> None:
        if r.origin is None:
            self._read_states.append(ReadState(r.read_id, index))
        else:
            self._msgs.append(
                (r.origin, ReadIndexResponse(self._term, r.read_id, index, self._inc))
            )

    def _fail_read(self, r: _Read) -> None:
        self._answer_read(r, -2)

    def _expire_leader_reads(self, now: float) -> None:
        for q in (self._reads_waiting, self._reads_pending):
            # Deadlines are in arrival order; a read stuck behind a live one waits with it.
            while q and q[0].deadline <= now:
                self._fail_read(q.popleft())

    def _expire_forwarded_reads(self, now: float) -> None:
        fw = self._reads_forwarded
        expired = [rid for rid, (_, d) in fw.items() if d <= now]
        for rid in expired:
            del fw[rid]
            self._read_states.append(ReadState(rid, -2))

    def _on_read_index(self, frm: NodeId, m: ReadIndex) -> None:
        if self._role is Role.LEADER:
            self._leader_read(m.read_id, frm)
        else:
            self._msgs.append((frm, ReadIndexResponse(self._term, m.read_id, -2, self._inc)))

    def _on_read_index_response(self, frm: NodeId, m: ReadIndexResponse) -> None:
        pending = self._reads_forwarded.get(m.read_id)
        if pending is None or pending[0] != frm:
            return  # not ours, or answered already
        del self._reads_forwarded[m.read_id]
        self._read_states.append(ReadState(m.read_id, m.index))

    def __repr__(self) -> str:
        return (
            f"RaftCore({self._id!r} {self._role.value} term={self._term} "
            f"leader={self._leader!r} last={self._log.last_seq} commit={self._commit})"
        )


__all__ = [
    "Role", "HardState", "SoftState", "ReadState", "Ready", "LogStorage", "RaftConfig",
    "Quorum", "RaftCore", "KNOWN_BUGS",
]
