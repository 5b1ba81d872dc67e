"""tinyraftplus: Raft consensus for Trio with a durable, C-accelerated replicated log."""

from __future__ import annotations

from .entry import Entry
from .errors import *  # noqa: F403  (the exception tree is part of the public API)
from .errors import __all__ as _errors_all
from .events import NodeEvent

# Imports the C extension: a missing build fails here with instructions (see _native).
from .log import FsLog, StateFile
from .node import AppendResult, RaftNode

__version__ = "0.1.0"

__all__ = [
    "Entry", "FsLog", "StateFile", "RaftNode", "AppendResult", "NodeEvent", *_errors_all,
]
