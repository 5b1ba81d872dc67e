"""Over real sockets: ``python -m tinyraftplus.server`` processes on loopback (three unless
asked otherwise) with mutual TLS on both ports and fsync on, and one client process doing
``put`` of a value to a key, each awaited until committed and applied.

* ``raft.tcp.append.seq``: one put in flight (100 B), beside the raw ``write`` + ``fdatasync``
  loop of 100 B measured in the same run; CPU per put in all processes.
* ``raft.tcp.append.concurrent``: 256 puts of 100 B in flight, the same baseline.
* ``raft.tcp.append.large``: 64 puts of 64 KiB in flight over 1,024 keys (``LARGE_KEYS``), in
  MB/s of values, beside a raw 64 KiB ``write`` + ``fdatasync`` loop in MB/s;
  ``raft.tcp.append.large.new_keys``: the same with a new key every put, so that each adds a
  value to every store (no target: it shows what a growing state machine costs).

Every row carries the put latency percentiles (from the client) and CPU microseconds per
committed put, summed over the servers (``/proc/<pid>/stat``) and the client (``getrusage``)
over the client's measuring window. The PySyncObj comparison is ``benchmarks.bench_peer``.

Also runnable alone: ``python -m benchmarks.bench_tcp`` (these figures, no harness), and
``python -m benchmarks.bench_tcp client ADDR,... CA CERT KEY SECONDS CONCURRENCY SIZE KEYS
PIDS LATFILE`` (the client process; ``- - -`` for CA CERT KEY: plaintext; prints ``RATE``,
``COUNT`` and ``CPU`` lines and writes each put's latency in seconds to ``LATFILE`` as native
doubles).
"""

from __future__ import annotations

import array
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ._common import (
    Context,
    Result,
    Target,
    child_env,
    cpu_us_per_op,
    free_ports,
    median,
    percentiles,
)
from .baseline import parallel_write_fdatasync_rate, write_fdatasync_rate
from .peer_pysyncobj import WINDOW_MAX, WINDOW_ROUNDS

TITLE = "Raft over TCP: 3 server processes, mutual TLS, fsync on"
CONCURRENCY = 256
SIZE = 100
LARGE_SIZE = 64 << 10
LARGE_CONCURRENCY = 64
KEYS = 1024
"""Keys each client worker cycles through (the 100 B figures; 0: a new key every put)."""
LARGE_KEYS = 16
"""Keys per worker for ``raft.tcp.append.large``: 1,024 keys of 64 KiB in all, so after the
first round every put overwrites a value and the servers' memory stops growing. With a new
key every put, each adds a 64 KiB value to every replica's store, and the fresh pages cost
more CPU than the replication (on the dev VM zeroing them was 30% of all CPU samples): that
is ``raft.tcp.append.large.new_keys``."""
READY = re.compile(r"tinyraftplus-server ready id=(\S+) peer=\S+ client=(\S+):(\d+)")


