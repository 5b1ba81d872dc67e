"""``python -m tinyraftplus.log repair DIR NAME --truncate-at SEQ [--dry-run]``: cut a
damaged log so that it opens again.

A log with damage in its middle (``LogCorruptError``, whose message names this command with
the damaged record's seq) cannot be opened, so ``FsLog.truncate`` cannot mend it. This
removes the record ``SEQ`` and everything after it (records ``< SEQ`` stay), by the same
steps and in the same crash-safe order as ``FsLog.truncate``: later segment files are
unlinked (newest first) and the directory synced, then the segment holding ``SEQ`` is cut
(its index file dropped: it becomes the tail) and fdatasynced. A crash part-way leaves a
log that opens with a shorter suffix gone, never one with a gap.

* It holds the log's lock (``LOCK``, ``flock``) throughout, dry run included: a log that a
  process has open is refused (``LogLockedError``); stop that process first.
* Every record kept is checked first (a full scan of the segments before the cut, as
  ``verify`` does): damage before ``SEQ`` is refused, naming the seq to cut at instead.
* An atomic batch (``append_batch``, a transaction) is all or nothing: a ``SEQ`` inside one
  moves back to the batch's first record, and the output says so.
* ``--dry-run`` changes nothing and says what would go: the seqs and number of intact
  records, the damaged bytes and where, and the bytes in all.
* Afterwards the log is opened with ``FsLog`` (its own recovery) and closed, and the seqs it
  holds are printed.

In a Raft cluster, removing acknowledged entries from one member is safe only while the
others hold them: the member then catches up from the leader. Cutting entries a quorum of
members lack loses committed writes; restore from a replica instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from typing import TextIO

import trio

from ..errors import InvalidArgumentError, LogCorruptError, LogLockedError
from . import fileops
from . import format as fmt
from ._codes import reason
from .segment import decode_seg_header, scan_fd
from .tailcheck import zero_padded


@dataclass
class Plan:
    """What a repair removes (computed under the lock, before anything changes)."""

    path: str
    asked: int
    """The ``--truncate-at`` seq given."""
    seq: int
    """Where the cut is: ``asked``, or the first seq of the atomic batch holding it."""
    first_seq: int
    """The log's first seq (records ``first_seq .. seq - 1`` stay)."""
    cut_file: str = ""
    cut_at: int = 0
    """Byte offset the segment holding ``seq`` is cut at."""
    delete: list[str] = field(default_factory=list)
    """Later segment files removed whole."""
    removed: int = 0
    """Intact records removed."""
    removed_last: int = -1
    """The highest intact seq removed (-1: none)."""
    removed_bytes: int = 0
    damage: list[str] = field(default_factory=list)
    """Damaged or unreadable byte ranges removed, described."""

    def describe(self) -> str:
        parts = []
        n = self.removed_last - self.seq + 1
        if n > 0:
            intact = f", {self.removed} of them intact" if self.removed != n else ""
            parts.append(f"seqs {self.seq}..{self.removed_last} ({n} record"
                         f"{'s' if n != 1 else ''}{intact})")
        parts.extend(self.damage)
        what = " and ".join(parts) if parts else "nothing but empty segment files"
        kept = (f"seqs {self.first_seq}..{self.seq - 1} stay" if self.seq > self.first_seq
                else f"no record stays (the log will start again at seq {self.first_seq})")
        moved = ""
        if self.seq != self.asked:
            moved = (f" (seq {self.asked} is inside an atomic batch that starts at seq "
                     f"{self.seq}: a batch is all or nothing, so the cut moves to its start)")
        return (f"{self.path}: truncating at seq {self.seq}{moved} removes {what}: "
                f"{self.removed_bytes:,} bytes in all; {kept}")


def _flags_at(fd: int, off: int) -> int:
    return int.from_bytes(os.pread(fd, 4, off + 24), "little")


