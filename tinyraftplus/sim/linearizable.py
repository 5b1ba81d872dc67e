"""A linearizability checker for client histories (Wing & Gong's search with Lowe's memoisation).

Theory of operation
-------------------
A history is a list of :class:`Operation`: each has a call time and, if it returned, a return
time and an output. It is *linearizable* when every operation can be given a point in time
between its call and its return such that running the operations one by one in that order
through a sequential model (the :class:`Model`) produces exactly the recorded outputs.
Operations that never returned (a client timed out, its node crashed) are "maybe": they may
take effect at any point after their call, or never, and their output is unknown.

The search walks the history in call order. At each point the operations that may be
linearized next are those not yet placed whose call precedes the earliest return among the
completed operations not yet placed (anything later would violate real-time order). It tries
each through the model and goes deeper; the pair (set of placed operations as a bitmask,
model state) is remembered, so a configuration that was already explored and failed is never
explored again (Lowe's improvement; it turns the exponential search into one bounded by the
number of distinct configurations, which concurrency, not history length, determines).

Linearizability is compositional (Herlihy & Wing): a history is linearizable if and only if
the sub-history of every object is. The checker therefore splits the history by
``Operation.key`` and checks each key alone, which keeps the bitmasks short and the search
small.

When a key's history is not linearizable the checker shrinks it to a *minimal offending set*:
operations are removed one at a time while the rest stays non-linearizable, except that an
operation whose effect another remaining operation observed (a write whose value a read
returned, ``Model.observes``) is kept, so a stale read is reported with the writes that make it
stale, not as "a read of a value never written".

The model shipped here is :class:`KVModel` (``put`` / ``get`` / ``append`` on string values);
users plug in their own by implementing :class:`Model`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InvalidArgumentError

__all__ = [
    "Operation",
    "Model",
    "KVModel",
    "History",
    "KeyVerdict",
    "CheckResult",
    "check",
    "check_key",
    "minimal_offending_set",
]

_INF = float("inf")


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation on one key.

    ``ret is None`` means the operation never returned (a "maybe": it may have taken effect
    at any time after ``call``, or never); its ``output`` is then ignored.
    """

    id: int
    client: Hashable
    key: Hashable
    kind: str
    input: Any
    output: Any
    call: float
    ret: float | None

    @property
    def pending(self) -> bool:
        return self.ret is None

    def describe(self) -> str:
        """One readable line: ``#12 c1 put('k1', 'v') -> None  [1.234, 1.250]``."""
        end = "never returned" if self.ret is None else f"{self.ret:.6f}"
        out = "?" if self.ret is None else repr(self.output)
        arg = "" if self.input is None else f", {self.input!r}"
        return (
            f"#{self.id} client={self.client} {self.kind}({self.key!r}{arg}) -> {out}"
            f"  [{self.call:.6f}, {end}]"
        )


class Model(Protocol):
    """A sequential specification of one object (one key).

    States must be hashable (they are memoised with the set of placed operations) and
    should be small: the checker copies nothing, it keeps every state it sees.
    """

    def init(self, key: Hashable) -> Hashable:
        """The state of ``key`` before any operation."""
        ...

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        """Run ``op`` on ``state``: ``(ok, new_state)``. ``ok`` is False when the recorded
        output is not what the sequential object would have returned. For a pending op
        (``op.pending``) the output is unknown: accept any output and return the effect."""
        ...

    def observes(self, reader: Operation, writer: Operation) -> bool:
        """True when ``reader``'s output shows ``writer``'s effect (used to keep shrunk
        counterexamples readable; returning False is safe unless the model sets
        ``drop_unobserved_pending``)."""
        ...

    # Optional class attribute ``drop_unobserved_pending = True``: the model promises that
    # a pending operation no completed operation ``observes`` can be left out (it may
    # always "never have happened"). Without it, histories with many operations that never
    # returned make the search exponential.