def _certs(directory: Path, ids: list[int]) -> dict[str, str]:
    import trustme  # a test dependency; the harness records an error without it

    ca = trustme.CA()
    out = {"ca": str(directory / "ca.pem")}
    ca.cert_pem.write_to_path(out["ca"])
    for name, san in [(str(i), f"node-{i}.tinyraftplus") for i in ids] + [
            ("client", "client.tinyraftplus")]:
        cert = ca.issue_cert(san)
        out[f"cert-{name}"] = str(directory / f"{name}.crt")
        out[f"key-{name}"] = str(directory / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(out[f"cert-{name}"])
        cert.private_key_pem.write_to_path(out[f"key-{name}"])
    return out


@dataclass
class ClientRun:
    """What one client process measured over its window."""

    rate: float
    """Committed puts per second."""
    count: int
    cpu_seconds: float | None
    """CPU of the client and every server process over the window (None if unreadable)."""
    latencies: list[float]
    """Seconds, one per put completed in the window."""


class Cluster:
    """``nodes`` server processes on loopback, mutual TLS, fsync on (both switchable, to see
    what each costs: ``tls=False`` runs the servers and the client ``--plaintext``)."""

    def __init__(self, directory: Path, nodes: int = 3, *, fsync: bool = True,
                 tls: bool = True) -> None:
        self.dir = directory
        self.ids = list(range(1, nodes + 1))
        self.certs = _certs(directory, self.ids)
        self.fsync = fsync
        self.tls = tls
        ports = free_ports(nodes)
        self.peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip(self.ids, ports,
                                                                    strict=True))
        self.procs: list[subprocess.Popen] = []
        self.clients: list[str] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> None:
        outs = []
        for i in self.ids:
            out = self.dir / f"out-{i}.txt"
            err = open(self.dir / f"err-{i}.txt", "wb")  # noqa: SIM115 (the child owns it)
            outs.append(out)
            with open(out, "wb") as o:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tinyraftplus.server", "--id", str(i),
                     "--peers", self.peers, "--client-port", "0",
                     "--data", str(self.dir / f"data-{i}"), "--election-timeout", "1.0",
                     *(["--tls-ca", self.certs["ca"], "--tls-cert", self.certs[f"cert-{i}"],
                        "--tls-key", self.certs[f"key-{i}"]] if self.tls else ["--plaintext"]),
                     "--log-level", "WARNING", *([] if self.fsync else ["--no-fsync"])],
                    stdout=o, stderr=err, stdin=subprocess.DEVNULL, env=child_env()))
            err.close()
        deadline = time.monotonic() + 60
        for k, (i, out) in enumerate(zip(self.ids, outs, strict=True)):
            while True:
                m = READY.search(out.read_text())
                if m:
                    self.clients.append(f"{m.group(2)}:{m.group(3)}")
                    break
                if self.procs[k].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server {i} did not start:\n"
                                       f"{(self.dir / f'err-{i}.txt').read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_client(self, seconds: float, concurrency: int = CONCURRENCY,
                   size: int = SIZE, keys: int = KEYS) -> ClientRun:
        """One client process keeping ``concurrency`` puts of ``size`` bytes in flight for
        ``seconds`` (after a short warm-up), each worker cycling through ``keys`` keys."""
        latfile = self.dir / "latencies.bin"
        tls = [self.certs["ca"], self.certs["cert-client"], self.certs["key-client"]]
        argv = [sys.executable, "-m", "benchmarks.bench_tcp", "client", ",".join(self.clients),
                *(tls if self.tls else ["-", "-", "-"]),
                str(seconds), str(concurrency), str(size), str(keys),
                ",".join(map(str, self.pids)), str(latfile)]
        p = subprocess.run(argv, capture_output=True, text=True, env=child_env(),
                           timeout=max(seconds, WINDOW_MAX) + 120)
        rate = re.search(r"^RATE (\S+)", p.stdout, re.M)
        count = re.search(r"^COUNT (\d+)", p.stdout, re.M)
        cpu = re.search(r"^CPU (\S+)", p.stdout, re.M)
        if p.returncode != 0 or not rate or not count or not cpu:
            raise RuntimeError(f"benchmark client failed ({p.returncode}):\n{p.stderr[-3000:]}")
        lat = array.array("d")
        with open(latfile, "rb") as f:
            lat.frombytes(f.read())
        latfile.unlink()
        return ClientRun(float(rate.group(1)), int(count.group(1)),
                         None if cpu.group(1) == "none" else float(cpu.group(1)), lat.tolist())


@dataclass
class Series:
    """Repetitions of one client shape: rates, and everything pooled for the row."""

    rates: list[float]
    counts: list[int]
    cpu: list[float | None]
    latencies: list[float]

    @classmethod
    def empty(cls) -> Series:
        return cls([], [], [], [])

    def add(self, run: ClientRun) -> None:
        self.rates.append(run.rate)
        self.counts.append(run.count)
        self.cpu.append(run.cpu_seconds)
        self.latencies.extend(run.latencies)

    @property
    def latency_ms(self) -> dict[str, float] | None:
        return percentiles(self.latencies, 1e3)

    @property
    def cpu_us(self) -> float | None:
        return cpu_us_per_op(self.cpu, self.counts)


