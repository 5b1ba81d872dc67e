"""Corruption test for ``FsLog``: flip one bit anywhere in a closed log and reopen it.

A small log (three 4 KiB segments, single appends, batches, a transaction, an aborted one) is
written and closed. Then, for every byte of it (one random bit per byte; the default suite
takes every header and index byte and every 4th payload byte, ``-m slow`` every byte), and
for 500 aimed random positions in a larger log, a copy gets that bit flipped and is read
back through ``open``, ``iter`` and ``read``, after ``verify`` (in-process, through the CLI's
``run``). The rules:

* every record the log returns equals the original record at that seq: never bad bytes;
* a flip in the last atomic write of the log (its tail record or the batch that ends it)
  may instead truncate the log back to before that write, with a warning;
* any other flip in a record must raise ``LogCorruptError`` whose ``.path`` is the flipped
  file and whose ``.offset`` points at the damaged record (at or before the flipped byte);
* a flip in a segment header raises ``LogCorruptError`` for that file unless the log never
  needs that header (then everything must still read back intact);
* records are never silently dropped from the middle or the end of the log;
* ``verify`` exits 1 naming the file and an offset at or before the flip for any damaged
  record outside the last write, exits 0 or 1 (naming the file) otherwise, and changes nothing.

The records' layout comes from the on-disk format documented in ``tinyraftplus.log.format``
(and ``csrc/tplog.h``), parsed here independently with the ``crc32c`` package; the test
first checks that the pristine log matches that documentation byte for byte. ``python -m
tinyraftplus.log verify`` is run on a few damaged copies and must fail naming file and offset.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import struct
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import crc32c
import pytest

from tinyraftplus.entry import Entry
from tinyraftplus.errors import LogCorruptError
from tinyraftplus.log import FsLog, LogRecoveryWarning

NAME = "flipme"

# The documented format (csrc/tplog.h, tinyraftplus/log/format.py), restated independently.
SEG_MAGIC = b"TPLOGSEG"
SEG_HDR = struct.Struct("<8sIIQQ12sI")  # magic, version, header length, first seq, prev term
REC_HDR = struct.Struct("<IIQQII")  # length, crc, seq, term, flags, reserved
FLAG_MORE = 1
FLAG_ROUND = 2  # format 2: the record starts a write round; bytes 28..32 its durable back


@dataclass(frozen=True)
class Frame:
    """One record as it sits in a segment file."""

    start: int
    end: int
    seq: int
    term: int
    flags: int
    payload: bytes


@dataclass
class Layout:
    """Where everything is in the pristine log's files."""

    files: dict[str, bytes]  # relative path -> bytes
    segments: dict[str, list[Frame]]  # relative path -> frames, for segment files
    last_write_first_seq: int  # first seq of the log's last atomic write
    last_write_file: str
    last_write_start: int  # file offset where that write begins

    def frame_at(self, rel: str, pos: int) -> Frame | None:
        for f in self.segments.get(rel, ()):
            if f.start <= pos < f.end:
                return f
        return None

    def batch_start(self, rel: str, frame: Frame) -> int:
        """File offset of the first record of the atomic write that contains ``frame``."""
        frames = self.segments[rel]
        i = frames.index(frame)
        while i > 0 and frames[i - 1].flags & FLAG_MORE:
            i -= 1
        return frames[i].start


def _crc(data: bytes) -> int:
    return crc32c.crc32c(data)


def parse_segment(data: bytes) -> tuple[int, list[Frame]]:
    """Parse one segment file per the documented format; raise AssertionError if it is not."""
    magic, version, hlen, first, _prev_term, reserved, hcrc = SEG_HDR.unpack_from(data, 0)
    assert magic == SEG_MAGIC and version == 2 and hlen == SEG_HDR.size == 48
    assert reserved == bytes(12), "segment header reserved bytes must be zero"
    assert hcrc == _crc(data[:44]), "segment header CRC does not match the documentation"
    frames = []
    off, seq = SEG_HDR.size, first
    while off < len(data):
        length, crc, rseq, term, flags, rsv = REC_HDR.unpack_from(data, off)
        end = off + REC_HDR.size + length
        assert end <= len(data), f"record at {off} runs past the end of the file"
        assert crc == _crc(data[off + 8 : end]), f"record at {off}: CRC != documented CRC"
        assert rseq == seq and flags & ~(FLAG_MORE | FLAG_ROUND) == 0
        assert rsv == 0 or flags & FLAG_ROUND, f"record at {off}: reserved bytes set"
        frames.append(Frame(off, end, rseq, term, flags, data[off + REC_HDR.size : end]))
        off, seq = end, seq + 1
    return first, frames


