"""The simulated cluster: N real ``RaftCore``s on virtual time, with faults, clients and checks.

One :class:`Simulation` is one seed. Everything random in it (the network's faults, the crash
schedule, the clients' choices, each core's election timeouts) comes from ``random.Random``
instances derived from the seed, and every event goes through one :class:`EventQueue`, so a
seed replays exactly: same seed, same trace.

A run is ``steps`` slices of ``step_dt`` virtual seconds. At the start of each slice the fault
scheduler may partition or heal the network, crash a node (at once, or armed to die at its
k-th next storage step: between writing its vote and syncing it, between a truncate and the
append that follows, ...), or crash the whole cluster; crashed nodes restart after a random
delay from their durable state only. Then the slice's events run: message deliveries, timer
ticks, client operations.

After the last slice the simulation settles: it heals the network, restarts every node, lets
the clients finish what they started (no new operations), reads every key once more, and waits
for all nodes to apply the same log. It then checks that every acknowledged write is there and
that the client history is linearizable.

The node driver (:class:`SimNode`) follows the Raft core's driving protocol step by step
(``tinyraftplus.raft.core``): send ``messages``; persist the hard state and sync it; truncate;
append; sync; ``advance``; send ``messages_after_persist``; apply through ``commit_seq``; serve
``read_states``. Client writes go to the leader through ``propose`` (a follower forwards them
with ``Propose`` and waits to apply the seq the leader gave, as ``RaftNode`` does); reads go
through ``read_index``.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigurationError, InvalidArgumentError, MembershipError, NotLeaderError
from ..raft.core import RaftConfig, RaftCore, Role
from ..raft.membership import Config, QuorumRule, quorum_of
from ..raft.messages import Propose, ProposeResponse
from ..raft.snapshot import crc32c
from .app import OpSpec, SessionStateMachine, SimApp, kv_app, supports_snapshots
from .invariants import Invariants, SafetyViolation
from .linearizable import History, check
from .network import PARTITION_KINDS, EventQueue, NetworkFaults, SimNetwork
from .snapfiles import SNAPSHOT_STEPS
from .snapshots import SNAPSHOT_BUGS, NodeSnapshots, base_of
from .store import STORE_BUGS, SimCrash, SimStore

__all__ = ["SimConfig", "SimResult", "Simulation", "run_seed", "CORE_BUGS", "ALL_BUGS",
           "SNAPSHOT_BUGS"]

CORE_BUGS = frozenset({"count_vote_twice", "commit_old_term", "skip_append_term_check",
                       "config_on_commit", "skip_own_term_rule"})
# (store bugs, including "trust_wiped", are in store.py; the snapshot driver's in
# snapshots.py)
ALL_BUGS = CORE_BUGS | STORE_BUGS | SNAPSHOT_BUGS

_INF = float("inf")

CHURN_OVERRIDES: tuple[tuple[str, Any], ...] = (
    ("rpc_max", 1), ("new_leader_crash", 0.3), ("leader_crash", 0.5), ("crash_p", 0.03),
    ("drop", 0.3), ("pre_vote", False), ("check_quorum", False), ("vote_bounce", 0.5),
    ("duplicate", 0.05), ("long_delay", 0.05), ("restart_min", 0.001),
)


MEMBERSHIP_OVERRIDES: tuple[tuple[str, Any], ...] = (
    ("member_p", 0.3), ("spares", 2), ("wipe_p", 0.0),  # (wipes: see README, known limits)
)


@dataclass(frozen=True)
class SimConfig:
    """Knobs of a run. Anything left ``None`` is drawn from the seed (so different seeds
    explore different cluster sizes and fault intensities); set it to pin it."""

    steps: int = 300
    step_dt: float = 0.010
    nodes: int | None = None  # None: 3 or 5, from the seed
    clients: int = 3
    keys: int = 3
    faults: bool = True
    bugs: frozenset[str] = frozenset()
    election_timeout: float | None = None  # None: 0.05 .. 0.3 s from the seed
    # Pin fault-profile knobs (see ``_Profile``), e.g. ``(("rpc_max", 1),)``.
    overrides: tuple[tuple[str, Any], ...] = ()
    attempt_timeout: float = 0.3  # a client retries an attempt after this long
    op_timeout: float = 1.5  # and gives up on the operation (a "maybe") after this long
    settle_time: float = 20.0  # virtual seconds allowed to settle after the last step
    require_liveness: bool = True  # a cluster that cannot settle once healed is a failure
    max_messages: int = 200_000  # more than this in one seed is a message storm: a failure
    trace_tail: int = 60  # events shown around a failure
    # Snapshots (``snapshots.py``): every node snapshots its state machine after each
    # multiple of this many applied entries and compacts its log behind it. None: drawn from
    # the seed (off in some seeds, 4 to 25 in the others); 0: off.
    snapshot_entries: int | None = None
    trailing_entries: int | None = None  # kept behind a snapshot; None: drawn from the seed
    snapshot_chunk: int = 256  # bytes per InstallSnapshot chunk (small: several per transfer)
    snapshot_timeout: int = 10  # heartbeat ticks without progress before a transfer reopens

    def __post_init__(self) -> None:
        unknown = set(self.bugs) - ALL_BUGS
        if unknown:
            raise InvalidArgumentError(
                f"SimConfig: unknown bug(s) {sorted(unknown)}; known: {sorted(ALL_BUGS)}"
            )
        if self.nodes is not None and self.nodes < 1:
            raise InvalidArgumentError(f"SimConfig: nodes must be >= 1, got {self.nodes}")
        bad = [k for k, _ in self.overrides if k not in _Profile.__dataclass_fields__]
        if bad:
            raise InvalidArgumentError(
                f"SimConfig: unknown profile knob(s) {bad}; known: "
                f"{sorted(_Profile.__dataclass_fields__)}"
            )
        if self.steps < 0:
            raise InvalidArgumentError(f"SimConfig: steps must be >= 0, got {self.steps}")
        for name in ("snapshot_entries", "trailing_entries"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise InvalidArgumentError(
                    f"SimConfig: {name} must be a whole number >= 0 (0: off) or None "
                    f"(drawn from the seed), got {v!r}")
        for name in ("snapshot_chunk", "snapshot_timeout"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"SimConfig: {name} must be >= 1, got {v!r}")

    @classmethod
    def churn(cls, **kw: Any) -> SimConfig:
        """A harsher preset (``--preset churn``): three nodes, 50 ms elections, no PreVote or
        CheckQuorum, one entry per AppendEntries, 30% loss, leaders crashing soon after they
        win, voters bouncing right after they vote. It makes the multi-failure histories
        behind Raft's subtle bugs (Figure 8, a forgotten vote) common enough to find in a few
        hundred seeds; the default mix finds them too, but rarely."""
        overrides = dict(CHURN_OVERRIDES)
        overrides.update(dict(kw.pop("overrides", ())))
        kw.setdefault("nodes", 3)
        kw.setdefault("election_timeout", 0.05)
        return cls(overrides=tuple(overrides.items()), **kw)

    @classmethod
    def membership_churn(cls, **kw: Any) -> SimConfig:
        """``churn`` plus a membership change (or a leadership transfer) asked of the leader
        in 30% of the steps, with two spare nodes to add: leaders crash soon after they
        append a change, which is where the membership rules matter. No disk wipes (a
        member recovering while stale changes linger may wait: README, known limits)."""
        extra = dict(MEMBERSHIP_OVERRIDES)
        extra.update(dict(kw.pop("overrides", ())))
        return cls.churn(overrides=tuple(extra.items()), **kw)

    def replay_command(self, seed: int) -> str:
        parts = ["python -m tinyraftplus.sim", f"--seed {seed}", f"--steps {self.steps}"]
        n_churn = len(CHURN_OVERRIDES)
        churn = (self.overrides[:n_churn] == CHURN_OVERRIDES and self.nodes == 3
                 and self.election_timeout == 0.05)
        overrides = self.overrides[n_churn:] if churn else self.overrides
        if churn:
            parts.append("--preset churn")
        elif self.nodes is not None:
            parts.append(f"--nodes {self.nodes}")
        if self.clients != SimConfig.clients:
            parts.append(f"--clients {self.clients}")
        if self.keys != SimConfig.keys:
            parts.append(f"--keys {self.keys}")
        if self.snapshot_entries is not None:
            parts.append(f"--snapshot-entries {self.snapshot_entries}")
        if not self.faults:
            parts.append("--no-faults")
        if self.election_timeout is not None and not churn:
            parts.append(f"--election-timeout {self.election_timeout}")
        for k, v in overrides:
            parts.append(f"--set {k}={v!r}")
        for b in sorted(self.bugs):
            parts.append(f"--bug {b}")
        parts.append("--trace")
        return " ".join(parts)


@dataclass
class SimResult:
    seed: int
    ok: bool
    ops: int = 0
    acked_writes: int = 0
    elections: int = 0
    crashes: int = 0
    partitions: int = 0
    wipes: int = 0
    member_changes: int = 0
    messages: int = 0
    commits: int = 0
    checks: int = 0
    virtual_time: float = 0.0
    violation: SafetyViolation | None = None
    trace_hash: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Profile:
    """Per-seed fault intensities and Raft knobs (each drawn from the seed; pin any of them
    with ``SimConfig.overrides`` or ``--set name=value``). Probabilities are per message
    (network) or per step (partitions, crashes) unless said otherwise."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay_max: float = 0.005
    long_delay: float = 0.0  # probability of a long delay (up to 250 ms: reordering)
    partition_p: float = 0.0
    heal_p: float = 0.0
    crash_p: float = 0.0
    crash_all_p: float = 0.0
    leader_crash: float = 0.0  # share of crashes aimed at the current leader
    vote_bounce: float = 0.0  # chance a node that just persisted a vote crashes, restarts at once
    new_leader_crash: float = 0.0  # chance a new leader crashes within ~50 ms of winning
    restart_min: float = 0.1
    restart_max: float = 0.1
    torn: bool = False  # a crash may keep a random prefix of the unsynced writes
    skew: float = 0.0  # clock rate error, +/- this fraction
    pre_vote: bool = True
    check_quorum: bool = True
    rpc_max: int = 64
    max_inflight: int = 8
    # A small byte budget per AppendEntries also makes the leader's cache of recent entries
    # small (two windows of it), so it is trimmed all the time and lagging followers are
    # served from storage: what large values do to a real cluster.
    rpc_max_bytes: int = 1 << 20
    wipe_p: float = 0.0  # per step: a node crashes and loses its disk (one at a time)
    member_p: float = 0.0  # per step: the leader is asked for a membership change or transfer
    spares: int = 0  # nodes beyond the first configuration's voters, started as joiners
    # snapshots (when on): a crash at a random step of a snapshot being written or
    # installed (per snapshot); a bit flipped in a stopped node's newest snapshot file (per
    # crash); an InstallSnapshot chunk damaged in flight (per chunk)
    snap_crash: float = 0.0
    snap_rot: float = 0.0
    snap_corrupt: float = 0.0

    @property
    def net(self) -> NetworkFaults:
        return NetworkFaults(self.drop, self.duplicate, 0.0005, self.delay_max,
                             self.long_delay, 0.25, self.snap_corrupt)


