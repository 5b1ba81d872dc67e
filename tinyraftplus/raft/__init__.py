"""The sans-io Raft core: ``RaftCore`` and its contract types, quorum rules, messages and an
in-memory ``LogStorage`` (``MemoryLog``) for tests and the simulator."""

from __future__ import annotations

from .core import (
    KNOWN_BUGS,
    RaftConfig,
    RaftCore,
    ReadState,
    Ready,
    Role,
    SoftState,
)
from .memory import MemoryLog
from .quorum import Quorum
from .state import HardState, Recovery
from .storage import LogStorage

__all__ = [
    "KNOWN_BUGS", "HardState", "LogStorage", "RaftConfig", "RaftCore", "ReadState", "Ready",
    "Role", "SoftState", "MemoryLog", "Quorum", "Recovery",
]
