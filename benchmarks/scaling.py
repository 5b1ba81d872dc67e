"""``python -m benchmarks.append_throughput --scaling [--plot PATH] [--max-log-gib N]``

How cost grows, as curves rather than single figures:

* ``clients``: puts/s, p50/p99 and CPU per put against puts in flight (1, 16, 256, 4,096) from
  one client process, 100 B values, 3 server processes over TCP with mutual TLS, fsync on.
* ``payload``: the same cluster at 64 puts in flight against the value size (100 B, 4 KiB,
  64 KiB), in puts/s and MB/s of values.
* ``nodes``: 256 puts of 100 B in flight against the cluster size (3, 5 and 7 server
  processes, all on this machine, so more nodes also means more processes per core).
* ``log_open``: ``FsLog`` open time against the log's size (1, 4 and 16 GiB of 1 KiB records
  in 64 MiB segments, as far as ``--max-log-gib`` and the free disk allow), beside opening
  and ``fstat``-ing its files. It should stay flat: open reads the tail segment and the
  sealed segments' index headers, not their records.

``--plot PATH`` draws the four curves with matplotlib (``pip install -e '.[bench]'``); without
matplotlib the curves are still measured and printed, and the run says how to get the plot.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._common import Context, _fmt, cpu_us_per_op, median, percentiles
from .baseline import open_fstat_seconds

CLIENTS = (1, 16, 256, 4096)
PAYLOADS = (100, 4 << 10, 64 << 10)
PAYLOAD_CONCURRENCY = 64
NODES = (3, 5, 7)
NODES_CONCURRENCY = 256
LOG_GIB = (1, 4, 16)
LOG_RECORD = 1 << 10
LOG_SEGMENT = 64 << 20
GiB = 1 << 30
DISK_MARGIN = 4 * GiB
"""Free space the log-open curve leaves on the disk, so as not to starve other work."""


@dataclass
class Point:
    """One point of a curve: ``x`` and what was measured there (medians over repetitions;
    latency percentiles over every operation of every repetition)."""

    x: float
    rate: float
    """Operations per second (for ``log_open``: seconds to open)."""
    mbps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us: float | None = None
    baseline: float | None = None
    samples: list[float] = field(default_factory=list)


@dataclass
class Curve:
    name: str
    x_label: str
    y_label: str
    notes: str
    points: list[Point] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "x_label": self.x_label, "y_label": self.y_label,
                "notes": self.notes, "points": [asdict(p) for p in self.points]}


# --- TCP curves --------------------------------------------------------------------------------


def tcp_point(cluster: Any, seconds: float, reps: int, concurrency: int, size: int,
              keys: int | None = None) -> Point:
    """``reps`` client runs of ``concurrency`` puts of ``size`` bytes on ``cluster`` (a
    ``bench_tcp.Cluster`` that is running), each worker cycling through ``keys`` keys
    (default ``bench_tcp.KEYS``)."""
    from .bench_tcp import KEYS
    rates: list[float] = []
    counts: list[int] = []
    cpu: list[float | None] = []
    lat: list[float] = []
    for _ in range(reps):
        got = cluster.run_client(seconds, concurrency, size, KEYS if keys is None else keys)
        rates.append(got.rate)
        counts.append(got.count)
        cpu.append(got.cpu_seconds)
        lat.extend(got.latencies)
    pct = percentiles(lat, 1e3) or {}
    rate = median(rates)
    return Point(x=concurrency, rate=rate, mbps=rate * size / 1e6, p50_ms=pct.get("p50"),
                 p99_ms=pct.get("p99"), cpu_us=cpu_us_per_op(cpu, counts), samples=rates)


def clients_curve(directory: Path, seconds: float, reps: int,
                  points: Sequence[int] = CLIENTS) -> Curve:
    from .bench_tcp import Cluster

    curve = Curve("clients", "puts in flight (one client process)", "puts/s",
                  "3 server processes, mutual TLS, fsync on; 100 B values")
    with Cluster(directory) as cl:
        for c in points:
            p = tcp_point(cl, seconds, reps, c, 100)
            curve.points.append(p)
            _progress(curve, p)
    return curve


def payload_curve(directory: Path, seconds: float, reps: int,
                  sizes: Sequence[int] = PAYLOADS) -> Curve:
    from .bench_tcp import LARGE_KEYS, Cluster

    curve = Curve("payload", "value size (bytes)", "puts/s",
                  f"3 server processes, mutual TLS, fsync on; {PAYLOAD_CONCURRENCY} puts in "
                  f"flight over {PAYLOAD_CONCURRENCY * LARGE_KEYS:,} keys (overwritten: the "
                  "stores stop growing, as in raft.tcp.append.large)")
    with Cluster(directory) as cl:
        for size in sizes:
            p = tcp_point(cl, seconds, reps, PAYLOAD_CONCURRENCY, size, LARGE_KEYS)
            p.x = size
            curve.points.append(p)
            _progress(curve, p)
    return curve


def nodes_curve(directory: Path, seconds: float, reps: int,
                sizes: Sequence[int] = NODES) -> Curve:
    from .bench_tcp import Cluster

    curve = Curve("nodes", "cluster size (server processes)", "puts/s",
                  f"mutual TLS, fsync on; {NODES_CONCURRENCY} puts of 100 B in flight; every "
                  "node on this machine")
    for n in sizes:
        d = directory / f"nodes-{n}"
        d.mkdir()
        try:
            with Cluster(d, n) as cl:
                p = tcp_point(cl, seconds, reps, NODES_CONCURRENCY, 100)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        p.x = n
        curve.points.append(p)
        _progress(curve, p)
    return curve


# --- log open time against log size ------------------------------------------------------------


def log_sizes(max_gib: float, directory: Path) -> tuple[list[int], str]:
    """The log sizes (bytes) to measure: ``LOG_GIB`` up to ``max_gib`` and to what the disk
    under ``directory`` can spare; below 1 GiB, ``max_gib`` / 16, / 4 and itself."""
    allowed = shutil.disk_usage(directory).free - DISK_MARGIN
    cap = min(max_gib * GiB, allowed)
    note = ""
    if allowed < max_gib * GiB:
        note = f"; capped at {allowed / GiB:.1f} GiB by the free disk space"
    if max_gib >= 1:
        sizes = [int(g * GiB) for g in LOG_GIB if g * GiB <= cap]
    else:
        sizes = [int(max_gib * GiB / k) for k in (16, 4, 1) if max_gib * GiB / k <= cap]
    if not sizes:
        raise RuntimeError(f"no room for the log-open curve under {directory}: "
                           f"{allowed / GiB:.1f} GiB free beyond a {DISK_MARGIN / GiB:.0f} GiB "
                           "margin; pass --dir on a bigger disk or a smaller --max-log-gib")
    return sizes, note


async def log_open_curve(directory: Path, sizes: Sequence[int], reps: int = 3,
                         record: int = LOG_RECORD, segment: int = LOG_SEGMENT) -> Curve:
    """Grow one log through ``sizes`` (bytes of records, ascending) and time its open at each:
    the median of ``reps`` opens of a closed log, beside open+fstat of its files."""
    from tinyraftplus.log import FsLog

    curve = Curve("log_open", "log size (GiB)", "open seconds",
                  f"{record} B records in {segment >> 20} MiB segments; page cache warm as "
                  "far as it holds the log")
    data = os.urandom(record)
    per_batch = max(1, (4 << 20) // record)
    items = [data] * per_batch
    written = 0
    for size in sizes:
        target = size // record
        async with FsLog(str(directory), "open", segment_size=segment, fsync=False) as log:
            while written < target:
                k = min(per_batch, target - written)
                await log.append_batch(items if k == per_batch else items[:k])
                written += k
        _sync_files(directory)  # let writeback of the fill finish before the clock runs
        opens, raws = [], []
        for _ in range(reps):
            raws.append(open_fstat_seconds(directory))
            log = FsLog(str(directory), "open", segment_size=segment)
            t0 = time.perf_counter()
            await log.open()
            opens.append(time.perf_counter() - t0)
            if log.seq != written - 1:
                raise RuntimeError(f"reopened log has seq {log.seq}, expected {written - 1}")
            await log.close()
        p = Point(x=size / GiB, rate=median(opens), baseline=median(raws), samples=opens)
        curve.points.append(p)
        _progress(curve, p)
    return curve


def _sync_files(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# --- the run, the table, the plot --------------------------------------------------------------


def _progress(curve: Curve, p: Point) -> None:
    import sys

    print(f"  {curve.name} {p.x:g}: {_fmt(p.rate)} {curve.y_label}", file=sys.stderr,
          flush=True)


async def run_scaling(ctx: Context, max_log_gib: float) -> list[Curve]:
    """Every curve, in the order of the module docstring; a curve that fails is recorded in
    ``ctx.errors`` and the others still run."""
    seconds = max(ctx.duration, 1.0)
    reps = 1 if ctx.quick else min(ctx.repeats, 3)
    curves: list[Curve] = []
    steps: list[tuple[str, Any]] = [
        ("clients", lambda d: clients_curve(d, seconds, reps)),
        ("payload", lambda d: payload_curve(d, seconds, reps)),
        ("nodes", lambda d: nodes_curve(d, seconds, reps)),
    ]
    for name, fn in steps:
        if not ctx.wants(name):
            continue
        d = ctx.subdir(f"scaling-{name}")
        try:
            curves.append(fn(d))
        except Exception as exc:
            ctx.record_error(f"scaling {name}", exc)
        finally:
            ctx.remove(d)
    if ctx.wants("log_open"):
        d = ctx.subdir("scaling-log-open")
        try:
            sizes, note = log_sizes(max_log_gib, d)
            curve = await log_open_curve(d, sizes)
            curve.notes += note
            curves.append(curve)
        except Exception as exc:
            ctx.record_error("scaling log_open", exc)
        finally:
            ctx.remove(d)
    return curves


def format_curves(curves: Sequence[Curve]) -> str:
    """One small table per curve."""
    out: list[str] = []
    for c in curves:
        out.append(f"{c.name}: {c.y_label} against {c.x_label} ({c.notes})")
        if c.name == "log_open":
            header = ("GiB", "open s", "open+fstat s", "")
            rows = [(_fmt(p.x), _fmt(p.rate), _fmt(p.baseline), "") for p in c.points]
        else:
            header = (c.x_label.split(" (")[0], "puts/s", "MB/s", "p50/p99 ms  CPU/put")
            rows = [(f"{p.x:,.0f}", _fmt(p.rate), _fmt(p.mbps),
                     f"{_fmt(p.p50_ms)}/{_fmt(p.p99_ms)}  "
                     f"{'-' if p.cpu_us is None else _fmt(p.cpu_us) + ' us'}")
                    for p in c.points]
        table = [header, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for r in table:
            out.append("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
        out.append("")
    return "\n".join(out).rstrip()


PLOT_HINT = ("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]'); "
             "the curves above were measured anyway")


def plot(curves: Sequence[Curve], path: str) -> str | None:
    """Draw ``curves`` to ``path`` (SVG, PNG, ... by its extension). Returns None when
    written, or a sentence saying why not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return PLOT_HINT
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = {c.name: c for c in curves}
    for ax, name in zip(axes.flat, ("clients", "payload", "nodes", "log_open"), strict=True):
        c = panels.get(name)
        if c is None or not c.points:
            ax.set_visible(False)
            continue
        xs = [p.x for p in c.points]
        if name == "log_open":
            ax.plot(xs, [p.rate * 1e3 for p in c.points], "o-", label="FsLog open")
            ax.plot(xs, [(p.baseline or 0) * 1e3 for p in c.points], "s--",
                    label="open+fstat of its files")
            ax.set_ylabel("ms")
            ax.set_ylim(bottom=0)
            ax.legend(loc="upper left", fontsize=8)
        else:
            y = [p.mbps for p in c.points] if name == "payload" else [p.rate for p in c.points]
            ax.plot(xs, y, "o-", color="tab:blue")
            ax.set_ylabel("MB/s of values" if name == "payload" else "puts/s",
                          color="tab:blue")
            ax.set_ylim(bottom=0)
            ax2 = ax.twinx()
            ax2.plot(xs, [p.p99_ms for p in c.points], "s--", color="tab:red")
            ax2.set_ylabel("p99 latency (ms)", color="tab:red")
            ax2.set_ylim(bottom=0)
            if name != "nodes":
                ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:,.0f}" if x >= 1 else f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(c.x_label)
        ax.set_title(f"{c.name}: {c.notes}", fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle("tinyraftplus scaling (python -m benchmarks.append_throughput --scaling)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
