"""Issue 12: ``python -m tinyraftplus.log repair DIR NAME --truncate-at SEQ [--dry-run]``
makes a log with damage in its middle open again; ``LogCorruptError`` names the command."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tinyraftplus import FsLog
from tinyraftplus.errors import LogCorruptError
from tinyraftplus.log import format as fmt
from tinyraftplus.log.__main__ import main as log_main

ROOT = Path(__file__).resolve().parent.parent


def make_log(d: Path, name: str = "x") -> list[str]:
    """Three segments (seqs 0..42, 43..85, 86..107) ending with a batch (103..105)."""

    async def go() -> None:
        async with FsLog(d, name, segment_size=4096) as log:
            for i in range(100):
                await log.append(b"record %03d " % i + b"x" * 50)
            await log.append_batch([b"a", b"b", b"c"])
            await log.append_batch([b"d", b"e", b"f"])
            await log.append(b"last")
            await log.append(b"very last")

    trio.run(go)
    return sorted(f for f in os.listdir(d / name) if f.endswith(fmt.SEG_SUFFIX))


def flip(path: Path, off: int) -> None:
    b = bytearray(path.read_bytes())
    b[off] ^= 0x10
    path.write_bytes(bytes(b))


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(os.listdir(d)):
        h.update(f.encode() + (d / f).read_bytes())
    return h.hexdigest()


def read_all(d: Path, name: str = "x") -> list[tuple[int, bytes]]:
    async def go() -> list[tuple[int, bytes]]:
        async with FsLog(d, name) as log:
            return [(e.seq, e.data) async for e in log.iter(log.first_seq)]

    return trio.run(go)


def repair(capsys, *args) -> tuple[int, str]:
    rc = log_main(["repair", *map(str, args)])
    return rc, capsys.readouterr().out


def test_mid_log_damage_error_names_the_command_and_repair_cuts_there(tmp_path, capsys):
    segs = make_log(tmp_path)
    assert segs[1] == fmt.segment_name(43)
    flip(tmp_path / "x" / segs[1], fmt.SEG_HDR + 93 + 40)  # inside seq 44 (93-byte records)
    with pytest.raises(LogCorruptError) as ei:
        read_all(tmp_path)
    msg = str(ei.value)
    assert f"python -m tinyraftplus.log repair {tmp_path} x --truncate-at 44" in msg, msg

    before = digest(tmp_path / "x")
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 44, "--dry-run")
    assert rc == 0, out
    assert "truncating at seq 44 removes seqs 44..107 (64 records, 22 of them intact)" in out
    assert f"from byte offset {fmt.SEG_HDR + 93} of {segs[1]} (CRC32C mismatch there)" in out
    assert "seqs 0..43 stay" in out and "bytes in all" in out
    assert "dry run: nothing changed" in out
    assert digest(tmp_path / "x") == before

    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 44)
    assert rc == 0, out
    assert "done: the log opens and holds seqs 0..43" in out
    files = os.listdir(tmp_path / "x")
    assert fmt.segment_name(86) not in files  # the later segment went whole
    assert fmt.index_name(43) not in files  # the cut one is the tail now: no index
    got = read_all(tmp_path)
    assert [s for s, _ in got] == list(range(44))
    assert got[43][1].startswith(b"record 043")

    async def append_more() -> int:
        async with FsLog(tmp_path, "x") as log:
            return await log.append(b"again")

    assert trio.run(append_more) == 44
    assert log_main(["verify", str(tmp_path), "x"]) == 0


def test_damage_before_the_cut_is_refused_naming_the_seq(tmp_path, capsys):
    segs = make_log(tmp_path)
    flip(tmp_path / "x" / segs[1], fmt.SEG_HDR + 93 + 40)
    before = digest(tmp_path / "x")
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 60)
    assert rc == 1
    assert "record seq 44" in out and "use --truncate-at 44" in out
    assert digest(tmp_path / "x") == before


def test_a_cut_inside_a_batch_moves_to_its_start(tmp_path, capsys):
    make_log(tmp_path)
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 104)
    assert rc == 0, out
    assert "seq 104 is inside an atomic batch that starts at seq 103" in out
    assert "removes seqs 103..107 (5 records)" in out
    assert [s for s, _ in read_all(tmp_path)] == list(range(103))


def test_a_cut_at_a_segment_boundary_drops_the_later_files(tmp_path, capsys):
    make_log(tmp_path)
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 43)
    assert rc == 0, out
    assert "seqs 0..42 stay" in out
    assert fmt.segment_name(43) not in os.listdir(tmp_path / "x")
    assert [s for s, _ in read_all(tmp_path)] == list(range(43))


def test_an_open_log_is_refused_and_bad_seqs_are_usage_errors(tmp_path, capsys):
    make_log(tmp_path)

    async def while_open() -> tuple[int, str]:
        async with FsLog(tmp_path, "x"):
            return repair(capsys, tmp_path, "x", "--truncate-at", 50, "--dry-run")

    rc, out = trio.run(while_open)
    assert rc == 1 and "is open in another process" in out
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", -1)
    assert rc == 2 and "give a seq >= 0" in out
    rc, out = repair(capsys, tmp_path, "nope", "--truncate-at", 1)
    assert rc == 2 and "no log at" in out
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 500)
    assert rc == 0 and "nothing at or after seq 108" in out


def test_the_command_line(tmp_path):
    make_log(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "tinyraftplus.log", "repair", str(tmp_path), "x",
                        "--truncate-at", "100", "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "removes seqs 100..107 (8 records)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tinyraftplus.log", "repair", str(tmp_path), "x"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--truncate-at" in r.stderr


def test_the_preallocated_zeros_of_a_tail_left_by_a_crash_are_not_damage(tmp_path, capsys):
    """A tail a SIGKILL left grown ahead of its records (``format``: preallocated tail)."""
    segs = make_log(tmp_path)
    tail = tmp_path / "x" / segs[-1]
    data = tail.read_bytes()
    tail.write_bytes(data + bytes(1 << 20))
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 108, "--dry-run")
    assert rc == 0 and "nothing at or after seq 108 to remove" in out, out
    rc, out = repair(capsys, tmp_path, "x", "--truncate-at", 107)
    assert rc == 0 and "unreadable" not in out and "incomplete" not in out, out
    # what goes is seq 107's record (32 + 9 bytes) and none of the zeros
    assert "removes seqs 107..107 (1 record): 41 bytes in all" in out, out
    assert read_all(tmp_path)[-1] == (106, b"last")