async def run(ctx: Context) -> list[Result]:
    names = ["raft.tcp.append.seq", "raft.tcp.append.concurrent", "raft.tcp.append.large",
             "raft.tcp.append.large.vs_disk_share", "raft.tcp.append.large.new_keys"]
    if not ctx.wants_any(names):
        return []
    out: list[Result] = []
    dur = max(ctx.duration, 1.0)
    reps = min(ctx.repeats, 2) if ctx.quick else ctx.repeats
    seq, conc, large, fresh = Series.empty(), Series.empty(), Series.empty(), Series.empty()
    raws: list[float] = []
    raws_large: list[float] = []
    raws_fresh: list[float] = []
    shares_large: list[float] = []
    # The 64 KiB figures run after the 100 B ones, each on a cluster of its own: sharing
    # one, the 100 B figures fell rep by rep once large runs had gone before them
    # (raft.tcp.append.concurrent 25,486 -> 14,712 puts/s; alone 16,079-18,124; the cause
    # was not found), and with a new key every put the stores grow by about 200 MB a run
    # (there the raw 64 KiB loop itself fell from 259 to 10 MB/s over the repetitions).
    dirs = [ctx.subdir(f"tcp-{k}") for k in ("small", "large", "new-keys")]
    try:
        if ctx.wants_any(["raft.tcp.append.seq", "raft.tcp.append.concurrent"]):
            with Cluster(dirs[0]) as cl:
                for _ in range(reps):
                    raws.append(write_fdatasync_rate(dirs[0], SIZE, dur / 2))
                    if ctx.wants("raft.tcp.append.seq"):
                        seq.add(cl.run_client(dur, 1, SIZE))
                    if ctx.wants("raft.tcp.append.concurrent"):
                        conc.add(cl.run_client(dur, CONCURRENCY, SIZE))
            ctx.remove(dirs[0])  # each cluster's files go as soon as it stops
        if ctx.wants("raft.tcp.append.large"):
            with Cluster(dirs[1]) as cl:
                for _ in range(reps):
                    raws_large.append(write_fdatasync_rate(dirs[1], LARGE_SIZE, dur / 2)
                                      * LARGE_SIZE / 1e6)
                    # Three replicas on this one disk each write every value: what one
                    # of three parallel raw loops gets is the most each can write.
                    shares_large.append(parallel_write_fdatasync_rate(
                        dirs[1], LARGE_SIZE, 3, dur / 2) * LARGE_SIZE / 1e6)
                    large.add(cl.run_client(dur, LARGE_CONCURRENCY, LARGE_SIZE, LARGE_KEYS))
            ctx.remove(dirs[1])
        if ctx.wants("raft.tcp.append.large.new_keys"):
            with Cluster(dirs[2]) as cl:
                for _ in range(reps):
                    raws_fresh.append(write_fdatasync_rate(dirs[2], LARGE_SIZE, dur / 2)
                                      * LARGE_SIZE / 1e6)
                    fresh.add(cl.run_client(dur, LARGE_CONCURRENCY, LARGE_SIZE, 0))
    finally:
        for d in dirs:
            ctx.remove(d)
    shape = "3 server processes + 1 client process on loopback, mutual TLS, fsync on"
    if seq.rates:
        out.append(Result(
            "raft.tcp.append.seq", median(seq.rates), "writes/s", baseline=median(raws),
            baseline_name="raw write+fdatasync 100 B", target=Target(">=", 0.2, "ratio"),
            extra_targets=[Target("<", 1000, "cpu_us")],
            samples=seq.rates, baseline_samples=raws,
            latency=seq.latency_ms, cpu_us=seq.cpu_us,
            notes=f"{shape}; one put of {SIZE} B in flight",
        ))
    if conc.rates:
        ctx.baselines["raft.tcp.append.concurrent"] = median(conc.rates)
        out.append(Result(
            "raft.tcp.append.concurrent", median(conc.rates), "writes/s",
            baseline=median(raws), baseline_name="raw write+fdatasync 100 B",
            samples=conc.rates, baseline_samples=raws,
            latency=conc.latency_ms, cpu_us=conc.cpu_us,
            notes=f"{shape}; {CONCURRENCY} concurrent puts of {SIZE} B, each committed and "
                  "applied; target: >= 2x PySyncObj's best (peer.pysyncobj.concurrent)",
        ))
    if large.rates:
        mbs = [r * LARGE_SIZE / 1e6 for r in large.rates]
        out.append(Result(
            "raft.tcp.append.large", median(mbs), "MB/s",
            baseline=median(raws_large), baseline_name="raw write+fdatasync 64 KiB",
            target=Target(">=", 0.5, "ratio"), samples=mbs, baseline_samples=raws_large,
            latency=large.latency_ms, cpu_us=large.cpu_us,
            notes=f"{shape}; {LARGE_CONCURRENCY} concurrent puts of 64 KiB values over "
                  f"{LARGE_CONCURRENCY * LARGE_KEYS:,} keys ({median(large.rates):,.0f} "
                  "puts/s); CPU per put",
        ))
        out.append(Result(
            "raft.tcp.append.large.vs_disk_share", median(mbs), "MB/s",
            baseline=median(shares_large),
            baseline_name="one of 3 raw write+fdatasync 64 KiB loops run at once",
            samples=mbs, baseline_samples=shares_large,
            notes="second baseline: the 3 replicas share one disk here, and each writes every "
                  "value; the ratio is against each one's share of it",
        ))
    if fresh.rates:
        mbs = [r * LARGE_SIZE / 1e6 for r in fresh.rates]
        out.append(Result(
            "raft.tcp.append.large.new_keys", median(mbs), "MB/s",
            baseline=median(raws_fresh), baseline_name="raw write+fdatasync 64 KiB",
            samples=mbs, baseline_samples=raws_fresh,
            latency=fresh.latency_ms, cpu_us=fresh.cpu_us,
            notes="as raft.tcp.append.large with a new key every put: each adds a 64 KiB "
                  "value to every replica's store "
                  f"({median(fresh.rates):,.0f} puts/s); no target",
        ))
    return out


