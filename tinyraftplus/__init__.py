"""tinyraftplus: Raft consensus for Trio with a durable, C-accelerated replicated log."""

from __future__ import annotations

from .entry import Entry
from .errors import *  # noqa: F403  (the exception tree is part of the public API)
from .errors import __all__ as _errors_all  # noqa: F401

# Imports the C extension: a missing build fails here with instructions (see _native).
from .log import FsLog, StateFile  # noqa: E402, F401

__version__ = "0.1.0"
