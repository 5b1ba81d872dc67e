"""Shared pieces of the benchmark harness: results, targets, the run context, timing, RSS.

A benchmark *section* is a module with ``TITLE: str`` and ``async def run(ctx: Context) ->
list[Result]``; ``benchmarks.append_throughput`` lists the sections it runs. A section
measures each figure beside a baseline measured in the same run, on the same directory,
interleaved with it (the machine is shared and noisy, so both are repeated and the medians
reported), and returns ``Result`` rows. Nothing here knows about the log or Raft.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}


@dataclass(frozen=True)
class Target:
    """A goal for one figure: ``metric`` ``op`` ``threshold``.

    ``metric`` is "value", "ratio" or "cpu_us" (the row's CPU microseconds per operation)."""

    op: str
    threshold: float
    metric: str = "value"

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"target op must be one of {sorted(_OPS)}, not {self.op!r}")
        if self.metric not in ("value", "ratio", "cpu_us"):
            raise ValueError(
                f"target metric must be 'value', 'ratio' or 'cpu_us', not {self.metric!r}")

    def check(self, result: Result) -> bool | None:
        got = {"value": result.value, "ratio": result.ratio,
               "cpu_us": result.cpu_us}[self.metric]
        if got is None or (isinstance(got, float) and math.isnan(got)):
            return None
        return _OPS[self.op](got, self.threshold)

    def describe(self, unit: str) -> str:
        if self.metric == "ratio":
            return f"ratio {self.op} {_fmt(self.threshold)}"
        if self.metric == "cpu_us":
            return f"CPU/op {self.op} {_fmt(self.threshold)} us"
        return f"{self.op} {_fmt(self.threshold)} {unit}"

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "value": self.threshold}


@dataclass
class Result:
    """One row of the table and of the JSON output.

    ``baseline`` is in ``baseline_unit`` (defaults to ``unit``); ``ratio`` is always
    ``value / baseline`` unless the section sets it, also where smaller is better (open time,
    memory), so read it with the target beside it. ``samples`` are the individual
    repetitions behind the medians.

    ``latency`` is per-operation latency in milliseconds, ``{"p50", "p99", "p99.9"}`` over
    every operation of every repetition pooled (see ``percentiles``); ``cpu_us`` is CPU
    microseconds (user + system) per completed operation, summed over every process that
    took part (see ``CpuMeter``).
    """

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_unit: str | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: Target | None = None
    notes: str = ""
    samples: list[float] = field(default_factory=list)
    baseline_samples: list[float] = field(default_factory=list)
    extra_targets: list[Target] = field(default_factory=list)
    latency: dict[str, float] | None = None
    cpu_us: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = self.value / self.baseline

    @property
    def passed(self) -> bool | None:
        checks = [t.check(self) for t in ([self.target] if self.target else [])]
        checks += [t.check(self) for t in self.extra_targets]
        if not checks:
            return None
        if any(c is False for c in checks):
            return False
        if any(c is None for c in checks):
            return None
        return True

    def target_text(self) -> str:
        targets = ([self.target] if self.target else []) + self.extra_targets
        return " and ".join(t.describe(self.unit) for t in targets)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": self.ratio,
        }
        if self.baseline is not None:
            out["baseline_unit"] = self.baseline_unit or self.unit
            out["baseline_name"] = self.baseline_name
        targets = ([self.target] if self.target else []) + self.extra_targets
        out["target"] = targets[0].to_json() if len(targets) == 1 else (
            [t.to_json() for t in targets] if targets else None
        )
        out["pass"] = self.passed
        out["latency_ms"] = self.latency
        out["cpu_us_per_op"] = self.cpu_us
        out["notes"] = self.notes
        out["samples"] = self.samples
        out["baseline_samples"] = self.baseline_samples
        return out


