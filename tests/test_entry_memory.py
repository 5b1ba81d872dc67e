"""Memory that holds entry payloads is bounded in bytes, not only in entries.

With 64 KiB values a node used to keep about 1 GiB alive: the core's cache of recent
entries was bounded at 8,192 entries, and the results remembered for late forwarded answers
kept their 16,384 entries, payloads and all. Each new entry then took fresh memory from the
kernel (page faults and zeroing were 9% of a 3-node cluster's CPU in
``raft.tcp.append.large``; issue 13)."""

from __future__ import annotations

import gc
import tracemalloc

import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.raft.core import RaftConfig
from tinyraftplus.raft.testing import Cluster

KIB = 1024


def test_core_cache_of_recent_entries_is_bounded_in_bytes() -> None:
    cfg = RaftConfig(rpc_max_bytes=64 * KIB, max_inflight=2)  # cache: 256 KiB, trimmed at 512
    bound = 2 * cfg.rpc_max_bytes * cfg.max_inflight
    c = Cluster([1, 2, 3], seed=3, config=cfg)
    leader = c.wait_leader()
    lagging = next(i for i in c.ids if i != leader)
    c.partition([i for i in c.ids if i != lagging], [lagging])
    payloads = [bytes([k % 251]) * (16 * KIB) for k in range(200)]  # 3.2 MiB in all
    for p in payloads:
        c.propose([p], at=leader)
        c.stabilize()
    for i, core in c.cores.items():
        log = core._log
        cached = log.mem[:log.stable + 1 - log.mem_start]
        held = sum(len(e.data) for e in cached)
        assert held == log.cached_bytes, (i, held, log.cached_bytes)
        assert held <= 2 * bound, f"node {i} caches {held} bytes of entries (bound {bound})"
        assert len(cached) < 200 or i == lagging
    # The follower that missed them all catches up: what left the cache is read from storage.
    c.heal()
    c.run_until(lambda: c.cores[lagging].commit_seq == c.cores[leader].commit_seq)
    c.stabilize()
    c.check_log_matching()
    assert [d for d in c.data(lagging) if d] == payloads
    assert c.cores[lagging]._log.cached_bytes <= 2 * bound
    assert not c.violations, c.violations


async def test_node_keeps_no_payloads_of_applied_entries(tmp_path) -> None:
    """3,000 appends of 64 KiB (188 MiB) through a one-node cluster without a state
    machine: what stays allocated afterwards is the core's byte-bounded cache (at most
    32 MiB by default), not the payloads of every entry whose result it remembers."""
    n, size = 3000, 64 * KIB
    async with RaftNode(1, [1], lambda to, msg: None, FsLog(str(tmp_path), "a", fsync=False),
                        bootstrap=True) as node:
        await node.wait_leader(commit=True)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for k in range(n):
                await node.append(k.to_bytes(4, "big") * (size // 4))  # a new object each
            await trio.sleep(0)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert node.apply_seq >= n
    assert held < 40 << 20, f"{held / 2**20:.0f} MiB still allocated after {n} x 64 KiB appends"
