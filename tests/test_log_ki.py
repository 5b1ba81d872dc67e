"""Issue 9.2: Ctrl-C during appends never makes ``close()`` hang or spin.

Before the fix a KeyboardInterrupt delivered inside ``Flusher.wait`` left the round in
flight uncollected, and ``close()`` looped forever at 100% CPU (real SIGINTs hung 12 of 16
runs). The child process (tests/ki_child.py) appends from the main task and four others;
each run must exit within a bounded time with ``close()`` done, and the log must reopen
with every acknowledged record.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tinyraftplus import FsLog
from tinyraftplus.log import LogRecoveryWarning

CHILD = Path(__file__).with_name("ki_child.py")
LIMIT = 20.0  # seconds a child may take to close after the last signal


def _start(tmp: Path, mode: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])
    p = subprocess.Popen(
        [sys.executable, str(CHILD), str(tmp), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def _finish(p: subprocess.Popen[str]) -> int:
    try:
        out, err = p.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(
            f"the child did not finish close() within {LIMIT} s: {err[-2000:]}"
        ) from None
    assert "closed" in out.split(), (out, err[-3000:])
    acked = int(out.split("acked ")[1].split()[0])
    return acked


async def _check(tmp: Path, acked: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogRecoveryWarning)
        async with FsLog(tmp, "x", segment_size=1 << 16) as log:
            assert log.seq >= acked
            n = 0
            async for e in log.iter():
                assert e.seq == n and e.data.startswith(b"task ")
                n += 1
            assert n == log.seq + 1
            await log.append(b"after")


async def test_keyboard_interrupt_in_the_flusher_wait(tmp_path: Path) -> None:
    p = _start(tmp_path, "inject")
    acked = _finish(p)
    assert p.returncode == 0
    await _check(tmp_path, acked)


@pytest.mark.parametrize("run", range(6))
async def test_real_sigints_during_appends(tmp_path: Path, run: int) -> None:
    rng = random.Random(run)
    p = _start(tmp_path, "sigint")
    time.sleep(rng.uniform(0.02, 0.3))
    for _ in range(rng.randint(1, 4)):  # more Ctrl-Cs while it closes
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGINT)
        time.sleep(rng.uniform(0.0, 0.05))
    acked = _finish(p)
    await _check(tmp_path, acked)