@dataclass
class Context:
    """What every section gets.

    ``tmpdir`` is a fresh directory on the disk under test; sections make subdirectories and
    should delete big files when done (the harness deletes the whole directory at the end).
    ``baselines`` caches raw figures by name so that later sections can compare against the
    same raw limit without measuring it again (for example ``raw.fdatasync.1KiB`` ops/s).
    ``repeats`` and ``duration`` size each repetition; ``quick`` asks for small sizes.
    """

    tmpdir: Path
    quick: bool = False
    only: tuple[str, ...] = ()
    repeats: int = 5
    duration: float = 1.0
    baselines: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _counter: int = 0

    def record_error(self, figure: str, exc: BaseException) -> None:
        """Note that ``figure`` could not be measured, and go on with the others; the run
        then exits non-zero and lists the errors in the JSON ``meta``."""
        import traceback

        text = "".join(traceback.format_exception(exc)).rstrip()
        self.errors.append(f"{figure} failed:\n{text}")
        print(self.errors[-1], file=sys.stderr)

    def wants(self, name: str) -> bool:
        """True if the figure ``name`` was asked for (``--only`` prefixes; none: all)."""
        return not self.only or any(name.startswith(p) for p in self.only)

    def wants_any(self, names: Iterable[str]) -> bool:
        return any(self.wants(n) for n in names)

    def subdir(self, label: str) -> Path:
        """A new empty directory under ``tmpdir`` (unique per call)."""
        self._counter += 1
        path = self.tmpdir / f"{self._counter:03d}-{label}"
        path.mkdir(parents=True)
        return path

    def remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


SLICES = 6
"""Slices per repetition in which a sequential figure and its raw baselines take turns, so
that all of them see the same shared disk."""


def rate_for(duration: float, step: Callable[[], object]) -> tuple[int, float]:
    """Call ``step()`` until ``duration`` seconds pass; return (calls, elapsed seconds)."""
    n = 0
    start = time.perf_counter()
    end = start + duration
    while True:
        step()
        n += 1
        now = time.perf_counter()
        if now >= end:
            return n, now - start


PEAK_RSS_TAG = "PEAK_RSS_BYTES"


def own_peak_rss() -> int:
    """This process's peak resident set size in bytes, counting only its own image.

    On Linux this is ``VmHWM`` from ``/proc/self/status``. ``ru_maxrss`` (``RUSAGE_SELF`` or,
    from the parent, ``RUSAGE_CHILDREN`` / ``wait4``) is not used there because the kernel
    carries the pre-``exec`` high-water mark into it: a child spawned with ``vfork`` (what
    ``subprocess`` uses) reports at least the parent's RSS, so a benchmark parent holding
    60 MB would make every child look 60 MB big.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def print_peak_rss() -> None:
    """For child scripts: print the line ``peak_rss_of`` looks for."""
    print(f"{PEAK_RSS_TAG} {own_peak_rss()}", flush=True)


def peak_rss_of(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``argv`` as a child and return (its peak RSS in bytes, its other output).

    The child should end with ``print_peak_rss()`` (see ``own_peak_rss`` for why); if it does
    not, ``wait4``'s ``ru_maxrss`` for that one child is used, which may include this
    process's RSS. Raises ``RuntimeError`` with the child's output if it fails.
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}:\n{out}")
    lines = out.splitlines()
    for line in lines:
        if line.startswith(PEAK_RSS_TAG + " "):
            rest = "\n".join(x for x in lines if not x.startswith(PEAK_RSS_TAG))
            return int(line.split()[1]), rest
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return usage.ru_maxrss * scale, out


def child_env() -> dict[str, str]:
    """Environment for a child Python that must import this checkout's packages."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    ax = abs(x)
    if ax >= 1e6:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.01 or ax == 0:
        return f"{x:.3f}"
    return f"{x:.2e}"


def _fmt_latency(lat: dict[str, float] | None) -> str:
    if not lat:
        return "-"
    return "/".join(_fmt(lat[k]) for k in PERCENTILES)