def plan(path: str, seq: int) -> Plan:
    """Work out the repair of the log at ``path`` (read-only; the caller holds the lock)."""
    firsts = sorted(f for f in map(fmt.parse_segment_name, os.listdir(path)) if f is not None)
    if not firsts:
        raise InvalidArgumentError(f"{path} holds no segment files: nothing to repair")
    if seq < firsts[0]:
        raise InvalidArgumentError(
            f"--truncate-at {seq}: the log starts at seq {firsts[0]} (earlier records were "
            f"compacted away); give a seq >= {firsts[0]}")
    p = Plan(path, seq, seq, firsts[0])
    for i, first in enumerate(firsts):
        seg_path = os.path.join(path, fmt.segment_name(first))
        nxt = firsts[i + 1] if i + 1 < len(firsts) else None
        with open(seg_path, "rb") as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            hdr = decode_seg_header(os.pread(fd, fmt.SEG_HDR, 0))
            if p.seq <= first and i > 0:  # after the cut: the whole file goes
                p.delete.append(seg_path)
                p.removed_bytes += size
                if isinstance(hdr, int):
                    p.damage.append(f"{os.path.basename(seg_path)} ({reason(hdr)} in its "
                                    "header)")
                    continue
                r = scan_fd(fd, first, False)
                if zero_padded(fd, r):  # a tail's preallocated zeros: not damage
                    p.removed_bytes -= size - r.bad_off
                    r = r._replace(status=0, file_size=r.bad_off)
                if r.n:
                    p.removed += r.n
                    p.removed_last = first + r.n - 1
                if r.status != 0:
                    p.damage.append(f"{r.file_size - r.bad_off:,} unreadable bytes from "
                                    f"byte offset {r.bad_off} of {os.path.basename(seg_path)} "
                                    f"({reason(r.reason)} there)")
                continue
            if isinstance(hdr, int):
                raise LogCorruptError(
                    f"{seg_path}: {reason(hdr)} in the segment header: the records from seq "
                    f"{first} on cannot be kept"
                    + (f"; use --truncate-at {first}" if i > 0 else
                       "; this is the log's first segment: restore the log from a replica"),
                    path=seg_path, offset=0)
            if hdr[0] != first:
                raise LogCorruptError(
                    f"{seg_path} says it starts at seq {hdr[0]}, its name says {first}"
                    + (f"; use --truncate-at {first}" if i > 0 else ""),
                    path=seg_path, offset=16)
            r = scan_fd(fd, first, True)
            if zero_padded(fd, r):  # the records end where the preallocated zeros begin
                size = r.bad_off
                r = r._replace(status=0, reason=0, file_size=size)
            # The cut is in this segment, or at its end when SEQ starts the next one.
            holds_cut = nxt is None or p.seq <= nxt
            k = p.seq - first if holds_cut else (nxt or 0) - first
            if r.n < k:  # damage (or the end) before what must stay
                if r.status == 0 and holds_cut:  # the log simply ends before SEQ
                    k = r.n
                    p.seq = p.asked = first + r.n
                else:
                    bad = first + r.n
                    raise LogCorruptError(
                        f"record seq {bad} at byte offset {r.bad_off if r.status else r.end} "
                        f"of {seg_path} is damaged ({reason(r.reason or -5)}) and comes "
                        f"before seq {p.seq}, so cutting there would keep it: use "
                        f"--truncate-at {bad}", path=seg_path, offset=r.bad_off)
            if not holds_cut:
                continue
            # An atomic batch is never split: back to its first record.
            while k > 0 and _flags_at(fd, r.offs[k - 1]) & fmt.FLAG_MORE:
                k -= 1
            p.seq = first + k
            p.cut_file = seg_path
            p.cut_at = r.offs[k] if k < r.n else r.end
            p.removed_bytes += size - p.cut_at
            if r.n > k:
                p.removed += r.n - k
                p.removed_last = first + r.n - 1
            if r.status != 0:
                p.damage.append(f"{size - r.bad_off:,} unreadable bytes from byte offset "
                                f"{r.bad_off} of {os.path.basename(seg_path)} "
                                f"({reason(r.reason)} there)")
            elif r.end != size:
                p.damage.append(f"{size - r.end:,} bytes of an incomplete write")
    return p


