"""The core's side of membership changes and leadership transfer (a mixin of ``RaftCore``).

``membership.py`` says what a configuration is and how one follows another; this module
holds what the core does with them: which configuration is in force (the latest one in the
log, from the moment it is appended), what happens when it is truncated away or committed
(auto-leave of a joint configuration, a removed leader stepping down), the checks before a
leader proposes a change, and handing leadership to another voter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..entry import ConfigEntry, Entry
from ..errors import InvalidArgumentError, MembershipError, NotLeaderError
from .membership import (
    Config,
    ConfigStack,
    JointQuorum,
    QuorumRule,
    leave_joint,
    next_config,
    quorum_of,
)
from .messages import CoreMessage, NodeId, TimeoutNow
from .progress import Progress
from .raftlog import RaftLog


class Reconfiguration:
    """Mixed into ``RaftCore``; the fields it uses are declared here."""

    _id: NodeId
    _term: int
    _inc: int
    _now: float
    _commit: int
    _log: RaftLog
    _rule: QuorumRule
    _configs: ConfigStack
    _config: Config
    _quorum: JointQuorum
    _nodes: tuple[NodeId, ...]
    _peers: tuple[NodeId, ...]
    _peer_set: frozenset[NodeId]
    _voters: tuple[NodeId, ...]
    _is_voter: bool
    _prs: dict[NodeId, Progress]
    _dirty: set[NodeId]
    _bcast: bool
    _hs_changed: bool
    _msgs: list[tuple[NodeId, CoreMessage]]
    _transfer_target: NodeId | None
    _transfer_deadline: float
    _transfer_sent: bool
    _bugs: frozenset[str]

    # --- the configuration in force ---------------------------------------------------
    @property
    def configuration(self) -> Config:
        """The configuration in force: the latest in the log, committed or not."""
        return self._config

    @property
    def latest_configuration(self) -> Config:
        """The latest configuration in the log: by the rules, the one in force (the same as
        ``configuration`` unless the planted bug ``config_on_commit`` is on)."""
        return self._configs.latest[2]

    @property
    def config_seq(self) -> int:
        """Seq of the entry that holds the configuration in force (-1: the one the node
        was started with, which no entry holds)."""
        return self._configs.latest[0]

    @property
    def committed_config_seq(self) -> int:
        """Seq of the latest committed configuration (-1: the one started with)."""
        seqs = [s for s, _, _ in self._configs.items if s <= self._commit]
        return seqs[-1] if seqs else -1

    def _use_configs(self, stack: ConfigStack) -> None:
        """Make ``stack.latest`` the configuration in force; replicate to the members of
        every configuration still in the stack (a node being removed hears of its removal)."""
        changed = stack is not self._configs
        self._configs = stack
        # (the planted bug "config_on_commit": the oldest kept, i.e. committed, one rules)
        cfg = stack.items[0][2] if "config_on_commit" in self._bugs else stack.latest[2]
        if cfg is not self._config:
            self._config = cfg
            self._quorum = quorum_of(cfg, self._rule)
        members: set[NodeId] = set()
        for _, _, c in stack.items:
            members |= c.members
        self._nodes = tuple(sorted(cfg.members, key=repr))
        self._peers = tuple(sorted(members - {self._id}, key=repr))
        self._peer_set = frozenset(self._peers)
        self._voters = tuple(sorted(cfg.all_voters - {self._id}, key=repr))
        self._is_voter = self._id in cfg.all_voters
        if self._prs or self._leading():
            nxt = self._log.last_seq + 1
            for p in self._peers:
                if p not in self._prs:
                    self._prs[p] = Progress(nxt, self._now)
                    self._dirty.add(p)
            for p in [p for p in self._prs if p not in self._peer_set]:
                del self._prs[p]
                self._dirty.discard(p)
        if self._transfer_target is not None and self._transfer_target not in cfg.all_voters:
            self._transfer_target = None  # no longer a voter: it must not be made leader
        if changed:
            self._hs_changed = True

    def _leading(self) -> bool:
        raise NotImplementedError  # RaftCore's

    def _config_appended(self, e: Entry) -> None:
        cfg = Config.decode(e.data)
        self._log.config_index.append((e.seq, e.term))
        self._use_configs(self._configs.push(e.seq, e.term, cfg))

    def _configs_truncated(self, seq: int) -> None:
        index = self._log.config_index
        if index and index[-1][0] > seq:
            self._log.config_index = [x for x in index if x[0] <= seq]
            self._hs_changed = True
        if self._configs.latest[0] > seq:
            self._use_configs(self._configs.truncate_after(seq))

    def _configs_committed(self) -> None:
        """The commit seq advanced: drop configurations older than the latest committed
        one; on the leader, leave a committed joint configuration, and step down once a
        configuration without this node is committed."""
        stack = self._configs
        if len(stack.items) > 1:
            # Only through what this node holds durably: the stack is persisted before the
            # entries, and after a crash its oldest item must still be in the log.
            pruned = stack.committed_through(min(self._commit, self._log.stable))
            if pruned is not stack:
                self._use_configs(pruned)
        if not self._leading():
            return
        seq, _, cfg = self._configs.latest
        if seq > self._commit:
            return
        if cfg.joint:
            self._append_config(leave_joint(cfg))  # C_old,new is committed: now C_new
        elif not self._is_voter:
            self._step_down_removed()

    def _step_down_removed(self) -> None:
        raise NotImplementedError  # RaftCore's

    def _append_config(self, cfg: Config) -> int:
        seq = self._log.last_seq + 1
        self._log.append([ConfigEntry(seq, self._term, cfg.encode())])
        self._log.config_index.append((seq, self._term))
        self._use_configs(self._configs.push(seq, self._term, cfg))
        self._bcast = True
        return seq

    # --- proposing a change (leader) ----------------------------------------------------
    def propose_config(
        self,
        voters: Iterable[NodeId],
        learners: Iterable[NodeId] = (),
        *,
        expected_config_seq: int | None = None,
        groups: Mapping[NodeId, Any] | None = None,
        addrs: Mapping[NodeId, str] | None = None,
        max_lag: int | None = None,
    ) -> tuple[int, int]:
        """Leader only: change the configuration to ``voters`` + ``learners`` (through a
        joint configuration if more than one voter changes; the leader leaves it by itself
        once it commits). Returns ``(seq, term)`` of the entry appended. ``max_lag``: a
        voter that was a learner must be at most this many entries behind.

        Raises ``NotLeaderError``, ``MembershipError`` (the rules in ``membership.py``),
        ``ConfigurationError`` (an unsafe quorum rule, naming two disjoint sets)."""
        if not self._leading():
            raise NotLeaderError(
                f"node {self._id!r} is not the leader; send membership changes there",
                leader=getattr(self, "_leader", None),
            )
        log = self._log
        if log.term_at(self._commit) != self._term and "skip_own_term_rule" not in self._bugs:
            raise MembershipError(
                f"leader {self._id!r} has not yet committed an entry of its term {self._term}; "
                "retry in a moment (a change before that could race one of the previous "
                "leader's)"
            )
        if self._transfer_target is not None:
            raise MembershipError(
                f"leader {self._id!r} is handing leadership to {self._transfer_target!r}; "
                "propose the change to the new leader"
            )
        seq, _, cur = self._configs.latest
        if expected_config_seq is not None and expected_config_seq != seq:
            raise MembershipError(
                f"the configuration changed: expected_config_seq={expected_config_seq} but "
                f"the latest configuration is at seq {seq} ({cur.describe()}); read the "
                "status again and decide on the new one"
            )
        if seq > self._commit or cur.joint:
            raise MembershipError(
                f"a membership change is in flight (configuration at seq {seq}, "
                f"{cur.describe()}, not committed yet); one change at a time: retry once it "
                "commits"
            )
        new = next_config(cur, voters, learners, groups, addrs)
        quorum_of(new, self._rule)  # refuses an unsafe rule, naming two disjoint sets
        if max_lag is not None:
            last = log.last_seq
            for v in new.voters - cur.voters - {self._id}:
                pr = self._prs.get(v)
                if pr is not None and last - pr.match > max_lag:
                    raise MembershipError(
                        f"node {v!r} is {last - pr.match} entries behind the leader (at most "
                        f"{max_lag} for a new voter): let it catch up as a learner first"
                    )
        return self._append_config(new), self._term

    # --- leadership transfer ----------------------------------------------------------------
    def transfer_leadership(self, to: NodeId | None = None) -> NodeId:
        """Leader only: hand leadership to voter ``to`` (``None``: the most up-to-date
        voter). New proposals are refused (``NotLeaderError``) until it takes over or one
        election timeout passes, after which this node leads on. The target is brought up
        to date first, then sent ``TimeoutNow``. Returns the target."""
        if not self._leading():
            raise NotLeaderError(f"node {self._id!r} is not the leader", leader=None)
        voters = [v for v in self._voters if v in self._prs]
        if to is None:
            if not voters:
                raise InvalidArgumentError(
                    f"transfer_leadership: node {self._id!r} is the only voter; add one first"
                )
            to = max(voters, key=lambda v: (self._prs[v].match, repr(v)))
        elif to == self._id:
            self._transfer_target = None  # stay: cancels a transfer under way
            return to
        elif to not in voters:
            role = "a learner" if to in self._config.learners else "not a member"
            raise InvalidArgumentError(
                f"transfer_leadership(to={to!r}): {to!r} is {role}; only voters can lead"
            )
        self._start_transfer(to)
        return to

    def _start_transfer(self, to: NodeId) -> None:
        self._transfer_target = to
        self._transfer_deadline = self._now + self._election_timeout()
        self._transfer_sent = False
        self._maybe_send_timeout_now(to)

    def _election_timeout(self) -> float:
        raise NotImplementedError  # RaftCore's

    def _maybe_send_timeout_now(self, p: NodeId) -> None:
        """Once the transfer target holds the whole log, tell it to campaign now."""
        if self._transfer_target != p or self._transfer_sent:
            return
        if p not in self._config.all_voters:
            self._transfer_target = None
            return
        pr = self._prs.get(p)
        if pr is None:
            return
        if pr.match >= self._log.last_seq:
            self._transfer_sent = True
            self._msgs.append((p, TimeoutNow(self._term, self._inc)))
        else:
            self._dirty.add(p)


__all__ = ["Reconfiguration"]
