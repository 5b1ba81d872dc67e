"""The messages Raft nodes exchange, as frozen, slotted dataclasses.

The sender's id is not part of a message: the transport knows who it came from (and, with
mutual TLS, has authenticated it), and hands ``(from_id, message)`` to ``RaftNode.receive``.

Two families:

* Core messages (``RequestVote`` ... ``SnapshotResponse``) are stepped into ``RaftCore``.
  Every one carries the sender's ``term`` and, last, ``inc``: the *incarnation* of the
  sender's durable state (its data identity, created when the member's state was first
  written; see ``tinyraftplus.raft.recovery``). A receiver ignores messages from an older
  incarnation of a peer than one it has seen, so a member that lost its disk is never
  mistaken for the member it was.
* Driver messages (``Propose`` / ``ProposeResponse``) are handled by ``RaftNode`` itself: a
  follower forwards a client's append to the leader, the leader answers with the seq it gave
  the entries, and the follower then waits until it has applied that seq itself (so the
  apply result comes from its own, deterministic, state machine).

``tinyraftplus.transport.wire`` encodes these for the network and validates every field on
the way in; nothing here trusts its input, but nothing here checks it either.

Sequence numbers start at 0. ``-1`` means "before the first entry" (an empty log's last seq,
the ``prev_seq`` of an append that starts at 0). Term 0 means "no term": the term of
``prev_seq == -1`` and of records written without Raft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..entry import Entry

NodeId = Union[int, str]  # noqa: UP007 (a runtime alias other modules introspect)
"""Node ids are small ints (as in the original) or strings; they must be hashable and
msgpack-encodable and are compared with ``==``."""


@dataclass(frozen=True, slots=True)
class RequestVote:
    """Ask for a vote (or, with ``pre_vote``, ask whether a vote *would* be granted).

    A pre-vote carries ``term`` = the candidate's current term + 1 but changes no state on
    either side; only when a quorum says yes does the candidate bump its term for real.
    ``transfer`` is set when the leader asked this node to campaign (``TimeoutNow``): voters
    then ignore their "I heard from a leader recently" check.
    """

    term: int
    last_seq: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False
    inc: int = 0


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: int
    granted: bool
    pre_vote: bool = False
    inc: int = 0


@dataclass(frozen=True, slots=True)
class AppendEntries:
    """Replicate ``entries`` after ``(prev_seq, prev_term)``; also the heartbeat (no entries).

    ``read_id`` numbers the leader's ReadIndex confirmation rounds; followers echo it back so
    the leader knows a quorum still followed it after a read arrived. 0 means no round.
    """

    term: int
    prev_seq: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit_seq: int
    read_id: int = 0
    inc: int = 0


@dataclass(frozen=True, slots=True)
class AppendResponse:
    """Answer to ``AppendEntries``.

    On success ``match_seq`` is the last seq the follower now holds *durably* that matches
    the leader. On failure ``match_seq`` is the ``prev_seq`` it rejected (so the leader can
    tell a stale rejection from a current one) and the follower gives a hint so the leader
    backs off a whole term at a time: ``conflict_term`` is the follower's term at
    ``prev_seq`` (0 if it has no entry there) and ``conflict_seq`` the first seq it holds
    with that term (or its last seq + 1 when the entry is missing).
    A follower at a newer term answers a stale leader's append with ``success=False`` and
    its term, which makes that leader step down.
    """

    term: int
    success: bool
    match_seq: int
    conflict_term: int = 0
    conflict_seq: int = -1
    read_id: int = 0
    inc: int = 0


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leader to an up-to-date follower: campaign now (leadership transfer, priorities).
    Accepted only from the leader of the current term, once."""

    term: int
    inc: int = 0


@dataclass(frozen=True, slots=True)
class ReadIndex:
    """Follower to leader: what commit seq must I apply before serving read ``read_id``?"""

    term: int
    read_id: int
    inc: int = 0


@dataclass(frozen=True, slots=True)
class ReadIndexResponse:
    """Leader to follower: serve ``read_id`` once applied through ``index``; ``index == -2``
    means refused (not leader any more, or no entry of its term committed yet)."""

    term: int
    read_id: int
    index: int
    inc: int = 0