def _profile(rng: random.Random, faults: bool) -> _Profile:
    if not faults:
        return _Profile()
    return _Profile(
        drop=rng.choice([0.0, 0.01, 0.05, 0.1, 0.2]),
        duplicate=rng.choice([0.0, 0.02, 0.05]),
        delay_max=rng.choice([0.002, 0.01, 0.03]),
        long_delay=rng.choice([0.0, 0.02, 0.05]),
        partition_p=rng.choice([0.005, 0.01, 0.03]),
        heal_p=rng.choice([0.01, 0.03, 0.06]),
        crash_p=rng.choice([0.003, 0.01, 0.03]),
        crash_all_p=rng.choice([0.0, 0.0, 0.002]),
        leader_crash=rng.choice([0.0, 0.3, 0.7]),
        vote_bounce=rng.choice([0.0, 0.1, 0.3]),
        new_leader_crash=rng.choice([0.0, 0.1, 0.3]),
        # a short restart (a process bounce) lets delayed messages from before the crash
        # reach the restarted node: what catches a node that forgot its vote
        restart_min=rng.choice([0.001, 0.02]),
        restart_max=rng.choice([0.05, 0.2, 1.0]),
        torn=rng.random() < 0.5,
        skew=rng.choice([0.0, 0.05, 0.2]),
        pre_vote=rng.random() < 0.8,
        check_quorum=rng.random() < 0.8,
        rpc_max=rng.choice([1, 3, 64]),
        max_inflight=rng.choice([1, 2, 8]),
        rpc_max_bytes=rng.choice([1 << 20, 1 << 20, 64]),
    )


class _Attempt:
    """One try of a client operation at one node; only the client's current attempt counts."""

    __slots__ = ("client", "node", "seq", "term")

    def __init__(self, client: _Client, node: Any) -> None:
        self.client = client
        self.node = node
        self.seq = -1
        self.term = -1

    def done(self, result: Any) -> None:
        self.client.on_done(self, result)

    def error(self, reason: str, hint: Any = None) -> None:
        self.client.on_error(self, reason, hint)


