"""What the Raft core needs from storage, as narrow ``Protocol``s (hashicorp raft keeps its
``LogStore`` and ``StableStore`` apart the same way). ``FsLog`` is the durable implementation
of ``LogStorage``; ``MemoryLog`` and the simulator's store are others."""

from __future__ import annotations

from typing import Protocol

from ..entry import Entry


class LogStorage(Protocol):
    """What the core reads from the durable log: synchronous and cheap (``FsLog`` keeps the
    terms in memory and reads payloads with one ``pread``; the simulator's store is a list).
    The core keeps entries it has handed out in a ``Ready`` but that were not yet
    ``advance``d in memory itself, so storage only ever sees durable writes."""

    @property
    def seq(self) -> int:
        """Last seq held, ``-1`` when empty."""

    @property
    def first_seq(self) -> int:
        """First seq held (0 unless a prefix was compacted away)."""

    def term_at(self, seq: int) -> int:
        """Term of the entry at ``seq``; 0 for ``seq == -1``."""

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries ``lo..hi`` inclusive, stopping early once ``max_bytes`` of payload are
        gathered (but always at least one entry when ``lo <= hi``)."""


__all__ = ["LogStorage"]
