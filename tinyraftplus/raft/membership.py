"""Cluster membership: configurations as log entries, joint consensus, learners.

Theory of operation
-------------------
A ``Config`` says who is in the cluster: the *voters* (who elect and commit), the *learners*
(who receive the log and apply it, and never count), and during a change of more than one
voter the *outgoing* voters of the configuration being left (joint consensus). Each member
may carry a replication group (for ``group``/``group_fn`` quorums) and an address (which a
transport may use to reach it; the core ignores it).

A configuration is an entry of its own kind in the log (a ``ConfigEntry``, whose ``kind`` is
``KIND_CONFIG``, payload ``Config.encode()``). A node uses the *latest* configuration in its
log, committed or not, from the moment it appends it; when a conflicting leader truncates
that entry away, the node falls back to the one before (Ongaro's thesis, 4.1; hashicorp's
``latest`` / ``committed``).
The core therefore keeps the configurations of its uncommitted entries in a short stack
(``ConfigStack``), persisted with the hard state, so a restarted node knows its configuration
before it hears from anyone.

Joint consensus (thesis 4.3; etcd's ``ConfChangeV2``): changing more than one voter first
appends ``C_old,new`` (voters = new, outgoing = old), in which an election or a commit needs a
quorum of the old set AND of the new one; once that entry commits, the leader appends
``C_new`` by itself (auto-leave). Changing one voter may go straight to ``C_new``: any
majority of the old set and any majority of the new one intersect. Rules a leader enforces
before proposing (``check_change``), each because a known bug lies behind it:

* an entry of the leader's own term is committed (the 2015 single-server bug: without it a
  new leader can append a change concurrently with an uncommitted one of a previous leader);
* the latest configuration is committed, so one change is in flight at a time;
* ``expected_config_seq``, when given, equals the seq of the latest configuration
  (compare-and-set against a stale view, hashicorp's ``prevIndex``);
* a voter that is promoted from learner is caught up (``max_lag``);
* the quorum rule of every configuration involved is safe (``Quorum`` refuses two disjoint
  accepted sets, naming them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..entry import KIND_CONFIG, KIND_NORMAL
from ..errors import ConfigurationError, InvalidArgumentError
from .messages import NodeId
from .quorum import Quorum


@dataclass(frozen=True)
class Config:
    """One cluster configuration (see the module docstring). ``groups`` and ``addrs`` map
    member ids to their replication group and address (both optional)."""

    voters: frozenset[NodeId]
    learners: frozenset[NodeId] = frozenset()
    outgoing: frozenset[NodeId] = frozenset()  # non-empty only in a joint configuration
    groups: Mapping[NodeId, Any] = field(default_factory=dict)
    addrs: Mapping[NodeId, str] = field(default_factory=dict)

    @property
    def joint(self) -> bool:
        return bool(self.outgoing)

    @property
    def members(self) -> frozenset[NodeId]:
        """Everyone the leader replicates to (plus itself)."""
        return self.voters | self.learners | self.outgoing

    @property
    def all_voters(self) -> frozenset[NodeId]:
        return self.voters | self.outgoing

    def describe(self) -> str:
        def ids(s: Iterable[NodeId]) -> str:
            return "{" + ", ".join(repr(i) for i in sorted(s, key=repr)) + "}"

        out = f"voters {ids(self.voters)}"
        if self.outgoing:
            out += f" joint with {ids(self.outgoing)}"
        if self.learners:
            out += f", learners {ids(self.learners)}"
        return out

    def encode(self) -> bytes:
        def ids(s: Iterable[NodeId]) -> list[NodeId]:
            return sorted(s, key=repr)

        return msgpack.packb([
            1, ids(self.voters), ids(self.learners), ids(self.outgoing),
            [x for k in ids(self.groups) for x in (k, self.groups[k])],
            [x for k in ids(self.addrs) for x in (k, self.addrs[k])],
        ])

    @classmethod
    def decode(cls, raw: bytes) -> Config:
        try:
            v = msgpack.unpackb(raw)
            if not isinstance(v, list) or len(v) != 6 or v[0] != 1:
                raise ValueError("not a version-1 configuration")
            _, voters, learners, outgoing, groups, addrs = v
            return cls(
                frozenset(voters), frozenset(learners), frozenset(outgoing),
                dict(zip(groups[::2], groups[1::2], strict=True)),
                dict(zip(addrs[::2], addrs[1::2], strict=True)),
            )
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise InvalidArgumentError(f"cannot decode a configuration entry: {e}") from None


def bootstrap_config(nodes: Iterable[NodeId], group: Mapping[NodeId, Any] | None = None) -> Config:
    """The first configuration of a new cluster: every node a voter."""
    return Config(frozenset(nodes), groups=dict(group or {}))


class QuorumRule:
    """How to build the quorum of a voter set: the same ``quorum``/``group_fn`` for every
    configuration, with each configuration's own groups."""

    def __init__(self, quorum: int | None = None,
                 group_fn: Callable[[frozenset[NodeId]], bool] | None = None,
                 use_groups: bool = False) -> None:
        self.quorum = quorum
        self.group_fn = group_fn
        self.use_groups = use_groups

    def build(self, voters: frozenset[NodeId], groups: Mapping[NodeId, Any]) -> Quorum:
        ids = sorted(voters, key=repr)
        group = {i: groups[i] for i in ids} if self.use_groups else None
        return Quorum(ids, quorum=self.quorum, group=group, group_fn=self.group_fn)

    @property
    def majority(self) -> bool:
        """Plain majorities of whatever voters a configuration has."""
        return self.quorum is None and self.group_fn is None and not self.use_groups

    @classmethod
    def of(cls, q: Quorum) -> QuorumRule:
        """The rule a ``Quorum`` was built with."""
        return cls(q.quorum_arg, q.group_fn, q.groups is not None)


