"""One exception tree for the whole library, split by blame.

* ``UsageError`` and its children: the caller did something wrong (bad argument, wrong seq,
  use after close). They also derive from ``ValueError`` / ``RuntimeError`` where a Python
  user would reach for those, so ``except ValueError`` keeps working.
* ``LogError`` and its children: the storage failed or holds damaged data. ``LogFailedError``
  is sticky: once the log could not make data durable it refuses every later write.
* ``RaftError`` and its children: consensus could not do what was asked (no leader, the
  leader changed, a timeout). They say nothing about the state machine's own result.
* ``ProtocolError``: a peer sent something we cannot accept. Inside a node these are caught,
  reported as warnings and the message is dropped; they only reach users of the wire codec.

Messages say what happened, where (file, offset, node, seq) and what to do about it.
"""

from __future__ import annotations


class TinyRaftError(Exception):
    """Base of every exception this library raises on purpose."""


# --- caller misuse -------------------------------------------------------------------------


class UsageError(TinyRaftError):
    """The caller broke the API's contract."""


class InvalidArgumentError(UsageError, ValueError):
    """An argument has the wrong type or value."""


class SeqMismatchError(InvalidArgumentError):
    """An explicit ``seq`` was not the next one the log expects."""

    def __init__(self, message: str, *, expected: int, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class ClosedError(UsageError, RuntimeError):
    """The object was used before ``open()`` / after ``close()``."""


# --- storage -------------------------------------------------------------------------------


class LogError(TinyRaftError):
    """The durable log failed."""


class LogLockedError(LogError):
    """Another process (or another FsLog in this one) holds the log's lock file."""


class LogCorruptError(LogError):
    """Damaged data where only valid records may be: names the file and byte offset."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset


class LogFullError(LogError, OSError):
    """The disk is full (``ENOSPC``). The log stays consistent; free space and retry."""


class LogFailedError(LogError):
    """A write or ``fdatasync`` failed; the log is closed for writing for good.

    After an ``fsync`` error the kernel may have dropped the dirty pages, so retrying could
    report success for data that is not on disk. Reopen the log to recover from what is.
    """


class SnapshotError(LogError):
    """A snapshot could not be written, read or received (``tinyraftplus.snapshot``)."""


class SnapshotCorruptError(SnapshotError):
    """A snapshot file's header or data does not match its CRC32C, size or name: names the
    file and what is wrong. A damaged snapshot is never restored; take or fetch another."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset


class SnapshotGoneError(SnapshotError):
    """The snapshot asked for is no longer stored (pruned by a newer one, replaced, or a
    partial transfer discarded): fetch the store's ``latest()`` and start over from it."""


# --- consensus -----------------------------------------------------------------------------


class RaftError(TinyRaftError):
    """Consensus could not complete the request."""


class NotLeaderError(RaftError):
    """This node is not the leader; ``leader`` is the one it knows of, or ``None``."""

    def __init__(self, message: str, *, leader: object | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class NoLeaderError(RaftError):
    """No leader could be reached in time (no quorum, or an election is under way)."""


class LeadershipLostError(RaftError):
    """The leader lost its role before the request was committed; it may or may not apply."""


class RaftTimeoutError(RaftError, TimeoutError):
    """The operation did not complete within its timeout."""


class NodeStoppedError(RaftError):
    """The node was stopped while the request was pending."""


class MemberStateLostError(RaftError):
    """This node's durable state is incomplete (its log is gone but its hard state is not,
    or the reverse after a restore): it is not the member it was and must not start as one.
    The message says how to bring it back (recovery, or remove and re-add it)."""


class MembershipError(RaftError):
    """A membership change was refused (another is in flight, the leader has not committed
    an entry of its term yet, ``expected_config_seq`` is stale, a learner lags, ...); the
    message says which and what to do. Nothing was proposed."""


class ConfigurationError(UsageError, ValueError):
    """A cluster configuration is unsafe or inconsistent (for example, disjoint quorums)."""


# --- network -------------------------------------------------------------------------------


class ProtocolError(TinyRaftError):
    """A peer sent bytes or a message we cannot accept (bad frame, type, range or size)."""


class TransportError(TinyRaftError):
    """A connection could not be made or was lost."""


__all__ = [
    "TinyRaftError",
    "UsageError",
    "InvalidArgumentError",
    "SeqMismatchError",
    "ClosedError",
    "LogError",
    "LogLockedError",
    "LogCorruptError",
    "LogFullError",
    "LogFailedError",
    "SnapshotError",
    "SnapshotCorruptError",
    "SnapshotGoneError",
    "RaftError",
    "NotLeaderError",
    "NoLeaderError",
    "LeadershipLostError",
    "RaftTimeoutError",
    "NodeStoppedError",
    "MemberStateLostError",
    "MembershipError",
    "ConfigurationError",
    "ProtocolError",
    "TransportError",
]