def _is_segment(data: bytes) -> bool:
    return data[:8] == SEG_MAGIC


def _layout(root: Path, originals: list[Entry]) -> Layout:
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file()}
    segments: dict[str, list[Frame]] = {}
    for rel, data in files.items():
        if _is_segment(data):
            first, frames = parse_segment(data)
            assert Path(rel).name.startswith(f"{first:020d}"), f"{rel} holds first seq {first}"
            segments[rel] = frames
    # The documented format describes exactly the records that were written.
    frames_in_order = sorted((f for fs in segments.values() for f in fs), key=lambda f: f.seq)
    assert [Entry(f.seq, f.term, f.payload) for f in frames_in_order] == originals
    last_rel = max((rel for rel, fs in segments.items() if fs), key=lambda r: segments[r][-1].seq)
    frames = segments[last_rel]
    last = frames[-1]
    assert not last.flags & FLAG_MORE, "the log's last record still says more follow"
    i = len(frames) - 1
    while i > 0 and frames[i - 1].flags & FLAG_MORE:
        i -= 1
    return Layout(files, segments, frames[i].seq, last_rel, frames[i].start)


async def _build(root: Path, rng: random.Random, *, segment_size: int, ops: int,
                 max_payload: int, min_segments: int = 1) -> list[Entry]:
    """Write a log of single appends, batches and transactions; return its entries.

    Runs at least ``ops`` operations, and more until the log has ``min_segments`` segments.
    """
    root.mkdir(parents=True, exist_ok=True)
    # fsync=True: every operation is its own durable write round, so damage before the
    # last one is mid-log (with fsync=False nothing was durable: any damage in the tail
    # segment may be a torn write, and open cuts it back).
    log = FsLog(str(root), NAME, segment_size=segment_size, fsync=True)
    originals: list[Entry] = []
    term = 1

    def payload() -> bytes:
        return rng.randbytes(rng.randint(1, max_payload))

    def segments() -> int:
        return sum(1 for _ in root.rglob("*.seg"))

    async with log:
        i = 0
        while True:
            i += 1
            last = i >= ops and segments() >= min_segments
            if rng.random() < 0.15:
                term += 1
            kind = rng.choice(("single", "single", "batch", "txn", "abort"))
            if last:
                kind = "batch"  # the log ends with a batch: its tail write is several records
            if kind == "single":
                data = payload()
                seq = await log.append(data, term=term)
                originals.append(Entry(seq, term, data))
            elif kind == "batch":
                items = [payload() for _ in range(rng.randint(2, 4))]
                first = await log.append_batch(items, term=term)
                originals += [Entry(first + j, term, d) for j, d in enumerate(items)]
            else:
                items = [payload() for _ in range(rng.randint(1, 3))]
                async with log.txn() as txn:
                    seqs = [await txn.append(d, term=term) for d in items]
                    if kind == "abort":
                        await txn.abort()
                if kind == "txn":
                    originals += [Entry(s, term, d) for s, d in zip(seqs, items, strict=True)]
            if last:
                break
        assert log.seq == len(originals) - 1
    assert [e.seq for e in originals] == list(range(len(originals)))
    return originals


def _restore(work: Path, layout: Layout) -> None:
    """Make ``work`` an exact copy of the pristine log again, rewriting only what changed
    (the log may have truncated a tail or rebuilt an index in the last round)."""
    present = {str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()}
    for rel in present - layout.files.keys():
        (work / rel).unlink()
    for rel, data in layout.files.items():
        path = work / rel
        if rel in present:
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _check_error(
    exc: LogCorruptError, work: Path, rel: str, pos: int, low: int, where: str
) -> None:
    assert exc.path is not None and exc.offset is not None, f"{where}: {exc!r} lacks path/offset"
    got = Path(exc.path)
    if not got.is_absolute():
        got = Path.cwd() / got
    assert got.resolve() == (work / rel).resolve(), (
        f"{where}: LogCorruptError names {exc.path}, not the flipped file {rel} ({exc})"
    )
    assert low <= exc.offset <= pos, (
        f"{where}: LogCorruptError offset {exc.offset} is not in [{low}, {pos}] ({exc})"
    )
    assert rel.split("/")[-1] in str(exc) and str(exc.offset) in str(exc), (
        f"{where}: the message does not name the file and offset: {exc}"
    )


