"""Turn the C core's return codes into exceptions that name the file and the offset."""

from __future__ import annotations

import errno
import os

from .._native import lib
from ..errors import LogCorruptError, LogFailedError, LogFullError

_REASONS = {
    lib.TP_EBADLEN: "record length out of range",
    lib.TP_ECRC: "CRC32C mismatch",
    lib.TP_ESEQ: "unexpected seq (records out of order or missing)",
    lib.TP_EFLAGS: "unknown flag or reserved bits set",
    lib.TP_ESHORT: "record cut short",
    lib.TP_EHDR: "bad segment header",
}

VERIFY_HINT = "inspect it with `python -m tinyraftplus.log verify DIR NAME`"


def reason(code: int) -> str:
    if code in _REASONS:
        return _REASONS[code]
    if code < 0 and -code in errno.errorcode:
        return os.strerror(-code)
    return f"error code {code}"


def repair_hint(segment_path: str, seq: int | None) -> str:
    """The command that cuts the log holding ``segment_path`` at ``seq`` (removing it and
    everything after; ``tinyraftplus/log/repair.py``)."""
    log_dir = os.path.dirname(os.path.abspath(segment_path))
    where = f"{os.path.dirname(log_dir)} {os.path.basename(log_dir)}"
    at = "SEQ" if seq is None else str(seq)
    return f"python -m tinyraftplus.log repair {where} --truncate-at {at}"


def corrupt(code: int, path: str, offset: int, what: str = "damaged record",
            seq: int | None = None) -> LogCorruptError:
    """``seq``: the damaged record's seq, if known (the repair command is then exact)."""
    which = "" if seq is None else f" (seq {seq})"
    return LogCorruptError(
        f"{what}{which} in {path} at byte offset {offset}: {reason(code)}; the log will not "
        f"return these bytes; {VERIFY_HINT}; keep the records before it with "
        f"`{repair_hint(path, seq)}` (--dry-run first says what would be lost), or restore "
        "the log from a replica",
        path=path,
        offset=offset,
    )


def write_error(rc: int, op: int, path: str, offset: int) -> LogFullError | LogFailedError:
    """ENOSPC from a write is recoverable (the batch was cut back); anything else fails
    the log for good."""
    err = -rc
    if op == lib.TP_OP_TRUNC:
        return LogFailedError(
            f"a write of {path} at byte offset {offset} failed, and cutting the partial "
            f"write back failed too: {os.strerror(err)} ({errno.errorcode.get(err, err)}); "
            "part of the failed appends may still be in the file, so the log refuses further "
            "writes: close and reopen it (after freeing space) to continue from what is on "
            "disk, where the failed appends may or may not be"
        )
    what = "fdatasync" if op == lib.TP_OP_SYNC else "write"
    if err == errno.ENOSPC and op == lib.TP_OP_WRITE:
        return LogFullError(
            errno.ENOSPC,
            f"disk full writing {path} at byte offset {offset}; the batch was not written "
            "and the log is unchanged: free space and append again",
            path,
        )
    return LogFailedError(
        f"{what} of {path} at byte offset {offset} failed: {os.strerror(err)} "
        f"({errno.errorcode.get(err, err)}); the log refuses further writes because the "
        "kernel may have dropped the unwritten data: close and reopen it to continue from "
        "what is on disk (every record acknowledged before this error; the failed write "
        "was cut back, so unacknowledged records are normally gone)"
    )
