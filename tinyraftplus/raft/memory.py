"""``MemoryLog``: an in-memory ``LogStorage`` for tests and the simulator.

Not durable: it lives and dies with the process. The simulator models a crash by keeping
the object (what was "on disk") and throwing the ``RaftCore`` away.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..entry import Entry
from ..errors import InvalidArgumentError, SeqMismatchError


class MemoryLog:
    """A list of ``Entry`` with the read side of ``LogStorage`` plus the writes a Raft
    driver needs: ``append(entries)``, ``truncate_after(seq)``, and for snapshots
    ``compact(seq)`` (drop entries ``<= seq``) and ``reset(seq, term)`` (hold nothing, start
    after ``(seq, term)``)."""

    __slots__ = ("_entries", "_base", "_base_term")

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries: list[Entry] = []
        self._base = -1  # the seq before the first entry held
        self._base_term = 0
        items = list(entries)
        if items:
            self.append(items)

    @property
    def seq(self) -> int:
        return self._base + len(self._entries)

    @property
    def first_seq(self) -> int:
        return self._base + 1

    @property
    def head(self) -> Entry | None:
        return self._entries[-1] if self._entries else None

    def _range(self) -> str:
        return f"{self.first_seq}..{self.seq}"

    def term_at(self, seq: int) -> int:
        if seq == self._base:
            return self._base_term
        i = seq - self._base - 1
        if not 0 <= i < len(self._entries):
            raise InvalidArgumentError(
                f"MemoryLog.term_at({seq}): no such entry (log holds {self._range()})"
            )
        return self._entries[i].term

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        if lo > hi:
            return []
        if lo <= self._base or hi > self.seq:
            raise InvalidArgumentError(
                f"MemoryLog.entries({lo}, {hi}): out of range (log holds {self._range()})"
            )
        b = self._base + 1
        out = self._entries[lo - b:hi + 1 - b]
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
        expected = self.seq + 1
        if entries[0].seq != expected or entries[-1].seq != expected + len(entries) - 1:
            raise SeqMismatchError(
                f"MemoryLog.append: entries {entries[0].seq}..{entries[-1].seq} do not follow "
                f"seq {expected - 1}; truncate or append in order",
                expected=expected, got=entries[0].seq,
            )
        self._entries.extend(entries)

    def truncate_after(self, seq: int) -> None:
        """Keep entries ``<= seq`` (``-1``, or ``first_seq - 1``, empties the log)."""
        if seq < self._base:
            raise InvalidArgumentError(
                f"MemoryLog.truncate_after({seq}): entries up to {self._base} were compacted"
            )
        del self._entries[seq - self._base:]

    def compact(self, seq: int) -> None:
        """Drop entries ``<= seq`` (at most all of them)."""
        seq = min(seq, self.seq)
        if seq <= self._base:
            return
        self._base_term = self.term_at(seq)
        del self._entries[:seq - self._base]
        self._base = seq

    def reset(self, seq: int, term: int) -> None:
        """Hold nothing; the next entry is ``seq + 1`` and ``term_at(seq) == term``."""
        self._entries = []
        self._base = seq
        self._base_term = term

    def all(self) -> list[Entry]:
        """A copy of every entry held, for checks."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MemoryLog({self._range()})"