async def _check_flip(
    work: Path, layout: Layout, originals: list[Entry], segment_size: int,
    rel: str, pos: int, bit: int, *, reads: list[int] | None = None,
) -> str:
    """Flip one bit in a fresh copy, read everything back, apply the rules; return outcome."""
    _restore(work, layout)
    path = work / rel
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ (1 << bit)]))

    frame = layout.frame_at(rel, pos)
    in_frame = frame is not None
    in_last_write = in_frame and rel == layout.last_write_file and pos >= layout.last_write_start
    # Where a correct error may point: the damaged record (or its atomic write) if the flip
    # is in a record, anywhere in the file up to the flip otherwise.
    low = layout.batch_start(rel, frame) if frame is not None else 0
    where = f"flip of bit {bit} at {rel}:{pos} ({_describe(layout, rel, pos)})"

    # ``verify`` first: it is read-only, while open() may cut a torn tail.
    flipped = path.read_bytes()
    rc, out = _verify_in_process(work)
    assert path.read_bytes() == flipped, f"{where}: verify modified the log"
    if rel in layout.segments and not in_last_write:
        assert rc == 1, f"{where}: verify exited {rc}, not 1, on a damaged segment: {out!r}"
    if rc == 1:
        m = re.search(r"(\S+) at byte offset (\d+)", out)
        assert m and Path(m.group(1)).name == Path(rel).name, (
            f"{where}: verify does not name {rel} as the damaged file: {out!r}"
        )
        assert low <= int(m.group(2)) <= pos, (
            f"{where}: verify names offset {m.group(2)}, not in [{low}, {pos}]: {out!r}"
        )
    else:
        assert rc == 0, f"{where}: verify exited {rc}: {out!r}"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = FsLog(str(work), NAME, segment_size=segment_size)
        try:
            await log.open()
        except LogCorruptError as exc:
            _check_error(exc, work, rel, pos, low, where + ", at open")
            return "error at open"
        try:
            got: list[Entry] = []
            err: LogCorruptError | None = None
            try:
                async for entry in log.iter(0):
                    got.append(entry)
            except LogCorruptError as exc:
                err = exc
            for entry in got:
                assert entry.seq < len(originals) and entry == originals[entry.seq], (
                    f"{where}: iter returned a wrong record at seq {entry.seq}: {entry!r}"
                )
            assert [e.seq for e in got] == list(range(len(got))), f"{where}: seqs skip"
            if err is not None:
                _check_error(err, work, rel, pos, low, where + ", in iter")
            outcome = "error in iter" if err else "intact"
            if err is None and len(got) < len(originals):
                # Only the last atomic write may go, and only with a warning.
                assert in_last_write, (
                    f"{where}: the log silently lost records {len(got)}..{len(originals) - 1}"
                )
                assert len(got) == layout.last_write_first_seq, (
                    f"{where}: truncated to {len(got)} records, not to the start of the last "
                    f"write ({layout.last_write_first_seq})"
                )
                assert any(issubclass(w.category, LogRecoveryWarning) for w in caught), (
                    f"{where}: the tail was truncated without a LogRecoveryWarning"
                )
                outcome = "tail truncated"
            if err is None:
                assert log.seq == len(got) - 1, f"{where}: log.seq {log.seq} != {len(got) - 1}"
                if in_frame and outcome == "intact":
                    raise AssertionError(f"{where}: a damaged record read back without error")
            # read() of each seq: the original bytes or LogCorruptError, never anything else.
            for seq in reads if reads is not None else range(len(originals)):
                if seq > log.seq:
                    continue
                try:
                    entry = await log.read(seq)
                except LogCorruptError as exc:
                    _check_error(exc, work, rel, pos, low, where + f", in read({seq})")
                    continue
                assert entry == originals[seq], f"{where}: read({seq}) returned {entry!r}"
            return outcome
        finally:
            await log.close()


def _describe(layout: Layout, rel: str, pos: int) -> str:
    if rel not in layout.segments:
        return "not a segment file"
    if pos < SEG_HDR.size:
        return "segment header"
    frame = layout.frame_at(rel, pos)
    assert frame is not None
    inner = pos - frame.start
    field = "payload"
    for start, label in ((0, "length"), (4, "crc"), (8, "seq"), (16, "term"), (24, "flags"),
                         (28, "reserved")):
        if start <= inner < REC_HDR.size:
            field = label
    return f"record seq {frame.seq} {field}"


