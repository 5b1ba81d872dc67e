"""``MemoryLog``: an in-memory ``LogStorage`` for tests and the simulator.

Not durable: it lives and dies with the process. The simulator models a crash by keeping
the object (what was "on disk") and throwing the ``RaftCore`` away.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..entry import Entry
from ..errors import InvalidArgumentError, SeqMismatchError


class MemoryLog:
    """A list of ``Entry`` with the read side of ``LogStorage`` plus the two writes a Raft
    driver needs: ``append(entries)`` and ``truncate_after(seq)``."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries: list[Entry] = []
        items = list(entries)
        if items:
            self.append(items)

    @property
    def seq(self) -> int:
        return len(self._entries) - 1

    @property
    def first_seq(self) -> int:
        return 0

    @property
    def head(self) -> Entry | None:
        return self._entries[-1] if self._entries else None

    def term_at(self, seq: int) -> int:
        if seq == -1:
            return 0
        if not 0 <= seq < len(self._entries):
            raise InvalidArgumentError(
                f"MemoryLog.term_at({seq}): no such entry (log holds 0..{self.seq})"
            )
        return self._entries[seq].term

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        if lo > hi:
            return []
        if lo < 0 or hi > self.seq:
            raise InvalidArgumentError(
                f"MemoryLog.entries({lo}, {hi}): out of range (log holds 0..{self.seq})"
            )
        out = self._entries[lo:hi + 1]
        total = 0
        for i, e in enumerate(out):
            total += len(e.data)
            if total > max_bytes and i > 0:
                del out[i:]
                break
        return out

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append entries that continue the log exactly (seqs ``seq + 1``, ``seq + 2``...)."""
        if not entries:
            return
        expected = len(self._entries)
        if entries[0].seq != expected or entries[-1].seq != expected + len(entries) - 1:
            raise SeqMismatchError(
                f"MemoryLog.append: entries {entries[0].seq}..{entries[-1].seq} do not follow "
                f"seq {expected - 1}; truncate or append in order",
                expected=expected, got=entries[0].seq,
            )
        self._entries.extend(entries)

    def truncate_after(self, seq: int) -> None:
        """Keep entries ``<= seq`` (``-1`` empties the log)."""
        if seq < -1:
            raise InvalidArgumentError(f"MemoryLog.truncate_after({seq}): seq must be >= -1")
        del self._entries[seq + 1:]

    def all(self) -> list[Entry]:
        """A copy of every entry, for checks."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MemoryLog(seq={self.seq})"