def apply(p: Plan) -> None:
    """Cut as planned, durably, in ``FsLog.truncate``'s order (the caller holds the lock)."""
    for seg_path in reversed(p.delete):
        with contextlib.suppress(FileNotFoundError):
            fileops.unlink(seg_path[: -len(fmt.SEG_SUFFIX)] + fmt.IDX_SUFFIX)
        fileops.unlink(seg_path)
    # The unlinks are durable before the cut (see FsLog._truncate_sync).
    fileops.fsync_dir(p.path)
    with contextlib.suppress(FileNotFoundError):
        fileops.unlink(p.cut_file[: -len(fmt.SEG_SUFFIX)] + fmt.IDX_SUFFIX)  # now the tail
    fd = fileops.open_fd(p.cut_file, os.O_RDWR | os.O_CLOEXEC)
    try:
        fileops.ftruncate(fd, p.cut_at)
        fileops.fdatasync(fd)
    finally:
        os.close(fd)
    fileops.fsync_dir(p.path)


def repair(dir: str, name: str, seq: int, *, dry_run: bool = False) -> Plan:
    """Plan (and unless ``dry_run``, apply) the repair of log ``DIR/NAME`` at ``seq``.
    Raises ``LogLockedError`` if the log is open, ``LogCorruptError`` for damage before the
    cut, ``InvalidArgumentError`` for a seq or path that does not fit."""
    path = os.path.join(dir, name)
    if not os.path.isdir(path):
        raise InvalidArgumentError(f"no log at {path}")
    lock_fd = os.open(os.path.join(path, fmt.LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                      0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LogLockedError(
                f"log {path} is open in another process (it holds {fmt.LOCK_NAME}); stop "
                "that process first: a log is repaired only while nobody uses it") from None
        p = plan(path, seq)
        if not dry_run and (p.delete or p.removed_bytes):
            apply(p)
    finally:
        os.close(lock_fd)  # releases the flock
    return p


def check_opens(dir: str, name: str) -> tuple[int, int]:
    """Open the log with ``FsLog`` (its own recovery) and close it: (first seq, last seq)."""
    from .fslog import FsLog

    async def go() -> tuple[int, int]:
        async with FsLog(dir, name) as log:
            return log.first_seq, log.seq

    return trio.run(go)


def run(dir: str, name: str, seq: int, dry_run: bool, out: TextIO) -> int:
    """The command: 0 done (or nothing to do), 1 refused, 2 usage."""
    try:
        p = repair(dir, name, seq, dry_run=dry_run)
    except InvalidArgumentError as e:
        print(f"error: {e}", file=out)
        return 2
    except (LogLockedError, LogCorruptError, OSError) as e:
        print(f"error: {e}", file=out)
        return 1
    if not (p.delete or p.removed_bytes):
        print(f"{p.path}: nothing at or after seq {p.seq} to remove", file=out)
        return 0
    print(p.describe(), file=out)
    if dry_run:
        print("dry run: nothing changed; run it again without --dry-run to cut", file=out)
        return 0
    first, last = check_opens(dir, name)
    held = f"seqs {first}..{last}" if last >= first else f"no records (next seq {first})"
    print(f"done: the log opens and holds {held}", file=out)
    return 0


def main(argv: list[str]) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m tinyraftplus.log repair",
        description="Cut a damaged log at SEQ (removing SEQ and every later record) so that "
                    "it opens again; the log must not be open elsewhere.")
    p.add_argument("dir", help="directory holding the log (the FsLog dir argument)")
    p.add_argument("name", help="log name (the FsLog name argument)")
    p.add_argument("--truncate-at", type=int, required=True, metavar="SEQ",
                   help="the first seq to remove (the damaged record's, as LogCorruptError "
                        "and verify name it); records before it stay")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing; say what would be removed")
    a = p.parse_args(argv)
    return run(a.dir, a.name, a.truncate_at, a.dry_run, sys.stdout)
