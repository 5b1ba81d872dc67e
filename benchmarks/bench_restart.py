"""``kv.restart``: how long a key-value server whose log holds 1M entries behind a snapshot
takes from process start to ready, beside the time to load its snapshot in the same run.

The data directory is made in this process, through the server's own ``Server`` class (one
node, plaintext, fsync off, so filling takes seconds, not minutes): N puts of distinct keys
in batches of 1,000, the log keeping every entry (``trailing_entries`` > N, so it really
holds N entries), then ``await node.snapshot()``: N entries, all behind the snapshot. Then,
``repeats`` times, alternating the two:

* **restart**: ``python -m tinyraftplus.server`` on that directory (mutual TLS, fsync on,
  the default options), timed from ``Popen`` to its ready line, which it prints once the
  snapshot is restored, the log opened and the node running. The time until it has also
  elected itself and applied the log's end (status ``apply_seq``) is in the notes.
* **baseline**: a fresh ``python`` that reads the snapshot's data and loads it into a
  ``KVStore`` (``SnapshotStore.open_data`` + ``KVStore.restore``), timed from ``Popen`` to
  exit: the least any restart must pay to have the state in memory (interpreter, msgpack,
  the read, a million keys made). The raw read of the file (page cache) is in the notes.

Ratio restart / baseline: what everything else costs (imports of the server, TLS, the log's
open, the node's start), target <= 3. A restart that replayed the log instead would add the
replay of N entries (its figure, for scale: ``--snapshot-entries 0``, not measured here).
``--quick``: 100,000 entries. Also runnable alone: ``python -m benchmarks.bench_restart
[--quick]``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import trio

from ._common import Context, Result, Target, child_env, free_ports, median

TITLE = "KV server restart behind a snapshot"
FULL = 1_000_000
QUICK = 100_000
BATCH = 1000
READY = re.compile(r"tinyraftplus-server ready id=(\S+) peer=\S+ client=(\S+):(\d+)")


async def fill(directory: Path, n: int, peer_port: int) -> int:
    """``n`` puts of distinct keys through an in-process one-node server, then a snapshot.
    Returns the snapshot's seq (the log's last)."""
    from tinyraftplus.kv.server import Server, ServerConfig
    from tinyraftplus.kv.store import encode_register, encode_write

    cfg = ServerConfig(node_id=1, peers={1: ("127.0.0.1", peer_port)},
                       data_dir=str(directory), client_listen=("127.0.0.1", 0),
                       plaintext=True, fsync=False, bootstrap=True, election_timeout=0.2,
                       ping_timeout=0.04, snapshot_entries=0, trailing_entries=n + 1000)
    server = Server(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        node = server.node
        assert node is not None
        await node.wait_leader(commit=True)
        sid = (await node.append(encode_register("bench"))).result[1]
        for lo in range(0, n, BATCH):
            await node.append_batch([
                encode_write(sid, i + 1, i + 1, "put", b"key%08d" % i, b"value-%08d" % i,
                             "bench") for i in range(lo, min(n, lo + BATCH))])
        meta = await node.snapshot()
        nursery.cancel_scope.cancel()
    return int(meta.seq)


def certs(directory: Path) -> list[str]:
    """Server TLS options for node 1 (a CA, its certificate and key)."""
    import trustme  # a test dependency, as in bench_tcp

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert = ca.issue_cert("node-1.tinyraftplus")
    cert.cert_chain_pems[0].write_to_path(str(directory / "node.crt"))
    cert.private_key_pem.write_to_path(str(directory / "node.key"))
    return ["--tls-ca", str(directory / "ca.pem"), "--tls-cert", str(directory / "node.crt"),
            "--tls-key", str(directory / "node.key")]


async def restart_once(directory: Path, tls: list[str], peer_port: int,
                       last: int) -> tuple[float, float]:
    """Start the server on ``directory``; (seconds to its ready line, seconds until it has
    applied through ``last``, polled through its client port); then stop it (SIGTERM)."""
    from tinyraftplus.kv.client import Client, client_ssl_context

    argv = [sys.executable, "-m", "tinyraftplus.server", "--id", "1", "--peers",
            f"1=127.0.0.1:{peer_port}", "--client-port", "0", "--data", str(directory / "data"),
            "--election-timeout", "0.2", "--log-level", "WARNING", *tls]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline)
        ready = time.perf_counter() - t0
        m = READY.search(line)
        if not m:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise RuntimeError(f"the server did not start: {line!r}\n{err[-3000:]}")
        addr = (m.group(2), int(m.group(3)))
        ctx = client_ssl_context(tls[1], tls[3], tls[5])
        async with Client([addr], tls=ctx, timeout=30) as c:
            with trio.fail_after(120):
                while (await c.status(addr))["apply_seq"] < last:
                    await trio.sleep(0.002)
        caught_up = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.terminate()
        await trio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
    return ready, caught_up


_LOAD = """
import sys
from tinyraftplus.kv.store import KVStore
from tinyraftplus.snapshot import SnapshotStore
store = SnapshotStore(sys.argv[1], "raft")
store.open()
meta = store.latest()
kv = KVStore()
with store.open_data(meta) as f:
    kv.restore(meta, f)
