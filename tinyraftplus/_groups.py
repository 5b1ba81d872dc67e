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


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) groups, in order; ``[exc]`` for a plain exception."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in leaves(inner)]


def sole_exception(
    exc: BaseException, consequences: tuple[type[BaseException], ...] = ()
) -> BaseException:
    """The one exception inside (nested) groups, else ``exc`` itself. Exceptions of the
    ``consequences`` types (such as ``NodeStoppedError``, which a caller's pending request
    gets *because* the node's own task failed) do not count when there is another one: the
    cause is the exception to show."""
    found = leaves(exc)
    causes = [x for x in found if not isinstance(x, consequences)] if consequences else found
    if len(causes) == 1:
        return causes[0]
    if not causes and len(found) == 1:
        return found[0]
    return exc


async def exit_nursery(
    manager: Any,
    exc_type: Any,
    exc: BaseException | None,
    tb: Any,
    *,
    consequences: tuple[type[BaseException], ...] = (),
) -> bool:
    """Call ``manager.__aexit__`` (a ``trio.open_nursery()`` manager) and raise what failed,
    unwrapped when it is a single exception (not counting ``consequences`` of another).

    When that exception is the body's own, return False so Python re-raises it untouched
    (traceback and ``__context__`` as the body left them); anything else that comes alone is
    raised bare; several exceptions stay a group."""
    try:
        return bool(await manager.__aexit__(exc_type, exc, tb))
    except BaseExceptionGroup as group:
        sole = sole_exception(group, consequences)
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