class SimNode:
    """The driver of one simulated node (see the module docstring for its protocol)."""

    def __init__(self, sim: Simulation, node_id: Any, rate: float, offset: float) -> None:
        self.sim = sim
        self.id = node_id
        self.rate = rate
        self.offset = offset
        self.store = SimStore(node_id, bugs=sim.config.bugs & STORE_BUGS,
                              rng=random.Random(f"{sim.seed}:store:{node_id}"),
                              torn=sim.profile.torn,
                              snap_rng=random.Random(f"{sim.seed}:snapfiles:{node_id}"))
        committed = sim.inv.committed
        self.store.committed_term = lambda seq: (
            committed[seq][0] if 0 <= seq < len(committed) else None)
        self.snaps: NodeSnapshots | None = None
        self.core: RaftCore | None = None
        self.sm: SessionStateMachine | None = None
        self.up = False
        self.incarnation = 0
        self.applied = -1
        self.led_term = -1
        self.checked_commit = -1
        self.checked_config: Config | None = None
        self.results: dict[int, Any] = {}
        self.write_waiters: dict[int, list[tuple[int, _Attempt]]] = {}
        self.read_waiters: list[tuple[int, _Attempt, Any]] = []
        self.reads: dict[int, tuple[_Attempt, Any]] = {}
        self.forwards: dict[int, _Attempt] = {}
        self.next_id = 1
        self.tick_at = _INF
        self.tick_gen = 0
        self.crash_gen = 0

    def local_now(self) -> float:
        return self.offset + self.rate * self.sim.queue.now

    # --- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        sim = self.sim
        self.incarnation += 1
        wiped = self.store.wipes > 0 and not self.store.has_state
        hs = self.store.restart_hard_state()
        rng = random.Random(f"{sim.seed}:core:{self.id}:{self.incarnation}")
        # Started without state, a node is given the cluster as an operator would: the first
        # voters at the first start, the current configuration's after a wipe.
        voters = sorted(sim.current_config().voters if wiped else sim.voter_ids)
        self.sm = SessionStateMachine(sim.app.state_machine())
        self.applied = -1
        self.snaps = snaps = NodeSnapshots(self)
        base = snaps.restore_at_start()  # the newest good snapshot, then the log after it
        self.core = RaftCore(
            self.id, voters, self.store, hs, config=sim.raft_config, rng=rng,
            now=self.local_now(), commit_seq=-1, bugs=sim.config.bugs & CORE_BUGS,
            join=self.id not in voters, snapshots=snaps, snapshot_base=base,
        )
        self.led_term = -1
        self.checked_commit = -1
        self.checked_config = None
        self.results = {}
        self.up = True
        sim.inv.on_restart(self.id)
        sim.trace("start", self.id, self.incarnation, hs.term, hs.vote, self.store.seq)
        self.process()

    def crash(self, why: str, restart_in: float | None = None) -> None:
        if not self.up:
            return
        step = self.store.crash_step
        if step in SNAPSHOT_STEPS:
            self.sim.snap_stats["crash " + step] += 1
        elif self.snaps is not None and self.snaps.job is not None:
            self.sim.snap_stats["crash while writing a snapshot"] += 1
        kept = self.store.crash()
        sim = self.sim
        if sim.snapshot_entries and sim.profile.snap_rot and self.snaps is not None and (
                sim.snap_rng.random() < sim.profile.snap_rot) and self.snaps.rot():
            sim.snap_stats["rot"] += 1
            kept += ", a bit of its newest snapshot flipped at rest"
        self.up = False
        self.core = None
        self.sm = None
        self.snaps = None
        self.write_waiters = {}
        self.read_waiters = []
        self.reads = {}
        self.forwards = {}
        self.tick_gen += 1
        self.tick_at = _INF
        self.crash_gen += 1
        sim.crashes += 1
        sim.trace("crash", self.id, why, kept, self.store.durable_seq)
        sim.check_acked_durable(f"after node {self.id} crashed")
        sim.schedule_restart(self, restart_in)

    # --- the driving protocol ----------------------------------------------------------
    def process(self) -> None:
        core = self.core
        sim = self.sim
        store = self.store
        send = sim.net.send
        me = self.id
        while self.up and core is not None and core.has_ready():
            rd = core.ready()
            if rd.soft_state is not None:
                ss = rd.soft_state
                sim.trace("role", me, ss.role.value, ss.term, ss.leader)
            for to, msg in rd.messages:
                send(me, to, msg)
            try:
                hs = rd.hard_state
                if hs is not None:
                    store.set_hard_state(hs)
                    store.sync_hard_state()
                    if hs.vote is not None and hs.vote != me:
                        sim.on_vote(self)
                wrote = False
                if rd.truncate_after is not None:
                    store.truncate_after(rd.truncate_after)
                    wrote = True
                if rd.entries:
                    store.append(rd.entries)
                    wrote = True
                    inv = sim.inv
                    for e in rd.entries:
                        inv.on_append(me, e.seq, e.term, store.chain_at(e.seq))
                if wrote:
                    store.sync_log()
            except SimCrash as crash:
                self.crash(str(crash))
                return
            core.advance(rd)
            for to, msg in rd.messages_after_persist:
                send(me, to, msg)
            if rd.snapshot_in:
                assert self.snaps is not None
                try:
                    for frm, piece in rd.snapshot_in:
                        self.snaps.on_piece(frm, piece)
                except SimCrash as crash:
                    self.crash(str(crash))
                    return
            if me in sim.lost and not core.recovering:
                sim.lost.discard(me)
                sim.trace("recovered", me, core.term, store.seq)
            if core.role is Role.LEADER and self.led_term != core.term:
                # What it committed before it led was checked where it was committed.
                self.checked_commit = core.commit_seq
                self.checked_config = core.latest_configuration
            if core.role is Role.LEADER and core.commit_seq > self.checked_commit:
                self.checked_commit = core.commit_seq
                sim.check_commit_quorum(self)
            if core.role is Role.LEADER and self.led_term != core.term:
                self.led_term = core.term
                sim.elections += 1
                sim.trace("leader", me, core.term, store.seq)
                sim.inv.on_leader(me, core.term, store.chain_snapshot())
                sim.on_new_leader(self)
            commit = core.commit_seq
            if rd.commit_seq > commit:
                sim.fail("commit report",
                         f"node {me}'s Ready says commit_seq {rd.commit_seq} but the core's "
                         f"commit_seq is {commit}", [me])
            sim.inv.on_commit(me, commit, core.term, store.seq, store.chain_at, store.term_at,
                              store.first_seq - 1)
            if rd.commit_seq > self.applied:
                self._apply(rd.commit_seq)
            for rs in rd.read_states:
                self._read_state(rs.read_id, rs.index)
        if self.up and core is not None:
            self._schedule_tick()

    def _apply(self, commit: int) -> None:
        store = self.store
        sm = self.sm
        assert sm is not None
        sim = self.sim
        core = self.core
        assert core is not None
        for seq in range(self.applied + 1, min(commit, store.seq) + 1):
            e = core.read_entries(seq, seq, 1 << 30)[0]  # typed: a ConfigEntry is one
            result = sm.apply(b"" if e.kind else e.data, seq)  # a configuration: as a no-op
            self.applied = seq
            if self.snaps is not None:
                self.snaps.on_applied(e)
            self.results[seq] = result
            sim.commits += 1
            waiters = self.write_waiters.pop(seq, None)
            if waiters:
                for term, att in waiters:
                    if e.term == term:
                        att.seq, att.term = seq, term
                        att.done(result)
                    else:
                        att.error(f"entry at seq {seq} was replaced (term {e.term}, not {term})")
        self._release_reads()

    def after_install(self, seq: int) -> None:
        """A snapshot through ``seq`` was installed: writes waiting for a seq it covers can
        no longer learn their entry's term (compacted): their clients retry (sessions make
        that safe); reads it covers can be served."""
        for s in [s for s in self.write_waiters if s <= seq]:
            for _term, att in self.write_waiters.pop(s):
                att.error(f"entry at seq {s} is behind an installed snapshot")
        self._release_reads()

    def _release_reads(self) -> None:
        sm = self.sm
        assert sm is not None
        if self.read_waiters:
            still = []
            for index, att, query in self.read_waiters:
                if index <= self.applied:
                    att.done(sm.read(query))
                else:
                    still.append((index, att, query))
            self.read_waiters = still

    def _read_state(self, read_id: int, index: int) -> None:
        entry = self.reads.pop(read_id, None)
        if entry is None:
            return
        att, query = entry
        if index == -2:
            att.error("read index refused")
        elif index <= self.applied:
            assert self.sm is not None
            att.done(self.sm.read(query))
        else:
            self.read_waiters.append((index, att, query))

    def _schedule_tick(self) -> None:
        core = self.core
        assert core is not None
        d = core.next_deadline
        if d is None or d == _INF:
            return
        now = self.sim.queue.now
        t = (d - self.offset) / self.rate
        if t < now + 1e-4:  # timer resolution; also keeps a stuck deadline from spinning
            t = now + 1e-4
        if self.tick_at > now and self.tick_at <= t:
            return  # an earlier or equal tick is already pending
        self.tick_gen += 1
        self.tick_at = t
        self.sim.queue.at(t, self._on_tick, self.tick_gen)

    def _on_tick(self, gen: int) -> None:
        if gen != self.tick_gen or not self.up or self.core is None:
            return
        self.tick_at = _INF
        self.core.tick(self.local_now())
        self.process()

    # --- network -------------------------------------------------------------------------
    def on_message(self, src: Any, msg: Any) -> None:
        if not self.up or self.core is None:
            return
        sim = self.sim
        sim.trace("recv", src, self.id, msg)
        if isinstance(msg, Propose):
            try:
                seq, term = self.core.propose(list(msg.items))
            except NotLeaderError as e:
                sim.net.send(self.id, src, ProposeResponse(msg.req_id, -1, 0, "not leader",
                                                           e.leader))
            else:
                sim.net.send(self.id, src, ProposeResponse(msg.req_id, seq, term))
        elif isinstance(msg, ProposeResponse):
            att = self.forwards.pop(msg.req_id, None)
            if att is not None:
                if msg.first_seq < 0:
                    att.error(f"forward refused: {msg.error}", msg.leader)
                else:
                    self._wait_write(msg.first_seq, msg.term, att)
        else:
            self.core.step(src, msg)
        self.process()

    # --- client entry points --------------------------------------------------------------
    def _wait_write(self, seq: int, term: int, att: _Attempt) -> None:
        if seq <= self.applied:
            e = self.store.entry(seq)  # (None if compacted: the client retries)
            if e is not None and e.term == term:
                att.seq, att.term = seq, term
                att.done(self.results.get(seq))
            else:
                att.error(f"entry at seq {seq} was replaced")
        else:
            self.write_waiters.setdefault(seq, []).append((term, att))

    def client_write(self, att: _Attempt, data: bytes) -> None:
        core = self.core
        if not self.up or core is None:
            return  # the request is lost; the client times out
        if core.role is Role.LEADER:
            try:
                seq, term = core.propose([data])
            except NotLeaderError as e:
                att.error("not leader", e.leader)
                return
            self._wait_write(seq, term, att)
            self.process()
        elif core.leader is not None and core.leader != self.id:
            req = self.next_id
            self.next_id += 1
            self.forwards[req] = att
            self.sim.net.send(self.id, core.leader, Propose(req, (data,)))
        else:
            att.error("no leader")

    def client_read(self, att: _Attempt, query: Any) -> None:
        core = self.core
        if not self.up or core is None:
            return
        rid = self.next_id
        self.next_id += 1
        self.reads[rid] = (att, query)
        core.read_index(rid)
        self.process()