class KVModel:
    """Key-value register with ``put`` (set), ``append`` (concatenate) and ``get``.

    Values are strings; a missing key reads as ``None``; ``append`` to a missing key starts
    from ``""``. ``put`` and ``append`` return ``None``. Workloads should write unique
    values (the simulator writes ``"<client.n>"``) so ``observes`` is exact.
    """

    KINDS = ("put", "get", "append")

    # With unique values, a pending write no read shows can be taken as never applied: a
    # pending append that no read contains only ever adds a token no read returned, and a
    # pending put no read contains is overwritten before any read. Leaving such writes out
    # keeps the search small when many writes never returned.
    drop_unobserved_pending = True

    def init(self, key: Hashable) -> Hashable:
        return None

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        kind = op.kind
        if kind == "get":
            if op.ret is None:
                return True, state
            return op.output == state, state
        if kind == "put":
            ok = op.ret is None or op.output is None
            return ok, op.input
        if kind == "append":
            ok = op.ret is None or op.output is None
            return ok, (state or "") + op.input  # type: ignore[operator]
        raise InvalidArgumentError(
            f"KVModel: operation #{op.id} has unknown kind {kind!r}; expected one of "
            f"{', '.join(self.KINDS)}"
        )

    def observes(self, reader: Operation, writer: Operation) -> bool:
        if reader.kind != "get" or reader.ret is None or writer.kind == "get":
            return False
        out = reader.output
        return isinstance(out, str) and isinstance(writer.input, str) and writer.input in out


class History:
    """Records operations as they happen (``invoke`` then ``ok`` / ``fail`` / ``info``).

    ``fail`` says the operation certainly did not take effect (it is dropped from the
    history); ``info`` (or never finishing) leaves it pending: maybe.
    """

    def __init__(self) -> None:
        self._calls: dict[int, tuple[Hashable, Hashable, str, Any, float]] = {}
        self._done: dict[int, tuple[Any, float]] = {}
        self._failed: set[int] = set()
        self._next = 0

    def invoke(self, client: Hashable, key: Hashable, kind: str, input: Any, now: float) -> int:
        op_id = self._next
        self._next += 1
        self._calls[op_id] = (client, key, kind, input, now)
        return op_id

    def ok(self, op_id: int, output: Any, now: float) -> None:
        self._check_open(op_id)
        self._done[op_id] = (output, now)

    def fail(self, op_id: int) -> None:
        self._check_open(op_id)
        self._failed.add(op_id)

    def info(self, op_id: int) -> None:
        self._check_open(op_id)

    def _check_open(self, op_id: int) -> None:
        if op_id not in self._calls:
            raise InvalidArgumentError(f"History: unknown operation id {op_id}")
        if op_id in self._done or op_id in self._failed:
            raise InvalidArgumentError(f"History: operation #{op_id} was already completed")

    def operations(self) -> list[Operation]:
        out = []
        for op_id, (client, key, kind, inp, call) in self._calls.items():
            if op_id in self._failed:
                continue
            output, ret = self._done.get(op_id, (None, None))
            out.append(Operation(op_id, client, key, kind, inp, output, call, ret))
        return out

    def __len__(self) -> int:
        return len(self._calls) - len(self._failed)


@dataclass(slots=True)
class KeyVerdict:
    """The verdict for one key: ``ok`` is True, False, or None (search budget exhausted)."""

    key: Hashable
    ok: bool | None
    ops: int
    states: int
    offending: list[Operation] = field(default_factory=list)

    def explain(self) -> str:
        if self.ok:
            return f"key {self.key!r}: linearizable ({self.ops} ops)"
        if self.ok is None:
            return (
                f"key {self.key!r}: UNKNOWN, search gave up after {self.states} states "
                f"({self.ops} ops); raise max_states or shorten the history"
            )
        lines = [
            f"key {self.key!r}: NOT linearizable ({self.ops} ops); minimal offending set "
            f"({len(self.offending)} ops, no order of them fits their call/return times):"
        ]
        lines += ["  " + op.describe() for op in sorted(self.offending, key=_by_call)]
        return "\n".join(lines)


@dataclass(slots=True)
class CheckResult:
    """``ok``: True (linearizable), False (not), None (some key's search gave up)."""

    ok: bool | None
    ops: int
    keys: list[KeyVerdict]

    @property
    def failures(self) -> list[KeyVerdict]:
        return [k for k in self.keys if k.ok is not True]

    def explain(self) -> str:
        if self.ok:
            return f"linearizable: {self.ops} operations on {len(self.keys)} keys"
        return "\n".join(k.explain() for k in self.failures)


def _by_call(op: Operation) -> tuple[float, float, int]:
    return (op.call, _INF if op.ret is None else op.ret, op.id)