@dataclass(frozen=True, slots=True)
class Recover:
    """From a member that lost its durable state (or never had any) and is rebuilding it:
    "what is your term, and how far does your log go?". Its ``inc`` is the new incarnation
    that replaces the one the member had; receivers adopt it and forget the old one's
    progress (see ``tinyraftplus.raft.recovery``)."""

    term: int
    inc: int = 0


@dataclass(frozen=True, slots=True)
class RecoverResponse:
    """Answer to ``Recover``: the responder's durable term, the last (seq, term) of its
    durable log, and the voters of its latest configuration (so a recovering node started
    with an outdated configuration also asks the voters it did not know). Sent only after
    the responder persisted the new incarnation it learned."""

    term: int
    last_seq: int
    last_term: int
    voters: tuple[NodeId, ...] = ()
    inc: int = 0


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """Leader to a follower that needs entries the leader compacted away: one piece of the
    snapshot ``(seq, snap_term, size, crc)`` (``tinyraftplus.raft.snapshot``).

    ``begin`` opens (or resumes) a transfer: it carries no data, but the snapshot's
    configuration and extra state, and the follower answers how many bytes of that very
    snapshot it already holds. Other messages carry ``data`` at ``offset`` with its CRC32C
    (``chunk_crc``), so a damaged chunk is refused and sent again."""

    term: int
    seq: int
    snap_term: int
    size: int
    crc: int
    offset: int
    data: bytes
    chunk_crc: int = 0
    begin: bool = False
    config: bytes | None = None
    extra: bytes = b""
    inc: int = 0


SNAP_OK = 0  # the follower holds ``offset`` bytes of the snapshot: send on from there
SNAP_REJECTED = 1  # a chunk was not taken (out of order or damaged): resend from ``offset``
SNAP_DONE = 2  # installed (or already covered): the follower's log matches through ``seq``
SNAP_BEGIN = 3  # the follower holds nothing of this snapshot: open the transfer again
SNAP_CORRUPT = 4  # every chunk checked, the whole did not: the leader's copy is damaged


@dataclass(frozen=True, slots=True)
class SnapshotResponse:
    """Follower to leader, about the snapshot ``(seq, snap_term, crc)``: ``status`` is one of
    ``SNAP_OK``, ``SNAP_REJECTED``, ``SNAP_DONE``, ``SNAP_BEGIN``, ``SNAP_CORRUPT``; ``offset``
    is how many
    bytes of it the follower holds."""

    term: int
    seq: int
    snap_term: int
    crc: int
    offset: int
    status: int = SNAP_OK
    inc: int = 0


@dataclass(frozen=True, slots=True)
class Propose:
    """Follower's driver to the leader's driver: append ``items`` on behalf of a client."""

    req_id: int
    items: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ProposeResponse:
    """The seq and term the leader gave the first item (the rest follow in order), or
    ``first_seq == -1`` with ``error`` set (``leader`` is a hint where known)."""

    req_id: int
    first_seq: int
    term: int
    error: str | None = None
    leader: Any = None


CoreMessage = Union[  # noqa: UP007
    RequestVote, VoteResponse, AppendEntries, AppendResponse, TimeoutNow, ReadIndex,
    ReadIndexResponse, Recover, RecoverResponse, InstallSnapshot, SnapshotResponse,
]
Message = Union[CoreMessage, Propose, ProposeResponse]  # noqa: UP007

CORE_MESSAGE_TYPES = (
    RequestVote, VoteResponse, AppendEntries, AppendResponse, TimeoutNow, ReadIndex,
    ReadIndexResponse, Recover, RecoverResponse, InstallSnapshot, SnapshotResponse,
)
MESSAGE_TYPES = CORE_MESSAGE_TYPES + (Propose, ProposeResponse)

__all__ = [
    "NodeId", "Entry", "RequestVote", "VoteResponse", "AppendEntries", "AppendResponse",
    "TimeoutNow", "ReadIndex", "ReadIndexResponse", "Recover", "RecoverResponse",
    "InstallSnapshot", "SnapshotResponse", "SNAP_OK", "SNAP_REJECTED", "SNAP_DONE",
    "SNAP_BEGIN", "SNAP_CORRUPT", "Propose",
    "ProposeResponse",
    "CoreMessage", "Message", "CORE_MESSAGE_TYPES", "MESSAGE_TYPES",
]
