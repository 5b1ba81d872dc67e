"""Node events (change / commit / apply / warn / error) and the hub that fans them out.

A node must never stall because someone is slow to read its events, so each subscriber gets a
bounded buffer: when it is full the oldest event is dropped and the subscriber's ``dropped``
count goes up (the next event it reads tells it how many it missed). Callbacks run inline and
must be quick; an exception from one is logged and otherwise ignored. ``on`` returns a
:class:`Listener`: ``close()`` it, or use it as a context manager, to remove the callback.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import trio

from .errors import InvalidArgumentError

log = logging.getLogger("tinyraftplus")

EventKind = Literal["change", "commit", "apply", "warn", "error", "config", "snapshot"]
EVENT_KINDS: tuple[str, ...] = ("change", "commit", "apply", "warn", "error", "config", "snapshot")


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """One event. ``kind`` says which; the other fields are filled as it makes sense:

    * ``change``: ``state`` (role), ``leader``, ``term``
    * ``commit``: ``seq`` (the new commit seq)
    * ``apply``: ``seq`` (the new apply seq)
    * ``warn`` / ``error``: ``message`` and, where there is one, ``exc``
    * ``config``: ``seq`` (of the configuration entry), ``config`` (the ``Config`` in force)
      and ``description`` (its ``describe()``)
    """

    kind: str
    node_id: Any
    seq: int | None = None
    state: str | None = None
    leader: Any = None
    term: int | None = None
    message: str | None = None
    exc: BaseException | None = None
    dropped: int = 0
    config: Any = None
    description: str | None = None
    size: int | None = None  # snapshot: bytes of state-machine data
    installed: bool | None = None  # snapshot: received from a leader (else taken here)


class Subscription:
    """An async iterator over a node's events; close it (``async with``) to unsubscribe."""

    def __init__(self, hub: EventHub, kinds: frozenset[str], maxlen: int) -> None:
        self._hub = hub
        self._kinds = kinds
        self._buf: deque[NodeEvent] = deque()
        self._maxlen = maxlen
        self._dropped = 0
        self._wake = trio.Event()
        self._closed = False

    def _push(self, ev: NodeEvent) -> None:
        if ev.kind not in self._kinds:
            return
        if len(self._buf) >= self._maxlen:
            self._buf.popleft()
            self._dropped += 1
        self._buf.append(ev)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._hub._subs.discard(self)
        self._wake.set()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[NodeEvent]:
        return self

    async def __anext__(self) -> NodeEvent:
        while not self._buf:
            if self._closed:
                raise StopAsyncIteration
            self._wake = trio.Event()
            await self._wake.wait()
        ev = self._buf.popleft()
        if self._dropped:
            # Tell the reader what it missed on the next event it does get.
            ev = NodeEvent(**{**_asdict(ev), "dropped": self._dropped})
            self._dropped = 0
        return ev


class Listener:
    """A callback registered with ``on``. ``close()`` removes it (idempotent); as a context
    manager (``with`` or ``async with``) it is removed when the block ends::

        with node.on("change", print):
            ...
    """

    __slots__ = ("_hub", "kinds", "callback", "_closed")

    def __init__(self, hub: EventHub, kinds: frozenset[str],
                 callback: Callable[[NodeEvent], Any]) -> None:
        self._hub = hub
        self.kinds = kinds
        self.callback = callback
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for k in self.kinds:
            entries = self._hub._callbacks[k]
            for i, entry in enumerate(entries):
                if entry is self:
                    del entries[i]
                    break

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Listener {sorted(self.kinds)} {self.callback!r} {state}>"


def _asdict(ev: NodeEvent) -> dict[str, Any]:
    return {name: getattr(ev, name) for name in NodeEvent.__slots__}  # type: ignore[attr-defined]


class EventHub:
    def __init__(self, node_id: Any) -> None:
        self.node_id = node_id
        self._subs: set[Subscription] = set()
        self._callbacks: dict[str, list[Listener]] = {k: [] for k in EVENT_KINDS}

    def subscribe(
        self, kinds: str | tuple[str, ...] | None = None, *, maxlen: int = 1024
    ) -> Subscription:
        wanted = _kinds(kinds)
        if maxlen < 1:
            raise InvalidArgumentError(
                f"subscribe(maxlen={maxlen!r}): the buffer needs room for one event"
            )
        sub = Subscription(self, wanted, maxlen)
        self._subs.add(sub)
        return sub

    def on(self, kinds: str | tuple[str, ...], callback: Callable[[NodeEvent], Any]) -> Listener:
        """Call ``callback(event)`` for each event of these kinds; returns a
        :class:`Listener` whose ``close()`` removes it."""
        if not callable(callback):
            raise InvalidArgumentError(
                f"on({kinds!r}, ...): the callback {callback!r} is not callable"
            )
        listener = Listener(self, _kinds(kinds), callback)
        for k in listener.kinds:
            self._callbacks[k].append(listener)
        return listener

    def off(self, kinds: str | tuple[str, ...], callback: Callable[[NodeEvent], Any]) -> None:
        """Remove every listener of these kinds that calls ``callback``."""
        for k in _kinds(kinds):
            for listener in [x for x in self._callbacks[k] if x.callback == callback]:
                self._callbacks[k].remove(listener)

    @property
    def quiet(self) -> bool:
        """True when nobody listens, so hot paths can skip building events."""
        return not self._subs and not any(self._callbacks.values())

    def emit(self, kind: str, **fields: Any) -> None:
        if not self._subs and not self._callbacks[kind]:
            return
        ev = NodeEvent(kind=kind, node_id=self.node_id, **fields)
        for sub in list(self._subs):
            sub._push(ev)
        for listener in list(self._callbacks[kind]):
            try:
                listener.callback(ev)
            except Exception:  # a user callback must not break the node
                log.exception("tinyraftplus: %s event callback %r raised", kind,
                              listener.callback)

    def close(self) -> None:
        for sub in list(self._subs):
            sub.close()


def _kinds(kinds: str | tuple[str, ...] | None) -> frozenset[str]:
    if kinds is None:
        return frozenset(EVENT_KINDS)
    if isinstance(kinds, str):
        kinds = (kinds,)
    bad = [k for k in kinds if k not in EVENT_KINDS]
    if bad:
        raise InvalidArgumentError(
            f"unknown event kind(s) {bad}: use some of {list(EVENT_KINDS)}"
        )
    return frozenset(kinds)
