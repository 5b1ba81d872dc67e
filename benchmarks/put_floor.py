"""What one put's message pattern costs with nothing else done: the floor under
``raft.tcp.append.seq``.

Four Trio processes on loopback, connected by ``FastStream`` with mutual TLS as the server's
are: a client sends 100 B to a "leader", which sends 100 B to each of two "followers"; each
answers 20 B; on the first answer the leader answers the client, which sends the next. Six
messages a round, as a put with one in flight has. With ``--fsync`` the leader and each
follower also ``write`` + ``fdatasync`` the 100 B on its own file (the leader after sending,
as a Raft leader does), inline. No log format, no Raft, no key-value store: the CPU per round
and the rate are what any implementation with a Trio process per node pays before its own
work. Printed beside the raw ``write`` + ``fdatasync`` loop of the same run.

``python -m benchmarks.put_floor [--seconds S] [--runs N]`` (both modes, alternating).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from tinyraftplus.transport.faststream import FastStream
from tinyraftplus.transport.tls import TlsConfig, node_dns_name

from ._common import child_env, median, proc_cpu_seconds
from .baseline import write_fdatasync_rate
from .bench_tcp import _certs

REQUEST, ANSWER = 100, 20


def _tls(d: str) -> TlsConfig:
    """Every process presents node 1's certificate (made by ``bench_tcp``'s helper) with the
    contexts the server builds, so the handshake and ciphers are the server's."""
    return TlsConfig.from_files(f"{d}/ca.pem", f"{d}/1.crt", f"{d}/1.key")


async def _read(stream: FastStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        buf += await stream.receive_some()
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _accept(listener: socket.socket, d: str) -> FastStream:
    await trio.lowlevel.wait_readable(listener)
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = FastStream(sock, _tls(d).server_context, server_side=True)
    await stream.do_handshake()
    return stream


async def _connect(port: int, d: str) -> FastStream:
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    await trio.lowlevel.wait_writable(sock)
    stream = FastStream(sock, _tls(d).client_context, server_hostname=node_dns_name(1))
    await stream.do_handshake()
    return stream


def _sync_file(d: str, fsync: bool) -> int | None:
    if not fsync:
        return None
    return os.open(f"{d}/data-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _persist(fd: int | None, data: bytes) -> None:
    if fd is not None:
        os.write(fd, data)
        os.fdatasync(fd)


async def _follower(d: str, port: int, fsync: bool) -> None:
    stream = await _connect(port, d)
    fd, buf = _sync_file(d, fsync), bytearray()
    while True:
        _persist(fd, await _read(stream, REQUEST, buf))
        await stream.send_all(b"a" * ANSWER)


async def _leader(d: str, followers_fd: int, clients_fd: int, fsync: bool) -> None:
    to_followers = socket.socket(fileno=followers_fd)
    to_clients = socket.socket(fileno=clients_fd)
    followers = [await _accept(to_followers, d) for _ in range(2)]
    client = await _accept(to_clients, d)
    fd, buf = _sync_file(d, fsync), bytearray()
    left, done = 0, trio.Event()

    async def answers(stream: FastStream) -> None:
        nonlocal left
        b = bytearray()
        while True:
            await _read(stream, ANSWER, b)
            left -= 1
            if left == 1:  # the first of two: a majority with the leader
                done.set()

    async with trio.open_nursery() as nursery:
        for f in followers:
            nursery.start_soon(answers, f)
        while True:
            request = await _read(client, REQUEST, buf)
            left, done = 2, trio.Event()
            for f in followers:
                if not f.try_send(request):
                    await f.flush()
            _persist(fd, request)
            await done.wait()
            await client.send_all(b"r" * ANSWER)


async def _client(d: str, port: int, seconds: float, pids: list[int]) -> None:
    stream = await _connect(port, d)
    buf = bytearray()
    for _ in range(200):  # warm up
        await stream.send_all(b"q" * REQUEST)
        await _read(stream, ANSWER, buf)

    def cpu() -> float:
        return sum(proc_cpu_seconds(p) or 0.0 for p in pids)

    c0, t0, n = cpu(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        await stream.send_all(b"q" * REQUEST)
        await _read(stream, ANSWER, buf)
        n += 1
    elapsed, used = time.perf_counter() - t0, cpu() - c0
    print(f"ROUNDS {n / elapsed:.1f} CPU {used / n:.9f}", flush=True)


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.setblocking(False)
    return s


def measure(seconds: float, fsync: bool) -> tuple[float, float]:
    """(rounds per second, CPU seconds per round in all four processes)."""
    me = [sys.executable, "-m", "benchmarks.put_floor"]
    mode = ["--fsync"] if fsync else []
    with tempfile.TemporaryDirectory() as d:
        _certs(Path(d), [1])
        lf, lc = _listener(), _listener()
        procs = [subprocess.Popen(
            [*me, "leader", d, str(lf.fileno()), str(lc.fileno()), *mode],
            pass_fds=[lf.fileno(), lc.fileno()], env=child_env(),
            stderr=subprocess.DEVNULL)]  # killed at the end, mid-read: no traceback wanted
        try:
            procs += [subprocess.Popen([*me, "follower", d, str(lf.getsockname()[1]), *mode],
                                       env=child_env(), stderr=subprocess.DEVNULL)
                      for _ in range(2)]
            out = subprocess.run(
                [*me, "client", d, str(lc.getsockname()[1]), str(seconds),
                 ",".join(str(p.pid) for p in procs)],
                capture_output=True, text=True, env=child_env(), timeout=seconds + 60)
        finally:
            for p in procs:
                p.kill()
                p.wait()
            lf.close()
            lc.close()
        words = out.stdout.split()
        if out.returncode != 0 or len(words) != 4:
            raise RuntimeError(f"floor client failed:\n{out.stderr[-2000:]}")
        return float(words[1]), float(words[3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    raws = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            raws.append(write_fdatasync_rate(Path(d), REQUEST, 1.0))
        for fsync in (False, True):
            results[fsync].append(measure(args.seconds, fsync))
    raw = median(raws)
    print(f"raw write+fdatasync {REQUEST} B: {raw:,.0f}/s (median of {args.runs})")
    for fsync, runs in results.items():
        rate = median(r for r, _ in runs)
        cpu = median(c for _, c in runs)
        what = "with fdatasync on leader and followers" if fsync else "messages only"
        print(f"put floor, {what}: {rate:,.0f} rounds/s ({rate / raw:.3f} of raw), "
              f"{cpu * 1e6:,.0f} us CPU per round in 4 processes (medians of "
              f"{', '.join(f'{r:,.0f}' for r, _ in runs)})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("leader", "follower", "client"):
        role, d, *rest = sys.argv[1:]
        fsync = "--fsync" in rest
        rest = [a for a in rest if a != "--fsync"]
        if role == "leader":
            trio.run(_leader, d, int(rest[0]), int(rest[1]), fsync)
        elif role == "follower":
            trio.run(_follower, d, int(rest[0]), fsync)
        else:
            trio.run(_client, d, int(rest[0]), float(rest[1]),
                     [int(p) for p in rest[2].split(",")] + [os.getpid()])
    else:
        main()
