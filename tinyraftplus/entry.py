"""``Entry``: one record of the log, shared by the durable log and the Raft core."""

from __future__ import annotations

from typing import ClassVar, NamedTuple


class _Record(NamedTuple):
    seq: int
    term: int
    data: bytes


class Entry(_Record):
    """One log record: its sequence number, the Raft term that wrote it (0 without Raft) and
    its payload.

    A ``NamedTuple`` rather than a dataclass because the log creates one per record when it
    iterates (a million a second) and tuple construction is several times cheaper. In a
    Raft log, ``data == b""`` is the no-op a new leader appends at the start of its term.
    ``kind`` is a class attribute, not a field: records stay ``(seq, term, data)`` triples,
    and the rare configuration entry is told apart by its type (``ConfigEntry``).
    """

    __slots__ = ()
    kind: ClassVar[int] = 0


class ConfigEntry(Entry):
    """A cluster configuration in the log (``tinyraftplus.raft.membership``): the same triple,
    told apart by its type. State machines see it as ``None``, like the no-op."""

    __slots__ = ()
    kind: ClassVar[int] = 1


KIND_NORMAL = Entry.kind
KIND_CONFIG = ConfigEntry.kind
ENTRY_TYPES = (Entry, ConfigEntry)
