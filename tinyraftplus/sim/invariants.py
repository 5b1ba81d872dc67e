"""Raft's safety properties, checked incrementally while a simulation runs.

Each check is O(1) or O(new entries) per event, so every event of every seed is checked:

* **Election safety**: at most one leader per term (``on_leader``).
* **Log matching**: if two logs hold an entry with the same seq and term, they are identical
  up to it. Every entry any node ever writes is registered as ``(seq, term) -> chain hash``
  (the chain hash covers the whole prefix, see ``store.py``); a second, different chain at the
  same ``(seq, term)`` is a violation (``on_append``).
* **Leader completeness**: an entry committed in term T is in the log of every leader of a
  term after T. Each leader's log is snapshotted (as chain hashes) when it wins; it is checked
  against everything committed so far, and every later commit is checked against the
  snapshots of leaders of later terms (a commit can be *learned* after a later leader won).
* **State machine safety**: no two nodes commit (and so apply) different entries at one seq:
  every node's committed prefix must match one canonical committed log (``on_commit``).
* **Commit monotonicity**: a node's commit index never goes backwards while it stays up
  (after a restart it starts again from what its durable state says) and never passes the
  end of its own log.
* **Durability of acknowledged writes**: every write a client saw succeed is on the durable
  log of at least a quorum of nodes, so no sequence of crashes of a minority can lose it
  (``check_acked_durable``, run after every crash and at the end).

A violation raises :class:`SafetyViolation` through the ``fail`` callback the simulator
passes in, which adds the seed, the step and a replay command.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import TinyRaftError

__all__ = ["SafetyViolation", "Invariants"]


class SafetyViolation(TinyRaftError):
    """The simulated cluster broke a Raft safety property or linearizability.

    ``invariant`` names the property, ``nodes`` the nodes involved; ``str()`` is the full
    report (seed, step, replay command, trace around the failure)."""

    def __init__(self, message: str, *, invariant: str, nodes: Sequence[Any] = (),
                 seed: int | None = None, step: int | None = None, report: str = "") -> None:
        super().__init__(report or message)
        self.invariant = invariant
        self.nodes = list(nodes)
        self.seed = seed
        self.step = step
        self.short = message


Fail = Callable[[str, str, Sequence[Any]], None]
LeaderLog = tuple[int, int, list[int]]  # base, chain hash at base, chain hashes after it


class Invariants:
    def __init__(self, nodes: Sequence[Any], quorum_size: int, fail: Fail) -> None:
        self.nodes = list(nodes)
        self.quorum_size = quorum_size
        self._fail = fail
        self.leaders: dict[int, Any] = {}
        # term -> (leader, chain hashes of its log when it won)
        self.leader_logs: dict[int, tuple[Any, LeaderLog]] = {}
        # (seq, term) -> (chain hash, first writer)
        self.chains: dict[tuple[int, int], tuple[int, Any]] = {}
        # canonical committed log: per seq (term, chain hash, commit term, first node)
        self.committed: list[tuple[int, int, int, Any]] = []
        self.commit_of: dict[Any, int] = {n: -1 for n in nodes}
        # acknowledged writes: (seq, term, description)
        self.acked: list[tuple[int, int, str]] = []
        # seq -> (digest of the state machine's snapshot there, first node, how it got it)
        self.snapshots: dict[int, tuple[int, Any, str]] = {}
        self.checks = 0

    # --- election safety + leader completeness ------------------------------------------
    def on_leader(self, node: Any, term: int, chain: LeaderLog | list[int]) -> None:
        """``chain``: the new leader's log as ``(base, chain hash at base, chain hashes of
        base + 1 ..)``; entries up to ``base`` are in its snapshot (``base == -1``: none).
        A plain list is the chain hashes of a log from seq 0."""
        if isinstance(chain, list):
            chain = (-1, 0, chain)
        self.checks += 1
        other = self.leaders.get(term)
        if other is None:
            self.leaders[term] = node
        elif other != node:
            self._fail("election safety",
                       f"two leaders in term {term}: node {other} and node {node}",
                       [other, node])
            return
        else:
            return  # already checked when it won
        self.leader_logs[term] = (node, chain)
        base = chain[0]
        for seq, (_t, h, cterm, first) in enumerate(self.committed):
            if cterm < term and (seq >= base or seq == 0):
                self._check_has(node, term, chain, seq, h, cterm, first)

    def _check_has(self, leader: Any, term: int, chain: LeaderLog, seq: int, h: int,
                   cterm: int, first: Any) -> None:
        base, base_chain, hashes = chain
        have: int | None
        if seq < base:
            # In its snapshot: it holds the committed prefix iff its chain hash at the base
            # (which covers the prefix) is the committed one there.
            if base >= len(self.committed):
                return  # checked when base is committed
            seq, h, have = base, self.committed[base][1], base_chain
        elif seq == base:
            have = base_chain
        else:
            i = seq - base - 1
            have = hashes[i] if i < len(hashes) else None
        if have != h:
            what = "nothing" if have is None else "a different entry"
            self._fail(
                "leader completeness",
                f"node {leader} won term {term} but has {what} at seq {seq}, which was "
                f"committed in term {cterm} (first reported by node {first})",
                [leader, first],
            )

    # --- log matching --------------------------------------------------------------------
    def on_append(self, node: Any, seq: int, term: int, chain: int) -> None:
        key = (seq, term)
        seen = self.chains.get(key)
        if seen is None:
            self.chains[key] = (chain, node)
        elif seen[0] != chain:
            self._fail(
                "log matching",
                f"node {node} holds an entry at seq {seq} term {term} whose log prefix "
                f"differs from the one node {seen[1]} holds at the same seq and term",
                [seen[1], node],
            )

    # --- commit --------------------------------------------------------------------------
    def on_restart(self, node: Any) -> None:
        self.commit_of[node] = -1

    def on_commit(self, node: Any, commit: int, term: int, last_seq: int,
                  chain_at: Callable[[int], int], term_at: Callable[[int], int],
                  base: int = -1) -> None:
        """``base``: the node's log holds entries after it only (the rest is in its
        snapshot, and the chain hash at ``base`` covers all of it)."""
        prev = self.commit_of[node]
        if commit < prev:
            self._fail("commit monotonicity",
                       f"node {node}'s commit index went back from {prev} to {commit}", [node])
            return
        if commit == prev:
            return
        if commit > last_seq:
            self._fail("commit beyond log",
                       f"node {node} committed through seq {commit} but its log ends at "
                       f"{last_seq}", [node])
            return
        self.checks += 1
        self.commit_of[node] = commit
        committed = self.committed
        for seq in range(max(prev + 1, base, 0), commit + 1):
            h = chain_at(seq)
            if seq < len(committed):
                t0, h0, _c, first = committed[seq]
                if h0 != h:
                    self._fail(
                        "state machine safety",
                        f"node {node} committed seq {seq} (term {term_at(seq)}) but node "
                        f"{first} committed a different entry there (term {t0})",
                        [first, node],
                    )
                    return
            else:
                t = term_at(seq)
                committed.append((t, h, term, node))
                for lterm, (leader, chain) in self.leader_logs.items():
                    if lterm > term:
                        self._check_has(leader, lterm, chain, seq, h, term, node)

    # --- snapshots ------------------------------------------------------------------------
    def on_snapshot(self, node: Any, seq: int, digest: int, how: str) -> None:
        """Every snapshot at ``seq`` (taken, received, restored) holds the same state: the
        state machine's after applying the committed log through ``seq``."""
        self.checks += 1
        seen = self.snapshots.get(seq)
        if seen is None:
            self.snapshots[seq] = (digest, node, how)
        elif seen[0] != digest:
            self._fail(
                "snapshot agreement",
                f"node {node}'s snapshot at seq {seq} ({how}) holds another state than the "
                f"one node {seen[1]} {seen[2]} at that seq",
                [seen[1], node],
            )

    # --- durability of acknowledged writes ----------------------------------------------
    def on_ack(self, seq: int, term: int, what: str) -> None:
        self.acked.append((seq, term, what))

    def check_acked_durable(self, durable_term_at: dict[Any, Callable[[int], int | None]],
                            when: str, quorum: Any = None, voters: Any = None,
                            lost: Any = ()) -> None:
        """Every acknowledged write is durable on enough nodes that no quorum of the
        configuration in force lacks it (so no leader can be elected without it). Nodes
        that lost their disk and have not finished recovering count as holders: they vote
        for nobody until they hold every committed entry again."""
        self.checks += 1
        if voters is None:
            voters = frozenset(self.nodes)
        for seq, term, what in self.acked:
            holders = {n for n, f in durable_term_at.items() if f(seq) == term} | set(lost)
            lacking = [n for n in voters if n not in holders]
            short = (quorum.is_quorum(lacking) if quorum is not None
                     else len(voters) - len(lacking) < self.quorum_size)
            if short:
                self._fail(
                    "acknowledged write durability",
                    f"{what} was acknowledged at seq {seq} term {term} but {when} only "
                    f"{sorted(holders - set(lost)) or 'no nodes'} hold it durably, so the "
                    f"voters {sorted(lacking)} that lack it form a quorum; crashing the "
                    "others would lose it",
                    sorted(holders),
                )
                return
