"""``RaftNode``'s membership, leadership-transfer and status API (a mixin of ``RaftNode``).

The rules live in the core (``raft/reconfig.py``, ``raft/membership.py``); this module runs
them on the node's driver task (the core is only ever touched between two ``Ready``s, never
while one is being persisted) and waits for their outcome:

* ``change_membership`` returns once the *final* configuration is committed: after a joint
  configuration, once the leader has left it by itself. If leadership is lost meanwhile the
  change may or may not take effect: ``LeadershipLostError`` says so, and the status shows
  which happened.
* ``add_learner`` / ``promote`` / ``remove_node`` compute the new sets from the configuration
  in force and call ``change_membership`` with ``expected_config_seq`` set, so two operators
  racing each other cannot undo each other's change.
* ``transfer_leadership`` returns the new leader once it leads, or raises
  ``RaftTimeoutError`` after one election timeout (plus ``timeout``), when the old leader has
  taken its role back.

A follower refuses all of them with ``NotLeaderError`` naming the leader: membership changes
are rare and operator-driven, so they go to the leader (``Client`` and the admin tool find
it), rather than being forwarded with the ambiguity a forwarded request carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from .errors import (
    InvalidArgumentError,
    LeadershipLostError,
    NodeStoppedError,
    RaftTimeoutError,
)
from .raft.core import RaftCore, Role
from .raft.membership import Config
from .raft.messages import NodeId

DEFAULT_PROMOTE_LAG = 1000
"""``promote`` refuses a learner more than this many entries behind the leader."""


@dataclass(frozen=True)
class FollowerStatus:
    """What the leader knows of one follower."""

    match: int
    next: int
    state: str  # "probe", "replicate" or "lost"
    inflight: int
    last_heard: float | None = None
    """Seconds since this node last handled a message from it (``None``: never)."""


@dataclass(frozen=True)
class NodeStatus:
    """A snapshot of a node, for operators (``RaftNode.status()``)."""

    node_id: Any
    role: str
    term: int
    leader: Any
    first_seq: int
    last_seq: int
    commit_seq: int
    apply_seq: int
    voters: tuple[Any, ...]
    learners: tuple[Any, ...]
    outgoing: tuple[Any, ...]
    config_seq: int
    recovering: bool
    followers: dict[Any, FollowerStatus] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["followers"] = {k: dict(v.__dict__) for k, v in self.followers.items()}
        return d


class MembershipAPI:
    """Mixed into ``RaftNode``; uses its driver (``_run_on_driver``) and waits."""

    node_id: Any
    append_timeout: float
    _core: RaftCore | None

    async def _run_on_driver(self, fn: Callable[[RaftCore], Any]) -> Any:
        raise NotImplementedError  # RaftNode's

    async def wait_commit(self, seq: int) -> None:
        raise NotImplementedError  # RaftNode's

    async def wait_leader(self, commit: bool = False) -> Any:
        raise NotImplementedError  # RaftNode's

    def _check_running(self) -> None:
        raise NotImplementedError  # RaftNode's

    @property
    def apply_seq(self) -> int:
        raise NotImplementedError  # RaftNode's

    # --- introspection -----------------------------------------------------------------
    @property
    def configuration(self) -> Config:
        """The configuration in force on this node (the latest in its log)."""
        core = self._core
        if core is None:
            raise NodeStoppedError(f"node {self.node_id!r} is not running")
        return core.configuration

    def status(self) -> NodeStatus:
        """Role, term, leader, seqs, configuration and (on the leader) each follower's
        replication progress."""
        core = self._core
        if core is None:
            raise NodeStoppedError(f"node {self.node_id!r} is not running")
        cfg = core.configuration
        followers: dict[Any, FollowerStatus] = {}
        if core.role is Role.LEADER:
            heard: dict[Any, float] = getattr(self, "_heard", {})
            now = trio.current_time()
            for p, pr in core.progress.items():
                state = "lost" if pr.lost else ("probe" if pr.probe else "replicate")
                t = heard.get(p)
                age = None if t is None else round(now - t, 3)
                followers[p] = FollowerStatus(pr.match, pr.next, state, len(pr.inflight), age)

        def ids(s: Iterable[Any]) -> tuple[Any, ...]:
            return tuple(sorted(s, key=repr))

        return NodeStatus(
            self.node_id, core.role.value, core.term, core.leader, core.first_seq,
            core.last_seq, core.commit_seq, self.apply_seq, ids(cfg.voters),
            ids(cfg.learners), ids(cfg.outgoing), core.config_seq, core.recovering,
            followers,
        )

    # --- changes -------------------------------------------------------------------------
    async def change_membership(
        self,
        voters: Iterable[NodeId],
        learners: Iterable[NodeId] = (),
        *,
        expected_config_seq: int | None = None,
        addrs: Mapping[NodeId, str] | None = None,
        groups: Mapping[NodeId, Any] | None = None,
        max_lag: int | None = None,
        timeout: float | None = None,
    ) -> Config:
        """Make ``voters`` the voters and ``learners`` the learners (on the leader; joint
        consensus when more than one voter changes). Returns the configuration once it is
        committed. Raises ``NotLeaderError`` (with the leader), ``MembershipError`` (another
        change in flight, stale ``expected_config_seq``, a lagging learner, a leader that
        has not committed an entry of its term yet), ``ConfigurationError`` (an unsafe
        quorum rule), ``LeadershipLostError`` / ``RaftTimeoutError`` (it may or may not
        take effect: check ``status()``)."""
        self._check_running()
        v, lr = list(voters), list(learners)
        core = self._core
        if core is not None and core.role is Role.LEADER:
            # A new leader first commits an entry of its term (the rule): wait for that
            # rather than refuse a change that comes just after an election.
            with trio.move_on_after(self.append_timeout):
                await self.wait_leader(commit=True)

        def propose(core: RaftCore) -> tuple[int, int]:
            return core.propose_config(v, lr, expected_config_seq=expected_config_seq,
                                       groups=groups, addrs=addrs, max_lag=max_lag)

        seq, term = await self._run_on_driver(propose)
        limit = self.append_timeout if timeout is None else timeout
        with trio.move_on_after(limit) as scope:
            while True:
                await self.wait_commit(seq)
                core = self._core
                if core is None:
                    raise NodeStoppedError(f"node {self.node_id!r} stopped")
                if core.term_at(seq) != term:
                    raise LeadershipLostError(
                        f"the configuration change at seq {seq} (term {term}) was replaced "
                        "after a leader change: it did not take effect; check status() and "
                        "try again"
                    )
                cfg = core.configuration
                if not cfg.joint and core.config_seq <= core.commit_seq:
                    return cfg
                seq = core.config_seq  # the leave-joint entry: wait for it too
                term = core.term_at(seq)
        assert scope.cancelled_caught
        raise RaftTimeoutError(
            f"the configuration change did not commit within {limit}s (no quorum of the old "
            "and the new voters?); it may still take effect: check status()"
        )

    async def add_learner(self, node_id: NodeId, addr: str | None = None) -> Config:
        """Add ``node_id`` as a learner (it receives the log, never votes or counts)."""
        cfg = self.configuration
        if node_id in cfg.members:
            raise InvalidArgumentError(f"add_learner({node_id!r}): already a member "
                                       f"({cfg.describe()})")
        return await self.change_membership(
            cfg.voters, cfg.learners | {node_id}, expected_config_seq=self._config_seq(),
            addrs=None if addr is None else {node_id: addr},
        )

    async def promote(self, node_id: NodeId, *, max_lag: int = DEFAULT_PROMOTE_LAG) -> Config:
        """Make learner ``node_id`` a voter, once its log is within ``max_lag`` entries of
        the leader's (``MembershipError`` otherwise: let it catch up, then retry)."""
        cfg = self.configuration
        if node_id not in cfg.learners:
            raise InvalidArgumentError(
                f"promote({node_id!r}): not a learner ({cfg.describe()}); add it with "
                "add_learner first"
            )
        return await self.change_membership(
            cfg.voters | {node_id}, cfg.learners - {node_id},
            expected_config_seq=self._config_seq(), max_lag=max_lag,
        )

    async def remove_node(self, node_id: NodeId) -> Config:
        """Remove voter or learner ``node_id``. A leader that removes itself leads the change
        to its end and then steps down."""
        cfg = self.configuration
        if node_id not in cfg.members:
            raise InvalidArgumentError(f"remove_node({node_id!r}): not a member "
                                       f"({cfg.describe()})")
        return await self.change_membership(
            cfg.voters - {node_id}, cfg.learners - {node_id},
            expected_config_seq=self._config_seq(),
        )

    def _config_seq(self) -> int:
        core = self._core
        if core is None:
            raise NodeStoppedError(f"node {self.node_id!r} is not running")
        return core.config_seq

    async def transfer_leadership(self, to: NodeId | None = None, *,
                                  timeout: float | None = None) -> NodeId:
        """Hand leadership to voter ``to`` (``None``: the most up-to-date one) and return
        the new leader once it leads. Meanwhile this node refuses new appends
        (``NotLeaderError``; ``append`` waits and then goes to the new leader). Raises
        ``InvalidArgumentError`` for a learner or unknown target, ``RaftTimeoutError`` if
        it has not taken over within one election timeout (plus ``timeout``): this node
        then leads on."""
        self._check_running()
        target = await self._run_on_driver(lambda core: core.transfer_leadership(to))
        core = self._core
        assert core is not None
        limit = core.config.election_timeout * 2 + (timeout or 0.0)
        with trio.move_on_after(limit):
            while True:
                core = self._core
                if core is None:
                    raise NodeStoppedError(f"node {self.node_id!r} stopped")
                if core.leader == target and core.role is not Role.LEADER:
                    return target
                if core.leader == target == self.node_id:
                    return target
                await trio.sleep(core.config.heartbeat_interval / 4)
        raise RaftTimeoutError(
            f"node {target!r} did not take over leadership within {limit:.2f}s; "
            f"node {self.node_id!r} leads on"
        )


__all__ = ["MembershipAPI", "NodeStatus", "FollowerStatus", "DEFAULT_PROMOTE_LAG"]
