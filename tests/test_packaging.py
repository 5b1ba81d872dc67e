"""Packaging: one stable-ABI (abi3) wheel for CPython 3.10+, the MIT license shipped as a file
and declared as an SPDX expression, and CI that runs the linters."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tinyraftplus._tplog

ROOT = Path(__file__).resolve().parent.parent


def test_extension_is_built_for_the_stable_abi():
    assert Path(tinyraftplus._tplog.__file__).name.endswith(".abi3.so")


def test_wheel_tag_and_license_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = (ROOT / "setup.py").read_text()
    assert '"py_limited_api": "cp310"' in setup
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    assert project["requires-python"] == ">=3.10"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the tinyraftplus authors" in text
    assert {"test", "dev", "bench", "metrics"} <= set(project["optional-dependencies"])


def test_ci_runs_ruff_and_mypy_and_fails_with_them():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    lines = [x.strip() for x in ci.splitlines()]
    assert "python -m pip install -q -e '.[dev]'" in lines
    assert "ruff check ." in lines and "mypy tinyraftplus" in lines


@pytest.mark.slow
def test_built_wheel_is_abi3_and_imports(tmp_path):
    """``pytest -m slow -k wheel``: builds the wheel (about 15 s) and imports it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
                    "-w", str(tmp_path)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("tinyraftplus-*.whl")
    assert wheel.name.endswith("-cp310-abi3-linux_x86_64.whl") or "-cp310-abi3-" in wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "tinyraftplus/_tplog.abi3.so" in names
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        site = tmp_path / "site"
        z.extractall(site)
    code = ("import tinyraftplus._tplog as t; from tinyraftplus._native import lib; "
            f"assert t.__file__.startswith({str(site)!r}); "
            "print(hex(lib.tp_crc32c(0, b'123456789', 9)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(site)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0xe3069283"  # the CRC32C check value
