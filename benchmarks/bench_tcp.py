"""Over real sockets: three ``python -m tinyraftplus.server`` processes on loopback with mutual
TLS on both ports and fsync on, and one client process keeping 256 requests of 100 bytes in
flight (``put`` of a 100-byte value to a fresh key, each awaited until committed and applied).

``raft.tcp.append.concurrent`` is committed writes per second, beside the raw ``write`` +
``fdatasync`` loop (100 B records) measured in the same run, between the repetitions. With
``pysyncobj`` installed, ``peer.pysyncobj.concurrent`` runs the same shape on PySyncObj (see
``benchmarks/peer_pysyncobj.py``) and prints our ratio to it.

Also runnable alone: ``python -m benchmarks.bench_tcp`` (the figure, no harness), and
``python -m benchmarks.bench_tcp client ADDR,ADDR,ADDR CA CERT KEY SECONDS CONCURRENCY SIZE``
(the client process; prints ``RATE <writes/s>``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ._common import Context, Result, Target, child_env, free_ports, median
from .baseline import write_fdatasync_rate

TITLE = "Raft over TCP: 3 server processes, mutual TLS, fsync on"
CONCURRENCY = 256
SIZE = 100
READY = re.compile(r"tinyraftplus-server ready id=(\S+) peer=\S+ client=(\S+):(\d+)")


def _certs(directory: Path) -> dict[str, str]:
    import trustme  # a test dependency; the harness records an error without it

    ca = trustme.CA()
    out = {"ca": str(directory / "ca.pem")}
    ca.cert_pem.write_to_path(out["ca"])
    for name, san in [(str(i), f"node-{i}.tinyraftplus") for i in (1, 2, 3)] + [
            ("client", "client.tinyraftplus")]:
        cert = ca.issue_cert(san)
        out[f"cert-{name}"] = str(directory / f"{name}.crt")
        out[f"key-{name}"] = str(directory / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(out[f"cert-{name}"])
        cert.private_key_pem.write_to_path(out[f"key-{name}"])
    return out


class _Cluster:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.certs = _certs(directory)
        ports = free_ports(3)
        self.peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip((1, 2, 3), ports,
                                                                    strict=True))
        self.procs: list[subprocess.Popen] = []
        self.clients: list[str] = []

    def start(self) -> None:
        outs = []
        for i in (1, 2, 3):
            out = self.dir / f"out-{i}.txt"
            err = open(self.dir / f"err-{i}.txt", "wb")  # noqa: SIM115 (the child owns it)
            outs.append(out)
            with open(out, "wb") as o:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tinyraftplus.server", "--id", str(i),
                     "--peers", self.peers, "--client-port", "0",
                     "--data", str(self.dir / f"data-{i}"), "--election-timeout", "1.0",
                     "--tls-ca", self.certs["ca"], "--tls-cert", self.certs[f"cert-{i}"],
                     "--tls-key", self.certs[f"key-{i}"], "--log-level", "WARNING"],
                    stdout=o, stderr=err, stdin=subprocess.DEVNULL, env=child_env()))
            err.close()
        deadline = time.monotonic() + 60
        for i, out in zip((1, 2, 3), outs, strict=True):
            while True:
                m = READY.search(out.read_text())
                if m:
                    self.clients.append(f"{m.group(2)}:{m.group(3)}")
                    break
                if self.procs[i - 1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server {i} did not start:\n"
                                       f"{(self.dir / f'err-{i}.txt').read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()

    def run_client(self, seconds: float) -> float:
        argv = [sys.executable, "-m", "benchmarks.bench_tcp", "client", ",".join(self.clients),
                self.certs["ca"], self.certs["cert-client"], self.certs["key-client"],
                str(seconds), str(CONCURRENCY), str(SIZE)]
        p = subprocess.run(argv, capture_output=True, text=True, env=child_env(),
                           timeout=seconds + 120)
        m = re.search(r"^RATE (\S+)", p.stdout, re.M)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"benchmark client failed ({p.returncode}):\n{p.stderr[-3000:]}")
        return float(m.group(1))


async def run(ctx: Context) -> list[Result]:
    names = ["raft.tcp.append.concurrent", "peer.pysyncobj.concurrent"]
    if not ctx.wants_any(names):
        return []
    out: list[Result] = []
    dur = max(ctx.duration, 1.0)
    rates: list[float] = []
    raws: list[float] = []
    if ctx.wants("raft.tcp.append.concurrent"):
        d = ctx.subdir("tcp")
        cl = _Cluster(d)
        try:
            cl.start()
            for _ in range(ctx.repeats):
                raws.append(write_fdatasync_rate(d, SIZE, dur / 2))
                rates.append(cl.run_client(dur))
        finally:
            cl.stop()
            ctx.remove(d)
        out.append(Result(
            "raft.tcp.append.concurrent", median(rates), "writes/s", baseline=median(raws),
            baseline_name="raw write+fdatasync 100 B", target=Target(">=", 20_000),
            samples=rates, baseline_samples=raws,
            notes=f"3 server processes + 1 client process on loopback, mutual TLS, fsync on; "
                  f"{CONCURRENCY} concurrent puts of {SIZE} B, each committed and applied",
        ))
    if ctx.wants("peer.pysyncobj.concurrent"):
        try:
            import pysyncobj  # noqa: F401
        except ImportError:
            print("(peer.pysyncobj.concurrent skipped: pip install pysyncobj)", file=sys.stderr)
            return out
        from .peer_pysyncobj import measure

        peer_rates = []
        for _ in range(ctx.repeats):
            d = ctx.subdir("pysyncobj")
            try:
                peer_rates.append(measure(d, dur, CONCURRENCY, SIZE))
            finally:
                ctx.remove(d)
        ours = median(rates) if rates else None
        theirs = median(peer_rates)
        out.append(Result(
            "peer.pysyncobj.concurrent", theirs, "writes/s",
            baseline=ours, baseline_name="ours: raft.tcp.append.concurrent",
            ratio=(ours / theirs) if ours and theirs else None,
            target=Target(">=", 1.0, "ratio"), samples=peer_rates,
            notes="PySyncObj 3 processes on loopback, same size and concurrency; no TLS, and "
                  "its journal is never fsynced (in-memory log). ratio = ours / theirs",
        ))
    return out


# --- the client process ----------------------------------------------------------------------


def _client_main(argv: list[str]) -> None:
    import trio

    from tinyraftplus.client import Client, client_ssl_context

    addrs, ca, cert, key, seconds, conc, size = argv
    duration, concurrency, nbytes = float(seconds), int(conc), int(size)
    value = os.urandom(nbytes)

    async def main() -> None:
        ctx = client_ssl_context(ca, cert, key)
        async with Client(addrs.split(","), tls=ctx, timeout=30.0) as c:
            count = 0
            measuring = False
            stop_at = 0.0

            async def worker(w: int) -> None:
                nonlocal count
                n = 0
                while True:
                    await c.put(b"w%d-%d" % (w, n), value)
                    n += 1
                    if measuring:
                        count += 1
                    if stop_at and trio.current_time() >= stop_at:
                        return

            async with trio.open_nursery() as nursery:
                for w in range(concurrency):
                    nursery.start_soon(worker, w)
                await trio.sleep(min(1.0, duration / 2))  # warm up: connections, leader
                measuring = True
                t0 = trio.current_time()
                stop_at = t0 + duration
                await trio.sleep(duration)
                measuring = False
                elapsed = trio.current_time() - t0
                print(f"RATE {count / elapsed:.1f}", flush=True)
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