class _Client:
    """A sequential client: one operation at a time, retried until done or given up."""

    def __init__(self, sim: Simulation, cid: int) -> None:
        self.sim = sim
        self.id = cid
        self.rng = random.Random(f"{sim.seed}:client:{cid}")
        self.n = 0
        self.spec: OpSpec | None = None
        self.hist_id = -1
        self.started = 0.0
        self.attempt: _Attempt | None = None
        self.hint: Any = None
        self.tries = 0
        self.final: list[OpSpec] = []

    @property
    def idle(self) -> bool:
        return self.spec is None

    def issue(self) -> None:
        sim = self.sim
        if self.spec is not None:
            return
        if sim.stopping:
            if not self.final:
                return
            spec = self.final.pop(0)
        else:
            spec = sim.app.workload.next_op(self.rng, self.id, self.n)
        self.n += 1
        self.spec = spec
        self.tries = 0
        self.started = sim.queue.now
        self.hist_id = sim.history.invoke(self.id, spec.key, spec.kind, spec.input,
                                          sim.queue.now)
        sim.trace("invoke", self.id, self.hist_id, spec.kind, spec.key, spec.input)
        self._try()

    def _try(self) -> None:
        sim = self.sim
        spec = self.spec
        assert spec is not None
        rng = self.rng
        ids = sim.node_ids
        node = self.hint if (self.hint in sim.nodes and rng.random() < 0.8) else rng.choice(ids)
        att = _Attempt(self, node)
        self.attempt = att
        self.tries += 1
        sim.queue.after(sim.config.attempt_timeout, self._timeout, att)
        target = sim.nodes[node]
        if spec.write:
            payload = sim.app.workload.encode(spec)
            data = SessionStateMachine.wrap(self.id, self.n, payload)
            target.client_write(att, data)
        else:
            target.client_read(att, sim.app.workload.query(spec))

    def on_done(self, att: _Attempt, result: Any) -> None:
        if att is not self.attempt or self.spec is None:
            return
        sim = self.sim
        spec = self.spec
        output = sim.app.workload.output(spec, result)
        sim.history.ok(self.hist_id, output, sim.queue.now)
        sim.trace("ok", self.id, self.hist_id, output, att.node, att.seq)
        if spec.write:
            sim.inv.on_ack(att.seq, att.term,
                           f"client {self.id}'s {spec.kind}({spec.key!r}, {spec.input!r})")
        self.hint = att.node
        self._finish()

    def on_error(self, att: _Attempt, reason: str, hint: Any) -> None:
        if att is not self.attempt:
            return
        self.attempt = None
        self.sim.trace("error", self.id, self.hist_id, att.node, reason, hint)
        self.hint = hint
        self.sim.queue.after(0.005 + self.rng.random() * 0.02, self._retry)

    def _timeout(self, att: _Attempt) -> None:
        if att is not self.attempt:
            return
        self.attempt = None
        self.sim.trace("timeout", self.id, self.hist_id, att.node)
        self.hint = None
        self._retry()

    def _retry(self) -> None:
        sim = self.sim
        if self.spec is None or self.attempt is not None:
            return
        if not sim.stopping and sim.queue.now - self.started > sim.config.op_timeout:
            spec = self.spec
            if spec.write:
                sim.history.info(self.hist_id)  # maybe applied, maybe not
            else:
                sim.history.fail(self.hist_id)  # a read that never returned changed nothing
            sim.trace("give-up", self.id, self.hist_id)
            self._finish()
            return
        self._try()

    def _finish(self) -> None:
        self.attempt = None
        self.spec = None
        self.sim.queue.after(self.rng.random() * 0.03, self.issue)


