"""What recovery does with the end of a log, decided in one place for ``FsLog.open`` and for
``python -m tinyraftplus.log verify`` (so that the two cannot disagree).

**A segment header that does not decode** in a file of at most a header's size holds no
record, so no acknowledged data can be lost with it (records are written only after their
segment's header was made durable: ``Segment.create_file``):

* the tail, after another segment: a roll that a crash interrupted; the file is removed
  and the segment before is the tail again;
* the only segment, starting at seq 0: the creation of a new log that a crash interrupted;
  the header is written again (its one other field, the term before seq 0, is 0);
* the only segment, starting later (after compaction): corrupt. Its header carried the term
  of the record before its first seq, which Raft's consistency check needs, and no
  interrupted operation of the log leaves such a file, so it is damage, not a crash.

Anything else with a bad header (a larger file, a segment in the middle) is corrupt.
``verify`` used to call the lone empty segment corrupt while ``open`` rewrote it; ``open``
was right (nothing can be lost), and both now follow these rules.

**A tail cut back** (``TP_SCAN_TORN`` or an incomplete batch): format 2 proves a record
durable only through a *later* write round (its ROUND record says how far the segment was
durable when it was written; see ``format``). For the last round there is no later one, so
the format cannot tell a round that a crash interrupted (never acknowledged) from a round
that was fdatasynced and acknowledged and then damaged (a flipped bit). What the bytes
show is used instead: a round a crash interrupted mostly leaves its records cut short by
the end of the file or holding bytes that were never written (runs of zeros); a complete
record that fails its check (a CRC mismatch, a length field that runs past the file while
the bytes the file does hold pass the CRC) is what damage to written data looks like. The
first is cut back with a ``LogRecoveryWarning`` as an unfinished write; the second too (the
log must open, and the records cannot be read back), but the warning and an ERROR log line
name the seqs dropped and say that they may have been acknowledged. The rule errs towards
the loud side: an unfinished write over stale bytes (after a truncate that a crash undid)
is reported as possibly acknowledged (a few of the crash-state suite's states), and a
damaged record holding 64 zero bytes of its own, or whose own zeros run from a 512-byte
sector boundary to its end and on into the preallocated zeros after it, is taken for
unfinished.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass

import crc32c

from .._native import lib
from . import format as fmt
from ._codes import reason

logger = logging.getLogger("tinyraftplus.log")


class LogRecoveryWarning(UserWarning):
    """Open found a torn or incomplete tail (a crash mid-write) and cut it back."""


_HERE = os.path.dirname(os.path.abspath(__file__))


def warn_caller(message: str) -> None:
    """``warnings.warn(message, LogRecoveryWarning)`` attributed to the first frame outside
    ``tinyraftplus/log/``: the line that opened the log (a user's ``async with FsLog``, or
    the ``RaftNode`` that opened it), never Trio's or outcome's internals. Call it on the
    thread and in the task that opened the log."""
    level = 2
    f = sys._getframe(1)
    while f is not None and os.path.dirname(os.path.abspath(f.f_code.co_filename)) == _HERE:
        f = f.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, LogRecoveryWarning, stacklevel=level)


def torn_header_action(index: int, count: int, size: int, first_seq: int) -> str:
    """For a segment whose header does not decode: ``"remove"``, ``"rewrite"`` or
    ``"corrupt"`` (see the module docstring). ``index`` of ``count`` segments."""
    if size > fmt.SEG_HDR:
        return "corrupt"
    if index == count - 1 and index > 0:
        return "remove"
    if count == 1 and first_seq == 0:
        return "rewrite"
    return "corrupt"


@dataclass(frozen=True)
class TailCut:
    """What cutting a tail segment back to its last complete batch drops."""

    path: str
    cut_at: int
    """Byte offset the file is cut to (the end of the last complete batch)."""
    first_dropped: int
    """The first seq dropped."""
    last_dropped: int
    """The last seq known dropped (records found intact after the damage count)."""
    nbytes: int
    maybe_acknowledged: bool
    why: str

    @property
    def seqs(self) -> str:
        if self.last_dropped == self.first_dropped:
            return f"seq {self.first_dropped}"
        return f"seqs {self.first_dropped}..{self.last_dropped}"

    def message(self, kept_last: int) -> str:
        if not self.maybe_acknowledged:
            return (f"{self.path}: {self.why}, left by a crash mid-write; cutting the log back "
                    f"to byte offset {self.cut_at} (last complete record: seq {kept_last}; "
                    f"dropped {self.seqs}, never acknowledged)")
        return (f"{self.path}: {self.why}; cutting the log back to byte offset {self.cut_at} "
                f"drops {self.seqs} ({self.nbytes} bytes), WHICH MAY HAVE BEEN ACKNOWLEDGED: "
                "the record is whole but fails its check, as damage to durable data leaves "
                "it (a crash mid-write mostly leaves records cut short or zeros), and the "
                "format cannot tell whether the last write round was durable. If this is a "
                "Raft member, the other members still hold the entries and it catches up; "
                "otherwise restore the log from a replica or a backup. Last record kept: "
                f"seq {kept_last}")


def _record_chain_end(data: bytes, off: int, seq: int) -> tuple[int, int]:
    """Follow the valid records from ``off`` (the first with seq ``seq``): (last seq, end)."""
    last = seq - 1
    while off + fmt.REC_HDR <= len(data):
        n = int.from_bytes(data[off:off + 4], "little")
        if int.from_bytes(data[off + 8:off + 16], "little") != seq or off + fmt.REC_HDR + n > \
                len(data):
            break
        crc = int.from_bytes(data[off + 4:off + 8], "little")
        if crc32c.crc32c(data[off + 8:off + fmt.REC_HDR + n]) != crc:
            break
        last, seq, off = seq, seq + 1, off + fmt.REC_HDR + n
    return last, off


ZERO_RUN = 64
SECTOR = 512  # what a power loss keeps or loses as a whole


def _lost_sector(data: bytes, lo: int, hi: int) -> bool:
    """Do the bytes ``[lo, hi)`` hold what a write that never fully reached the disk leaves:
    a run of at least ``ZERO_RUN`` zero bytes (a power loss keeps any subset of a round's
    pages or sectors, and what it did not keep of a file the write extended reads as
    zeros)? A record whose own payload holds such a run is taken for unfinished too: the
    price of telling the two apart from the bytes alone."""
    return bytes(ZERO_RUN) in data[lo:max(hi, lo + ZERO_RUN)]


def _whole_but_damaged(data: bytes, bad: int, resync: int | None) -> bool:
    """Is the invalid record at ``bad`` a complete record whose bytes were damaged (rather
    than one a crash left unfinished)? ``data`` is the file from offset 0. (A record whose
    payload holds a whole aligned sector of zeros is taken for unfinished: the price of
    telling the two apart from the bytes alone.)"""
    rest = data[bad:]
    if len(rest) < fmt.REC_HDR or not rest.strip(b"\0"):
        return False  # cut short in its header, or never written at all
    n = int.from_bytes(rest[:4], "little")
    crc = int.from_bytes(rest[4:8], "little")
    if fmt.REC_HDR + n <= len(rest):
        # Whole as its length says, and invalid: damaged, unless a sector of it never
        # reached the disk (a power loss mid-round keeps any subset of its pages), or its
        # end did not: zeros from a sector boundary inside it on to the end of the file
        # (the preallocated tail), as a write cut short leaves in a file grown ahead.
        end = bad + fmt.REC_HDR + n
        zeros_from = len(data.rstrip(b"\0"))
        if -(-zeros_from // SECTOR) * SECTOR < end:
            return False
        return not _lost_sector(data, bad, end)
    # Its length runs past the end: cut short by a crash, unless the length field itself is
    # damaged: then the bytes up to the next record (or the end) pass the CRC.
    for end in [len(data)] + ([resync] if resync is not None else []):
        if end - bad >= fmt.REC_HDR and crc32c.crc32c(data[bad + 8:end]) == crc:
            return True
    return False


def _zeros(fd: int, lo: int, hi: int) -> bool:
    """Are the bytes ``[lo, hi)`` of the file all zero (never written)?"""
    return nonzero_end(fd, lo, hi) == lo


def nonzero_end(fd: int, lo: int, hi: int) -> int:
    """Where the bytes ``[lo, hi)`` of the file end once the zeros at their end (the
    preallocated tail, ``format``) are left out: ``lo`` if they are all zero."""
    step = 1 << 20
    while hi > lo:
        off = max(lo, hi - step)
        chunk = os.pread(fd, hi - off, off)
        n = len(chunk.rstrip(b"\0"))
        if n:
            return off + n
        hi = off
    return lo


def zero_padded(fd: int, r: object) -> bool:
    """Does the scan ``r`` of a tail segment stop only at its preallocated zeros? Its
    records then end where the zeros begin, and nothing after them was ever written."""
    return (r.status == lib.TP_SCAN_TORN  # type: ignore[attr-defined]
            and _zeros(fd, r.bad_off, r.file_size))  # type: ignore[attr-defined]


def classify_tail(path: str, fd: int, first_seq: int, r: object) -> TailCut | None:
    """What cutting this tail segment back (``r``: its ``ScanResult``) drops, or ``None``
    when nothing is cut. Reads the bytes after the last complete batch (cold path)."""
    n = r.n  # type: ignore[attr-defined]
    n_commit = r.n_commit  # type: ignore[attr-defined]
    commit_end = r.commit_end  # type: ignore[attr-defined]
    size = r.file_size  # type: ignore[attr-defined]
    if commit_end == size or _zeros(fd, commit_end, size):
        return None  # the end, or the end and the preallocated zeros after it (``format``)
    torn = r.status == lib.TP_SCAN_TORN  # type: ignore[attr-defined]
    parts = []
    last = first_seq + n - 1
    damaged = False
    if torn:
        bad = r.bad_off  # type: ignore[attr-defined]
        rs = r.resync_off  # type: ignore[attr-defined]
        resync = None if rs == 2**64 - 1 else rs
        data = os.pread(fd, size, 0)
        damaged = _whole_but_damaged(data, bad, resync)
        what = (f"damaged record (seq {first_seq + n}) at byte offset {bad}: "
                f"{reason(r.reason)}" if damaged  # type: ignore[attr-defined]
                else f"torn record at byte offset {bad}")
        last = max(last, first_seq + n)
        if resync is not None:
            what += (f" (valid records of the same write round follow at byte offset "
                     f"{resync})" if damaged else
                     f" (valid records of the same unacknowledged write round follow at byte "
                     f"offset {resync}: a later page of it reached the disk, an earlier one "
                     "did not)")
            seq_after = int.from_bytes(data[resync + 8:resync + 16], "little")
            last = max(last, _record_chain_end(data, resync, seq_after)[0])
        parts.append(what)
    if n_commit < n:
        parts.append(f"incomplete batch of {n - n_commit} records")
    return TailCut(path, commit_end, first_seq + n_commit, last,
                   nonzero_end(fd, commit_end, size) - commit_end, damaged, " and ".join(parts))


def report_tail_cut(cut: TailCut, kept_last: int) -> str:
    """The recovery message for ``cut``; a cut that may drop acknowledged records is also
    logged at ERROR level. Returns the message (for a ``LogRecoveryWarning``)."""
    msg = cut.message(kept_last)
    if cut.maybe_acknowledged:
        logger.error("%s", msg)
    return msg