def format_table(results: list[Result]) -> str:
    """A plain-text table: figure, baseline, ratio, latency percentiles (ms), CPU per operation
    (us, all processes), target and whether it was met."""
    rows = [("figure", "value", "baseline", "ratio", "p50/p99/p99.9 ms", "CPU/op",
             "target", "", "notes")]
    for r in results:
        base = "-"
        if r.baseline is not None:
            base = f"{_fmt(r.baseline)} {r.baseline_unit or r.unit}"
            if r.baseline_name:
                base += f" ({r.baseline_name})"
        verdict = {True: "pass", False: "MISS", None: ""}[r.passed]
        rows.append(
            (
                r.name,
                f"{_fmt(r.value)} {r.unit}",
                base,
                _fmt(r.ratio),
                _fmt_latency(r.latency),
                "-" if r.cpu_us is None else f"{_fmt(r.cpu_us)} us",
                r.target_text(),
                verdict,
                r.notes,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[j].ljust(widths[j]) if j == 0 else row[j].rjust(widths[j])
                 for j in range(len(widths))]
        lines.append("  ".join(cells) + ("  " + row[-1] if row[-1] else ""))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(results: list[Result]) -> str:
    """The table as Markdown (for the README): the same columns, without the notes."""
    lines = ["| figure | value | baseline (same run) | ratio | p50 / p99 / p99.9 ms | "
             "CPU per op | target | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        base = "-"
        if r.baseline is not None:
            base = f"{_fmt(r.baseline)} {r.baseline_unit or r.unit}"
            if r.baseline_name:
                base += f" ({r.baseline_name})"
        verdict = {True: "met", False: "**missed**", None: ""}[r.passed]
        cpu = "-" if r.cpu_us is None else f"{_fmt(r.cpu_us)} us"
        lines.append(f"| `{r.name}` | {_fmt(r.value)} {r.unit} | {base} | {_fmt(r.ratio)} | "
                     f"{_fmt_latency(r.latency).replace('/', ' / ')} | {cpu} | "
                     f"{r.target_text() or '-'} | {verdict} |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], results: list[Result], meta: dict[str, Any]) -> None:
    doc = {"results": [r.to_json() for r in results], "meta": meta}
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports on 127.0.0.1 that were free a moment ago (for child processes)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --- latency percentiles -----------------------------------------------------------------------

PERCENTILES = ("p50", "p99", "p99.9")
_FRACTIONS = {"p50": 0.50, "p99": 0.99, "p99.9": 0.999}


def percentiles(samples: Iterable[float], scale: float = 1.0) -> dict[str, float] | None:
    """``{"p50", "p99", "p99.9"}`` of ``samples`` times ``scale`` (None when empty).

    Nearest rank: the smallest sample with at least that fraction of all samples at or below
    it, so every percentile is a latency that was observed (no interpolation), and p99.9 of
    fewer than 1,000 samples is the maximum, as it should be.
    """
    xs = sorted(samples)
    if not xs:
        return None
    n = len(xs)
    return {k: xs[max(0, math.ceil(f * n) - 1)] * scale for k, f in _FRACTIONS.items()}


# --- CPU accounting ----------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (all its threads), from
    ``/proc/<pid>/stat``; None where there is no ``/proc`` or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def self_cpu_seconds() -> float:
    """User + system CPU seconds of this process, every thread (``getrusage``)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class CpuMeter:
    """CPU seconds spent by this process and the processes ``pids`` between ``start()`` and
    ``stop()``. ``/proc`` counts in clock ticks (10 ms), so measure windows of a second or
    more; ``seconds`` is None if a process could not be read (not Linux, or it exited)."""

    def __init__(self, pids: Iterable[int] = (), include_self: bool = True) -> None:
        self.pids = list(pids)
        self.include_self = include_self
        self._start: float | None = None
        self.seconds: float | None = None

    def _now(self) -> float | None:
        total = self_cpu_seconds() if self.include_self else 0.0
        for pid in self.pids:
            got = proc_cpu_seconds(pid)
            if got is None:
                return None
            total += got
        return total

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> float | None:
        end = self._now()
        self.seconds = None if end is None or self._start is None else end - self._start
        return self.seconds


def cpu_us_per_op(seconds: Iterable[float | None], ops: Iterable[int]) -> float | None:
    """Microseconds of CPU per operation over several windows (None if any is unknown)."""
    secs, n = list(seconds), sum(ops)
    if not secs or any(s is None for s in secs) or not n:
        return None
    return sum(s for s in secs if s is not None) / n * 1e6
