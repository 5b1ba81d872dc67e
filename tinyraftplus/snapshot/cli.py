"""``python -m tinyraftplus.log snapshots DIR NAME [--verify]``: list a log's snapshots.

Read-only (takes no lock, creates and removes nothing). One line per snapshot file of
``DIR/NAME.snap/``, oldest first, tab-separated: seq, term, size, CRC32C, the configuration
in force at seq (``Config.decode``), and the status: ``header ok`` (the header's CRC32C,
name and length agree), or with ``--verify`` ``OK`` once the data's CRC32C is checked too;
``DAMAGED`` and the reason otherwise. Partial transfers and temp files of an interrupted
write are listed as notes. Exit status: 0 if every snapshot is sound, 1 if any is damaged,
2 on usage errors (no such log or snapshot directory).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from ..errors import SnapshotCorruptError, TinyRaftError
from .store import CRC, PREAMBLE, check_data, parse_partial_name, read_header, scan


def _config(raw: bytes | None) -> str:
    if raw is None:
        return "-"
    from ..raft.membership import Config

    try:
        return Config.decode(raw).describe()
    except TinyRaftError as e:
        return f"undecodable ({e})"


def run(dir: str, name: str, verify: bool, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    snap_dir = os.path.join(dir, name + ".snap")
    if not os.path.isdir(snap_dir):
        if os.path.isdir(os.path.join(dir, name)):
            print(f"{snap_dir}: no snapshots (the directory does not exist)", file=out)
            return 0
        print(f"error: no log and no snapshots at {os.path.join(dir, name)}", file=err)
        return 2
    damaged = 0
    count = 0
    print("seq\tterm\tsize\tcrc\tconfiguration\tstatus", file=out)
    for e in scan(snap_dir):
        path = os.path.join(snap_dir, e.name)
        if e.kind == "temp":
            print(f"note: {path}: temp file of an interrupted write (open removes it)", file=out)
            continue
        if e.kind == "partial":
            ident = parse_partial_name(e.name)
            assert ident is not None
            held = max(0, os.path.getsize(path) - _header_len(path))
            print(
                f"note: {path}: partial transfer of seq {ident[0]} term {ident[1]}"
                f" ({held} of {ident[2]} bytes received)",
                file=out,
            )
            continue
        if e.kind == "other":
            continue
        count += 1
        if e.meta is None:
            damaged += 1
            print(f"DAMAGED\t{path}: {e.error}", file=out)
            continue
        m = e.meta
        status = "header ok"
        if verify:
            try:
                with open(path, "rb") as f:
                    check_data(f.fileno(), path, read_header(f.fileno(), path))
                status = "OK"
            except (SnapshotCorruptError, OSError) as exc:
                damaged += 1
                status = f"DAMAGED: {exc}"
        print(f"{m.seq}\t{m.term}\t{m.size}\t{m.crc:#010x}\t{_config(m.config)}\t{status}",
              file=out)
    verdict = "damaged" if damaged else "sound"
    print(f"{snap_dir}: {count} snapshot(s), {damaged} damaged: {verdict}", file=out)
    return 1 if damaged else 0


def _header_len(path: str) -> int:
    """Bytes before the data of a (partial) snapshot file, from its preamble."""
    try:
        with open(path, "rb") as f:
            pre = f.read(PREAMBLE.size)
    except OSError:
        return 0
    if len(pre) < PREAMBLE.size:
        return len(pre)
    return PREAMBLE.size + PREAMBLE.unpack(pre)[2] + CRC.size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tinyraftplus.log snapshots", description=__doc__.split("\n")[0]
    )
    p.add_argument("dir", help="directory holding the log (the FsLog dir argument)")
    p.add_argument("name", help="log name (the FsLog name argument)")
    p.add_argument("--verify", action="store_true", help="also check every data CRC32C")
    a = p.parse_args(argv)
    try:
        return run(a.dir, a.name, a.verify)
    except BrokenPipeError:
        return 0
