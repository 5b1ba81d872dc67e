"""The ``kv.restart`` benchmark must not rot: its pieces, on a small log."""

from __future__ import annotations

from benchmarks import bench_restart
from benchmarks._common import free_ports


async def test_kv_restart_pieces_run(tmp_path) -> None:
    (port,) = free_ports(1)
    last = await bench_restart.fill(tmp_path / "data", 3000, port)
    assert last >= 3000
    tls = bench_restart.certs(tmp_path)
    ready, caught_up = await bench_restart.restart_once(tmp_path, tls, port, last)
    assert 0 < ready <= caught_up
    took, keys, size = bench_restart.load_once(tmp_path)
    assert took > 0 and keys == 3000 and size > 3000 * 20
    assert bench_restart.read_file_seconds(tmp_path) >= 0