print(len(kv.data), meta.size)
"""


def load_once(directory: Path) -> tuple[float, int, int]:
    """A fresh process loads the newest snapshot into a KVStore: (seconds, keys, bytes)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _LOAD, str(directory / "data")], env=child_env(),
                       capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"loading the snapshot failed:\n{p.stderr[-3000:]}")
    keys, size = map(int, p.stdout.split())
    return took, keys, size


def read_file_seconds(directory: Path) -> float:
    """Seconds to read the newest snapshot file whole, in 1 MiB pieces (page cache)."""
    snap_dir = directory / "data" / "raft.snap"
    newest = max((p for p in snap_dir.iterdir() if p.is_file()), key=lambda p: p.name)
    t0 = time.perf_counter()
    with open(newest, "rb") as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - t0


async def run(ctx: Context) -> list[Result]:
    if not ctx.wants("kv.restart"):
        return []
    n = QUICK if ctx.quick else FULL
    d = ctx.subdir("kv-restart")
    try:
        (port,) = free_ports(1)
        t0 = time.perf_counter()
        last = await fill(d / "data", n, port)
        filled = time.perf_counter() - t0
        tls = certs(d)
        reps = 3 if ctx.quick else min(5, ctx.repeats)
        ready: list[float] = []
        caught: list[float] = []
        loads: list[float] = []
        reads: list[float] = []
        keys = size = 0
        for _ in range(reps):
            r, cu = await restart_once(d, tls, port, last)
            ready.append(r)
            caught.append(cu)
            took, keys, size = await trio.to_thread.run_sync(load_once, d)
            loads.append(took)
            reads.append(read_file_seconds(d))
    finally:
        ctx.remove(d)
    return [Result(
        "kv.restart", median(ready), "s", baseline=median(loads),
        baseline_name="a fresh process loading the snapshot into a KVStore",
        target=Target("<=", 3.0, "ratio"), samples=ready, baseline_samples=loads,
        notes=f"one node, mutual TLS, fsync on; its log holds {n:,} entries, all behind a "
              f"snapshot of {keys:,} keys ({size / 1e6:.1f} MB); until a status through "
              f"its client port says everything is applied: {median(caught):.2f} s; "
              f"reading the snapshot file alone: "
              f"{median(reads) * 1e3:.0f} ms; filling took {filled:.1f} s",
    )]


def main() -> None:  # pragma: no cover - a manual entry point
    import argparse
    import shutil
    import tempfile

    from ._common import format_table

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_restart")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tinyraftplus-restart-"))
    try:
        ctx = Context(tmpdir=tmp, quick=a.quick, repeats=3)
        print(format_table(trio.run(run, ctx)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    main()