def _report(failures: list[str], flips: int) -> None:
    """Fail with every violated rule, grouped by field and rule, not only with the first."""
    if not failures:
        return
    groups: dict[str, list[str]] = {}
    for msg in failures:
        m = re.match(r"flip of bit \d+ at \S+ \(([^)]*)\)(?:, in ([a-z]+))?[^:]*: (.*)", msg)
        if m:
            desc, step, rule = m.groups()
            field = desc.split()[-1] if desc.startswith("record") else desc
            key = f"{field} / {step or 'open'}: {re.sub(r'[0-9]+', 'N', rule)[:70]}"
        else:
            key = msg[:80]
        groups.setdefault(key, []).append(msg)
    lines = [f"{len(failures)} of {flips} flips broke a rule, in {len(groups)} groups:"]
    for key, msgs in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:12]:
        lines.append(f"  [{len(msgs)}x] {key}\n      e.g. {msgs[0][:400]}")
    raise AssertionError("\n".join(lines))


async def _run_flips(
    tmp: Path, layout: Layout, originals: list[Entry], segment_size: int,
    flips: list[tuple[str, int, int, list[int]]],
) -> dict[str, int]:
    """Check every ``(file, pos, bit, seqs to read)`` flip; fail listing all broken rules.

    One at a time: ``warnings.catch_warnings`` is process-global, so concurrent checks
    would see each other's warnings.
    """
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    work = tmp / "work"
    for rel, pos, bit, reads in flips:
        try:
            outcome = await _check_flip(
                work, layout, originals, segment_size, rel, pos, bit, reads=reads
            )
        except AssertionError as exc:
            failures.append(str(exc).split("\n")[0])
            outcome = "FAILED"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    _report(failures, len(flips))
    return outcomes


def _reads_near(layout: Layout, originals: list[Entry], rel: str, pos: int) -> list[int]:
    frame = layout.frame_at(rel, pos)
    near = [] if frame is None else [frame.seq - 1, frame.seq, frame.seq + 1]
    return sorted(s for s in {0, len(originals) - 1, *near} if 0 <= s < len(originals))


def _small_log_positions(layout: Layout, payload_stride: int) -> list[tuple[str, int]]:
    """Every byte of every file, except that inside payloads only every ``payload_stride``-th
    byte is taken (plus each payload's first and last byte). Payload bytes are all guarded
    the same way (the record CRC), headers and index files each in their own way."""
    out = []
    for rel, data in layout.files.items():
        for pos in range(len(data)):
            frame = layout.frame_at(rel, pos)
            if frame is not None and payload_stride > 1:
                inner = pos - frame.start - REC_HDR.size
                last = frame.end - frame.start - REC_HDR.size - 1
                if 0 < inner < last and inner % payload_stride:
                    continue
            out.append((rel, pos))
    return out


async def _sweep_small_log(tmp_path: Path, payload_stride: int) -> None:
    seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    segment_size = 4096  # the smallest FsLog accepts
    try:
        originals = await _build(tmp_path / "pristine", rng, segment_size=segment_size, ops=10,
                                 max_payload=400, min_segments=3)
        layout = _layout(tmp_path / "pristine", originals)
        assert len(layout.segments) >= 3, f"only {len(layout.segments)} segments"
        flips = [(rel, pos, rng.randrange(8), _reads_near(layout, originals, rel, pos))
                 for rel, pos in _small_log_positions(layout, payload_stride)]
        outcomes = await _run_flips(tmp_path, layout, originals, segment_size, flips)
    except BaseException:
        print(f"\n*** corruption test failed with seed {seed}")
        raise
    total = sum(len(d) for d in layout.files.values())
    print(f"small log: {len(originals)} records in {len(layout.segments)} segments, "
          f"{len(flips)} flips of {total} bytes: {outcomes}")
    # Sanity of the test itself: it did reach both detection paths.
    assert outcomes.get("error at open", 0) > 0 and outcomes.get("error in iter", 0) > 0


async def test_every_header_byte_of_a_small_log(tmp_path: Path) -> None:
    """Every byte of the segment and record headers and index files, every 4th payload byte
    (the full sweep is the slow test below: it takes half a minute)."""
    await _sweep_small_log(tmp_path, payload_stride=4)


@pytest.mark.slow
async def test_every_byte_of_a_small_log(tmp_path: Path) -> None:
    await _sweep_small_log(tmp_path, payload_stride=1)


