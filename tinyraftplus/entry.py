"""``Entry``: one record of the log, shared by the durable log and the Raft core."""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    """One log record: its sequence number, the Raft term that wrote it (0 without Raft) and
    its payload.

    A ``NamedTuple`` rather than a dataclass because the log creates one per record when it
    iterates (a million a second) and tuple construction is several times cheaper. In a
    Raft log, ``data == b""`` is the no-op a new leader appends at the start of its term.
    """

    seq: int
    term: int
    data: bytes
