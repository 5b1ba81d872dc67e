"""Virtual time and a faulty network for the simulator.

:class:`EventQueue` is the whole notion of time: a heap of ``(time, n, callback, args)`` where
``n`` is an insertion counter, so events at the same instant run in the order they were
scheduled and a run is a pure function of the seed.

:class:`SimNetwork` carries messages between nodes through that queue. Every message may be
dropped, duplicated, and is delayed by a random amount (sometimes a long one, which reorders
it behind later messages); an ``InstallSnapshot`` chunk may arrive damaged (a bit flipped:
its chunk CRC must catch it). Partitions are a set of cut directed links; a message is lost if
its link is cut when it is sent or when it would arrive (a partition also eats what is in
flight on the wire). The shapes a partition can take:

* ``split``: the nodes are shuffled and cut into two groups;
* ``minority``: a random minority is cut off from the rest;
* ``leader``: the given node (the simulator passes the current leader) is alone;
* ``bridge``: two groups that cannot talk to each other, plus one node that talks to both
  (the configuration that defeats naive leader leases and naive CheckQuorum);
* ``oneway``: some directed links are cut but their reverse is not.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InvalidArgumentError
from ..raft.messages import InstallSnapshot

__all__ = ["EventQueue", "NetworkFaults", "SimNetwork", "PARTITION_KINDS"]

PARTITION_KINDS = ("split", "minority", "leader", "bridge", "oneway")


class EventQueue:
    """Virtual clock plus a deterministic priority queue of callbacks."""

    __slots__ = ("now", "_heap", "_n")

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._n = 0

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        if when < self.now:
            when = self.now
        self._n += 1
        heapq.heappush(self._heap, (when, self._n, fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run_until(self, t: float) -> int:
        """Run every event scheduled at or before ``t``; the clock ends at ``t``."""
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= t:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            fn(*args)
            ran += 1
        self.now = t
        return ran

    def __len__(self) -> int:
        return len(self._heap)


@dataclass(frozen=True, slots=True)
class NetworkFaults:
    """Per-message fault rates and delays (seconds)."""

    drop: float = 0.05
    duplicate: float = 0.02
    delay_min: float = 0.001
    delay_max: float = 0.010
    long_delay: float = 0.03  # probability of a long delay (reorders the message)
    long_delay_max: float = 0.200
    snap_corrupt: float = 0.0  # probability an InstallSnapshot chunk arrives with a bit flipped

    @staticmethod
    def none() -> NetworkFaults:
        return NetworkFaults(0.0, 0.0, 0.001, 0.005, 0.0, 0.005)


class SimNetwork:
    """Delivers ``(src, dst, msg)`` through the event queue to ``deliver(src, dst, msg)``."""

    def __init__(self, queue: EventQueue, nodes: Sequence[Any], rng: random.Random,
                 faults: NetworkFaults, deliver: Callable[[Any, Any, Any], None],
                 trace: Callable[..., None] | None = None) -> None:
        self.queue = queue
        self.nodes = list(nodes)
        self.rng = rng
        self.faults = faults
        self._deliver = deliver
        self._trace = trace
        self.cut: set[tuple[Any, Any]] = set()
        # Scripted tests may drop chosen messages: ``filter(src, dst, msg) -> keep?``.
        self.filter: Callable[[Any, Any, Any], bool] | None = None
        self.partition_desc = "healed"
        self.sent = 0
        self.dropped = 0
        self.duplicated = 0
        self.corrupted = 0

    # --- messages ---------------------------------------------------------------------------
    def send(self, src: Any, dst: Any, msg: Any) -> None:
        self.sent += 1
        f = self.faults
        rng = self.rng
        if (src, dst) in self.cut or rng.random() < f.drop or (
                self.filter is not None and not self.filter(src, dst, msg)):
            self.dropped += 1
            return
        if f.snap_corrupt and type(msg) is InstallSnapshot and msg.data and (
                rng.random() < f.snap_corrupt):
            data = bytearray(msg.data)
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
            msg = replace(msg, data=bytes(data))  # its chunk_crc no longer matches
            self.corrupted += 1
        copies = 2 if rng.random() < f.duplicate else 1
        if copies == 2:
            self.duplicated += 1
        for _ in range(copies):
            if rng.random() < f.long_delay:
                delay = rng.uniform(f.delay_max, f.long_delay_max)
            else:
                delay = rng.uniform(f.delay_min, f.delay_max)
            self.queue.after(delay, self._arrive, src, dst, msg)

    def _arrive(self, src: Any, dst: Any, msg: Any) -> None:
        if (src, dst) in self.cut:
            self.dropped += 1
            return
        self._deliver(src, dst, msg)

    # --- partitions ------------------------------------------------------------------------
    def heal(self) -> None:
        self.cut.clear()
        self.partition_desc = "healed"

    def _cut_groups(self, a: Sequence[Any], b: Sequence[Any]) -> None:
        for x in a:
            for y in b:
                self.cut.add((x, y))
                self.cut.add((y, x))

    def partition(self, kind: str, leader: Any = None) -> str:
        """Replace the current partition with a new one of ``kind``; returns a description."""
        rng = self.rng
        nodes = list(self.nodes)
        n = len(nodes)
        self.cut.clear()
        if n < 2:
            self.partition_desc = "healed"
            return self.partition_desc
        if kind == "leader" and leader is None:
            kind = "minority"
        if kind == "split":
            rng.shuffle(nodes)
            k = rng.randint(1, n - 1)
            a, b = sorted(nodes[:k]), sorted(nodes[k:])
            self._cut_groups(a, b)
            desc = f"split {a} | {b}"
        elif kind == "minority":
            k = rng.randint(1, max(1, (n - 1) // 2))
            a = sorted(rng.sample(nodes, k))
            b = [x for x in nodes if x not in a]
            self._cut_groups(a, b)
            desc = f"minority {a} isolated from {b}"
        elif kind == "leader":
            b = [x for x in nodes if x != leader]
            self._cut_groups([leader], b)
            desc = f"leader {leader} isolated"
        elif kind == "bridge":
            if n < 3:
                return self.partition("split")
            rng.shuffle(nodes)
            bridge = nodes[0]
            rest = nodes[1:]
            k = rng.randint(1, len(rest) - 1)
            a, b = sorted(rest[:k]), sorted(rest[k:])
            self._cut_groups(a, b)
            desc = f"bridge {bridge} between {a} and {b}"
        elif kind == "oneway":
            # one direction of each chosen pair: a -> b is cut while b -> a still works
            pairs = [(x, y) for i, x in enumerate(nodes) for y in nodes[i + 1:]]
            chosen = [p if rng.random() < 0.5 else (p[1], p[0])
                      for p in rng.sample(pairs, rng.randint(1, max(1, len(pairs) // 2)))]
            self.cut.update(chosen)
            desc = "one-way cuts " + ",".join(f"{x}->{y}" for x, y in sorted(chosen, key=repr))
        else:
            raise InvalidArgumentError(f"SimNetwork.partition: unknown kind {kind!r}; "
                             f"expected one of {PARTITION_KINDS}")
        self.partition_desc = desc
        return desc
