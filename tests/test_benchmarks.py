"""The benchmark harness must not rot: its arithmetic, one tiny point of each kind of scaling
curve, the thread hand-off baseline, and the plot (or the hint without matplotlib)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import scaling
from benchmarks._common import (
    CpuMeter,
    Result,
    Target,
    cpu_us_per_op,
    format_table,
    percentiles,
    proc_cpu_seconds,
)
from benchmarks.baseline import handoff_write_fdatasync_rate, open_fstat_seconds


def test_percentiles_nearest_rank() -> None:
    xs = [float(i) for i in range(1000, 0, -1)]  # 1..1000, unsorted
    assert percentiles(xs) == {"p50": 500.0, "p99": 990.0, "p99.9": 999.0}
    # Fewer samples than 1 / (1 - 0.999): p99.9 is the largest seen, never beyond it.
    assert percentiles([3.0, 1.0, 2.0], 1e3) == {"p50": 2000.0, "p99": 3000.0, "p99.9": 3000.0}
    assert percentiles([0.5]) == {"p50": 0.5, "p99": 0.5, "p99.9": 0.5}
    assert percentiles([]) is None


def test_cpu_accounting_sees_a_busy_child() -> None:
    # The child burns 0.3 s of its own CPU, says so, then waits: what the meter saw must be
    # that plus the interpreter's start-up, however loaded the machine is.
    burn = ("import sys, time\nwhile time.process_time() < 0.3: pass\n"
            "print('burnt', flush=True)\nsys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        meter = CpuMeter([child.pid], include_self=False)
        meter.start()
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        used = meter.stop()
    finally:
        child.kill()
        child.wait()
    assert used is not None and 0.25 <= used <= 1.0
    assert proc_cpu_seconds(child.pid) is None  # reaped: gone
    assert cpu_us_per_op([0.5, 0.5], [500, 500]) == pytest.approx(1000.0)
    assert cpu_us_per_op([0.5, None], [500, 500]) is None


def test_table_and_json_carry_percentiles_and_cpu() -> None:
    r = Result("x.seq", 100.0, "ops/s", baseline=400.0, latency={"p50": 1.0, "p99": 2.5,
               "p99.9": 7.0}, cpu_us=1500.0,
               target=Target(">=", 0.2, "ratio"), extra_targets=[Target("<", 1000, "cpu_us")])
    assert r.passed is False  # the ratio holds (0.25) but the CPU target does not
    table = format_table([r])
    assert "1.000/2.500/7.000" in table and "1,500 us" in table and "CPU/op < 1,000 us" in table
    doc = r.to_json()
    assert doc["latency_ms"] == {"p50": 1.0, "p99": 2.5, "p99.9": 7.0}
    assert doc["cpu_us_per_op"] == 1500.0


async def test_handoff_baseline_runs(tmp_path) -> None:
    rate, lat = await handoff_write_fdatasync_rate(tmp_path, 1024, 0.1)
    assert rate > 0 and len(lat) >= 1 and all(x > 0 for x in lat)
    assert not list(tmp_path.iterdir())  # cleans up its file


def test_tiny_tcp_scaling_point(tmp_path) -> None:
    # One point of the clients curve: three TLS servers, a client process, 0.3 s.
    curve = scaling.clients_curve(tmp_path, 0.3, 1, points=(2,))
    (p,) = curve.points
    assert p.x == 2 and p.rate > 0 and p.mbps == pytest.approx(p.rate * 100 / 1e6)
    assert p.p50_ms is not None and p.p99_ms is not None and 0 < p.p50_ms <= p.p99_ms
    assert p.cpu_us is not None and p.cpu_us > 0
    assert "puts in flight" in scaling.format_curves([curve])


def test_tcp_client_cycles_its_keys_or_writes_new_ones(tmp_path) -> None:
    # raft.tcp.append.large overwrites a bounded key set (the stores stop growing);
    # large.new_keys writes a new key every put. Checked by the leader's key count.
    import trio

    from benchmarks.bench_tcp import Cluster
    from tinyraftplus.client import Client, client_ssl_context

    async def keys(cl: Cluster) -> int:
        tls = client_ssl_context(cl.certs["ca"], cl.certs["cert-client"], cl.certs["key-client"])
        async with Client(cl.clients, tls=tls) as c:
            st = await c.status()  # the node the client talks to: the leader, which
            assert st["role"] == "leader"  # applied every put it acknowledged
            return int(st["keys"])

    with Cluster(tmp_path) as cl:
        run = cl.run_client(0.3, 2, 100, keys=3)
        assert run.count > 6 and trio.run(keys, cl) == 6  # w0-0..2, w1-0..2
        fresh = cl.run_client(0.3, 2, 100, keys=0)
        assert fresh.count > 0 and trio.run(keys, cl) >= 6 + fresh.count


@pytest.mark.parametrize("fsync", [False, True])
def test_put_floor_runs_its_four_processes(fsync: bool) -> None:
    from benchmarks.put_floor import measure

    rate, cpu = measure(0.3, fsync)
    assert rate > 10 and 0 < cpu < 1  # rounds/s; CPU seconds per round in all four


async def test_tiny_log_open_curve(tmp_path) -> None:
    curve = await scaling.log_open_curve(tmp_path, [1 << 20, 2 << 20], reps=1,
                                         segment=256 << 10)
    assert [p.x for p in curve.points] == [1 / 1024, 2 / 1024]
    assert all(p.rate > 0 and p.baseline is not None for p in curve.points)


def test_open_fstat_baseline_opens_the_files_under_subdirectories(tmp_path) -> None:
    # A log keeps its segments in a subdirectory; the baseline must open those, not only
    # the top level (it once opened one directory and called that the floor).
    sub = tmp_path / "log"
    sub.mkdir()
    for i in range(300):
        (sub / f"{i:05d}.seg").write_bytes(b"x")
    one = tmp_path / "one"
    one.mkdir()
    (one / "00000.seg").write_bytes(b"x")
    many = min(open_fstat_seconds(tmp_path) for _ in range(3))
    few = min(open_fstat_seconds(one) for _ in range(3))
    assert many > 20 * few


def test_log_sizes_follow_max_and_disk(tmp_path, monkeypatch) -> None:
    sizes, note = scaling.log_sizes(0.25, tmp_path)
    assert sizes == [1 << 24, 1 << 26, 1 << 28] and note == ""
    monkeypatch.setattr(scaling, "DISK_MARGIN", 1 << 62)  # as if the disk were full
    with pytest.raises(RuntimeError, match="max-log-gib"):
        scaling.log_sizes(1, tmp_path)


def _curves() -> list[scaling.Curve]:
    c = scaling.Curve("clients", "puts in flight", "puts/s", "n")
    c.points = [scaling.Point(1, 100.0, p99_ms=5.0), scaling.Point(16, 900.0, p99_ms=9.0)]
    o = scaling.Curve("log_open", "log size (GiB)", "open seconds", "n")
    o.points = [scaling.Point(1, 0.004, baseline=1e-4), scaling.Point(4, 0.004, baseline=2e-4)]
    return [c, o]


def test_plot_writes_a_file(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.svg"
    assert scaling.plot(_curves(), str(path)) is None
    assert path.read_text().lstrip().startswith("<?xml")


def test_plot_without_matplotlib_says_how(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "curves.png"
    hint = scaling.plot(_curves(), str(path))
    assert hint is not None and "pip install" in hint and not path.exists()
