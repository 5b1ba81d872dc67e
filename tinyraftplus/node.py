"""``RaftNode``: the Trio driver that runs a ``RaftCore`` over a durable log and a transport.

Theory of operation
-------------------
One task, the *driver*, owns the core. Everything that wants the core's attention (a message
from a peer, a client's append or read, the passage of time) is queued and the driver woken;
the driver then feeds the queued inputs into the core and handles each ``Ready`` in the order
the core's contract prescribes: send what may go out at once, persist hard state and entries
(one ``fdatasync`` for everything that piled up meanwhile: group commit comes for free), tell
the core, send what promised durability, and publish the new commit seq.

A second task, the *applier*, feeds committed entries to the state machine in order, so a slow
state machine never delays replication. Appends wait for their own entries to be applied
(their result is the state machine's) and reads wait until the applier has reached the read's
commit index (ReadIndex).

A follower does not propose: it forwards a client's items to the leader's driver (``Propose``),
learns the seq they were given, and waits until *it* has applied that seq. If the entry that
ends up at that seq has another term, the leader lost it: ``LeadershipLostError``.

Both tasks live in a nursery the node owns: ``async with node:``, or ``await node.start(n)``
with a nursery of yours, or ``await nursery.start(node.serve)``. Leaving stops them, fails every
pending request with ``NodeStoppedError`` and closes the log if the node opened it.
"""

from __future__ import annotations

import inspect
import logging
import operator
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._groups import exit_nursery
from .entry import Entry
from .errors import (
    ClosedError,
    InvalidArgumentError,
    LeadershipLostError,
    MemberStateLostError,
    NodeStoppedError,
    NoLeaderError,
    NotLeaderError,
    ProtocolError,
    RaftTimeoutError,
    UsageError,
)
from .events import EventHub, Listener, NodeEvent, Subscription
from .idempotency import MAGIC as KEY_MAGIC
from .idempotency import KeyTable
from .idempotency import result_of as key_result
from .idempotency import unwrap as unwrap_key
from .idempotency import wrap as wrap_key
from .node_membership import MembershipAPI
from .node_snapshot import NodeSnapshots
from .raft import messages as m
from .raft.core import Quorum, RaftConfig, RaftCore, Ready, Role
from .raft.messages import NodeId
from .raft.recovery import new_incarnation
from .raft.state import HardState, Recovery, decode_hard_state, encode_hard_state
from .raft.validate import check_message

log = logging.getLogger("tinyraftplus")

