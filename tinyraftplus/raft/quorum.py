"""Quorum rules: which sets of nodes may commit an entry or elect a leader.

Raft is safe only if every two quorums intersect: a leader's commit quorum and the next
candidate's election quorum must share a node, or that node's refusal to vote for an
out-of-date candidate never happens and a committed entry can be lost. A strict majority
has this property by counting; a hand-written ``group_fn`` might not, so construction
checks it by enumerating every subset of the nodes and refuses the configuration with the
two disjoint sets it found.

Three rules, combinable:

* the default, a strict majority, ``n // 2 + 1`` nodes;
* ``quorum=N``: at least ``N`` nodes, ``N > n / 2`` (refused otherwise);
* ``group`` (node id -> group name): by default a majority inside every group; with
  ``group_fn(ids) -> bool`` a custom predicate (``group_fn`` alone, without ``group``, is a
  predicate over plain node ids). When ``quorum`` is given as well, both must hold.

A set that contains an accepted set is itself a quorum (more acknowledgements never hurt),
so a ``group_fn`` need not be monotone; the intersection check is done on what it accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from ..errors import ConfigurationError, InvalidArgumentError
from .messages import NodeId

MAX_ENUMERATED_NODES = 16
"""A custom ``group_fn`` is called for all ``2 ** n`` subsets at construction (about 0.25 s
for 16 nodes, doubling with each more); beyond this many nodes the configuration is refused.
Majorities, ``quorum=N`` and ``group`` without ``group_fn`` intersect by construction and
are never enumerated, whatever the size."""

_TABLES: dict[tuple[object, ...], bytes] = {}
"""Enumerated rules, by (nodes, count, groups, group_fn): every node of a process builds the
same rule, and it is checked once. Bounded: a process holds a handful of clusters."""
_TABLES_MAX = 64


def _fmt(ids: Iterable[NodeId]) -> str:
    return "{" + ", ".join(repr(i) for i in ids) + "}"


class Quorum:
    """Decides whether a set of node ids is enough to commit or to win an election.

    ``quorum``: a count (must be > n/2); ``group`` (node id -> group name) with ``group_fn``
    (``group_fn(ids) -> bool``; default with ``group`` alone: a majority in every group).
    Construction checks every two accepted sets intersect and raises ``ConfigurationError``
    naming two disjoint accepted sets otherwise; it also refuses a rule that the whole
    cluster cannot satisfy (no leader could ever be elected)."""

    __slots__ = (
        "nodes", "count", "_group_need", "_group_of", "_table", "_bit", "_majority_only",
        "description", "quorum_arg", "group_fn",
    )

    def __init__(
        self,
        nodes: Sequence[NodeId],
        quorum: int | None = None,
        group: dict[NodeId, object] | None = None,
        group_fn: Callable[[frozenset[NodeId]], bool] | None = None,
    ) -> None:
        ids = tuple(nodes)
        n = len(ids)
        if n == 0:
            raise ConfigurationError("a cluster needs at least one node; pass a non-empty nodes")
        if len(set(ids)) != n:
            dups = sorted({repr(i) for i in ids if ids.count(i) > 1})
            raise ConfigurationError(
                f"duplicate node ids {', '.join(dups)}: every id must be unique"
            )
        self.nodes: tuple[NodeId, ...] = ids
        # The rule as given, so that a membership change can build the same rule for
        # another set of nodes (``membership.QuorumRule``).
        self.quorum_arg = quorum
        self.group_fn = group_fn
        self._bit = {node: 1 << i for i, node in enumerate(ids)}
        self._group_need: dict[object, int] | None = None
        self._group_of: dict[NodeId, object] | None = None
        self._table: bytes | None = None

        if quorum is not None:
            if isinstance(quorum, bool) or not isinstance(quorum, int):
                raise InvalidArgumentError(f"quorum must be an int, got {quorum!r}")
            if quorum > n:
                raise ConfigurationError(
                    f"quorum={quorum} can never be reached with {n} nodes; use at most {n}"
                )
            if quorum * 2 <= n:
                raise ConfigurationError(
                    f"quorum={quorum} is unsafe with {n} nodes: the disjoint sets "
                    f"{_fmt(ids[:quorum])} and {_fmt(ids[n - quorum:])} would both be quorums "
                    f"and could commit different entries; use quorum > {n / 2:g}"
                )
            self.count = quorum
        elif group is None and group_fn is None:
            self.count = n // 2 + 1
        else:
            self.count = 0
        self._majority_only = group is None and group_fn is None

        if group is not None:
            missing = [i for i in ids if i not in group]
            extra = [k for k in group if k not in self._bit]
            if missing:
                raise ConfigurationError(
                    f"group has no entry for node(s) {_fmt(missing)}: give every node a group"
                )
            if extra:
                raise ConfigurationError(f"group names unknown node(s) {_fmt(extra)}")
            self._group_of = dict(group)
        if group is not None and group_fn is None:
            sizes: dict[object, int] = {}
            for g in group.values():
                sizes[g] = sizes.get(g, 0) + 1
            # A majority in each group: two such sets share a node in any one group, so no
            # enumeration is needed for safety.
            self._group_need = {g: size // 2 + 1 for g, size in sizes.items()}
        if group_fn is not None:
            if not callable(group_fn):
                raise InvalidArgumentError(f"group_fn must be callable, got {group_fn!r}")
            groups = None if group is None else tuple(sorted(group.items(), key=repr))
            key: tuple[object, ...] | None = (ids, self.count, groups, group_fn)
            try:
                table = _TABLES.get(key)  # type: ignore[arg-type]
            except TypeError:  # unhashable group names: check, but do not remember
                key, table = None, None
            if table is None:
                table = self._enumerate(group_fn)
                if key is not None:
                    if len(_TABLES) >= _TABLES_MAX:
                        del _TABLES[next(iter(_TABLES))]
                    _TABLES[key] = table
            self._table = table

        if not self._accepts_mask((1 << n) - 1):
            raise ConfigurationError(
                f"the quorum rule does not accept the whole cluster {_fmt(ids)}: no leader "
                "could ever be elected; fix quorum/group/group_fn"
            )
        self.description = self._describe(quorum, group, group_fn)

    # --- construction helpers ---------------------------------------------------------
    def _describe(self, quorum: int | None, group: object, group_fn: object) -> str:
        parts = []
        if quorum is not None or self._majority_only:
            parts.append(f"{self.count} of {len(self.nodes)}")
        if group_fn is not None:
            parts.append("group_fn")
        elif group is not None:
            parts.append("a majority in every group")
        return " and ".join(parts)

    def _enumerate(self, group_fn: Callable[[frozenset[NodeId]], bool]) -> bytes:
        """Call ``group_fn`` on every subset, close the accepted sets upwards and check that
        no two accepted sets are disjoint. Returns the closure as a bit table."""
        ids = self.nodes
        n = len(ids)
        if n > MAX_ENUMERATED_NODES:
            raise ConfigurationError(
                f"cannot verify group_fn for {n} nodes (2**{n} subsets); at most "
                f"{MAX_ENUMERATED_NODES} nodes are supported with a custom group_fn. For more "
                "nodes use group= alone (a majority in every group), quorum=N or the default "
                "majority, which are safe by construction and need no check"
            )
        size = 1 << n
        count = self.count
        accepted = bytearray(size)
        for mask in range(size):
            members = frozenset(ids[i] for i in range(n) if mask >> i & 1)
            if count and len(members) < count:
                continue
            try:
                ok = group_fn(members)
            except Exception as exc:  # the user's function; say where it broke
                raise ConfigurationError(
                    f"group_fn raised {exc!r} for nodes {_fmt(sorted(members, key=repr))}"
                ) from exc
            if ok:
                accepted[mask] = 1
        # Upward closure with whole-table big-int operations: bit m of ``table`` is set when
        # some subset of m is accepted. For each node i, every mask without bit i passes its
        # bit on to the same mask with bit i set.
        packed = bytearray((size + 7) // 8)
        for m in range(size):
            if accepted[m]:
                packed[m >> 3] |= 1 << (m & 7)
        table = int.from_bytes(packed, "little")
        for i in range(n):
            step = 1 << i
            without_i = (1 << step) - 1  # masks 0..step-1 lack bit i; the pattern repeats
            span = step * 2
            while span < size:
                without_i |= without_i << span
                span *= 2
            table |= (table & without_i) << step
        closure = table.to_bytes(len(packed), "little")
        full = size - 1
        for m in range(size):
            if not accepted[m]:
                continue
            rest = full ^ m
            if closure[rest >> 3] >> (rest & 7) & 1:
                other = self._accepted_subset(accepted, rest)
                a = [ids[i] for i in range(n) if m >> i & 1]
                b = [ids[i] for i in range(n) if other >> i & 1]
                raise ConfigurationError(
                    f"unsafe quorum rule: the disjoint sets {_fmt(a)} and {_fmt(b)} are both "
                    "accepted, so two leaders could commit different entries; make group_fn "
                    "require a majority in at least one common group"
                )
        return closure

    @staticmethod
    def _accepted_subset(accepted: bytearray, mask: int) -> int:
        sub = mask
        while True:
            if accepted[sub]:
                return sub
            if sub == 0:
                raise AssertionError("closure said a subset exists")  # pragma: no cover
            sub = (sub - 1) & mask

    # --- queries ----------------------------------------------------------------------
    def _accepts_mask(self, mask: int) -> bool:
        if self._table is not None:
            return bool(self._table[mask >> 3] >> (mask & 7) & 1)
        if mask.bit_count() < self.count:
            return False
        need = self._group_need
        if need is not None:
            assert self._group_of is not None
            have: dict[object, int] = {}
            for node, bit in self._bit.items():
                if mask & bit:
                    g = self._group_of[node]
                    have[g] = have.get(g, 0) + 1
            for g, k in need.items():
                if have.get(g, 0) < k:
                    return False
        return True

    def mask(self, ids: Iterable[NodeId]) -> int:
        bit = self._bit
        m = 0
        for i in ids:
            m |= bit.get(i, 0)  # unknown ids count for nothing
        return m

    def is_quorum(self, ids: Collection[NodeId]) -> bool:
        """Whether ``ids`` (unknown ids are ignored) may commit or elect."""
        if self._majority_only:
            bit = self._bit
            return len({i for i in ids if i in bit}) >= self.count
        return self._accepts_mask(self.mask(ids))

    def highest(self, values: Mapping[NodeId, int], default: int = -1) -> int:
        """The largest ``v`` such that the nodes with ``values[node] >= v`` form a quorum
        (``default`` if there is none). With the match seqs of every node this is the
        highest seq a quorum holds."""
        if self._majority_only:
            bit = self._bit
            vals = [v for k, v in values.items() if k in bit]  # others count for nothing
            if len(vals) < self.count:
                return default
            vals.sort(reverse=True)
            return vals[self.count - 1]
        bit = self._bit
        mask = 0
        for node, v in sorted(values.items(), key=lambda kv: kv[1], reverse=True):
            mask |= bit.get(node, 0)
            if self._accepts_mask(mask):
                return v
        return default

    @property
    def groups(self) -> dict[NodeId, object] | None:
        return dict(self._group_of) if self._group_of is not None else None

    def __repr__(self) -> str:
        return f"Quorum({_fmt(self.nodes)}: {self.description})"
