"""``python -m tinyraftplus.log verify|dump``."""

from __future__ import annotations

import subprocess
import sys

from tinyraftplus import FsLog
from tinyraftplus.log import format as fmt


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "tinyraftplus.log", *map(str, args)], capture_output=True, text=True
    )


async def _make(tmp_path, n=60):
    async with FsLog(tmp_path, "x", segment_size=4096) as log:
        for i in range(n):
            await log.append(b"payload-%03d" % i + bytes(80), term=1 + i // 30)


async def test_verify_and_dump_a_sound_log(tmp_path):
    await _make(tmp_path)
    r = _run("verify", tmp_path, "x")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "60 records" in r.stdout and "seqs 0..59" in r.stdout
    r = _run("dump", tmp_path, "x", "--width", "11")
    assert r.returncode == 0
    lines = [ln.split("\t") for ln in r.stdout.splitlines() if "\t" in ln]
    assert len(lines) == 60
    assert lines[31] == ["31", "2", "91", "payload-031..."]


async def test_verify_names_file_and_offset_of_damage(tmp_path):
    await _make(tmp_path)
    p = tmp_path / "x" / fmt.segment_name(0)
    raw = bytearray(p.read_bytes())
    off = fmt.SEG_HDR + 2 * (32 + 91)
    raw[off + 40] ^= 0x01
    p.write_bytes(bytes(raw))
    r = _run("verify", tmp_path, "x")
    assert r.returncode == 1
    assert f"CORRUPT {p} at byte offset {off}" in r.stdout
    assert "CRC32C mismatch" in r.stdout
    r = _run("dump", tmp_path, "x")
    assert r.returncode == 1 and "CORRUPT" in r.stdout


async def test_verify_reports_torn_tail_without_changing_it(tmp_path):
    await _make(tmp_path)
    segs = sorted((tmp_path / "x").glob("*.seg"))
    tail = segs[-1]
    raw = tail.read_bytes()
    tail.write_bytes(raw[:-10])
    r = _run("verify", tmp_path, "x")
    assert r.returncode == 0 and "torn tail" in r.stdout
    assert tail.read_bytes() == raw[:-10]  # read-only


def test_usage_errors(tmp_path):
    assert _run("verify", tmp_path, "nope").returncode == 2
    assert _run("frobnicate", tmp_path, "x").returncode == 2
