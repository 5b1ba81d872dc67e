"""Ctrl-C on the commands: a real SIGINT to the process group (what a terminal sends) ends the
demo, the example and the simulator with one line on stderr and exit status 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Inside a running cluster: every append blocks forever once the nodes run, so the signal
# lands while nodes, nurseries and the temporary directory are all live.
_BLOCK_APPENDS = """
import runpy, sys, trio
from tinyraftplus import RaftNode

async def blocked_append(self, data):
    print("cluster running", flush=True)
    await trio.sleep_forever()

RaftNode.append = blocked_append
"""


def _interrupt(code: str, *, ready: str, delay: float = 0.2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # start_new_session: a group of its own to signal, as a terminal signals its foreground
    # job; SIGINT back to default in case the test runner was started with it ignored.
    p = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if ready in line:
                break
        else:  # pragma: no cover
            raise AssertionError(f"never saw {ready!r}: {lines}")
        assert lines and ready in lines[-1], (lines, p.stderr.read() if p.stderr else "")
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:  # pragma: no cover
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, "".join(lines) + out, err)


def _assert_one_line(r: subprocess.CompletedProcess, name: str) -> None:
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [f"{name}: interrupted"], r.stderr


def test_ctrl_c_on_the_demo():
    code = _BLOCK_APPENDS + 'runpy.run_module("tinyraftplus.demo", run_name="__main__")\n'
    r = _interrupt(code, ready="cluster running")
    _assert_one_line(r, "tinyraftplus.demo")


def test_ctrl_c_on_the_three_nodes_example():
    code = _BLOCK_APPENDS + 'runpy.run_path("examples/three_nodes.py", run_name="__main__")\n'
    r = _interrupt(code, ready="cluster running")
    _assert_one_line(r, "tinyraftplus.demo")


def test_ctrl_c_on_the_counter_example():
    code = _BLOCK_APPENDS + 'runpy.run_path("examples/counter.py", run_name="__main__")\n'
    r = _interrupt(code, ready="cluster running")
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == ["interrupted"], r.stderr


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_on_the_simulator(jobs):
    # Import everything first, then run the real command line on a range that takes minutes.
    code = textwrap.dedent(f"""
        import runpy, sys
        import argparse, tinyraftplus.sim.cluster, tinyraftplus.sim.runner
        sys.argv = ["tinyraftplus.sim", "--seeds", "0:1000000", "--jobs", "{jobs}"]
        print("running", flush=True)
        runpy.run_module("tinyraftplus.sim", run_name="__main__", alter_sys=True)
    """)
    r = _interrupt(code, ready="running", delay=1.0)
    _assert_one_line(r, "python -m tinyraftplus.sim")
