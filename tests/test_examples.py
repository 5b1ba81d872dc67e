"""Every file in ``examples/`` runs (bounded in time), and what the README shows of them is what
they are and what they print, so neither can rot.

The README marks what it shows with HTML comments (invisible when rendered) right before a
fenced block: ``<!-- examples/NAME.py -->`` before the file's code, ``<!-- output of
examples/NAME.py -->`` before its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
TIMEOUT = 90  # seconds per example; each takes a few at most

_MARKED = re.compile(r"<!-- (output of )?(examples/[\w.-]+\.py) -->\n```[a-z]*\n(.*?)```",
                     re.DOTALL)


def _readme_blocks() -> tuple[dict[str, str], dict[str, str]]:
    code, output = {}, {}
    for m in _MARKED.finditer((ROOT / "README.md").read_text()):
        (output if m.group(1) else code)[m.group(2)] = m.group(3)
    return code, output


def _run(name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, f"examples/{name}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_there_are_examples_and_the_readme_marks_them():
    assert {"three_nodes.py", "counter.py", "fslog.py", "sim_counter.py"} <= set(EXAMPLES)
    code, output = _readme_blocks()
    shown = {"examples/counter.py", "examples/fslog.py", "examples/sim_counter.py"}
    assert shown <= set(code)
    assert shown | {"examples/three_nodes.py"} <= set(output)
    for path in list(code) + list(output):
        assert (ROOT / path).is_file(), f"README.md shows {path}, which does not exist"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name):
    r = _run(name)
    assert r.returncode == 0, f"examples/{name} exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"examples/{name} printed nothing"
    code, output = _readme_blocks()
    path = f"examples/{name}"
    if path in output:
        assert r.stdout == output[path], (
            f"README.md shows another output for {path}; update one or the other")
    if path in code:
        assert (ROOT / path).read_text() == code[path], (
            f"README.md shows other code than {path}; update one or the other")
