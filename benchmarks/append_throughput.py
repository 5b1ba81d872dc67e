"""``python -m benchmarks.append_throughput [--quick] [--json PATH] [--only PREFIX]...``

``--scaling [--plot PATH] [--max-log-gib N]`` measures curves instead of the table (see
``benchmarks.scaling``); ``--json`` then writes ``{"scaling": [...], "meta": {...}}``.

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

from ._common import Context, Result, format_markdown, format_table, write_json

SECTIONS = [
    "benchmarks.bench_log",
    "benchmarks.bench_raft",
    "benchmarks.bench_tcp",
    "benchmarks.bench_snapshot_writes",
    "benchmarks.bench_restart",
    "benchmarks.bench_snapshot",
    "benchmarks.bench_peer",  # last: it compares against figures measured above
]


def _load(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None  # that section is not written yet
        raise


def _context(args: argparse.Namespace, tmpdir: Path) -> Context:
    return Context(
        tmpdir=tmpdir,
        quick=args.quick,
        only=tuple(args.only or ()),
        repeats=args.repeats or (3 if args.quick else 5),
        duration=args.duration or (0.25 if args.quick else 1.5),
    )


async def _scaling(args: argparse.Namespace, tmpdir: Path) -> tuple[list[Any], list[str]]:
    from .scaling import run_scaling

    ctx = _context(args, tmpdir)
    max_gib = args.max_log_gib if args.max_log_gib is not None else (0.25 if args.quick else 16)
    curves = await run_scaling(ctx, max_gib)
    return curves, ctx.errors


def _meta(args: argparse.Namespace, tmpdir: Path, elapsed: float,
          errors: list[str]) -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "quick": args.quick,
        "only": args.only,
        "seconds": round(elapsed, 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "loadavg_at_end": load,
        "dir": str(tmpdir.parent),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "errors": errors,
    }


def _main_scaling(args: argparse.Namespace) -> int:
    from .scaling import format_curves, plot

    tmpdir = Path(tempfile.mkdtemp(prefix="tinyraftplus-scaling-", dir=args.dir))
    started = time.perf_counter()
    try:
        curves, errors = trio.run(_scaling, args, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(format_curves(curves))
    print(f"\n{len(curves)} curves in {elapsed:.1f}s"
          f"{' (--quick: short points)' if args.quick else ''}")
    if args.plot:
        why_not = plot(curves, args.plot)
        print(why_not if why_not else f"wrote {args.plot}")
    if args.json:
        import json

        doc = {"scaling": [c.to_json() for c in curves],
               "meta": _meta(args, tmpdir, elapsed, errors)}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 1 if errors else 0


async def _main(args: argparse.Namespace, tmpdir: Path) -> tuple[list[Result], list[str]]:
    ctx = _context(args, tmpdir)
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
                        help="small sizes and short repetitions (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", metavar="PREFIX", action="append",
                        help="run only figures whose name starts with PREFIX (repeatable); with "
                             "--scaling, curves: clients, payload, nodes, log_open")
    parser.add_argument("--dir", metavar="DIR", default=None,
                        help="where to put the temporary files (default: the system temp dir)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repetitions per figure (default 5, quick 3)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per repetition (default 1.5, quick 0.25)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the table as Markdown (for the README)")
    parser.add_argument("--scaling", action="store_true",
                        help="measure the scaling curves (clients, payload, cluster size, log "
                             "open time against log size) instead of the table")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="with --scaling (implied): draw the curves to PATH (.svg, .png); "
                             "needs matplotlib (the bench extra)")
    parser.add_argument("--max-log-gib", type=float, default=None, metavar="N",
                        help="largest log for the log-open curve, in GiB (default 16; "
                             "--quick 0.25); capped by the free disk space")
    args = parser.parse_args(argv)
    if args.plot or args.max_log_gib is not None:
        args.scaling = True
    if args.max_log_gib is not None and args.max_log_gib <= 0:
        parser.error("--max-log-gib must be positive")
    if args.scaling:
        return _main_scaling(args)

    tmpdir = Path(tempfile.mkdtemp(prefix="tinyraftplus-bench-", dir=args.dir))
    started = time.perf_counter()
    try:
        results, errors = trio.run(_main, args, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.perf_counter() - started

    print(format_table(results))
    if args.markdown:
        print("\n" + format_markdown(results))
    print(f"\n{len(results)} figures in {elapsed:.1f}s"
          f"{' (--quick: small sizes)' if args.quick else ''}; files in {tmpdir} (deleted)")
    if args.json:
        meta = _meta(args, tmpdir, elapsed, errors)
        write_json(args.json, results, meta)
        print(f"wrote {args.json}")
    if errors:
        return 1
    if args.strict and any(r.passed is False for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
