"""What the simulator runs on top of Raft: a state machine, a workload and a model.

Three small pieces, so a user can swap any of them:

* :class:`StateMachine` applies committed entries (``apply(data, seq)``; ``data == b""`` is a
  leader's no-op) and answers reads (``read(query)``). It must be deterministic: every node
  applies the same entries in the same order and must end in the same state.
* :class:`Workload` invents client operations (``next_op``), turns a write into the bytes that
  go into the log (``encode``) and a read into the query the state machine answers
  (``query``), and turns a result into the output recorded in the history (``output``).
* A :class:`~tinyraftplus.sim.linearizable.Model` is the sequential specification the
  checker holds the recorded history against.

The key-value trio (:class:`KVStateMachine`, :class:`KVWorkload`,
:class:`~tinyraftplus.sim.linearizable.KVModel`) is the default, bundled as
:func:`kv_app`.

Retried writes: a client that times out retries the same write, perhaps through another node,
so the same command can be committed twice. :class:`SessionStateMachine` wraps the user's
state machine with client sessions (Raft dissertation, section 6.3): every write travels in an
envelope ``[client, request_seq, payload]`` and a request the session has already applied is
not applied again (its first result is returned instead). User state machines therefore need
no de-duplication of their own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from ..errors import InvalidArgumentError
from .linearizable import KVModel, Model

__all__ = [
    "StateMachine",
    "Workload",
    "OpSpec",
    "SimApp",
    "SessionStateMachine",
    "KVStateMachine",
    "KVWorkload",
    "kv_app",
    "supports_snapshots",
]


class StateMachine(Protocol):
    def apply(self, data: bytes, seq: int) -> Any:
        """Apply one committed entry; ``b""`` is the leader's no-op (return ``None``)."""
        ...

    def read(self, query: Any) -> Any:
        """Answer a read from the current state (called once the read is linearizable)."""
        ...

    # Optional, for snapshots (``SimConfig.snapshot_entries``): ``snapshot() -> bytes``, the
    # whole state as bytes that depend only on the entries applied (equal states give equal
    # bytes: the simulator compares nodes' snapshots at the same seq), and
    # ``restore(data: bytes) -> None``, which replaces the whole state by a snapshot's. A
    # state machine without them runs with snapshots off.


def supports_snapshots(sm: Any) -> bool:
    return callable(getattr(sm, "snapshot", None)) and callable(getattr(sm, "restore", None))


@dataclass(frozen=True, slots=True)
class OpSpec:
    """A client operation before it runs: ``write`` ops go through the log, the others are
    reads served with ReadIndex."""

    kind: str
    key: Hashable
    input: Any
    write: bool


class Workload(Protocol):
    def next_op(self, rng: random.Random, client: int, n: int) -> OpSpec:
        """The ``n``-th operation of ``client``."""
        ...

    def encode(self, op: OpSpec) -> bytes:
        """The command bytes a write puts in the log (non-empty)."""
        ...

    def query(self, op: OpSpec) -> Any:
        """What to pass to ``StateMachine.read`` for a read."""
        ...

    def output(self, op: OpSpec, result: Any) -> Any:
        """The output to record for ``op`` given the state machine's result."""
        ...

    # Optional: ``final_ops() -> list[OpSpec]``, operations (usually reads of everything)
    # that one client runs after the cluster has healed, so that a write lost during the
    # faults shows up in the history even if no later read happened to look at it.


@dataclass(frozen=True)
class SimApp:
    """Everything application-specific the simulator needs."""

    state_machine: Callable[[], StateMachine]
    workload: Workload
    model: Model