class Simulation:
    """One seed of the simulator; :meth:`run` returns a :class:`SimResult` or raises
    :class:`SafetyViolation`."""

    def __init__(self, seed: int, config: SimConfig | None = None, app: SimApp | None = None,
                 record_trace: bool = True) -> None:
        self.seed = seed
        self.config = config = config if config is not None else SimConfig()
        self.app = app if app is not None else kv_app(config.keys)
        master = random.Random(f"tinyraftplus-sim:{seed}")
        n = config.nodes if config.nodes is not None else master.choice([3, 3, 5])
        self.profile = _profile(master, config.faults)
        if config.faults:
            # Drawn from generators of their own so that adding these faults kept every
            # other draw of a seed as it was.
            wipe = random.Random(f"{seed}:wipe").choice([0.0, 0.002, 0.005, 0.01])
            mr = random.Random(f"{seed}:membership")
            self.profile = replace(self.profile, wipe_p=wipe,
                                   member_p=mr.choice([0.0, 0.01, 0.03, 0.06]),
                                   spares=mr.choice([0, 1, 2]))
        # Snapshots: settings and faults drawn from a generator of their own too.
        sr = random.Random(f"{seed}:snapshots")
        can_snap = supports_snapshots(self.app.state_machine())
        every = config.snapshot_entries
        if every is None:
            every = sr.choice([0, 0, 4, 10, 25]) if can_snap else 0
        elif every and not can_snap:
            raise InvalidArgumentError(
                f"SimConfig.snapshot_entries={every}: the state machine under test has no "
                "snapshot() and restore(data) (see tinyraftplus.sim.app.StateMachine); give "
                "it both, or run with snapshot_entries=0")
        trailing = config.trailing_entries
        if trailing is None:
            trailing = sr.choice([0, every // 2, 2 * every])
        self.snapshot_entries: int = every
        self.trailing_entries: int = trailing
        if every and config.faults:
            self.profile = replace(self.profile, snap_crash=sr.choice([0.0, 0.1, 0.3]),
                                   snap_rot=sr.choice([0.0, 0.1, 0.3]),
                                   snap_corrupt=sr.choice([0.0, 0.01, 0.05]))
        self.snap_rng = random.Random(f"{seed}:snapjobs")
        # taken, skipped, installs, compactions, restores, damaged, "crash <step>"
        self.snap_stats: Counter[str] = Counter()
        if every:
            self.snap_stats["seeds"] = 1
        if config.overrides:
            self.profile = replace(self.profile, **dict(config.overrides))
        p = self.profile
        et = config.election_timeout
        if et is None:
            et = master.choice([0.05, 0.1, 0.15, 0.3])
        self.raft_config = RaftConfig(
            election_timeout=et,
            heartbeat_interval=et / 5,
            rpc_max=p.rpc_max,
            rpc_max_bytes=p.rpc_max_bytes,
            max_inflight=p.max_inflight,
            pre_vote=p.pre_vote,
            check_quorum=p.check_quorum,
            snapshot_chunk=config.snapshot_chunk,
            snapshot_timeout=config.snapshot_timeout,
        )
        # The first configuration's voters, then spare nodes that start as joiners (learners
        # of nobody's configuration until a membership change adds them).
        self.voter_ids: list[int] = list(range(1, n + 1))
        self.node_ids: list[int] = list(range(1, n + 1 + p.spares))
        self.quorum_size = n // 2 + 1
        self.rule = QuorumRule()
        self.member_changes = 0
        self.queue = EventQueue()
        self._record = record_trace
        self._trace: list[tuple[Any, ...]] = []
        self.step = -1
        self.fault_rng = random.Random(f"{seed}:faults")
        self.net = SimNetwork(self.queue, self.node_ids, random.Random(f"{seed}:net"),
                              p.net, self._deliver)
        self.inv = Invariants(self.node_ids, self.quorum_size, self.fail)
        self.history = History()
        self.nodes: dict[Any, SimNode] = {}
        for i in self.node_ids:
            rate = 1.0 + master.uniform(-p.skew, p.skew)
            offset = master.uniform(0, 1000.0)
            self.nodes[i] = SimNode(self, i, rate, offset)
        self.clients = [_Client(self, c) for c in range(config.clients)]
        self.stopping = False
        self.crashes = 0
        self.partitions = 0
        self.elections = 0
        self.commits = 0
        self.wipes = 0
        # Nodes whose disk was wiped and that have not finished recovering: until then they
        # hold less than they acknowledged, which the durability check allows for.
        self.lost: set[int] = set()

    # --- tracing and failing ------------------------------------------------------------------
    def trace(self, kind: str, *args: Any) -> None:
        if self._record:
            self._trace.append((self.queue.now, self.step, kind, args))

    def trace_lines(self, last: int | None = None) -> list[str]:
        events = self._trace if last is None else self._trace[-last:]
        return [f"  t={t:9.6f} step={s:4d} {kind:8s} " + " ".join(map(_fmt, args))
                for t, s, kind, args in events]

    def trace_hash(self) -> str:
        h = hashlib.sha256()
        for ev in self._trace:
            h.update(repr(ev).encode())
            h.update(b"\n")
        return h.hexdigest()

    def fail(self, invariant: str, message: str, nodes: Sequence[Any]) -> None:
        cfg = self.config
        head = (f"SAFETY VIOLATION [{invariant}] seed={self.seed} step={self.step} "
                f"t={self.queue.now:.6f} nodes={list(nodes)}: {message}")
        lines = [head, f"replay: {cfg.replay_command(self.seed)}",
                 f"cluster: {len(self.node_ids)} nodes, profile {self.profile}"]
        if self._record and cfg.trace_tail:
            lines.append(f"last {min(cfg.trace_tail, len(self._trace))} events:")
            lines += self.trace_lines(cfg.trace_tail)
        raise SafetyViolation(message, invariant=invariant, nodes=nodes, seed=self.seed,
                              step=self.step, report="\n".join(lines))

    def check_acked_durable(self, when: str) -> None:
        """No leader can ever be elected without an acknowledged write: for every node Y
        that lacks it, the voters of Y's own latest configuration that lack it too and
        whose durable log is no more up to date than Y's (those who would vote for Y) must
        not form a quorum of that configuration. Members recovering from a lost disk count
        as holding it (they vote for nobody without it)."""
        self.inv.checks += 1
        info: dict[Any, tuple[Config, tuple[int, int]]] = {}
        for n in self.nodes.values():
            store = n.store
            last = store.durable_seq
            key = (store.durable_term_at(last) or 0, last) if last >= 0 else (0, -1)
            if n.up and n.core is not None:
                cfg = n.core.configuration
            else:
                cfg = self.durable_config(n)[1]
            info[n.id] = (cfg, key)
        quorums: dict[int, Any] = {}
        for seq, term, what in self.inv.acked:
            lacking = [i for i, n in self.nodes.items()
                       if i not in self.lost and n.store.durable_term_at(seq) != term]
            for y in lacking:
                cfg, ykey = info[y]
                if y not in cfg.all_voters and not self.nodes[y].up:
                    continue
                voters = [v for v in cfg.all_voters
                          if v in lacking and (v == y or info[v][1] <= ykey)]
                q = quorums.get(id(cfg))
                if q is None:
                    q = quorums[id(cfg)] = quorum_of(cfg, self.rule)
                if q.is_quorum(voters):
                    holders = [i for i in self.nodes if i not in lacking]
                    self.fail(
                        "acknowledged write durability",
                        f"{what} was acknowledged at seq {seq} term {term} but {when} only "
                        f"{holders} hold it durably: node {y} could be elected without it by "
                        f"{sorted(voters)} ({cfg.describe()})", holders)
                    return

    def durable_config(self, node: SimNode) -> tuple[int, Config]:
        """The configuration a node that is down would restart with, and the seq of its
        entry: its newest good durable snapshot's (the one in force at the snapshot's seq)
        unless its durable hard state names a later one, else the hard state's, else the
        first voters'. (The hard state's stack stays None until a change is persisted.)"""
        store = node.store
        stack = store.durable_hard_state().configs
        snap = store.snaps.durable_newest()
        if snap is not None and snap.config is not None:
            later = [x for x in stack.items if x[0] > snap.seq] if stack is not None else []
            if later:
                return later[-1][0], later[-1][2]
            b = base_of(snap)
            return b.config_seq, b.config
        if stack is not None:
            return stack.latest[0], stack.latest[2]
        return -1, Config(frozenset(self.voter_ids))

    def check_commit_quorum(self, node: SimNode) -> None:
        """A leader commits only what a quorum of the configuration in force holds
        durably (joint: a quorum of each half)."""
        core = node.core
        assert core is not None
        seq = core.commit_seq
        term = core.term_at(seq)
        # The commit advanced under the configuration in force then: the one at the last
        # check or (if a change was appended since, within the same step) the current one.
        # In force means the latest in the log, whatever the core uses.
        cfg = core.latest_configuration
        ok = False
        for c in (cfg, node.checked_config or cfg):
            # (a node that lost its disk since it acknowledged is not asked for its vote
            # before it holds the entry again: it counts as holding it)
            holders = {i for i in c.all_voters
                       if self.nodes[i].store.durable_term_at(seq) == term or i in self.lost}
            ok = ok or quorum_of(c, self.rule).is_quorum(holders)
        node.checked_config = cfg
        self.inv.checks += 1
        if not ok:
            self.fail("commit quorum",
                      f"node {node.id} committed seq {seq} (term {term}) held durably only by "
                      f"{sorted(holders)}, not a quorum of the configuration in force "
                      f"({cfg.describe()})", [node.id])

    def _config_settled(self) -> bool:
        """No membership change in flight on any running node (the simulator wipes disks
        only then; see the README's known limits)."""
        return all(n.core.config_seq <= n.core.commit_seq for n in self.nodes.values()
                   if n.up and n.core is not None)

    def _membership_op(self, r: random.Random) -> None:
        lead = self.leader()
        if lead is None or self.lost:
            # (No change while a member recovers from a wipe: a leader that removes itself
            # and dies before its change commits can hold the only copy of a log tail the
            # recovering member then waits for; see the README's known limits.)
            return
        node = self.nodes[lead]
        core = node.core
        assert core is not None
        cfg = core.configuration
        outsiders: list[Any] = [i for i in self.node_ids if i not in cfg.members]
        learners: list[Any] = sorted(cfg.learners, key=repr)
        voters: list[Any] = sorted(cfg.voters, key=repr)
        ops = ["transfer"]
        if outsiders:
            ops.append("add learner")
        if learners:
            ops.append("promote")
        if len(voters) > 3:
            ops.append("remove")
        if learners and len(voters) >= 3:
            ops.append("replace")
        op = r.choice(ops)
        try:
            if op == "transfer":
                to = r.choice([None, *voters])
                what = f"transfer to {core.transfer_leadership(to)}"
            elif op == "add learner":
                x = r.choice(outsiders)
                core.propose_config(cfg.voters, cfg.learners | {x})
                what = f"add learner {x}"
            elif op == "promote":
                x = r.choice(learners)
                core.propose_config(cfg.voters | {x}, cfg.learners - {x}, max_lag=50)
                what = f"promote {x}"
            elif op == "remove":
                x = r.choice(voters)
                core.propose_config(cfg.voters - {x}, cfg.learners)
                what = f"remove {x}"
            else:
                x, y = r.choice(voters), r.choice(learners)
                core.propose_config((cfg.voters - {x}) | {y}, cfg.learners - {y}, max_lag=50)
                what = f"replace {x} by {y}"
        except (MembershipError, NotLeaderError, InvalidArgumentError, ConfigurationError) as e:
            self.trace("member-refused", lead, op, str(e)[:60])
            return
        self.member_changes += 1
        self.trace("member", lead, what)
        node.process()

    def current_config(self) -> Config:
        """The configuration the cluster moves in: the leader's (of the highest term among
        the running leaders), unless a node that is down had reached a higher term (then
        that leader may be stale); else that of the follower or stopped node of the
        highest term, newest configuration first. Not simply the newest entry anywhere: a
        node cut off with a change that was overwritten since, or a candidate of a term it
        will not win, holds a configuration nobody else uses."""
        leaders = [n.core for n in self.nodes.values()
                   if n.up and n.core is not None and n.core.role is Role.LEADER]
        down_terms = [n.store.durable_hard_state().term for n in self.nodes.values()
                      if not n.up]
        if leaders:
            lead = max(leaders, key=lambda c: c.term)
            if not down_terms or max(down_terms) <= lead.term:
                return lead.configuration
        cands: list[tuple[int, int, Config]] = []
        for n in self.nodes.values():
            if n.id in self.lost:
                continue  # its configuration is what it was given to start with
            core = n.core
            if n.up and core is not None:
                if core.role is Role.FOLLOWER or core.role is Role.LEADER:
                    cands.append((core.term, core.config_seq, core.configuration))
            else:
                hs = n.store.durable_hard_state()
                if hs.configs is not None or n.store.snaps.durable_newest() is not None:
                    cseq, cfg = self.durable_config(n)
                    cands.append((hs.term, cseq, cfg))
        if cands:
            return max(cands, key=lambda x: (x[0], x[1]))[2]
        return Config(frozenset(self.voter_ids))
    def _deliver(self, src: Any, dst: Any, msg: Any) -> None:
        self.nodes[dst].on_message(src, msg)

    def leader(self) -> int | None:
        best = None
        for i, node in self.nodes.items():
            core = node.core
            if node.up and core is not None and core.role is Role.LEADER:
                if best is None or core.term > self.nodes[best].core.term:  # type: ignore
                    best = i
        return best

    # --- faults -------------------------------------------------------------------------------
    def _restart(self, node: SimNode, gen: int) -> None:
        if not node.up and node.crash_gen == gen:
            node.start()

    def schedule_restart(self, node: SimNode, delay: float | None = None) -> None:
        if self.stopping:
            return
        if delay is None:
            p = self.profile
            delay = self.fault_rng.uniform(p.restart_min, max(p.restart_min, p.restart_max))
        self.queue.after(delay, self._restart, node, node.crash_gen)

    def _crash_now(self, node: SimNode, why: str) -> None:
        node.crash(why)

    def _can_crash_one(self) -> bool:
        voters = self.current_config().voters
        down = sum(1 for i in voters if not self.nodes[i].up)
        return down < len(voters) - (len(voters) // 2 + 1)

    def on_vote(self, node: SimNode) -> None:
        """A node just made a vote durable: maybe bounce it (crash, restart at once), which
        lets vote requests already in flight reach it again after the restart."""
        if self.stopping or not self.config.faults:
            return
        r = self.fault_rng
        if r.random() < self.profile.vote_bounce:
            self.queue.after(r.uniform(0.0, 0.002), self._bounce, node, node.crash_gen)

    def _bounce(self, node: SimNode, gen: int) -> None:
        if node.up and node.crash_gen == gen and self._can_crash_one() and not self.stopping:
            node.crash("bounce after voting", restart_in=self.fault_rng.uniform(0.0005, 0.005))

    def on_new_leader(self, node: SimNode) -> None:
        if self.stopping or not self.config.faults:
            return
        r = self.fault_rng
        if r.random() < self.profile.new_leader_crash:
            self.queue.after(r.uniform(0.0, 0.05), self._crash_leader, node, node.crash_gen)

    def _crash_leader(self, node: SimNode, gen: int) -> None:
        if node.up and node.crash_gen == gen and self._can_crash_one() and not self.stopping:
            node.crash("new leader crash")

    def _force_armed(self, node: SimNode, gen: int) -> None:
        if node.up and node.crash_gen == gen and node.store.crash_armed:
            self._crash_now(node, "armed crash did not fire in time")

    def _faults(self) -> None:
        p = self.profile
        r = self.fault_rng
        net = self.net
        if net.cut:
            if r.random() < p.heal_p:
                net.heal()
                self.trace("heal")
        elif r.random() < p.partition_p:
            kind = r.choice(PARTITION_KINDS)
            desc = net.partition(kind, self.leader())
            self.partitions += 1
            self.trace("partition", desc)
        if p.member_p and r.random() < p.member_p:
            self._membership_op(r)
        if p.wipe_p and not self.lost and self._config_settled() and r.random() < p.wipe_p:
            members = self.current_config().members
            up = [n for n in self.nodes.values() if n.up and n.id in members]
            if up and self._can_crash_one():
                victim = r.choice(up)
                victim.crash("crash, then the disk is wiped")
                victim.store.wipe()
                self.wipes += 1
                if "trust_wiped" not in self.config.bugs:
                    self.lost.add(victim.id)
                self.trace("wipe", victim.id)
                self.check_acked_durable(f"after node {victim.id} lost its disk")
                return
        if r.random() < p.crash_all_p:
            for node in self.nodes.values():
                if node.up:
                    self._crash_now(node, "whole-cluster crash")
            return
        if r.random() < p.crash_p:
            up = [n for n in self.nodes.values() if n.up]
            if up and self._can_crash_one():
                lead = self.leader()
                if lead is not None and r.random() < p.leader_crash:
                    victim = self.nodes[lead]
                else:
                    victim = r.choice(up)
                if r.random() < 0.5 or victim.store.crash_armed:
                    self._crash_now(victim, "crash")
                else:
                    k = r.randint(0, 4)
                    victim.store.arm_crash(k)
                    gen = victim.crash_gen
                    self.trace("arm-crash", victim.id, k)
                    self.queue.after(0.2, self._force_armed, victim, gen)

    # --- the run -----------------------------------------------------------------------------
    def run(self) -> SimResult:
        """Run the seed; raises :class:`SafetyViolation` on any violation, including an
        unexpected exception out of the core or the state machine (reported as
        ``invariant="exception"`` with its traceback and the trace)."""
        try:
            return self._run()
        except SafetyViolation:
            raise
        except Exception as e:
            import traceback

            tb = "".join(traceback.format_exception(e)[-6:])
            self.fail("exception", f"unexpected {type(e).__name__}: {e}\n{tb}", [])
            raise  # unreachable: fail() raises

    def _run(self) -> SimResult:
        cfg = self.config
        queue = self.queue
        for node in self.nodes.values():
            node.start()
        for c in self.clients:
            queue.after(c.rng.random() * 0.05, c.issue)
        for step in range(cfg.steps):
            self.step = step
            self._faults()
            queue.run_until((step + 1) * cfg.step_dt)
            self._check_storm()
        self.step = cfg.steps
        self._settle()
        ops = self.history.operations()
        res = check(ops, self.app.model)
        if res.ok is False:
            self.fail("linearizability", "client history is not linearizable:\n"
                      + res.explain(), [])
        if res.ok is None:
            self.fail("linearizability undecided", "the checker gave up (too many "
                      "configurations):\n" + res.explain(), [])
        return SimResult(
            seed=self.seed, ok=True, ops=len(ops), acked_writes=len(self.inv.acked),
            elections=self.elections, crashes=self.crashes, partitions=self.partitions,
            wipes=self.wipes, member_changes=self.member_changes, messages=self.net.sent,
            commits=self.commits, checks=self.inv.checks,
            virtual_time=queue.now,
            trace_hash=self.trace_hash() if self._record else "",
            stats={"snapshots": dict(self._snap_counts())},
        )

    def _snap_counts(self) -> Counter[str]:
        return Counter(self.snap_stats)

    def _check_storm(self) -> None:
        if self.net.sent > self.config.max_messages:
            self.fail("liveness", f"message storm: {self.net.sent} messages sent by "
                      f"t={self.queue.now:.3f}s virtual (limit {self.config.max_messages})",
                      list(self.nodes))

    def _settle(self) -> None:
        cfg = self.config
        queue = self.queue
        self.stopping = True
        self.net.heal()
        self.net.faults = NetworkFaults.none()
        self.trace("settle")
        for node in self.nodes.values():
            node.store._crash_in = None
            if not node.up:
                node.start()
        final_ops = getattr(self.app.workload, "final_ops", None)
        final = list(final_ops()) if final_ops is not None else []
        if final and self.clients:
            self.clients[0].final = final
            if self.clients[0].idle:
                queue.after(0.0, self.clients[0].issue)
        deadline = queue.now + cfg.settle_time
        # Let clients finish (including the final reads).
        while queue.now < deadline and (not all(c.idle for c in self.clients)
                                        or any(c.final for c in self.clients)):
            queue.run_until(queue.now + 0.05)
            self._check_storm()
        # Let every node apply the same log.
        while queue.now < deadline and not self._converged():
            queue.run_until(queue.now + 0.05)
            self._check_storm()
        busy = [c.id for c in self.clients if not c.idle]
        if cfg.require_liveness and (busy or not self._converged()):
            state = {i: (n.core.role.value, n.core.term, n.core.commit_seq, n.applied,
                         n.store.seq) for i, n in self.nodes.items() if n.core is not None}
            self.fail("liveness",
                      f"the healed cluster did not settle within {cfg.settle_time}s virtual "
                      f"(clients still busy: {busy}; node role/term/commit/applied/last: "
                      f"{state})", list(self.nodes))
        for c in self.clients:
            if c.spec is not None:  # only without require_liveness
                if c.spec.write:
                    self.history.info(c.hist_id)
                else:
                    self.history.fail(c.hist_id)
                c.spec = None
        self.check_acked_durable("after settling")
        if self._converged():
            self._check_state_agreement()
            members = self.current_config().members
            for seq, term, what in self.inv.acked:
                for i, node in self.nodes.items():
                    if i not in members:
                        continue
                    if node.store.covered_term(seq) != term:
                        self.fail("acknowledged write durability",
                                  f"{what} was acknowledged at seq {seq} term {term} but "
                                  f"node {i}'s settled log does not hold it", [i])

    def _check_state_agreement(self) -> None:
        """Settled, every member applied the same log: their state machines must hold the
        same state (compared through their snapshots, when they can take one)."""
        states: dict[int, list[Any]] = {}
        for i, node in self.nodes.items():
            if node.sm is None or i not in self.current_config().members:
                continue
            if not supports_snapshots(node.sm.inner):
                return
            states.setdefault(crc32c(node.sm.snapshot()), []).append(i)
        self.inv.checks += 1
        if len(states) > 1:
            groups = "; ".join(f"nodes {sorted(v)}" for v in states.values())
            self.fail("state agreement",
                      f"the settled nodes applied the same log through seq "
                      f"{max(n.applied for n in self.nodes.values())} but their state "
                      f"machines differ: {groups} hold different states",
                      sorted(i for v in states.values() for i in v))

    def _converged(self) -> bool:
        lead = self.leader()
        if lead is None:
            return False
        lc = self.nodes[lead].core
        assert lc is not None
        target = lc.commit_seq
        if target < lc.last_seq:
            return False
        members = lc.configuration.members
        for node in self.nodes.values():
            if node.id not in members:
                continue  # a spare never added, or a removed node: not caught up any more
            if not node.up or node.core is None or node.applied != target:
                return False
        return True


def _fmt(x: Any) -> str:
    if isinstance(x, str):
        return x
    return repr(x)


def run_seed(seed: int, config: SimConfig | None = None, app: SimApp | None = None,
             record_trace: bool = True) -> SimResult:
    """Run one seed; a violation comes back in ``SimResult.violation`` (not raised)."""
    sim = Simulation(seed, config, app, record_trace)
    try:
        return sim.run()
    except SafetyViolation as v:
        return SimResult(seed=seed, ok=False, ops=len(sim.history), violation=v,
                         crashes=sim.crashes, elections=sim.elections,
                         partitions=sim.partitions, wipes=sim.wipes,
                         member_changes=sim.member_changes,
                         messages=sim.net.sent, checks=sim.inv.checks,
                         virtual_time=sim.queue.now,
                         stats={"snapshots": dict(sim._snap_counts())})

