"""The durable log: ``FsLog`` (segmented, CRC32C-framed, group-committed) and
``StateFile`` (a small atomically replaced file for Raft's term and vote).

The on-disk format is documented in ``tinyraftplus.log.format``.
"""

from __future__ import annotations

from .fslog import FsLog, LogRecoveryWarning, Txn
from .state import StateFile

__all__ = ["FsLog", "Txn", "StateFile", "LogRecoveryWarning"]
