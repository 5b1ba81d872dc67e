"""What an open ``FsLog`` owns outside Python (the C flusher thread, the lock and segment
descriptors), and how that is released when nobody calls ``close()``: after ``fork()`` in
the child, and when the ``FsLog`` is dropped.

* ``fork()``: only the forking thread exists in the child, so the child's copy of the
  flusher has no thread (joining it would hang, and an append there would wait forever),
  and its copy of the locked descriptor kept the log locked against the parent for as long
  as the child lived. The child's copy closes its descriptors, forgets the flusher (never
  touching it) and refuses every later use with a ``ClosedError`` that says why. Every
  descriptor is opened ``O_CLOEXEC``, so a child that ``exec``s inherits none of them.
* Dropped without ``close()``: a finalizer stops the flusher thread, after the write it is
  doing (the finalizer holds the flusher, which holds that write's buffer, so the buffer
  cannot be freed under the thread), and closes the descriptors, releasing the lock.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Any

from .flusher import Flusher
from .segment import Segment

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_hook_installed = False


def _after_fork_in_child() -> None:
    for log in list(_live):
        with contextlib.suppress(Exception):
            log._forked()
    _live.clear()


def track(log: Any) -> None:
    """Register an open log for the fork handler."""
    global _hook_installed
    if not _hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hook_installed = True
    _live.add(log)


def untrack(log: Any) -> None:
    _live.discard(log)


def close_in_child(flusher: Flusher | None, segs: list[Segment], lock_fd: int | None) -> None:
    """Close the child's copies of the descriptors without touching locks or the thread
    (a lock another parent thread held at fork() stays held forever in the child)."""
    if flusher is not None:
        with contextlib.suppress(OSError):
            os.close(flusher._efd)
        flusher._f = None  # the thread is not in this process: never stop or join it
    for s in segs:
        if s.fd is not None:
            with contextlib.suppress(OSError):
                os.close(s.fd)
            s.fd = None
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(lock_fd)


def finalizer(
    log: Any, path: str, flusher: Flusher | None, segs: list[Segment], lock_fd: int
) -> weakref.finalize[..., Any]:
    """Release what ``log`` holds when it is garbage collected without ``close()``."""
    fin = weakref.finalize(log, _release, path, flusher, segs, lock_fd)
    fin.atexit = False  # at exit the process releases all of it anyway
    return fin


def _release(path: str, flusher: Flusher | None, segs: list[Segment], lock_fd: int) -> None:
    warnings.warn(
        f"FsLog {path} was dropped without close(): stopping its flusher thread and "
        "releasing its lock; close logs explicitly (async with FsLog(...))",
        ResourceWarning,
        stacklevel=2,
    )
    if flusher is not None:
        flusher.stop()  # joins the thread after the write in progress
    for s in segs:
        with contextlib.suppress(OSError):
            s.close_fd()
    with contextlib.suppress(OSError):
        os.close(lock_fd)


__all__: list[str] = ["track", "untrack", "close_in_child", "finalizer"]
