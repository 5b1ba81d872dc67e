"""``python -m benchmarks.append_throughput [--quick] [--json PATH] [--only PREFIX]...``

Runs every benchmark section listed in ``SECTIONS`` that is installed, prints one table of
figures beside their baselines and targets, and optionally writes them as JSON::

    {"results": [{"name", "value", "unit", "baseline", "ratio", "target", "pass", ...}],
     "meta": {...}}

A section is a module in this package with ``TITLE`` and ``async def run(ctx) -> list[Result]``
(see ``benchmarks._common``); adding one means adding its module name below. Sections that
are not written yet are skipped with a note. All files go to a temporary directory (``--dir``
picks the disk) that is deleted at the end.

Exit status: 0 when the run completed (figures below target are marked MISS in the table and
``"pass": false`` in the JSON, not failures of the run); 1 when a section raised;
``--strict`` also exits 1 on a MISS.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import trio

from ._common import Context, Result, format_table, write_json

SECTIONS = [
    "benchmarks.bench_log",
    "benchmarks.bench_raft",
    "benchmarks.bench_tcp",
    "benchmarks.bench_peer",  # last: it compares against figures measured above
]


def _load(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None  # that section is not written yet
        raise


async def _main(args: argparse.Namespace, tmpdir: Path) -> tuple[list[Result], list[str]]:
    ctx = Context(
        tmpdir=tmpdir,
        quick=args.quick,
        only=tuple(args.only or ()),
        repeats=args.repeats or (3 if args.quick else 5),
        duration=args.duration or (0.25 if args.quick else 1.5),
    )
    results: list[Result] = []
    errors: list[str] = []
    for name in SECTIONS:
        try:
            module = _load(name)
        except Exception:
            # A section whose imports fail (say, a part not built yet) must not hide the
            # figures of the others.
            errors.append(f"section {name} could not be imported:\n{traceback.format_exc()}")
            print(errors[-1], file=sys.stderr)
            continue
        if module is None:
            print(f"(section {name} not present, skipped)", file=sys.stderr)
            continue
        title = getattr(module, "TITLE", name)
        started = time.perf_counter()
        try:
            got = await module.run(ctx)
        except Exception:
            errors.append(f"section {name} failed:\n{traceback.format_exc()}")
            print(errors[-1], file=sys.stderr)
            continue
        got = [r for r in got if ctx.wants(r.name)]
        if got:
            print(f"({title}: {len(got)} figures in {time.perf_counter() - started:.1f}s)",
                  file=sys.stderr)
        results.extend(got)
    return results, errors + ctx.errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.append_throughput",
        description="Measure the log (and other sections) beside raw baselines.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short repetitions (under 30 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", metavar="PREFIX", action="append",
                        help="run only figures whose name starts with PREFIX (repeatable)")
    parser.add_argument("--dir", metavar="DIR", default=None,
                        help="where to put the temporary files (default: the system temp dir)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repetitions per figure (default 5, quick 3)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per repetition (default 1.5, quick 0.25)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    tmpdir = Path(tempfile.mkdtemp(prefix="tinyraftplus-bench-", dir=args.dir))
    started = time.perf_counter()
    try:
        results, errors = trio.run(_main, args, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.perf_counter() - started

    print(format_table(results))
    print(f"\n{len(results)} figures in {elapsed:.1f}s"
          f"{' (--quick: small sizes)' if args.quick else ''}; files in {tmpdir} (deleted)")
    if args.json:
        meta = {
            "quick": args.quick,
            "only": args.only,
            "seconds": round(elapsed, 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "dir": str(tmpdir.parent),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "errors": errors,
        }
        write_json(args.json, results, meta)
        print(f"wrote {args.json}")
    if errors:
        return 1
    if args.strict and any(r.passed is False for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