def _search(ops: Sequence[Operation], model: Model, key: Hashable, max_states: int
            ) -> tuple[bool | None, int]:
    """Depth-first search over (placed set, state); ``ops`` sorted by call time."""
    n = len(ops)
    calls = [op.call for op in ops]
    rets = [_INF if op.ret is None else op.ret for op in ops]
    full = 0
    for i, op in enumerate(ops):
        if op.ret is not None:
            full |= 1 << i
    step = model.step
    start = (0, model.init(key))
    seen = {start}
    stack = [start]
    while stack:
        mask, state = stack.pop()
        if mask & full == full:
            return True, len(seen)
        # Lowest unplaced op: everything below it is placed.
        low = (~mask & (mask + 1)).bit_length() - 1
        # Earliest return among unplaced completed ops; ops are sorted by call and
        # ret >= call, so once a call passes the running minimum no later op can lower it.
        min_ret = _INF
        i = low
        while i < n and calls[i] <= min_ret:
            if not (mask >> i) & 1 and rets[i] < min_ret:
                min_ret = rets[i]
            i += 1
        # Push maybe-ops first so the completed ones are popped (tried) first: a pending op
        # is only worth placing when a completed op needs its effect.
        for want_pending in (True, False):
            for j in range(low, i):
                if (mask >> j) & 1 or (rets[j] == _INF) is not want_pending:
                    continue
                ok, new_state = step(state, ops[j])
                if not ok:
                    continue
                nxt = (mask | (1 << j), new_state)
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        if len(seen) > max_states:
            return None, len(seen)
    return False, len(seen)


def check_key(ops: Iterable[Operation], model: Model | None = None, key: Hashable = None,
              max_states: int = 2_000_000) -> tuple[bool | None, int]:
    """Check one key's operations: ``(verdict, states explored)``. ``verdict`` is None when
    more than ``max_states`` configurations were needed."""
    model = model if model is not None else KVModel()
    ordered = sorted(ops, key=_by_call)
    return _search(ordered, model, key, max_states)


def minimal_offending_set(ops: Sequence[Operation], model: Model | None = None,
                          key: Hashable = None, max_states: int = 200_000) -> list[Operation]:
    """Shrink a non-linearizable single-key history to a 1-minimal non-linearizable subset.

    Removing any remaining operation either makes the rest linearizable or removes a write
    that a remaining read observed (see the module docstring)."""
    model = model if model is not None else KVModel()
    current = sorted(ops, key=_by_call)
    changed = True
    while changed:
        changed = False
        i = 0
        while i < len(current):
            victim = current[i]
            rest = current[:i] + current[i + 1:]
            if any(model.observes(r, victim) for r in rest):
                i += 1
                continue
            verdict, _ = _search(rest, model, key, max_states)
            if verdict is False:
                current = rest
                changed = True
            else:
                i += 1
    return current


def _drop_unobserved(ops: list[Operation], model: Model) -> list[Operation]:
    done = [o for o in ops if o.ret is not None]
    return [o for o in ops
            if o.ret is not None or any(model.observes(r, o) for r in done)]


def check(history: Iterable[Operation] | History, model: Model | None = None,
          max_states: int = 2_000_000, shrink: bool = True,
          key_fn: Callable[[Operation], Hashable] | None = None) -> CheckResult:
    """Check a whole history, key by key.

    ``key_fn`` overrides the partition (default ``op.key``); a model of an object that is
    not a set of independent keys should pass ``key_fn=lambda op: None``. Completed
    operations whose ``ret`` precedes their ``call`` are refused with
    ``InvalidArgumentError``.
    """
    model = model if model is not None else KVModel()
    ops = history.operations() if isinstance(history, History) else list(history)
    by_key: dict[Hashable, list[Operation]] = {}
    for op in ops:
        if op.ret is not None and op.ret < op.call:
            raise InvalidArgumentError(
                f"linearizable.check: operation #{op.id} returns at {op.ret} before its call "
                f"at {op.call}; fix the recorder's clock"
            )
        k = key_fn(op) if key_fn is not None else op.key
        by_key.setdefault(k, []).append(op)
    if getattr(model, "drop_unobserved_pending", False):
        by_key = {k: _drop_unobserved(v, model) for k, v in by_key.items()}
    verdicts = []
    overall: bool | None = True
    for k in sorted(by_key, key=repr):
        kops = sorted(by_key[k], key=_by_call)
        ok, states = _search(kops, model, k, max_states)
        verdict = KeyVerdict(k, ok, len(kops), states)
        if ok is False:
            overall = False
            if shrink:
                verdict.offending = minimal_offending_set(kops, model, k)
            else:
                verdict.offending = kops
        elif ok is None and overall is True:
            overall = None
        verdicts.append(verdict)
    return CheckResult(overall, len(ops), verdicts)
