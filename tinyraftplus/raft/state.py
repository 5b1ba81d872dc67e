"""What a member keeps durably besides its log: ``HardState``, and its byte encoding.

Raft's hard state is the current term and the vote cast in it. Ours adds the member's
*identity*, because a member is its durable state: a node whose disk was wiped may come back
with the same node id, but it has forgotten which votes it cast and which entries it
acknowledged, so it must not be trusted as the member it was (see ``recovery.py``):

* ``incarnation``: a number created when this member's state was first written (bootstrap or
  recovery), larger than any earlier incarnation of the same node id (the driver uses the
  wall clock in nanoseconds; the simulator a counter). Carried in every message as ``inc``.
* ``peers``: the incarnation last seen of every peer, so that a peer that came back from a
  wipe without going through recovery is recognised and ignored even after we restart.
* ``recovery``: set while this member rebuilds its state; it neither votes nor campaigns
  until recovery completes (and acknowledges nothing until it knows the term).
* ``has_log``: this member has written entries to its log at least once. A member whose
  hard state says so but whose log is empty lost its log; the driver refuses to start it.

The encoding is a msgpack array ``[term, vote, incarnation, [peer, inc, ...], recovery,
has_log, configs]`` with ``recovery`` either ``None`` or ``[phase, target_seq, target_term]``
and ``configs`` either ``None`` or ``[[seq, term, config entry payload], ...]``; the
first-wave form ``[term, vote]`` still decodes (incarnation 0, i.e. unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import InvalidArgumentError
from .membership import ConfigStack
from .messages import NodeId

LEARN_TERM = 1
"""Recovery phase 1: asking every other member for its term and log end; acknowledges
nothing, votes for nobody."""
CATCH_UP = 2
"""Recovery phase 2: the term is fenced (at least any this member could have voted in);
replicates and acknowledges normally but votes for nobody until its log reaches the target."""


@dataclass(frozen=True, slots=True)
class Recovery:
    """Where a recovering member stands. ``target_seq``/``target_term``: the most
    up-to-date (last term, last seq) any other member reported in phase 1; once this
    member's durable log is at least as up to date, it holds every entry that was committed
    before it lost its state, and may vote again."""

    phase: int = LEARN_TERM
    target_seq: int = -1
    target_term: int = 0


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash before the node acts on it (see the module docstring)."""

    term: int = 0
    vote: NodeId | None = None
    incarnation: int = 0
    peers: tuple[tuple[NodeId, int], ...] = ()
    recovery: Recovery | None = None
    has_log: bool = False
    # The latest committed configuration and the uncommitted ones after it (membership.py);
    # None until the first change: the configuration the node was constructed with.
    configs: ConfigStack | None = None


def encode_hard_state(hs: HardState) -> bytes:
    rec = hs.recovery
    return msgpack.packb([
        hs.term, hs.vote, hs.incarnation, [x for pair in hs.peers for x in pair],
        None if rec is None else [rec.phase, rec.target_seq, rec.target_term], hs.has_log,
        None if hs.configs is None else hs.configs.encode(),
    ])


def decode_hard_state(raw: bytes, where: str = "hard state") -> HardState:
    """Decode ``encode_hard_state``'s bytes (or the first wave's ``[term, vote]``).
    Raises ``InvalidArgumentError`` naming ``where`` for anything else."""
    try:
        v: Any = msgpack.unpackb(raw)
        if not isinstance(v, list) or len(v) not in (2, 6, 7):
            raise ValueError(f"expected an array of 2, 6 or 7 items, got {v!r:.60}")
        term, vote = v[0], v[1]
        if len(v) == 2:
            return HardState(int(term), vote)
        _, _, inc, flat, rec, has_log = v[:6]
        configs = ConfigStack.decode(v[6]) if len(v) > 6 and v[6] is not None else None
        peers = tuple((flat[i], int(flat[i + 1])) for i in range(0, len(flat), 2))
        recovery = None if rec is None else Recovery(int(rec[0]), int(rec[1]), int(rec[2]))
        if recovery is not None and recovery.phase not in (LEARN_TERM, CATCH_UP):
            raise ValueError(f"unknown recovery phase {recovery.phase}")
        return HardState(int(term), vote, int(inc), peers, recovery, bool(has_log), configs)
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
        raise InvalidArgumentError(
            f"{where}: cannot decode ({e}); the file is damaged: treat this member as one "
            "that lost its state (delete the file and restart it without bootstrap)"
        ) from None


__all__ = [
    "HardState", "Recovery", "LEARN_TERM", "CATCH_UP", "encode_hard_state",
    "decode_hard_state",
]
