"""Leaving a nursery the way a user expects: the exception that failed, not a group of one.

A Trio nursery wraps every exception that leaves it in an ``ExceptionGroup``, even the one the
``async with`` body raised itself. A library context manager that owns a nursery (``async with
node:``, ``async with MemoryNetwork():``) hands the caller the exception itself when it is the
only one, and keeps a real group of several as it is: the same rule trio-websocket applies to
its own nursery. ``KeyboardInterrupt`` and ``trio.Cancelled`` come out bare too, so Ctrl-C and
cancel scopes behave as they do without the library in between.
"""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one; ``exc`` itself otherwise."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def exit_nursery(
    manager: Any, exc_type: Any, exc: BaseException | None, tb: Any
) -> bool:
    """Call ``manager.__aexit__`` (a ``trio.open_nursery()`` manager) and raise what failed,
    unwrapped when it is a single exception.

    When that exception is the body's own, return False so Python re-raises it untouched
    (traceback and ``__context__`` as the body left them); anything else that comes alone is
    raised bare; several exceptions stay a group."""
    try:
        return bool(await manager.__aexit__(exc_type, exc, tb))
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        if sole is group:
            raise
        if sole is exc:
            return False
        # Raised here, ``sole`` would get the group as its ``__context__`` (a traceback that
        # shows the group after all); keep the context it had.
        context = sole.__context__
        try:
            raise sole  # noqa: B904 (the group is deliberately not chained)
        finally:
            sole.__context__ = context
