"""What a snapshot is, independent of where it is stored or how it travels.

A snapshot replaces a prefix of the log: it is the state machine's state after applying
every entry through ``seq`` (whose term is ``term``), plus what Raft itself needs to go on
from there without the entries: the configuration in force at ``seq`` (membership lives in
the log, so compacting the log would otherwise forget who the members are) and the node's
own replicated state (``extra``, e.g. the idempotency sessions of ``RaftNode.append``).
``size`` and ``crc`` (CRC32C) cover the state machine's bytes only; together with
``(seq, term)`` they identify a snapshot, so a transfer interrupted by a leader change resumes
only when the new leader holds the very same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SnapshotMeta:
    seq: int  # last log seq the snapshot includes
    term: int  # term of the entry at seq
    size: int  # bytes of state-machine data
    crc: int  # CRC32C of those bytes (the crc32c package's convention)
    config: bytes | None = None  # Config.encode() of the configuration in force at seq
    extra: bytes = b""  # the node's own replicated state, opaque to storage

    @property
    def ident(self) -> tuple[int, int, int, int]:
        """What two snapshots must share to be the same bytes."""
        return (self.seq, self.term, self.size, self.crc)


__all__ = ["SnapshotMeta"]