# Memory that grows with payload size is bounded in bytes, not only in counts.
_RESULT_MEMORY = 1 << 14  # applied results kept for forwarded appends whose answer is late...
_RESULT_MEMORY_BYTES = 16 << 20  # ... and at most about this many bytes of them
_APPLY_SLICE = 0.02  # seconds of inline applying before the driver lets other tasks run
_CACHE_MAX_BYTES = 64 << 20  # persisted-but-unapplied entries kept in memory for the applier
_SEND_QUEUE_BYTES = 64 << 20  # payload queued per peer for an async send
_PROPOSALS_REMEMBERED = 1 << 12  # forwarded appends answered, to drop duplicated Proposes


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What ``append`` returns: the entry's ``seq``, the ``data`` appended and the state
    machine's ``result`` for it (``None`` without a state machine). For ``append_batch``:
    the first seq, the list of items and the list of results."""

    seq: int
    data: Any
    result: Any = None


class _Waiter:
    """A one-shot result slot for a task waiting on the driver or the applier."""

    __slots__ = ("_event", "value", "error")

    def __init__(self) -> None:
        self._event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any) -> None:
        if not self._event.is_set():
            self.value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self.error = error
            self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Wakeup:
    """Wakes the driver: ``set()`` from anywhere on the Trio thread, ``wait()`` by the one
    driver task. Cheaper than a fresh ``trio.Event`` per round, which the driver, woken
    several times per append, would otherwise make and drop constantly."""

    __slots__ = ("_task", "_pending")

    def __init__(self) -> None:
        self._task: Any = None
        self._pending = False

    def set(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)
        else:
            self._pending = True

    async def wait(self) -> None:
        if self._pending:
            # Something arrived while the driver was busy. No checkpoint needed: nothing can
            # set the flag again until the driver yields, so this cannot spin.
            self._pending = False
            return
        self._task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class _AppendWaiter(_Waiter):
    __slots__ = ("first", "last", "term", "results")

    def __init__(self, first: int, last: int, term: int) -> None:
        super().__init__()
        self.first, self.last, self.term = first, last, term
        self.results: list[Any] = []


async def _maybe_await(v: Any) -> Any:
    if inspect.isawaitable(v):
        return await v
    return v


def _is_async_callable(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (callable objects with an async __call__)
    )


class RaftNode(MembershipAPI, NodeSnapshots):
    """One member of a Raft cluster.

    ``node_id`` must be in ``nodes``. ``send(to, msg)`` delivers a message to a peer; it may
    be a plain function (it must not block: queue and return) or an ``async`` function (the
    node then runs one sender task per peer with a bounded queue, so a slow peer never stalls
    it). A ``send`` that raises produces a ``warn`` event; the message counts as lost, which
    Raft tolerates. The transport hands incoming messages to ``receive(from_id, msg)``.

    ``log`` is an ``FsLog`` (or anything with its API); the node opens it if it is not open
    and then also closes it. Term and vote are kept durably beside it (``state_path``,
    default ``<log dir>/<log name>.raftstate``).

    Options (times in seconds):
      election_timeout (0.5): followers campaign after hearing nothing for a random time in
        ``[t, 2t)``; ping_timeout (0.1): leader heartbeat interval; append_timeout (10),
        read_timeout (10): bounds on ``append``/``read``; rpc_max (256): entries per message;
        apply: state machine ``apply(bufs, seq) -> list | None`` (sync or async; ``bufs[i]`` is
        the payload at ``seq + i``, ``None`` for a leader's no-op); apply_max (1024): entries per
        ``apply`` call; apply_seq (-1): the last seq your durable state machine already applied;
        read: ``read(cmd)`` (sync or async) answering linearizable reads; quorum: commit quorum
        size; group (node id -> group name) and group_fn (``fn(frozenset(ids)) -> bool``):
        replication groups; priority: this node's leader priority (or priorities: id -> int for
        every node); pre_vote (True), check_quorum (True); seed: for the election-timeout rng.
        Snapshots (``tinyraftplus.node_snapshot``): snapshot and restore: the state machine's
        ``snapshot()`` and ``restore(meta, stream)``; snapshot_entries (10000 with them, else
        0 = never): snapshot when the apply seq reaches a multiple of it; trailing_entries
        (5000): entries kept behind a snapshot; snapshot_keep (2): snapshots kept;
        snapshot_chunk (1 MiB): bytes per InstallSnapshot message.

    Starting without durable state (a new node, or one that lost its disk): by default the
    node *recovers* (``tinyraftplus.raft.recovery``): it asks every other member for its term
    and log, votes for nobody until its log has caught up, and so can never vote twice in a
    term or help elect a leader that lacks a committed entry. A brand-new cluster whose
    members all start needs nothing else. ``bootstrap=True`` says "this is a brand-new
    cluster" and lets a node without state vote at once, so that a new cluster can elect a
    leader with members missing; never pass it to a node that lost its data (peers that knew
    its old incarnation ignore it and warn; one that never heard from it cannot tell). With
    state on disk, ``bootstrap`` is ignored.
    """

    def __init__(
        self,
        node_id: NodeId,
        nodes: Sequence[NodeId],
        send: Callable[[Any, Any], Any],
        log: Any,
        *,
        election_timeout: float = 0.5,
        ping_timeout: float = 0.1,
        append_timeout: float = 10.0,
        read_timeout: float = 10.0,
        rpc_max: int = 256,
        rpc_max_bytes: int = 1 << 20,
        max_inflight: int = 8,
        apply: Callable[[list[bytes | None], int], Any] | None = None,
        apply_max: int = 1024,
        apply_seq: int = -1,
        read: Callable[[Any], Any] | None = None,
        quorum: int | None = None,
        group: dict[NodeId, Any] | None = None,
        group_fn: Callable[[frozenset[NodeId]], bool] | None = None,
        priority: int | None = None,
        priorities: dict[NodeId, int] | None = None,
        pre_vote: bool = True,
        check_quorum: bool = True,
        state_path: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        inbox_max: int = 1 << 16,
        send_queue_max: int = 1 << 12,
        bootstrap: bool = False,
        join: bool = False,
        snapshot: Callable[[], Any] | None = None,
        restore: Callable[[Any, Any], Any] | None = None,
        snapshot_entries: int | None = None,
        trailing_entries: int = 5000,
        snapshot_keep: int = 2,
        snapshot_chunk: int = 1 << 20,
    ) -> None:
        nodes = list(nodes)
        if len(set(nodes)) != len(nodes):
            raise InvalidArgumentError(f"RaftNode(nodes={nodes!r}): node ids must be unique")
        if join and node_id in nodes:
            raise InvalidArgumentError(
                f"RaftNode({node_id!r}, join=True): nodes must be the cluster's current voters, "
                "without this node (it joins as a learner once the leader adds it)"
            )
        if node_id not in nodes and not join:
            raise InvalidArgumentError(
                f"RaftNode({node_id!r}, nodes={nodes!r}): this node's id must be in nodes"
            )
        if not callable(send):
            raise InvalidArgumentError("RaftNode(send=...): send must be callable as send(to, msg)")
        for name in ("append_batch", "truncate", "term_at", "entries"):
            if not hasattr(log, name):
                raise InvalidArgumentError(
                    f"RaftNode(log={log!r}): the log has no {name!r}; pass an FsLog"
                )
        for name, v in (
            ("election_timeout", election_timeout),
            ("ping_timeout", ping_timeout),
            ("append_timeout", append_timeout),
            ("read_timeout", read_timeout),
        ):
            if not (isinstance(v, (int, float)) and v > 0):
                raise InvalidArgumentError(f"RaftNode({name}={v!r}): a positive number of seconds")
        if ping_timeout >= election_timeout:
            raise InvalidArgumentError(
                f"RaftNode(ping_timeout={ping_timeout}, election_timeout={election_timeout}): "
                "heartbeats must come more often than elections time out"
            )
        counts = (("rpc_max", rpc_max), ("apply_max", apply_max), ("max_inflight", max_inflight),
                  ("snapshot_chunk", snapshot_chunk))
        for name, iv in counts:
            if not (isinstance(iv, int) and iv >= 1):
                raise InvalidArgumentError(f"RaftNode({name}={iv!r}): a positive int")
        if snapshot_chunk > 8 << 20:
            raise InvalidArgumentError(
                f"RaftNode(snapshot_chunk={snapshot_chunk}): at most 8 MiB, so that a chunk "
                "fits the transports' frames (16 MiB by default) with room to spare"
            )
        if priority is not None:
            priorities = {**(priorities or {}), node_id: priority}

        self.node_id = node_id
        self.nodes = tuple(nodes)
        self.log = log
        self._send_fn = send
        self._send_async = _is_async_callable(send)
        self._apply_fn = apply
        # A sync apply runs inline in the driver (it would hold the one thread anyway); only
        # an async one gets a task of its own, so that its awaits do not stall replication.
        self._apply_async = apply is not None and _is_async_callable(apply)
        self.keys = KeyTable()  # append keys applied (idempotency.py): snapshot it with the SM
        if apply is not None:
            self._apply_fn = self.keys.wrap_apply(apply, self._apply_async)
        self._read_fn = read
        self._apply_max = apply_max
        self.append_timeout = float(append_timeout)
        self.read_timeout = float(read_timeout)
        self._quorum = Quorum(nodes, quorum=quorum, group=group, group_fn=group_fn)
        self._config = RaftConfig(
            election_timeout=float(election_timeout),
            heartbeat_interval=float(ping_timeout),
            rpc_max=rpc_max,
            rpc_max_bytes=rpc_max_bytes,
            max_inflight=max_inflight,
            pre_vote=pre_vote,
            check_quorum=check_quorum,
            priorities=priorities,
            snapshot_chunk=snapshot_chunk,
        )
        self._snapshot_init(snapshot, restore, snapshot_entries, trailing_entries, snapshot_keep)
        for name in ("compact", "reset", "first_seq") if snapshot is not None else ():
            if not hasattr(log, name):
                raise InvalidArgumentError(
                    f"RaftNode(log={log!r}, snapshot=...): the log has no {name!r}, which "
                    "snapshots need; pass an FsLog"
                )
        self._rng = random.Random(seed)
        self._state_path = os.fspath(state_path) if state_path is not None else None
        self._initial_apply_seq = apply_seq
        self._inbox_max = inbox_max
        self._send_queue_max = send_queue_max
        self._bootstrap = bool(bootstrap)
        self._join = bool(join)

        self.events = EventHub(node_id)
        self._core: RaftCore | None = None
        self._running = False
        self._stopping = False
        self._reset_volatile()

    def _reset_volatile(self) -> None:
        self._inbox: deque[tuple[Any, Any]] = deque()
        self._proposals: list[tuple[tuple[bytes, ...], _AppendWaiter]] = []
        self._deadlines: deque[tuple[float, _AppendWaiter]] = deque()
        self._read_requests: list[int] = []
        self._campaign_requested = False
        self._wake = _Wakeup()
        self._commit_seq = -1
        self._apply_seq = self._initial_apply_seq
        self._commit_changed = trio.Event()
        self._apply_changed = trio.Event()
        self._role_changed = trio.Event()
        # Append waiters by first seq; two waiters for one seq (an append lost in a leader
        # change and the next one given the same seq in a later term) share it through
        # ``_waiters_extra`` (rare), and only the entry applied there decides which wins.
        self._waiters: dict[int, _AppendWaiter] = {}
        self._waiters_extra: list[_AppendWaiter] = []
        self._active: list[_AppendWaiter] = []
        self._forwards: dict[int, tuple[Any, _Waiter]] = {}
        self._admin: list[tuple[Callable[[RaftCore], Any], _Waiter]] = []
        self._reads: dict[int, _Waiter] = {}
        # Request ids go out in Propose and ReadIndex; starting from the clock keeps them
        # unique across restarts, so the leader's duplicate filter never confuses two.
        self._next_id = time.time_ns()
        # Applied results kept for late answers: one (first seq, terms, results, bytes) per
        # applied chunk, not one tuple per entry (a per-entry loop here cost ~1 us an entry).
        self._recent_results: deque[tuple[int, list[int], list[Any], int]] = deque()
        self._recent_count = 0
        self._recent_bytes = 0
        self._proposed: dict[tuple[Any, int], tuple[int, int]] = {}
        self._cache: deque[Entry] = deque()
        self._cache_bytes = 0
        self._send_queues: dict[Any, deque[Any]] = {}
        self._send_bytes: dict[Any, int] = {}
        self._send_wakes: dict[Any, trio.Event] = {}
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._opened_log = False
        self.dropped_messages = 0
        self._apply_busy = False
        self._snapshot_reset()
        self.append_observer: Callable[[float], None] | None = None
        """For metrics: called with the seconds each successful append took."""
        self._heard: dict[Any, float] = {}  # peer -> when a message from it was last handled

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> RaftNode:
        self._own_nursery_cm = trio.open_nursery()
        nursery = await self._own_nursery_cm.__aenter__()
        try:
            await nursery.start(self.serve)
        except BaseException as exc:
            await exit_nursery(self._own_nursery_cm, type(exc), exc, exc.__traceback__,
                               consequences=(NodeStoppedError,))
            raise
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        # Ask the node to stop without waiting here: the nursery's own exit waits for it,
        # and must run even if this block is being cancelled from outside. What failed comes
        # out as raised (not in a group of one), so `except SomeError` around the block works;
        # when the node's own task failed, that cause, not the NodeStoppedError it led to.
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        return await exit_nursery(self._own_nursery_cm, *exc, consequences=(NodeStoppedError,))

    async def start(self, nursery: trio.Nursery | None = None) -> None:
        """Start the node's tasks in ``nursery`` and return once it runs (log open, hard
        state loaded). Prefer ``async with node:`` when the node's life is one block."""
        if not isinstance(nursery, trio.Nursery):
            raise UsageError(
                f"RaftNode.start() needs the nursery to run the node in (got {nursery!r}): "
                "use `async with node:`, or `await node.start(nursery)` inside "
                "`async with trio.open_nursery() as nursery:`"
            )
        await nursery.start(self.serve)

    async def stop(self) -> None:
        """Stop the node and wait until its tasks ended and its log is closed. Idempotent."""
        if not self._running:
            return
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        await self._stopped.wait()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled or ``stop()``; for ``nursery.start(node.serve)``."""
        if self._running:
            raise UsageError(f"RaftNode {self.node_id!r} is already running")
        self._reset_volatile()
        self._running = True
        self._stopping = False
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                await self._open()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self._apply_async:
                        nursery.start_soon(self._apply_task)
                    nursery.start_soon(self._timeout_task)
                    nursery.start_soon(self._ticker_task)
                    task_status.started()
                    await self._drive()
        finally:
            self._shutdown()
            if self._opened_log:
                with trio.CancelScope(shield=True):
                    try:
                        await self.log.close()
                    except Exception:
                        log.exception("tinyraftplus: node %r could not close its log", self.node_id)
            self._snapshot_close()
            self._core = None
            self._running = False
            self._stopped.set()

    async def _open(self) -> None:
        if _log_needs_open(self.log):
            await self.log.open()
            self._opened_log = True
        from .log.state import StateFile  # the C-backed log package; imported lazily

        path = self._state_path or self._default_state_path()
        self._state = StateFile(path)
        base = await self._snapshot_open()
        hs = await self._load_hard_state(path)
        # A durable state machine may be ahead of nothing we know; commit starts where it is.
        commit = min(self._apply_seq, self.log.seq)
        self._commit_seq = commit
        self._core = RaftCore(
            self.node_id,
            self.nodes,
            self.log,
            hs,
            config=self._config,
            quorum=self._quorum,
            rng=self._rng,
            now=trio.current_time(),
            commit_seq=commit,
            join=self._join,
            snapshots=self._snapshot_source(),
            snapshot_base=base,
        )
        self._config_seq_seen = self._core.config_seq

    async def _load_hard_state(self, path: str) -> HardState:
        """The member's durable state, or a new identity (bootstrap or recovery) written
        before the node says anything. Raises ``MemberStateLostError`` for a member whose
        log is gone while its hard state remains."""
        raw = self._state.load()
        if raw is None:
            rec = None if self._bootstrap else Recovery()
            hs = HardState(incarnation=_new_incarnation(rec is not None), recovery=rec)
            if rec is not None:
                log.info(
                    "tinyraftplus node %r: no state at %s; recovering from the other members "
                    "(pass bootstrap=True only to start a brand-new cluster)", self.node_id, path,
                )
        else:
            hs = decode_hard_state(raw, path)
            if hs.has_log and self.log.seq < 0:
                raise MemberStateLostError(
                    f"node {self.node_id!r}: its log ({getattr(self.log, 'path', self.log)}) is "
                    f"empty, but its state ({path}) says it held entries: it lost its log and "
                    "is not the member it was. Delete the state file too and restart the node "
                    "without bootstrap; it then recovers from the other members"
                )
            if hs.incarnation:
                return hs
            hs = HardState(hs.term, hs.vote, _new_incarnation(False), has_log=self.log.seq >= 0)
        await self._state.save(encode_hard_state(hs))
        return hs

    def _default_state_path(self) -> str:
        # Beside the log's directory (DIR/NAME.raftstate), not inside it: the log owns its
        # directory, and term and vote belong to the node, not to the log's records.
        path = getattr(self.log, "path", None)
        if path is None:
            raise InvalidArgumentError(
                "RaftNode: cannot tell where to keep term and vote for this log; pass state_path="
            )
        return os.fspath(path).rstrip(os.sep) + ".raftstate"

    def _shutdown(self) -> None:
        # The state machine outlives a stop: started again, the node resumes applying
        # where it left off instead of feeding it the whole log a second time.
        self._initial_apply_seq = self._apply_seq
        err = NodeStoppedError(f"node {self.node_id!r} stopped")
        for w in list(self._waiters.values()) + self._waiters_extra + self._active:
            w.fail(err)
        for _, aw in self._proposals:
            aw.fail(err)
        for _, fw in self._forwards.values():
            fw.fail(err)
        for rw in self._reads.values():
            rw.fail(err)
        for _, aw2 in self._admin:
            aw2.fail(err)
        self._admin.clear()
        self._waiters.clear()
        self._waiters_extra.clear()
        self._active.clear()
        self._proposals.clear()
        self._forwards.clear()
        self._reads.clear()
        for ev in (self._commit_changed, self._apply_changed, self._role_changed):
            ev.set()
        self.events.close()

    # ------------------------------------------------------------------ inputs
    def receive(self, from_id: Any, msg: Any) -> None:
        """Hand a message from peer ``from_id`` to the node. Never blocks and never raises
        for bad input: a malformed message or unknown sender is dropped with a ``warn``."""
        if not self._running or self._stopping:
            return
        if from_id == self.node_id:
            self._warn(f"dropped a message that claims to come from this node ({from_id!r})")
            return
        # A sender outside this node's configuration is not refused: a node whose
        # configuration is outdated (a learner that just joined, a follower that missed a
        # change) must still follow a leader it does not know yet. Which nodes may talk to
        # it at all is the transport's call (mutual TLS names every node); what counts is
        # the configuration's (the core counts votes and acknowledgements of members only).
        try:
            check_message(msg)
        except ProtocolError as e:
            self._warn(f"dropped a bad message from {from_id!r}: {e}")
            return
        if len(self._inbox) >= self._inbox_max:
            self._inbox.popleft()
            self.dropped_messages += 1
        self._inbox.append((from_id, msg))
        self._wake.set()

    def campaign(self) -> None:
        """Ask this node to start an election now."""
        self._campaign_requested = True
        self._wake.set()

    # ------------------------------------------------------------------ the driver
    async def _drive(self) -> None:
        core = self._core
        assert core is not None
        while True:
            await self._wake.wait()
            now = trio.current_time()
            core.tick(now)
            if self._campaign_requested:
                self._campaign_requested = False
                core.campaign()
            inbox = self._inbox
            while inbox:
                frm, msg = inbox.popleft()
                self._heard[frm] = now
                self._dispatch(core, frm, msg)
            if self._proposals:
                self._propose_pending(core)
            if self._admin:
                self._run_admin(core)
            if self._read_requests:
                reqs, self._read_requests = self._read_requests, []
                for rid in reqs:
                    core.read_index(rid)
            while core.has_ready():
                await self._handle_ready(core, core.ready())
            if self._install_ready is not None:
                await self._snap_install(core)
                while core.has_ready():
                    await self._handle_ready(core, core.ready())
            if not self._apply_async:
                while self._apply_seq < self._commit_seq and not self._restoring:
                    self._apply_inline()
                    if self._snap_due():
                        if self._snap_busy:
                            break  # the write in progress wakes the driver when done
                        await self._snap_capture()
                    elif self._apply_seq < self._commit_seq:
                        # More to apply: first let the other tasks (transport, clients) run,
                        # then go round once (messages, ticks), and on.
                        self._wake.set()
                        await trio.lowlevel.checkpoint()
                        break
            if self._snap_due() and not self._apply_busy and not self._snap_busy:
                await self._snap_capture()

    async def _ticker_task(self) -> None:
        """Wake the driver when the core has timed work (elections, heartbeats). It wakes
        at least every quarter heartbeat, so a deadline that moved earlier is met within
        that; the driver itself then needs no cancel scope per wait (those cost more than
        the rest of a round)."""
        core = self._core
        assert core is not None
        step = self._config.heartbeat_interval / 4
        while True:
            now = trio.current_time()
            deadline = core.next_deadline
            if deadline <= now:
                self._wake.set()
                deadline = now + step
            await trio.sleep_until(min(deadline, now + step))

    def _dispatch(self, core: RaftCore, frm: Any, msg: Any) -> None:
        t = type(msg)
        if t is m.Propose:
            key = (frm, msg.req_id)
            done = self._proposed.get(key)
            if done is not None:
                # A duplicate (networks duplicate): answer again, never append twice.
                self._send(frm, m.ProposeResponse(msg.req_id, done[0], done[1]))
                return
            try:
                first, term = core.propose(msg.items)
            except NotLeaderError as e:
                self._send(frm, m.ProposeResponse(msg.req_id, -1, 0, "not leader", e.leader))
            else:
                proposed = self._proposed
                proposed[key] = (first, term)
                if len(proposed) > _PROPOSALS_REMEMBERED:
                    del proposed[next(iter(proposed))]  # the oldest
                self._send(frm, m.ProposeResponse(msg.req_id, first, term))
        elif t is m.ProposeResponse:
            fw = self._forwards.get(msg.req_id)
            # Only the node we asked may answer (a stray or replayed answer is ignored).
            if fw is not None and fw[0] == frm:
                del self._forwards[msg.req_id]
                fw[1].set(msg)
        else:
            core.step(frm, msg)

    def _propose_pending(self, core: RaftCore) -> None:
        props, self._proposals = self._proposals, []
        for items, w in props:
            if w.done:  # the caller gave up (timeout or cancel) before we got to it
                continue
            try:
                first, term = core.propose(items)
            except NotLeaderError as e:
                w.fail(e)
            else:
                # Registered here, before any await, so the applier cannot miss it.
                w.first, w.last, w.term = first, first + len(items) - 1, term
                self._add_waiter(w)

    async def _handle_ready(self, core: RaftCore, rd: Ready) -> None:
        for to, msg in rd.messages:
            self._send(to, msg)
        if rd.hard_state is not None:
            await self._state.save(encode_hard_state(rd.hard_state))
        if rd.truncate_after is not None:
            await self.log.truncate(rd.truncate_after)
            cache = self._cache
            while cache and cache[-1].seq > rd.truncate_after:
                self._cache_bytes -= len(cache.pop().data)
        ents = rd.entries
        if ents:
            await self.log.append_batch(
                [e.data for e in ents], seq=ents[0].seq, term=[e.term for e in ents]
            )
            if self._cache_bytes < _CACHE_MAX_BYTES:
                self._cache.extend(ents)
                self._cache_bytes += _data_bytes(ents)
            else:
                # The applier is far behind; it reads from the log instead.
                self._cache.clear()
                self._cache_bytes = 0
        core.advance(rd)
        for to, msg in rd.messages_after_persist:
            self._send(to, msg)
        for frm, piece in rd.snapshot_in:
            self._snap_piece(core, frm, piece)
        for warning in rd.warnings:
            self._warn(warning)
        if core.config_seq != self._config_seq_seen:
            self._config_seq_seen = core.config_seq
            cfg = core.configuration
            self.events.emit("config", seq=core.config_seq, config=cfg,
                             description=cfg.describe())
        if rd.soft_state is not None:
            ss = rd.soft_state
            self._role_changed.set()
            self._role_changed = trio.Event()
            if self._forwards:
                self._abandon_forwards(ss.leader)
            self.events.emit("change", state=ss.role.value, leader=ss.leader, term=ss.term)
        if rd.commit_seq > self._commit_seq:
            self._commit_seq = rd.commit_seq
            self._commit_changed.set()
            self._commit_changed = trio.Event()
            self.events.emit("commit", seq=rd.commit_seq)
        for rs in rd.read_states:
            w = self._reads.pop(rs.read_id, None)
            if w is not None:
                w.set(rs.index)

    def _abandon_forwards(self, leader: Any) -> None:
        """The leader changed while appends forwarded to the old one wait for its answer.
        The answer may never come; the entries may or may not have been proposed. Fail
        those appends now rather than at ``append_timeout``; retrying them here could apply
        them twice, so that is left to callers that can tell (client sessions)."""
        for rid, (target, w) in list(self._forwards.items()):
            if target != leader:
                del self._forwards[rid]
                w.fail(LeadershipLostError(
                    f"node {target!r} stopped being leader before answering an append "
                    f"forwarded by node {self.node_id!r}; it may or may not be applied"
                ))

    # ------------------------------------------------------------------ sending
    def _send(self, to: Any, msg: Any) -> None:
        if self._send_async:
            q = self._send_queues.get(to)
            if q is None:
                q = self._send_queues[to] = deque()
                self._send_wakes[to] = trio.Event()
                assert self._nursery is not None
                self._nursery.start_soon(self._sender_task, to)
            size = _payload_bytes(msg)
            queued = self._send_bytes.get(to, 0) + size
            while q and (len(q) >= self._send_queue_max or queued > _SEND_QUEUE_BYTES):
                queued -= _payload_bytes(q.popleft())
                self.dropped_messages += 1
            q.append(msg)
            self._send_bytes[to] = queued
            self._send_wakes[to].set()
            return
        try:
            self._send_fn(to, msg)
        except Exception as e:
            self._warn(f"send to {to!r} failed: {e!r}", exc=e)

    async def _sender_task(self, to: Any) -> None:
        q = self._send_queues[to]
        while True:
            while not q:
                self._send_wakes[to] = trio.Event()
                await self._send_wakes[to].wait()
            msg = q.popleft()
            self._send_bytes[to] -= _payload_bytes(msg)
            try:
                await self._send_fn(to, msg)
            except Exception as e:
                self._warn(f"send to {to!r} failed: {e!r}", exc=e)

    def _warn(self, message: str, exc: BaseException | None = None) -> None:
        log.warning("tinyraftplus node %r: %s", self.node_id, message)
        self.events.emit("warn", message=message, exc=exc)

    # ------------------------------------------------------------------ the applier
    async def _apply_task(self) -> None:
        """Feed committed entries to an ``async`` state machine, in order."""
        assert self._apply_fn is not None
        while True:
            while (self._apply_seq >= self._commit_seq or self._restoring or self._capturing
                   or self._snap_due()):
                if self._restoring or self._capturing or self._snap_due():
                    # (a snapshot is due here: the driver captures it before the next batch)
                    self._wake.set()
                    await trio.sleep(0.001)
                else:
                    await self._commit_changed.wait()
            ents, bufs, lo = self._next_chunk()
            self._apply_busy = True
            try:
                results = await self._apply_fn(bufs, lo)
            except Exception as e:
                self._apply_failed(lo, e)
                raise
            finally:
                self._apply_busy = False
            self._applied(ents, results)
            if self._snap_due():
                self._wake.set()  # the driver captures it (between two batches)

    def _apply_inline(self) -> None:
        """Feed committed entries to a sync state machine (or none), in order, for at most
        about ``_APPLY_SLICE`` seconds: a long replay (a restart, a follower catching up)
        then lets the driver answer its peers and clients between slices."""
        fn = self._apply_fn
        until = time.perf_counter() + _APPLY_SLICE
        while (self._apply_seq < self._commit_seq and not self._snap_due()
               and time.perf_counter() < until):
            ents, bufs, lo = self._next_chunk()
            results: Any = None
            if fn is not None:
                try:
                    results = fn(bufs, lo)
                except Exception as e:
                    self._apply_failed(lo, e)
                    raise
                if inspect.isawaitable(results):
                    err = UsageError(
                        "apply() returned an awaitable from a plain function; declare it "
                        "`async def` so the node awaits it in a task of its own"
                    )
                    self.events.emit("error", message=str(err), exc=err)
                    raise err
            self._applied(ents, results)

    def _next_chunk(self) -> tuple[list[Entry], list[bytes | None], int]:
        lo = self._apply_seq + 1
        hi = min(self._commit_seq, lo + self._apply_max - 1)
        stop = self._snap_boundary(lo)
        if stop is not None and stop < hi:
            hi = stop  # the snapshot is taken right there
        ents = self._take_entries(lo, hi)
        # The no-op (b"") and configuration entries reach the state machine as None. (The
        # type test first: cheaper per entry than ``kind``, a class attribute.)
        return ents, [(e[2] or None) if type(e) is Entry or not e.kind else None
                      for e in ents], lo

    def _apply_failed(self, lo: int, e: Exception) -> None:
        # The state machine must be deterministic; if it raises, replicas could diverge,
        # so the node stops rather than guess.
        self.events.emit("error", message=f"apply({lo}..) raised {e!r}", exc=e)

    def _applied(self, ents: list[Entry], results: Any) -> None:
        if results is not None and len(results) != len(ents):
            err = UsageError(
                f"apply() returned {len(results)} results for {len(ents)} entries "
                f"(seq {ents[0].seq}..{ents[-1].seq}); return one per entry or None"
            )
            self.events.emit("error", message=str(err), exc=err)
            raise err
        self._finish_applied(ents, results)
        self._note_applied(ents)
        self._apply_seq = ents[-1].seq
        self._apply_changed.set()
        self._apply_changed = trio.Event()
        self.events.emit("apply", seq=self._apply_seq)

    def _take_entries(self, lo: int, hi: int) -> list[Entry]:
        cache = self._cache
        while cache and cache[0].seq < lo:
            self._cache_bytes -= len(cache.popleft().data)
        if cache and cache[0].seq == lo:
            n = min(hi - lo + 1, len(cache))
            if n == len(cache):  # the usual case: all of it, copied in C
                got = list(cache)
                cache.clear()
            else:
                popleft = cache.popleft
                got = [popleft() for _ in range(n)]
            self._cache_bytes -= _data_bytes(got)
            return got
        core = self._core
        if core is not None:
            return core.read_entries(lo, hi, 8 << 20)  # configuration entries typed
        return self.log.entries(lo, hi, 8 << 20)

    def _finish_applied(self, ents: list[Entry], results: Any) -> None:
        waiters, active, extra = self._waiters, self._active, self._waiters_extra
        if results is None:
            results = [None] * len(ents)
        elif type(results) is not list:
            results = list(results)  # any sequence apply() returned
        self._remember_results(ents, results)
        for e, r in zip(ents, results, strict=True):
            w = waiters.pop(e.seq, None) if waiters else None
            if extra:
                for x in [x for x in extra if x.first == e.seq]:
                    extra.remove(x)
                    active.append(x)
            if w is not None and not active and w.last == e.seq:
                # The common case: a one-entry append, nothing else collecting.
                if e.term == w.term:
                    w.results.append(r)
                    w.set(w.results)
                else:
                    w.fail(self._lost(w))
                continue
            if w is not None:
                active.append(w)
            if active:
                for w in list(active):
                    if e.term != w.term:
                        active.remove(w)
                        w.fail(self._lost(w))
                        continue
                    w.results.append(r)
                    if e.seq == w.last:
                        active.remove(w)
                        w.set(w.results)

    def _remember_results(self, ents: list[Entry], results: list[Any]) -> None:
        nones = results.count(None)  # no state machine, or no results: counted in C
        size = 64 * nones if nones == len(results) else sum(map(_result_size, results))
        recent = self._recent_results
        # The first seq and the terms, not the entries: those hold the payloads, and 16,384
        # of them kept 1 GiB alive per node with 64 KiB values (issue 13).
        recent.append((ents[0].seq, list(map(_TERM, ents)), list(results), size))
        self._recent_count += len(ents)
        self._recent_bytes += size
        while recent and (self._recent_count > _RESULT_MEMORY
                          or self._recent_bytes > _RESULT_MEMORY_BYTES):
            first, terms, old_results, old_size = recent[0]
            if len(recent) > 1:  # whole chunks first
                recent.popleft()
                self._recent_count -= len(terms)
                self._recent_bytes -= old_size
                continue
            # The newest chunk alone is over a bound: forget its oldest entries.
            k = 0
            while k < len(terms) and (self._recent_count - k > _RESULT_MEMORY
                                      or old_size > _RESULT_MEMORY_BYTES):
                old_size -= _result_size(old_results[k])
                k += 1
            recent.popleft()
            if k < len(terms):
                recent.append((first + k, terms[k:], old_results[k:], old_size))
            self._recent_count -= k
            self._recent_bytes = old_size if k < len(terms) else 0
            break

    def _recent(self, first: int, last: int) -> list[tuple[int, int, Any]]:
        """(seq, term, result) of the remembered entries in ``first..last``, in order."""
        got: list[tuple[int, int, Any]] = []
        for lo, terms, results, _ in self._recent_results:
            hi = lo + len(terms) - 1
            if hi < first or lo > last:
                continue
            a, b = max(first, lo), min(last, hi)
            got.extend((seq, terms[seq - lo], results[seq - lo]) for seq in range(a, b + 1))
        return got

    def _add_waiter(self, w: _AppendWaiter) -> None:
        if w.first in self._waiters:
            self._waiters_extra.append(w)
        else:
            self._waiters[w.first] = w

    def _drop_waiter(self, w: _AppendWaiter) -> None:
        """Forget ``w`` (done, timed out or cancelled), and only ``w``: another append may
        wait at the same seq in another term."""
        if self._waiters.get(w.first) is w:
            del self._waiters[w.first]
        elif w in self._waiters_extra:
            self._waiters_extra.remove(w)

    def _lost(self, w: _AppendWaiter) -> LeadershipLostError:
        return LeadershipLostError(
            f"the leader of term {w.term} lost its role before seq {w.first}..{w.last} were "
            "committed; another leader's entries took their place and yours were not applied"
        )

    def _register(self, first: int, last: int, term: int) -> _AppendWaiter:
        w = _AppendWaiter(first, last, term)
        if first <= self._apply_seq:
            # Already applied (a forwarded append whose answer came late): use the memory.
            got = self._recent(first, last)
            whole = len(got) == last - first + 1 and last <= self._apply_seq
            if whole and all(t == term for _, t, _ in got):
                w.set([r for _, _, r in got])
                return w
            if any(t != term for _, t, _ in got):
                w.fail(self._lost(w))
                return w
            if len(got) < min(last, self._apply_seq) - first + 1:
                w.fail(RaftTimeoutError(f"results for seq {first}.. are no longer in memory"))
                return w
            # Partially applied: collect the rest as it comes.
            w.results = [r for _, _, r in got]
            self._active.append(w)
            return w
        self._add_waiter(w)
        return w

    # ------------------------------------------------------------------ public API
    async def append(self, data: bytes, *, key: tuple[Any, int] | None = None) -> AppendResult:
        """Append one entry through the leader (forwarded if this node follows) and return
        once this node has applied it: ``AppendResult(seq, data, result)``.

        Raises ``InvalidArgumentError`` for non-bytes or empty data, ``RaftTimeoutError``
        after ``append_timeout`` (the entry may still commit later), ``LeadershipLostError``
        when the entry was proposed but lost, ``NodeStoppedError``. With ``key=(client_id,
        seq)`` a retry after any of these is applied at most once (``idempotency.py``)."""
        item = _check_item(data, "append(data)", key)
        res = await (self._append if self.append_observer is None else self._timed)((item,))
        return AppendResult(res[0], data, key_result(res[1][0]))

    async def append_batch(self, items: Sequence[bytes]) -> AppendResult:
        """Append several entries atomically and in order; returns the first seq and the list
        of results (see ``append``)."""
        if isinstance(items, (bytes, bytearray, memoryview)) or not isinstance(items, Sequence):
            raise InvalidArgumentError("append_batch(items): pass a list of bytes objects")
        if not items:
            raise InvalidArgumentError("append_batch([]): nothing to append")
        batch = tuple(
            # The common item (non-empty bytes, no envelope look) as it is; anything else
            # through the full check, whose message names the item.
            it if type(it) is bytes and it and not it.startswith(KEY_MAGIC)
            else _check_item(it, f"append_batch(items[{i}])")
            for i, it in enumerate(items))
        first, results = await (
            self._append if self.append_observer is None else self._timed)(batch)
        return AppendResult(first, list(items), results)

    async def _timed(self, items: tuple[bytes, ...]) -> tuple[int, list[Any]]:
        t0 = trio.current_time()
        out = await self._append(items)
        if self.append_observer is not None:
            self.append_observer(trio.current_time() - t0)
        return out

    async def _append(self, items: tuple[bytes, ...]) -> tuple[int, list[Any]]:
        self._check_running()
        deadline = trio.current_time() + self.append_timeout
        core = self._core
        assert core is not None
        if core.role is Role.LEADER:
            # The hot path: one waiter and no cancel scope per append (a scope costs more
            # than the rest of the append); ``_timeout_task`` enforces ``append_timeout``.
            aw = _AppendWaiter(-1, -1, 0)
            self._proposals.append((items, aw))
            self._deadlines.append((deadline, aw))
            self._wake.set()
            try:
                results = await aw.wait()
                return aw.first, results
            except NotLeaderError:
                pass  # leadership moved before the driver proposed it: take the slow path
            finally:
                self._drop_waiter(aw)
        try:
            with trio.fail_at(deadline):
                return await self._append_slow(items)
        except trio.TooSlowError:
            raise self._append_timeout_error() from None

    async def _append_slow(self, items: tuple[bytes, ...]) -> tuple[int, list[Any]]:
        while True:
            core = self._core
            assert core is not None
            if core.role is Role.LEADER:
                aw = _AppendWaiter(-1, -1, 0)
                self._proposals.append((items, aw))
                self._wake.set()
                try:
                    results = await aw.wait()
                    return aw.first, results
                except NotLeaderError:
                    # Leadership is moving (a hand-over to a preferred node, or we just
                    # lost it): wait for the change rather than spin.
                    with trio.move_on_after(self._config.heartbeat_interval):
                        await self._role_changed.wait()
                    continue
                finally:
                    self._drop_waiter(aw)
            leader = await self.wait_leader()
            if leader == self.node_id:
                continue
            rid = self._new_id()
            fw = _Waiter()
            self._forwards[rid] = (leader, fw)
            self._send(leader, m.Propose(rid, items))
            try:
                resp = await fw.wait()
            finally:
                self._forwards.pop(rid, None)
            if resp.first_seq < 0:
                await self._role_changed.wait()  # leadership moved; try again
                continue
            aw = self._register(resp.first_seq, resp.first_seq + len(items) - 1, resp.term)
            try:
                results = await aw.wait()
                return aw.first, results
            finally:
                self._drop_waiter(aw)

    def _append_timeout_error(self) -> RaftTimeoutError | NoLeaderError:
        if self.leader is None:
            return NoLeaderError(
                f"append on node {self.node_id!r}: no leader within {self.append_timeout}s "
                "(is a quorum of nodes up and connected?)"
            )
        return RaftTimeoutError(
            f"append on node {self.node_id!r} did not complete within {self.append_timeout}s "
            "(no quorum, or an election is under way); it may still be applied later"
        )

    async def _timeout_task(self) -> None:
        """Fail fast-path appends that outlive ``append_timeout``. Deadlines are queued in
        the order they were made, so the queue is sorted; finished ones are dropped as the
        sweep passes them (at least every quarter second, to bound memory)."""
        q = self._deadlines
        while True:
            now = trio.current_time()
            while q and (q[0][1].done or q[0][0] <= now):
                _, w = q.popleft()
                if not w.done:
                    w.fail(self._append_timeout_error())
            await trio.sleep_until(min(q[0][0], now + 0.25) if q else now + 0.25)

    async def read(self, cmd: Any = None) -> Any:
        """Linearizable read: confirm leadership with a quorum (ReadIndex), wait until this
        node applied through that index, then return ``read(cmd)`` of your state machine."""
        self._check_running()
        if self._read_fn is None:
            raise UsageError("read(): this node has no read= function; pass one to RaftNode")
        try:
            with trio.fail_after(self.read_timeout):
                index = await self.read_index()
                await self.wait_apply(index)
                while self._restoring:  # the state machine is being replaced
                    await self._apply_changed.wait()
        except trio.TooSlowError:
            raise RaftTimeoutError(
                f"read on node {self.node_id!r} not confirmed within {self.read_timeout}s"
            ) from None
        return await _maybe_await(self._read_fn(cmd))

    async def read_index(self) -> int:
        """The commit seq a linearizable read must wait for (leader confirmed by a quorum).
        Retries through elections; bound it with your own cancel scope."""
        self._check_running()
        while True:
            await self.wait_leader()
            rid = self._new_id()
            w = _Waiter()
            self._reads[rid] = w
            self._read_requests.append(rid)
            self._wake.set()
            try:
                index = await w.wait()
            finally:
                self._reads.pop(rid, None)
            if index >= -1:
                return int(index)
            # Refused (leadership changing): wait for the next change or a short while.
            with trio.move_on_after(self._config.heartbeat_interval):
                await self._role_changed.wait()

    async def wait_leader(self, commit: bool = False) -> Any:
        """Wait until a leader is known and return its id; with ``commit=True`` also until
        this node has seen an entry of the leader's term committed."""
        self._check_running()
        while True:
            core = self._core
            if core is None:
                raise NodeStoppedError(f"node {self.node_id!r} stopped")
            leader = core.leader
            if leader is not None and (
                not commit
                or (self._commit_seq >= 0 and self.log_term_at(self._commit_seq) == core.term)
            ):
                return leader
            ev = self._commit_changed if (commit and leader is not None) else self._role_changed
            await ev.wait()

    async def wait_commit(self, seq: int) -> None:
        while self._commit_seq < seq:
            self._check_running()
            await self._commit_changed.wait()

    async def wait_apply(self, seq: int) -> None:
        while self._apply_seq < seq:
            self._check_running()
            await self._apply_changed.wait()

    def subscribe(
        self, kinds: str | tuple[str, ...] | None = None, *, maxlen: int = 1024
    ) -> Subscription:
        """An async iterator of events (``change``, ``commit``, ``apply``, ``warn``,
        ``error``); a slow reader loses the oldest events, never stalls the node."""
        return self.events.subscribe(kinds, maxlen=maxlen)

    def on(self, kinds: str | tuple[str, ...], callback: Callable[[NodeEvent], Any]) -> Listener:
        """Call ``callback(event)`` for each event of these kinds (inline: keep it quick).
        Returns a ``Listener``: ``close()`` it, or use it as a context manager, to stop."""
        return self.events.on(kinds, callback)

    # ------------------------------------------------------------------ properties
    @property
    def state(self) -> str:
        """``"follower"``, ``"pre_candidate"``, ``"candidate"``, ``"leader"`` or ``"stopped"``."""
        return self._core.role.value if self._core is not None else "stopped"

    @property
    def leader(self) -> Any:
        return self._core.leader if self._core is not None else None

    def is_leader(self) -> bool:
        """True while this node runs and is the leader (the original's ``isLeader()``)."""
        return self._core is not None and self._core.role is Role.LEADER

    @property
    def term(self) -> int:
        """The current term. When the node is not running, the last term it made durable:
        it keeps its value after ``stop()`` (and before ``start`` reads an earlier run's;
        0 when there is none)."""
        if self._core is not None:
            return self._core.term
        return self._durable_term()

    def _durable_term(self) -> int:
        # The term in the hard-state file: what a stopped node last made durable.
        from .log.state import StateFile

        state = getattr(self, "_state", None)
        if state is None:
            try:
                state = StateFile(self._state_path or self._default_state_path())
            except InvalidArgumentError:
                return 0
        raw = state.load()
        return 0 if raw is None else decode_hard_state(raw).term

    @property
    def followers(self) -> list[Any]:
        """On the leader: the followers that answered within the last election timeout."""
        core = self._core
        if core is None or core.role is not Role.LEADER:
            return []
        active = getattr(core, "active_followers", None)
        if active is not None:
            return list(active)
        return [n for n in self.nodes if n != self.node_id]

    @property
    def seq(self) -> int:
        return int(self.log.seq)

    @property
    def head(self) -> bytes | None:
        """The last entry's payload (``None`` when empty or when it is a leader's no-op)."""
        h = self.log.head
        return (unwrap_key(h)[1] if h.startswith(KEY_MAGIC) else h) if h else None

    @property
    def commit_seq(self) -> int:
        return self._commit_seq

    @property
    def apply_seq(self) -> int:
        return self._apply_seq

    @property
    def running(self) -> bool:
        return self._running and not self._stopping

    def log_term_at(self, seq: int) -> int:
        return int(self.log.term_at(seq))

    # ------------------------------------------------------------------ helpers
    def _check_running(self) -> None:
        if not self._running or self._stopping:
            raise ClosedError(
                f"RaftNode {self.node_id!r} is not running: use `async with node:` or start()"
            )

    async def _run_on_driver(self, fn: Callable[[RaftCore], Any]) -> Any:
        """Run ``fn(core)`` on the driver task, between two rounds (never while a ``Ready``
        is being persisted), and return its result or raise its exception."""
        self._check_running()
        w = _Waiter()
        self._admin.append((fn, w))
        self._wake.set()
        return await w.wait()

    def _run_admin(self, core: RaftCore) -> None:
        admin, self._admin = self._admin, []
        for fn, w in admin:
            if w.done:
                continue
            try:
                w.set(fn(core))
            except Exception as e:  # the caller's error (NotLeaderError, MembershipError...)
                w.fail(e)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id