class SessionStateMachine:
    """Applies each client request at most once (see the module docstring)."""

    __slots__ = ("inner", "_sessions")

    def __init__(self, inner: StateMachine) -> None:
        self.inner = inner
        self._sessions: dict[Any, tuple[int, Any]] = {}

    @staticmethod
    def wrap(client: Any, request: int, payload: bytes) -> bytes:
        return msgpack.packb([client, request, payload], use_bin_type=True)

    def apply(self, data: bytes, seq: int) -> Any:
        if not data:
            return self.inner.apply(data, seq)
        client, request, payload = msgpack.unpackb(data, raw=False)
        last = self._sessions.get(client)
        if last is not None and request <= last[0]:
            # Applied already (a retry committed twice). Clients are sequential, so an
            # older request than the last one can only be an abandoned attempt.
            return last[1] if request == last[0] else None
        result = self.inner.apply(payload, seq)
        self._sessions[client] = (request, result)
        return result

    def read(self, query: Any) -> Any:
        return self.inner.read(query)

    def snapshot(self) -> bytes:
        """The sessions and the inner state machine's snapshot (the sessions must travel
        with the state: a retry committed after a snapshot is still recognised)."""
        sessions = sorted(([c, r, res] for c, (r, res) in self._sessions.items()),
                          key=lambda x: repr(x[0]))
        return msgpack.packb([sessions, self.inner.snapshot()],  # type: ignore[attr-defined]
                             use_bin_type=True)

    def restore(self, data: bytes) -> None:
        sessions, inner = msgpack.unpackb(data, raw=False)
        self._sessions = {c: (r, res) for c, r, res in sessions}
        self.inner.restore(inner)  # type: ignore[attr-defined]


class KVStateMachine:
    """A string key-value store: ``put`` sets, ``append`` concatenates, ``read(key)`` gets.

    Commands are msgpack ``[kind, key, value]``.
    """

    __slots__ = ("data", "applied")

    def __init__(self) -> None:
        self.data: dict[Any, str] = {}
        self.applied = -1

    def apply(self, data: bytes, seq: int) -> Any:
        self.applied = seq
        if not data:
            return None
        kind, key, value = msgpack.unpackb(data, raw=False)
        if kind == "put":
            self.data[key] = value
        elif kind == "append":
            self.data[key] = self.data.get(key, "") + value
        else:
            raise InvalidArgumentError(f"KVStateMachine: unknown command {kind!r} at seq {seq}")
        return None

    def read(self, query: Any) -> Any:
        return self.data.get(query)

    def snapshot(self) -> bytes:
        return msgpack.packb([self.applied, sorted(self.data.items())], use_bin_type=True)

    def restore(self, data: bytes) -> None:
        applied, items = msgpack.unpackb(data, raw=False)
        self.applied = applied
        self.data = dict(items)


class KVWorkload:
    """Random put / append / get on a few keys, with unique values (``<client.n>``) so the
    checker can tell every write apart. Few keys means contention, which is what finds bugs."""

    def __init__(self, keys: int = 3, write_ratio: float = 0.6, append_ratio: float = 0.5):
        if keys < 1:
            raise InvalidArgumentError(f"KVWorkload: keys must be >= 1, got {keys}")
        self.keys = [f"k{i}" for i in range(keys)]
        self.write_ratio = write_ratio
        self.append_ratio = append_ratio

    def next_op(self, rng: random.Random, client: int, n: int) -> OpSpec:
        key = rng.choice(self.keys)
        if rng.random() < self.write_ratio:
            kind = "append" if rng.random() < self.append_ratio else "put"
            return OpSpec(kind, key, f"<{client}.{n}>", True)
        return OpSpec("get", key, None, False)

    def encode(self, op: OpSpec) -> bytes:
        return msgpack.packb([op.kind, op.key, op.input], use_bin_type=True)

    def query(self, op: OpSpec) -> Any:
        return op.key

    def final_ops(self) -> list[OpSpec]:
        return [OpSpec("get", k, None, False) for k in self.keys]

    def output(self, op: OpSpec, result: Any) -> Any:
        return result


def kv_app(keys: int = 3) -> SimApp:
    """The default application: a key-value store checked against :class:`KVModel`."""
    return SimApp(KVStateMachine, KVWorkload(keys), KVModel())
