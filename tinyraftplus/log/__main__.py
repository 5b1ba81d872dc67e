"""``python -m tinyraftplus.log verify|dump DIR NAME``: check or print a log, read-only.
(``repair DIR NAME --truncate-at SEQ [--dry-run]`` cuts a damaged log: ``repair.py``.)

``verify`` scans every segment completely (headers, every record's CRC, seq continuity
across segments) without taking the log's lock or changing anything, and exits 0 if the log
is sound, 1 if it is damaged (naming the file and byte offset), 2 on usage errors: 0
means ``open`` opens it and every record it keeps reads back (what it finds at the end, it
judges by the rules ``open`` follows: ``tailcheck.py``; damage in a sealed segment, which
``open`` does not scan, is 1 because reading it would fail). A
torn tail (what a crash mid-write leaves, and what the next open cuts back) is reported but
is not damage; a whole last record that fails its check is a WARNING (open cuts it too, but
it may have been acknowledged). ``dump`` prints seq, term, length and a payload preview
for every record, then verifies like ``verify``.
``snapshots DIR NAME [--verify]`` lists the log's snapshots (``tinyraftplus.snapshot.cli``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from .._native import lib
from . import format as fmt
from ._codes import reason
from .segment import decode_seg_header, parse_entries, scan_fd
from .tailcheck import classify_tail, nonzero_end, torn_header_action


def _preview(data: bytes, width: int) -> str:
    text = data[:width]
    shown = text.decode("ascii", "backslashreplace") if text.isascii() else text.hex()
    return shown + ("..." if len(data) > width else "")


def run(dir: str, name: str, dump: bool, width: int, out: TextIO | None = None) -> int:
    # Look stdout up per call (not at import), so a caller that redirects it is honoured.
    out = out if out is not None else sys.stdout
    path = os.path.join(dir, name)
    if not os.path.isdir(path):
        print(f"error: no log at {path}", file=sys.stderr)
        return 2
    firsts = sorted(f for f in map(fmt.parse_segment_name, os.listdir(path)) if f is not None)
    if not firsts:
        print(f"error: {path} holds no segment files", file=sys.stderr)
        return 1
    expect = firsts[0]
    total = 0
    for i, first in enumerate(firsts):
        seg_path = os.path.join(path, fmt.segment_name(first))
        is_tail = i == len(firsts) - 1
        with open(seg_path, "rb") as f:
            fd = f.fileno()
            hdr = decode_seg_header(os.pread(fd, fmt.SEG_HDR, 0))
            if isinstance(hdr, int):  # the rules open follows too: tailcheck.py
                action = torn_header_action(i, len(firsts), os.fstat(fd).st_size, first)
                if action != "corrupt":
                    what = ("an interrupted roll; open removes it" if action == "remove" else
                            "a new log whose creation was interrupted; open writes it again")
                    print(f"note: {seg_path}: empty segment with a torn header ({what})",
                          file=out)
                    break
                print(f"CORRUPT {seg_path} at byte offset 0: {reason(hdr)}", file=out)
                return 1
            if hdr[0] != first or first != expect:
                print(
                    f"CORRUPT {seg_path} at byte offset 16: starts at seq {hdr[0]}, expected"
                    f" {expect} (name {first})",
                    file=out,
                )
                return 1
            r = scan_fd(fd, first, True)
            if dump and r.n:
                ents = parse_entries(
                    os.pread(fd, r.end - fmt.SEG_HDR, fmt.SEG_HDR),
                    fmt.SEG_HDR,
                    first,
                    r.n,
                    seg_path,
                )
                for e in ents:
                    print(f"{e.seq}\t{e.term}\t{len(e.data)}\t{_preview(e.data, width)}", file=out)
            if r.status == lib.TP_SCAN_CORRUPT or (r.status == lib.TP_SCAN_TORN and not is_tail):
                print(
                    f"CORRUPT {seg_path} at byte offset {r.bad_off}: {reason(r.reason)}"
                    f" (record seq {first + r.n})",
                    file=out,
                )
                return 1
            if not is_tail and r.n_commit != r.n:
                print(
                    f"CORRUPT {seg_path} at byte offset {r.commit_end}: sealed segment ends"
                    " inside a batch",
                    file=out,
                )
                return 1
            cut = classify_tail(seg_path, fd, first, r) if is_tail else None
            if cut is not None and cut.maybe_acknowledged:
                print(f"WARNING: {cut.message(first + r.n_commit - 1)} (what open will do)",
                      file=out)
            elif cut is not None:
                print(
                    f"note: {seg_path}: torn tail at byte offset {r.commit_end}"
                    f" ({nonzero_end(fd, r.commit_end, r.file_size) - r.commit_end} bytes,"
                    f" {r.n - r.n_commit} records of an"
                    " incomplete batch); open cuts it back",
                    file=out,
                )
            n = r.n_commit if is_tail else r.n
            total += n
            expect = first + n
    print(
        f"OK {path}: {len(firsts)} segment(s), {total} records, seqs {firsts[0]}..{expect - 1}",
        file=out,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["snapshots"]:
        from ..snapshot.cli import main as snapshots_main

        return snapshots_main(args[1:])
    if args[:1] == ["repair"]:  # a command of its own (repair.py); the rest read only
        from .repair import main as repair_main

        return repair_main(args[1:])
    p = argparse.ArgumentParser(
        prog="python -m tinyraftplus.log", description=__doc__.split("\n")[0]
    )
    p.add_argument("command", choices=["verify", "dump"])
    p.add_argument("dir", help="directory holding the log (the FsLog dir argument)")
    p.add_argument("name", help="log name (the FsLog name argument)")
    p.add_argument("--width", type=int, default=40, help="payload preview bytes (dump)")
    a = p.parse_args(args)
    try:
        return run(a.dir, a.name, a.command == "dump", a.width)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