def _payload_bytes(msg: Any) -> int:
    """Payload bytes a queued message holds (what makes a send queue big)."""
    t = type(msg)
    if t is m.AppendEntries:
        return _data_bytes(msg.entries)
    if t is m.Propose:
        return sum(map(len, msg.items))
    return 0


def _new_incarnation(recovering: bool) -> int:
    """Larger than any earlier incarnation of this node id: a wiped node restarts later in
    wall-clock time (nanoseconds, so two restarts within a second differ)."""
    return new_incarnation(time.time_ns(), recovering)


def _log_needs_open(log: Any) -> bool:
    """True for a log that was created but not opened yet (the node then owns opening and
    closing it); False for one the caller opened."""
    is_open = getattr(log, "is_open", None)
    if is_open is not None:
        return not is_open
    return getattr(log, "_state", "open") == "new"


_DATA = operator.itemgetter(2)  # an Entry is a (seq, term, data) tuple
_TERM = operator.itemgetter(1)


def _data_bytes(ents: Iterable[Entry]) -> int:
    """Bytes of the entries' data, summed in C (a generator cost ~0.3 us an entry)."""
    return sum(map(len, map(_DATA, ents)))


def _result_size(r: Any) -> int:
    """Bytes an applied result is counted for in the results memory."""
    return len(r) if isinstance(r, (bytes, bytearray, str)) else 64


def _check_item(data: Any, where: str, key: tuple[Any, int] | None = None) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidArgumentError(f"{where}: expected bytes, got {type(data).__name__}")
    if not data:
        raise InvalidArgumentError(
            f"{where}: empty payloads are reserved for the leader's no-op entry; "
            "send at least one byte"
        )
    return wrap_key(data, key)  # an envelope if keyed or if it looks like one (idempotency.py)


__all__ = ["RaftNode", "AppendResult"]
