"""Snapshots: the state machine's state at a log seq, stored beside the log."""

from .meta import SnapshotMeta

__all__ = ["SnapshotMeta"]
