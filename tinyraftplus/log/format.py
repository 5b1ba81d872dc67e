"""The on-disk format of an ``FsLog`` (version 2), for anyone writing another reader.

All integers are little-endian. CRC32C is the Castagnoli CRC (reflected polynomial
0x82F63B78, initial value and final xor 0xFFFFFFFF), the one the ``crc32c`` package computes.
The same description heads ``csrc/tplog.h``; the two must agree.

Directory ``DIR/NAME/`` holds:

* ``LOCK``: empty; held with ``flock(LOCK_EX)`` by the one process that has the log open.
* ``SSSSSSSSSSSSSSSSSSSS.seg``: a segment, named by the seq of its first record, zero-padded
  to 20 digits so that ``ls`` sorts segments in log order. Segments are contiguous: each one
  starts at the seq after the last record of the one before.
* ``SSSSSSSSSSSSSSSSSSSS.idx``: the index of a sealed (non-tail) segment, written when the
  log rolls to a new segment. It is a cache: missing or damaged, it is rebuilt by scanning
  the segment, so it is never fsynced.

Segment header (``SEG_HDR`` = 48 bytes)::

    0   8  magic b"TPLOGSEG"
    8   u32 format version (2; version 1 segments, without write rounds, are still read)
    12  u32 header length (48)
    16  u64 first seq (equals the file name)
    24  u64 term of the record before first seq (0 if none): survives compaction
    32  12 bytes reserved (zero)
    44  u32 CRC32C of bytes 0..44

Records follow back to back. Record header (``REC_HDR`` = 32 bytes), then the payload::

    0   u32 payload length (at most 2**30)
    4   u32 CRC32C of bytes 8..32 of this header and the payload
    8   u64 seq
    16  u64 term
    24  u32 flags: bit 0 = MORE (further records of the same atomic batch follow),
            bit 1 = ROUND (this record starts a write round; version 2)
    28  u32 with ROUND: "durable back", this record's offset minus the offset up to which
            the segment was durable when its round was written (0 with fsync: every
            earlier round was fdatasynced first; saturates, never overstating the durable
            end); without ROUND: zero

Atomicity: every record of an ``append_batch`` or a transaction except the last has MORE
set, and a batch never spans segments. On open, the tail segment is scanned and cut back to
the end of the last record without MORE, so a batch a crash cut short disappears whole. A
group commit writes many independent batches with one ``pwrite`` + ``fdatasync``.

Write rounds and torn tails: the writer puts many records into one write round (one
``pwrite``, then ``fdatasync``) and has at most one round in flight. A power loss during a
round may persist any subset of its pages: a later page and not an earlier one (XFS, ext4
``data=writeback``, preallocated files), which leaves invalid bytes followed by valid
records. On open, at the first invalid record (offset X), recovery looks at the valid
records after it: if one starts a round (ROUND) whose durable end, its offset minus its
durable back, lies beyond X, then X was durable before that round was written, so the
damage is mid-log: ``LogCorruptError``. Otherwise everything from X on belongs to the
round a crash interrupted: a torn tail, cut back to X with a ``LogRecoveryWarning``. In
version 1 segments any valid record after X makes the damage mid-log.

Preallocated tail: the writer grows the tail segment's file ahead of its records (a sparse
``ftruncate``, ``PREALLOC`` bytes at a time), because an ``fdatasync`` that must also make
a new file size durable costs 15-30% more than one that need not. So the tail segment may
end in zero bytes after its last record: a reader stops at the first record header of
zeros. Recovery treats a tail of zeros alone as the end of the log, not as a torn tail (no
warning: those bytes were never written, so nothing acknowledged is in them). A sealed
segment ends exactly at its last record: the writer cuts the zeros off, durably, before
it creates the next segment.

Index file (``.idx``)::

    0   8  magic b"TPLOGIDX"
    8   u32 version (1)
    12  u32 number of term runs R
    16  u64 first seq
    24  u64 record count N
    32  u64 segment data end (the segment file's size)
    40  u32 CRC32C of the offsets section
    44  u32 CRC32C of bytes 0..44 and the runs section
    48  R x (u64 seq, u64 term): the seq where each run of equal terms starts
    ..  N x u64: the file offset of each record

Open reads only the headers and runs of sealed segments' indexes, so its cost does not
grow with their records; the offsets section is read the first time a segment is read.
"""

from __future__ import annotations

import struct

SEG_HDR = 48
REC_HDR = 32
FLAG_MORE = 1
FLAG_ROUND = 2
FORMAT_VERSION = 2
IDX_VERSION = 1
MAX_BACK = (1 << 32) - 1
MAX_PAYLOAD = 1 << 30
MAX_U64 = (1 << 64) - 1

SEG_SUFFIX = ".seg"
IDX_SUFFIX = ".idx"
LOCK_NAME = "LOCK"

IDX_MAGIC = b"TPLOGIDX"
IDX_HDR = struct.Struct("<8sIIQQQII")  # 48 bytes
IDX_RUN = struct.Struct("<QQ")


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEG_SUFFIX}"


def index_name(first_seq: int) -> str:
    return f"{first_seq:020d}{IDX_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first seq a segment file name stands for, or None if it is not a segment."""
    if not name.endswith(SEG_SUFFIX):
        return None
    stem = name[: -len(SEG_SUFFIX)]
    if len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)

PREALLOC = 4 << 20
"""How far ahead of its writes the tail segment's file is grown at a time (sparse: no disk
blocks are taken until written); a smaller ``segment_size`` makes the step smaller."""