# --- the client process ----------------------------------------------------------------------


def _client_main(argv: list[str]) -> None:
    import trio

    from tinyraftplus.client import Client, client_ssl_context

    from ._common import CpuMeter

    addrs, ca, cert, key, seconds, conc, size, nkeys, pids, latfile = argv
    duration, concurrency, nbytes, keys = float(seconds), int(conc), int(size), int(nkeys)
    value = os.urandom(nbytes)
    run = os.urandom(6).hex().encode()
    server_pids = [int(p) for p in pids.split(",") if p]
    lat = array.array("d")

    async def main() -> None:
        tls = None if ca == "-" else client_ssl_context(ca, cert, key)
        inflight = max(1024, min(4096, concurrency))
        async with Client(addrs.split(","), tls=tls, plaintext=tls is None, timeout=60.0,
                          max_inflight=inflight) as c:
            count = 0
            completed = 0
            measuring = False
            stop_at = 0.0
            clock = time.perf_counter

            async def worker(w: int) -> None:
                nonlocal count, completed
                n = 0
                while True:
                    # A bounded key set per worker (keys=0: a new key every put, unique
                    # to this client process, so the servers' stores grow).
                    key = b"w%d-%d" % (w, n % keys) if keys else b"%s-w%d-%d" % (run, w, n)
                    t0 = clock()
                    await c.put(key, value)
                    if measuring:
                        lat.append(clock() - t0)
                        count += 1
                    n += 1
                    completed += 1
                    if stop_at and trio.current_time() >= stop_at:
                        return

            async with trio.open_nursery() as nursery:
                for w in range(concurrency):
                    nursery.start_soon(worker, w)
                # Warm up (connections, leader, caches) until one whole round of puts came
                # back, and a little more, so that the window sees the steady state.
                # As for PySyncObj (peer_pysyncobj), the window lasts at least three rounds.
                started = trio.current_time()
                with trio.move_on_after(60):
                    while completed < concurrency:
                        await trio.sleep(0.02)
                window = min(max(duration, WINDOW_ROUNDS * (trio.current_time() - started)),
                             WINDOW_MAX)
                await trio.sleep(min(1.0, duration / 2))
                meter = CpuMeter(server_pids)
                meter.start()
                measuring = True
                t0 = trio.current_time()
                stop_at = t0 + window
                await trio.sleep(window)
                measuring = False
                elapsed = trio.current_time() - t0
                cpu = meter.stop()
                with open(latfile, "wb") as f:
                    lat.tofile(f)
                print(f"RATE {count / elapsed:.1f}", flush=True)
                print(f"COUNT {count}", flush=True)
                print(f"CPU {'none' if cpu is None else f'{cpu:.4f}'}", flush=True)
                nursery.cancel_scope.cancel()

    trio.run(main)


def _standalone() -> None:
    import tempfile

    import trio

    from ._common import format_table

    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(tmpdir=Path(tmp), repeats=3, duration=2.0)
        print(format_table(trio.run(run, ctx)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        _client_main(sys.argv[2:])
    else:
        _standalone()
