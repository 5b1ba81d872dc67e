"""Snapshots: the state machine's state at a log seq, stored beside the log.

``SnapshotMeta`` describes one; ``SnapshotStore`` keeps them durably in ``<dir>/<name>.snap/``
(format and crash-safety rules in ``tinyraftplus.snapshot.store``).
"""

from ..errors import SnapshotCorruptError, SnapshotError, SnapshotGoneError
from .meta import SnapshotMeta
from .store import PartialSnapshot, SnapshotStore, SnapshotWarning, SnapshotWriter

__all__ = [
    "SnapshotMeta",
    "SnapshotStore",
    "SnapshotWriter",
    "PartialSnapshot",
    "SnapshotWarning",
    "SnapshotError",
    "SnapshotCorruptError",
    "SnapshotGoneError",
]
