"""Figures of the durable log (``FsLog``), each beside a raw baseline from the same run.

* ``log.append.seq``: one appender, 1 KiB records, each awaited (durable), vs the raw
  ``write`` + ``fdatasync`` loop of 1 KiB; ``log.append.seq.vs_handoff``, the same rate
  over a plain Python thread hand-off (``baseline.handoff_write_fdatasync_rate``); and
  ``log.append.seq.vs_prealloc``, over the raw loop writing into a file grown ahead of it
  (``baseline.prealloc_write_fdatasync_rate``), as the log writes its tail.
* ``log.append.concurrent``: 256 appenders, 100 B records, each awaited; and
  ``log.append.concurrent.vs_seq``, the same rate over ``log.append.seq`` (group commit).
* ``log.append_batch``: batches of 1,000 x 1 KiB, each durable, MB/s vs a raw loop writing
  the same bytes with one ``fdatasync`` per batch.
* ``log.iter``: iterate 1,000,000 x 100 B records, vs reading the same files raw.
* ``log.open``: open a log holding 1 GiB in sealed segments, vs opening and ``fstat``-ing its
  files.
* ``log.rss``: peak RSS of a child appending 1 GiB in durable batches, vs the same child
  appending nothing.

Baselines are measured interleaved with the figure (baseline, figure, baseline, ...) and the
medians reported, because the machine is shared. Run ``python -m benchmarks.bench_log
rss-child DIR BYTES`` to get the RSS child by hand.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio

from . import baseline as raw
from ._common import (
    SLICES,
    Context,
    CpuMeter,
    Result,
    Target,
    child_env,
    cpu_us_per_op,
    median,
    peak_rss_of,
    percentiles,
    print_peak_rss,
)

TITLE = "durable log (FsLog)"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def _fslog():  # type: ignore[no-untyped-def]
    # Imported lazily so that ``--only raft`` works while the log is broken, and so that the
    # import error names the missing C extension rather than failing at harness start.
    from tinyraftplus.log import FsLog

    return FsLog


async def _seq_rate(log, record: bytes, duration: float,  # type: ignore[no-untyped-def]
                    latencies: list[float] | None = None) -> float:
    """One appender awaiting each append; appends each latency (s) to ``latencies``."""
    n = 0
    clock = time.perf_counter
    lat = latencies if latencies is not None else []
    start = now = clock()
    end = start + duration
    while now < end:
        t0 = now
        await log.append(record)
        now = clock()
        lat.append(now - t0)
        n += 1
    return n / (now - start)


async def _concurrent_rate(log, record: bytes, tasks: int,  # type: ignore[no-untyped-def]
                           duration: float, latencies: list[float] | None = None,
                           ) -> tuple[float, int]:
    """``tasks`` appenders for ``duration``; returns (appends/s, appends)."""
    done = 0
    stop = False
    clock = time.perf_counter
    lat = latencies if latencies is not None else []

    async def appender() -> None:
        nonlocal done
        while not stop:
            t0 = clock()
            await log.append(record)
            lat.append(clock() - t0)
            done += 1

    start = clock()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(appender)
        await trio.sleep(duration)
        stop = True
    # Every started append is awaited to completion, so all ``done`` records are durable.
    return done / (clock() - start), done


async def _batch_rate(log, items: list[bytes], duration: float) -> float:  # type: ignore[no-untyped-def]
    size = sum(map(len, items))
    n = 0
    start = time.perf_counter()
    end = start + duration
    while True:
        await log.append_batch(items)
        n += 1
        now = time.perf_counter()
        if now >= end:
            return n * size / (now - start)


async def _fill(directory: Path, name: str, record: bytes, count: int, segment_size: int) -> None:
    """Write ``count`` copies of ``record`` quickly (no fsync per batch; one at close)."""
    FsLog = _fslog()
    per_batch = 10_000
    items = [record] * per_batch
    async with FsLog(str(directory), name, segment_size=segment_size, fsync=False) as log:
        left = count
        while left:
            k = min(left, per_batch)
            await log.append_batch(items if k == per_batch else items[:k])
            left -= k
    # Flush now so that writeback of the fill does not land inside the measurements.
    for path in _files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


async def bench_append_seq(ctx: Context) -> list[Result]:
    FsLog = _fslog()
    d = ctx.subdir("append-seq")
    record = os.urandom(KiB)
    logs, raws, handoffs, preallocs = [], [], [], []
    lat: list[float] = []
    cpu: list[float | None] = []
    ops: list[int] = []
    async with FsLog(str(d), "seq") as log:
        for _ in range(ctx.repeats):
            # The three are interleaved in short slices (the order rotating) so that each
            # sees the same disk: on a shared machine the raw loop's rate moved 10x between
            # consecutive 1.5 s windows, which made the ratios of back-to-back windows noise.
            counts, times = [0, 0, 0, 0], [0.0, 0.0, 0.0, 0.0]
            meter = CpuMeter()
            before = len(lat)
            log_cpu = 0.0
            for k in range(SLICES):
                for which in ((k + j) % 4 for j in range(4)):
                    t = ctx.duration / SLICES
                    if which == 0:
                        rate = raw.write_fdatasync_rate(d, KiB, t)
                    elif which == 1:
                        rate, _ = await raw.handoff_write_fdatasync_rate(d, KiB, t)
                    elif which == 3:
                        rate = raw.prealloc_write_fdatasync_rate(d, KiB, t)
                    else:
                        meter.start()
                        rate = await _seq_rate(log, record, t, lat)
                        log_cpu += meter.stop() or 0.0
                    counts[which] += round(rate * t)
                    times[which] += t
            raws.append(counts[0] / times[0])
            handoffs.append(counts[1] / times[1])
            logs.append(counts[2] / times[2])
            preallocs.append(counts[3] / times[3])
            cpu.append(log_cpu)
            ops.append(len(lat) - before)
    ctx.remove(d)
    ctx.baselines["raw.fdatasync.1KiB"] = median(raws)
    ctx.baselines["raw.handoff.1KiB"] = median(handoffs)
    ctx.baselines["log.append.seq"] = median(logs)
    latency = percentiles(lat, 1e3)
    cpu_us = cpu_us_per_op(cpu, ops)
    return [
        Result(
            "log.append.seq", median(logs), "records/s",
            baseline=median(raws), baseline_name="raw write+fdatasync 1 KiB",
            target=Target(">=", 0.8, "ratio"),
            notes="1 KiB records, one appender, each awaited (durable)",
            samples=logs, baseline_samples=raws, latency=latency, cpu_us=cpu_us,
        ),
        Result(
            "log.append.seq.vs_handoff", median(logs), "records/s",
            baseline=median(handoffs), baseline_name="thread hand-off write+fdatasync 1 KiB",
            target=Target(">=", 1.0, "ratio"),
            notes="second baseline: a Python worker thread doing write+fdatasync, the Trio "
                  "caller waiting on an eventfd; the log should be at or above it",
            samples=logs, baseline_samples=handoffs, latency=latency, cpu_us=cpu_us,
        ),
        Result(
            "log.append.seq.vs_prealloc", median(logs), "records/s",
            baseline=median(preallocs),
            baseline_name="raw pwrite+fdatasync 1 KiB into a file grown ahead",
            notes="third baseline: the raw loop writing as the log does, into a file grown "
                  "ahead of the writes, so no fdatasync makes a new size durable (the plain "
                  "loop's extra cost, which the log avoids)",
            samples=logs, baseline_samples=preallocs, latency=latency, cpu_us=cpu_us,
        ),
    ]


async def bench_append_concurrent(ctx: Context) -> list[Result]:
    FsLog = _fslog()
    d = ctx.subdir("append-concurrent")
    record = os.urandom(100)
    tasks = 256
    logs, raws = [], []
    lat: list[float] = []
    cpu: list[float | None] = []
    ops: list[int] = []
    async with FsLog(str(d), "conc") as log:
        for _ in range(ctx.repeats):
            raws.append(raw.write_fdatasync_rate(d, 100, ctx.duration))
            meter = CpuMeter()
            meter.start()
            rate, n = await _concurrent_rate(log, record, tasks, ctx.duration, lat)
            cpu.append(meter.stop())
            logs.append(rate)
            ops.append(n)
    seq = ctx.baselines.get("log.append.seq")
    seq_note = "log.append.seq from this run"
    if seq is None:
        # Asked for alone (``--only log.append.concurrent``): measure the single appender here.
        async with FsLog(str(d), "seq") as log:
            seq = median([await _seq_rate(log, os.urandom(KiB), ctx.duration)
                          for _ in range(ctx.repeats)])
        seq_note = "log.append.seq measured for this row"
    ctx.remove(d)
    value = median(logs)
    latency = percentiles(lat, 1e3)
    cpu_us = cpu_us_per_op(cpu, ops)
    return [
        Result(
            "log.append.concurrent", value, "records/s",
            baseline=median(raws), baseline_name="raw write+fdatasync 100 B",
            target=Target(">=", 100_000),
            # Each appender has one record in flight, so no group commit can beat this.
            notes=f"{tasks} appenders, 100 B records, each awaited (durable); ceiling "
            f"{tasks} x raw fdatasync rate = {tasks * median(raws):,.0f}/s",
            samples=logs, baseline_samples=raws, latency=latency, cpu_us=cpu_us,
        ),
        Result(
            "log.append.concurrent.vs_seq", value, "records/s",
            baseline=seq, baseline_name="log.append.seq",
            target=Target(">=", 20, "ratio"),
            notes=f"group commit gain; {seq_note}",
        ),
    ]


async def bench_append_batch(ctx: Context) -> list[Result]:
    FsLog = _fslog()
    d = ctx.subdir("append-batch")
    items = [os.urandom(KiB) for _ in range(1000)]
    logs, raws = [], []
    async with FsLog(str(d), "batch") as log:
        for _ in range(ctx.repeats):
            raws.append(raw.batch_write_fdatasync_rate(d, KiB, 1000, ctx.duration) / 1e6)
            logs.append(await _batch_rate(log, items, ctx.duration) / 1e6)
    ctx.remove(d)
    return [
        Result(
            "log.append_batch", median(logs), "MB/s",
            baseline=median(raws), baseline_name="raw 1 MiB write+fdatasync",
            target=Target(">=", 0.6, "ratio"),
            notes="batches of 1,000 x 1 KiB, each durable; payload bytes",
            samples=logs, baseline_samples=raws,
        )
    ]


async def bench_iter(ctx: Context) -> list[Result]:
    FsLog = _fslog()
    d = ctx.subdir("iter")
    count = 200_000 if ctx.quick else 1_000_000
    await _fill(d, "iter", os.urandom(100), count, 64 * MiB)
    files = _files(d)
    total_bytes = sum(p.stat().st_size for p in files)
    logs, raws = [], []
    async with FsLog(str(d), "iter") as log:
        for _ in range(max(3, ctx.repeats // 2)):
            raws.append(raw.sequential_read_rate(files) * count / total_bytes)
            n = 0
            start = time.perf_counter()
            async for _entry in log.iter(0):
                n += 1
            elapsed = time.perf_counter() - start
            if n != count:
                raise RuntimeError(f"log.iter returned {n} records, expected {count}")
            logs.append(n / elapsed)
    ctx.remove(d)
    return [
        Result(
            "log.iter", median(logs), "records/s",
            baseline=median(raws), baseline_name="raw read of the log's files",
            target=Target(">=", 500_000),
            notes=f"{count:,} x 100 B records, warm page cache",
            samples=logs, baseline_samples=raws,
        )
    ]


async def bench_open(ctx: Context) -> list[Result]:
    FsLog = _fslog()
    d = ctx.subdir("open")
    total = 64 * MiB if ctx.quick else GiB
    segment = 4 * MiB if ctx.quick else 64 * MiB
    await _fill(d, "open", os.urandom(KiB), total // KiB, segment)
    opens, raws = [], []
    segments = 0
    for _ in range(max(3, ctx.repeats)):
        raws.append(raw.open_fstat_seconds(d))
        log = FsLog(str(d), "open", segment_size=segment)
        start = time.perf_counter()
        await log.open()
        opens.append(time.perf_counter() - start)
        if log.seq != total // KiB - 1:
            raise RuntimeError(f"reopened log has seq {log.seq}, expected {total // KiB - 1}")
        await log.close()
    segments = sum(1 for p in _files(d) if p.stat().st_size >= segment // 2)
    ctx.remove(d)
    size = "64 MiB (--quick; target is for 1 GiB)" if ctx.quick else "1 GiB"
    return [
        Result(
            "log.open", median(opens), "s",
            baseline=median(raws), baseline_name="open+fstat of its files",
            target=Target("<=", 0.2),
            notes=f"{size} of 1 KiB records, {segments} full segments, warm page cache",
            samples=opens, baseline_samples=raws,
        )
    ]


async def bench_rss(ctx: Context) -> list[Result]:
    d = ctx.subdir("rss")
    total = 128 * MiB if ctx.quick else GiB
    argv = [sys.executable, "-m", "benchmarks.bench_log", "rss-child"]
    (d / "idle").mkdir()
    (d / "full").mkdir()
    idle, _ = peak_rss_of([*argv, str(d / "idle"), "0"], env=child_env())
    peak, out = peak_rss_of([*argv, str(d / "full"), str(total)], env=child_env())
    ctx.remove(d)
    size = "128 MiB (--quick; target is for 1 GiB)" if ctx.quick else "1 GiB"
    return [
        Result(
            "log.rss", peak / 1e6, "MB",
            baseline=idle / 1e6, baseline_name="same child appending nothing",
            target=Target("<", 200),
            notes=f"peak RSS of a child appending {size} in durable 1,000 x 1 KiB batches; "
            f"{out.strip()}",
        )
    ]


async def _rss_child(directory: str, total: int) -> None:
    FsLog = _fslog()
    items = [os.urandom(KiB) for _ in range(1000)]
    per_batch = len(items) * KiB
    start = time.perf_counter()
    async with FsLog(directory, "rss") as log:
        written = 0
        while written < total:
            await log.append_batch(items)
            written += per_batch
    elapsed = time.perf_counter() - start
    if total:
        print(f"{written / MiB:.0f} MiB in {elapsed:.1f}s")
    print_peak_rss()


FIGURES = [
    ("log.append.seq", bench_append_seq),
    ("log.append.concurrent", bench_append_concurrent),
    ("log.append_batch", bench_append_batch),
    ("log.iter", bench_iter),
    ("log.open", bench_open),
    ("log.rss", bench_rss),
]


async def run(ctx: Context) -> list[Result]:
    results: list[Result] = []
    for name, fn in FIGURES:
        if ctx.wants(name):
            try:
                results.extend(await fn(ctx))
            except Exception as exc:
                ctx.record_error(name, exc)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "rss-child":
        trio.run(_rss_child, sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m benchmarks.bench_log rss-child DIR BYTES")
