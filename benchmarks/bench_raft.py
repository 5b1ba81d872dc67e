"""Raft figures: three nodes in one process on the in-memory network, each with its own durable
``FsLog`` (fsync on), beside the raw ``write`` + ``fdatasync`` loop measured in the same run.

The three logs share one disk, so every committed entry costs at least two ``fdatasync``s on
it (the leader's and a follower's, in parallel); the batch figure is also printed against the
raw batch baseline divided by three.
"""

from __future__ import annotations

import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.transport.memory import MemoryNetwork

from ._common import (
    SLICES,
    Context,
    CpuMeter,
    Result,
    Target,
    cpu_us_per_op,
    median,
    percentiles,
)
from .baseline import batch_write_fdatasync_rate, write_fdatasync_rate

TITLE = "Raft: 3 nodes, in-memory network, durable FsLogs"
ELECTION_TIMEOUT = 0.5
CONCURRENCY = 256
FAILOVER_LIMIT = 60 * ELECTION_TIMEOUT


async def _cluster(stack: AsyncExitStack, directory: Path, **opts: Any) -> list[RaftNode]:
    ids = [1, 2, 3]
    net = MemoryNetwork()
    await stack.enter_async_context(net)
    nodes = []
    for i in ids:
        node = RaftNode(
            i, ids, net.sender(i), FsLog(str(directory), f"n{i}"),
            election_timeout=ELECTION_TIMEOUT, ping_timeout=0.1, append_timeout=30,
            # A brand-new cluster: without it, a member that has not caught up yet votes for
            # nobody, and raft.failover can stop the leader before every member has.
            bootstrap=True, **opts,
        )
        net.attach(node)
        nodes.append(node)
    for node in nodes:
        await stack.enter_async_context(node)
    return nodes


async def _leader(nodes: list[RaftNode]) -> RaftNode:
    with trio.fail_after(20):
        while True:
            for n in nodes:
                if n.running and n.state == "leader":
                    await n.wait_leader(commit=True)
                    return n
            await trio.sleep(0.01)


async def _off_loop(fn: Any, *args: Any) -> float:
    """Run a raw baseline loop in a worker thread. Run on the event loop, it blocked the
    cluster's nodes for its whole slice (0.25-0.75 s, against a 0.5 s election timeout):
    a slow ``fdatasync`` in it then let the election timers run out, and the leader the
    figure appends through could lose its place mid-run. The loop's ``write`` and
    ``fdatasync`` release the GIL, so the idle nodes beside it cost it nothing."""
    return float(await trio.to_thread.run_sync(fn, *args))


async def _rate_seq(leader: RaftNode, duration: float, lat: list[float]) -> tuple[float, int]:
    data = os.urandom(1024)
    n = 0
    clock = time.perf_counter
    start = now = clock()
    end = start + duration
    while now < end:
        t0 = now
        await leader.append(data)
        now = clock()
        lat.append(now - t0)
        n += 1
    return n / (now - start), n


async def _rate_concurrent(leader: RaftNode, clients: int, duration: float,
                           lat: list[float]) -> tuple[float, int]:
    data = os.urandom(100)
    count = 0
    clock = time.perf_counter
    end = clock() + duration

    async def client() -> None:
        nonlocal count
        while clock() < end:
            t0 = clock()
            await leader.append(data)
            lat.append(clock() - t0)
            count += 1

    start = clock()
    async with trio.open_nursery() as n:
        for _ in range(clients):
            n.start_soon(client)
    return count / (clock() - start), count


async def _rate_batch(leader: RaftNode, batch: int, duration: float) -> float:
    items = [os.urandom(1024) for _ in range(batch)]
    n = 0
    start = trio.current_time()
    end = start + duration
    while trio.current_time() < end:
        await leader.append_batch(items)
        n += batch
    return n / (trio.current_time() - start)


async def _failover(directory: Path) -> float:
    async with AsyncExitStack() as stack:
        nodes = await _cluster(stack, directory)
        leader = await _leader(nodes)
        await leader.append(b"before")
        others = [n for n in nodes if n is not leader]
        t0 = trio.current_time()
        await leader.stop()
        # The clock starts when the leader dies; it stops when a new leader committed an append.
        # Bounded: a cluster that never recovers is an error of this figure, not a hung run.
        with trio.move_on_after(FAILOVER_LIMIT):
            while True:
                try:
                    new = await _leader(others)
                    with trio.fail_after(5 * ELECTION_TIMEOUT):
                        await new.append(b"after")
                    return trio.current_time() - t0
                except Exception:
                    continue
        states = ", ".join(f"node {n.node_id}: {n.state} at term {n.term}" for n in others)
        raise RuntimeError(f"raft.failover: no new leader committed an append within "
                           f"{FAILOVER_LIMIT:.0f} s after the leader stopped ({states})")