class JointQuorum:
    """The quorum of a configuration: of its voters, and in a joint configuration also of
    its outgoing voters. Same interface as ``Quorum`` for what the core asks."""

    __slots__ = ("incoming", "outgoing", "nodes")

    def __init__(self, incoming: Quorum, outgoing: Quorum | None) -> None:
        self.incoming = incoming
        self.outgoing = outgoing
        nodes = set(incoming.nodes) | (set(outgoing.nodes) if outgoing is not None else set())
        self.nodes = tuple(sorted(nodes, key=repr))

    def is_quorum(self, ids: Any) -> bool:
        if not self.incoming.is_quorum(ids):
            return False
        return self.outgoing is None or self.outgoing.is_quorum(ids)

    def highest(self, values: Mapping[NodeId, int], default: int = -1) -> int:
        n = self.incoming.highest(values, default)
        if self.outgoing is not None:
            n = min(n, self.outgoing.highest(values, default))
        return n


def quorum_of(cfg: Config, rule: QuorumRule) -> JointQuorum:
    """Build (and so check: ``ConfigurationError`` naming two disjoint sets) the quorum of
    ``cfg``. Every two joint quorums contain a quorum of the incoming set each, so checking
    each half is enough for the joint rule to intersect."""
    if not cfg.voters:
        raise ConfigurationError(f"a configuration needs at least one voter: {cfg.describe()}")
    missing = [i for i in cfg.all_voters if rule.use_groups and i not in cfg.groups]
    if missing:
        raise ConfigurationError(
            f"no group for voter(s) {sorted(missing, key=repr)!r}: with replication groups "
            "every voter needs one"
        )
    incoming = rule.build(cfg.voters, cfg.groups)
    outgoing = rule.build(cfg.outgoing, cfg.groups) if cfg.outgoing else None
    return JointQuorum(incoming, outgoing)


def next_config(current: Config, voters: Iterable[NodeId], learners: Iterable[NodeId],
                groups: Mapping[NodeId, Any] | None = None,
                addrs: Mapping[NodeId, str] | None = None) -> Config:
    """The configuration to append for a change from ``current`` (which must not be joint)
    to ``voters`` + ``learners``: the target itself when at most one voter changes, else
    the joint configuration that leads to it."""
    new_voters = frozenset(voters)
    new_learners = frozenset(learners) - new_voters
    if not new_voters:
        raise InvalidArgumentError("change_membership: at least one voter is needed")
    g = {**current.groups, **(groups or {})}
    a = {**current.addrs, **(addrs or {})}
    keep = new_voters | new_learners
    g = {k: v for k, v in g.items() if k in keep or k in current.voters}
    a = {k: v for k, v in a.items() if k in keep or k in current.voters}
    changed = len(new_voters ^ current.voters)
    if changed <= 1:
        return Config(new_voters, new_learners, frozenset(), g, a)
    return Config(new_voters, new_learners, current.voters, g, a)


def leave_joint(cfg: Config) -> Config:
    """``C_new`` after a committed ``C_old,new`` (auto-leave)."""
    keep = cfg.voters | cfg.learners
    return Config(cfg.voters, cfg.learners, frozenset(),
                  {k: v for k, v in cfg.groups.items() if k in keep},
                  {k: v for k, v in cfg.addrs.items() if k in keep})


@dataclass(frozen=True)
class ConfigStack:
    """The configurations a node may have to fall back to: the latest committed one and the
    uncommitted ones after it, as ``(seq, term, Config)`` oldest first. ``seq == -1`` is the
    bootstrap configuration, which no entry carries."""

    items: tuple[tuple[int, int, Config], ...]

    @property
    def latest(self) -> tuple[int, int, Config]:
        return self.items[-1]

    def push(self, seq: int, term: int, cfg: Config) -> ConfigStack:
        return ConfigStack(self.items + ((seq, term, cfg),))

    def truncate_after(self, seq: int) -> ConfigStack:
        kept = tuple(x for x in self.items if x[0] <= seq)
        return ConfigStack(kept or self.items[:1])

    def committed_through(self, commit: int) -> ConfigStack:
        """Drop what is older than the latest committed configuration."""
        items = self.items
        i = 0
        for j, (s, _, _) in enumerate(items):
            if s <= commit:
                i = j
        return self if i == 0 else ConfigStack(items[i:])

    def matching(self, term_at: Callable[[int], int], last_seq: int,
                 first_seq: int = 0) -> ConfigStack:
        """After a restart: keep only configurations whose entry is still in the log (a
        crash may have lost an entry whose configuration the hard state already named).
        Entries before ``first_seq`` were compacted into a snapshot: committed, so kept."""
        kept = tuple(x for x in self.items if x[0] < max(first_seq, 0)
                     or (x[0] <= last_seq and term_at(x[0]) == x[1]) or x[0] < 0)
        return ConfigStack(kept or self.items[:1])

    def encode(self) -> list[Any]:
        return [[s, t, c.encode()] for s, t, c in self.items]

    @classmethod
    def decode(cls, v: Any) -> ConfigStack:
        return cls(tuple((int(s), int(t), Config.decode(c)) for s, t, c in v))


__all__ = [
    "KIND_NORMAL", "KIND_CONFIG", "Config", "ConfigStack", "JointQuorum", "QuorumRule",
    "bootstrap_config", "quorum_of", "next_config", "leave_joint",
]
