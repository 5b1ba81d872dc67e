"""The compiled C core (``tinyraftplus._tplog``), or a clear error saying how to build it.

Everything that needs C imports ``ffi`` and ``lib`` from here, so a missing build fails at
``import tinyraftplus`` with instructions instead of deep inside a log operation.
"""

from __future__ import annotations

try:
    from ._tplog import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "tinyraftplus: the C extension tinyraftplus._tplog is not built "
        f"({exc}). Build it from the source checkout with "
        "`pip install -e . --no-build-isolation` (or `pip install -e '.[test]'`); "
        "it needs a C compiler (gcc) and cffi."
    ) from exc

__all__ = ["ffi", "lib"]