async def run(ctx: Context) -> list[Result]:
    names = ["raft.append.seq", "raft.append.concurrent", "raft.append_batch", "raft.failover"]
    if not ctx.wants_any(names):
        return []
    dur = ctx.duration
    reps = ctx.repeats
    batch = 1000
    out: list[Result] = []
    seq_rates, conc_rates, batch_rates, raws, raw_batches = [], [], [], [], []
    seq_lat: list[float] = []
    conc_lat: list[float] = []
    seq_cpu: list[float | None] = []
    conc_cpu: list[float | None] = []
    seq_ops: list[int] = []
    conc_ops: list[int] = []
    d = ctx.subdir("raft")
    async with AsyncExitStack() as stack:
        nodes = await _cluster(stack, d)
        leader = await _leader(nodes)
        for _ in range(reps):
            if ctx.wants("raft.append.seq"):
                # Interleaved with the raw loop in short slices, the order alternating, so
                # that both see the same shared disk (as log.append.seq does).
                t = dur / SLICES
                raw_sum = seq_sum = cpu_sum = 0.0
                ops = 0
                meter = CpuMeter()
                for k in range(SLICES):
                    for which in ((0, 1) if k % 2 == 0 else (1, 0)):
                        if which == 0:
                            raw_sum += await _off_loop(write_fdatasync_rate, d, 1024, t)
                            continue
                        meter.start()
                        rate, n = await _rate_seq(leader, t, seq_lat)
                        cpu_sum += meter.stop() or 0.0
                        seq_sum += rate
                        ops += n
                raws.append(raw_sum / SLICES)
                seq_cpu.append(cpu_sum)
                seq_rates.append(seq_sum / SLICES)
                seq_ops.append(ops)
            else:
                raws.append(await _off_loop(write_fdatasync_rate, d, 1024, dur / 2))
            if ctx.wants("raft.append.concurrent"):
                meter = CpuMeter()
                meter.start()
                rate, n = await _rate_concurrent(leader, CONCURRENCY, dur, conc_lat)
                conc_cpu.append(meter.stop())
                conc_rates.append(rate)
                conc_ops.append(n)
            if ctx.wants("raft.append_batch"):
                raw_batches.append(
                    await _off_loop(batch_write_fdatasync_rate, d, 1024, batch, dur / 2) / 1024)
                batch_rates.append(await _rate_batch(leader, batch, dur))
    ctx.remove(d)
    raw = median(raws)
    if seq_rates:
        out.append(Result(
            "raft.append.seq", median(seq_rates), "appends/s", baseline=raw,
            baseline_name="raw write+fdatasync 1 KiB", target=Target(">=", 0.4, "ratio"),
            samples=seq_rates, baseline_samples=raws,
            latency=percentiles(seq_lat, 1e3), cpu_us=cpu_us_per_op(seq_cpu, seq_ops),
            notes="one client awaiting each 1 KiB append on the leader",
        ))
    if conc_rates:
        ctx.baselines["raft.append.concurrent"] = median(conc_rates)
        out.append(Result(
            "raft.append.concurrent", median(conc_rates), "entries/s", baseline=raw,
            baseline_name="raw write+fdatasync 1 KiB",
            samples=conc_rates, baseline_samples=raws,
            latency=percentiles(conc_lat, 1e3), cpu_us=cpu_us_per_op(conc_cpu, conc_ops),
            notes=f"{CONCURRENCY} concurrent clients, 100 B entries, each awaited (committed "
                  "and applied); target: >= 3x PySyncObj's best (peer.pysyncobj.inproc)",
        ))
    if batch_rates:
        rb = median(raw_batches)
        out.append(Result(
            "raft.append_batch", median(batch_rates), "entries/s", baseline=rb / 3,
            baseline_name="raw batch loop (1 KiB records, 1 fdatasync per 1,000) / 3 logs",
            target=Target(">=", 100_000), samples=batch_rates, baseline_samples=raw_batches,
            notes="batches of 1,000 x 1 KiB; three logs share one disk, hence the baseline / 3",
        ))
    if ctx.wants("raft.failover"):
        times = []
        for _ in range(max(3, reps)):
            fd = ctx.subdir("failover")
            times.append(await _failover(fd))
            ctx.remove(fd)
        out.append(Result(
            "raft.failover", median(times), "s", baseline=ELECTION_TIMEOUT,
            baseline_name="election_timeout", target=Target("<=", 3.0, "ratio"), samples=times,
            notes="leader stopped -> a new leader committed an append",
        ))
    return out