async def test_random_flips_in_a_larger_log(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    pristine = tmp_path / "pristine"
    segment_size = 16 << 10
    try:
        originals = await _build(pristine, rng, segment_size=segment_size, ops=220,
                                 max_payload=600)
        layout = _layout(pristine, originals)
        assert len(layout.segments) >= 5, f"only {len(layout.segments)} segments"
        segs = list(layout.segments)
        targets: list[tuple[str, int]] = []
        for i in range(500):
            # Aim a third at record headers, a third at payloads, some at segment headers,
            # the rest anywhere in any file, and always the last write's records.
            rel = rng.choice(segs)
            frames = layout.segments[rel]
            if i < 10:
                rel = layout.last_write_file
                frames = layout.segments[rel]
                f = frames[-1 - rng.randrange(min(3, len(frames)))]
                pos = rng.randrange(f.start, f.end)
            elif i % 3 == 0 and frames:
                f = rng.choice(frames)
                pos = f.start + rng.randrange(REC_HDR.size)
            elif i % 3 == 1 and frames:
                f = rng.choice(frames)
                pos = rng.randrange(f.start + REC_HDR.size, f.end)
            elif i % 10 == 2:
                pos = rng.randrange(SEG_HDR.size)
            else:
                rel = rng.choice([r for r, d in layout.files.items() if d])
                pos = rng.randrange(len(layout.files[rel]))
            targets.append((rel, pos))
        flips = []
        for rel, pos in targets:
            sample = rng.sample(range(len(originals)), 12)
            sample += _reads_near(layout, originals, rel, pos)
            flips.append((rel, pos, rng.randrange(8), sorted(set(sample))))
        outcomes = await _run_flips(tmp_path, layout, originals, segment_size, flips)
    except BaseException:
        print(f"\n*** corruption test failed with seed {seed}")
        raise
    print(f"larger log: {len(originals)} records in {len(layout.segments)} segments, "
          f"{len(targets)} flips: {outcomes}")


def _verify_in_process(work: Path) -> tuple[int, str]:
    """``python -m tinyraftplus.log verify WORK NAME`` run in this process (a subprocess per
    flip would take minutes); returns (exit code, output). Calls the CLI's ``run`` with an
    output stream, because its ``main`` prints to the ``sys.stdout`` bound at import time."""
    from tinyraftplus.log.__main__ import run as verify_run

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = verify_run(str(work), NAME, False, 40, out=buf)
    return rc, buf.getvalue()


def _verify_cli(work: Path) -> subprocess.CompletedProcess[str]:
    import tinyraftplus

    env = dict(os.environ)
    root = str(Path(tinyraftplus.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "tinyraftplus.log", "verify", str(work), NAME],
        capture_output=True, text=True, timeout=60, env=env,
    )


async def test_verify_cli_names_file_and_offset(tmp_path: Path) -> None:
    rng = random.Random(1234)
    pristine, work = tmp_path / "pristine", tmp_path / "work"
    segment_size = 4096
    originals = await _build(pristine, rng, segment_size=segment_size, ops=40, max_payload=300,
                             min_segments=3)
    layout = _layout(pristine, originals)
    _restore(work, layout)
    clean = _verify_cli(work)
    assert clean.returncode == 0, f"verify failed on an intact log:\n{clean.stdout}{clean.stderr}"

    # A payload flip and a record-header flip in sealed segments, and a flip in a record
    # of the tail segment that is followed by intact ones (damage mid-log found at open).
    segs = sorted(layout.segments)
    cases = []
    for rel, pick in ((segs[0], "payload"), (segs[1], "rechdr"), (layout.last_write_file, "mid")):
        frames = layout.segments[rel]
        if pick == "mid":
            before = [f for f in frames if f.end <= layout.last_write_start]
            if not before:
                continue
            f = before[len(before) // 2]
        else:
            f = frames[1]
        pos = f.start + (9 if pick == "rechdr" else REC_HDR.size + 3)
        cases.append((rel, pos, f))
    assert len(cases) >= 2
    for rel, pos, f in cases:
        _restore(work, layout)
        path = work / rel
        data = bytearray(path.read_bytes())
        data[pos] ^= 0x10
        path.write_bytes(bytes(data))
        res = _verify_cli(work)
        out = res.stdout + res.stderr
        assert res.returncode != 0, f"verify passed a log with a flipped bit at {rel}:{pos}:\n{out}"
        assert Path(rel).name in out, f"verify does not name {rel}:\n{out}"
        assert str(f.start) in out, f"verify does not name offset {f.start} of {rel}:\n{out}"
        assert path.read_bytes() == bytes(data), "verify modified the log it was checking"


@pytest.mark.slow
async def test_every_byte_of_several_small_logs(tmp_path: Path) -> None:
    for i in range(5):
        await _sweep_small_log(tmp_path / str(i), payload_stride=1)
