"""An in-process network for tests, examples and benchmarks, with fault injection.

``MemoryNetwork`` connects nodes living in one Trio program. Messages are handed over as Python
objects (no encoding), which is what makes it fast enough for benchmarks. It can drop, delay,
duplicate and reorder messages and partition the nodes; every fault is drawn from a seeded
``random.Random`` so a test can be replayed.

Delivery with no delay is a direct call of the receiver's ``receive`` (which only queues the
message), so a sender never blocks. Delayed messages are delivered by tasks in the network's
own nursery: use it as ``async with MemoryNetwork() as net:``. Without the ``async with``,
only zero-delay delivery is available.

This transport is for one process; it says so in its name. Use ``transport.tcp`` across
processes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import trio

from .._groups import exit_nursery

Receiver = Callable[[Any, Any], None]


class MemoryNetwork:
    def __init__(
        self,
        *,
        seed: int | None = None,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        reorder: float = 0.0,
    ) -> None:
        """``drop``/``duplicate``/``reorder`` are probabilities per message; ``delay`` is a
        (min, max) range in seconds. A reordered message is held back by an extra random delay
        of up to twice ``delay``'s max (or 10 ms), so later messages overtake it."""
        for name, p in (("drop", drop), ("duplicate", duplicate), ("reorder", reorder)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"MemoryNetwork({name}={p!r}): a probability is in [0, 1]")
        if delay[0] < 0 or delay[1] < delay[0]:
            raise ValueError(f"MemoryNetwork(delay={delay!r}): use (min, max) with 0 <= min <= max")
        self.rng = random.Random(seed)
        self.drop = drop
        self.duplicate = duplicate
        self.delay = delay
        self.reorder = reorder
        self._receivers: dict[Hashable, Receiver] = {}
        self._down: set[Hashable] = set()
        self._cut: set[tuple[Hashable, Hashable]] = set()  # directed (from, to) pairs
        self._nursery: trio.Nursery | None = None
        self.sent = 0
        self.delivered = 0
        self.dropped = 0

    async def __aenter__(self) -> MemoryNetwork:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()  # messages still in flight are simply lost
        self._nursery = None
        # What failed comes out as raised, not wrapped in a group of one.
        return await exit_nursery(self._nursery_cm, *exc)

    # --- wiring ----------------------------------------------------------------------------
    def register(self, node_id: Hashable, receive: Receiver) -> None:
        """Deliver messages addressed to ``node_id`` by calling ``receive(from_id, msg)``."""
        self._receivers[node_id] = receive

    def attach(self, node: Any) -> None:
        """Register a ``RaftNode`` (anything with ``node_id`` and ``receive``)."""
        self.register(node.node_id, node.receive)

    def sender(self, from_id: Hashable) -> Callable[[Any, Any], None]:
        """The ``send(to, msg)`` callable to give the node ``from_id``."""

        def send(to: Any, msg: Any) -> None:
            self.send(from_id, to, msg)

        return send

    # --- faults ----------------------------------------------------------------------------
    def partition(self, *groups: Iterable[Hashable]) -> None:
        """Split the nodes: messages only flow within a group. Nodes named in no group are
        cut off from everyone. Replaces any earlier partition."""
        sets = [set(g) for g in groups]
        nodes = set(self._receivers).union(*sets) if sets else set(self._receivers)
        self._cut = {
            (a, b)
            for a in nodes
            for b in nodes
            if a != b and not any(a in g and b in g for g in sets)
        }

    def isolate(self, node_id: Hashable) -> None:
        """Cut one node off from all others (both directions)."""
        others = [n for n in self._receivers if n != node_id]
        self.partition(others, [node_id])

    def cut(self, a: Hashable, b: Hashable, *, both: bool = True) -> None:
        """Drop messages from ``a`` to ``b`` (and back, unless ``both=False``)."""
        self._cut.add((a, b))
        if both:
            self._cut.add((b, a))

    def heal(self) -> None:
        """Remove every partition and cut (nodes marked down stay down)."""
        self._cut.clear()

    def down(self, node_id: Hashable) -> None:
        """Drop everything to and from ``node_id`` (a crashed machine)."""
        self._down.add(node_id)

    def up(self, node_id: Hashable) -> None:
        self._down.discard(node_id)

    # --- delivery --------------------------------------------------------------------------
    def send(self, from_id: Hashable, to: Hashable, msg: Any) -> None:
        self.sent += 1
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.drop and self.rng.random() < self.drop:
                self.dropped += 1
                continue
            wait = self.rng.uniform(*self.delay) if self.delay[1] else 0.0
            if self.reorder and self.rng.random() < self.reorder:
                wait += self.rng.uniform(0.0, max(2 * self.delay[1], 0.01))
            if wait > 0.0 and self._nursery is not None:
                self._nursery.start_soon(self._deliver_later, wait, from_id, to, msg)
            else:
                self._deliver(from_id, to, msg)

    async def _deliver_later(self, wait: float, from_id: Hashable, to: Hashable, msg: Any) -> None:
        await trio.sleep(wait)
        self._deliver(from_id, to, msg)

    def _deliver(self, from_id: Hashable, to: Hashable, msg: Any) -> None:
        # Faults are checked at delivery time, so a partition made while a message is in
        # flight still stops it, as a real cut link would.
        if from_id in self._down or to in self._down or (from_id, to) in self._cut:
            self.dropped += 1
            return
        receive = self._receivers.get(to)
        if receive is None:
            self.dropped += 1
            return
        self.delivered += 1
        receive(from_id, msg)
