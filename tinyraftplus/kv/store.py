"""The example replicated key-value store: a deterministic state machine with client sessions.

Theory of operation
-------------------
Keys and values are ``bytes``. Every write travels through the Raft log as one msgpack
*command* ``[client_id, seq, ack, op, key, value]`` (:func:`encode_write`), and every node
applies the same commands in the same order, so every replica reaches the same state.

**Exactly once.** A client that does not hear back (its connection broke, the leader changed,
the answer was slow) sends the same request again, perhaps to another node; both copies may
end up committed. The store therefore keeps a *session* per ``client_id`` (Raft dissertation,
section 6.3): the result of each request it applied, by ``seq``. A request whose result is
already there is not applied again; its first result is returned instead. Because a client
may have many requests in flight, which can commit in any order, a session keeps one result
per outstanding request, not only the last one; ``ack`` (the client's lowest seq still
waiting for an answer) tells the store which results the client no longer needs. A command
with ``seq < ack`` seen earlier is one the client has given up on: it is refused rather than
applied late (``stale``).

Everything a session does depends only on the commands in the log, never on clocks or on
which node applies them, so sessions are replicated state like the data: a retry that lands
on a new leader is recognised there too. Sessions are bounded: at most ``max_results`` kept
per client (the oldest go first) and ``max_sessions`` clients (the least recently active go
first; a client silent for that long starts afresh).

**Results** are tuples, because ``apply`` must never raise (a state machine that raises
stops the node): ``("ok", value)`` or ``("err", code, message)``. ``put`` gives the log seq it
was applied at (the key's revision), ``append`` the value's new length, ``delete`` whether the
key existed. A malformed command in the log (written by hand through the library) gives
``("err", "bad_command", ...)`` on every node alike.

The store lives in memory and is rebuilt from the log when a node starts (``apply_seq=-1``);
there are no snapshots, so the log grows with every write.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgpack

from ..errors import InvalidArgumentError

OPS = ("put", "append", "delete")
MAX_KEY = 4096
"""Largest key in bytes."""
MAX_VALUE = 1 << 20
"""Largest value (or appended chunk) in bytes."""
MAX_CLIENT_ID = (1 << 63) - 1

Result = tuple[Any, ...]


def encode_write(client_id: int, seq: int, ack: int, op: str, key: bytes,
                 value: bytes | None) -> bytes:
    """The log command for one write. Raises ``InvalidArgumentError`` for a request the store
    would refuse (so the mistake shows at the caller, not as an error result later)."""
    check_write(client_id, seq, ack, op, key, value)
    return msgpack.packb([client_id, seq, ack, op, key, value], use_bin_type=True)


def check_write(client_id: Any, seq: Any, ack: Any, op: Any, key: Any, value: Any) -> None:
    """Raise ``InvalidArgumentError`` unless the fields make a valid write."""
    if type(client_id) is not int or not 0 <= client_id <= MAX_CLIENT_ID:
        raise InvalidArgumentError(f"client_id must be an int in [0, 2**63), got {client_id!r}")
    if type(seq) is not int or not 1 <= seq <= MAX_CLIENT_ID:
        raise InvalidArgumentError(f"request seq must be an int >= 1, got {seq!r}")
    if type(ack) is not int or not 1 <= ack <= seq:
        raise InvalidArgumentError(f"ack must be an int in [1, seq={seq}], got {ack!r}")
    if op not in OPS or type(op) is not str:
        raise InvalidArgumentError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    check_key(key)
    if op == "delete":
        if value is not None:
            raise InvalidArgumentError("delete takes no value")
    elif type(value) is not bytes or len(value) > MAX_VALUE:
        raise InvalidArgumentError(
            f"{op} needs a bytes value of at most {MAX_VALUE} bytes, got "
            f"{type(value).__name__}{'' if type(value) is not bytes else f' of {len(value)}'}"
        )


def check_key(key: Any) -> None:
    if type(key) is not bytes or not 0 < len(key) <= MAX_KEY:
        raise InvalidArgumentError(
            f"a key must be 1..{MAX_KEY} bytes, got {type(key).__name__}"
            f"{f' of {len(key)} bytes' if type(key) is bytes else ''}"
        )


class _Session:
    __slots__ = ("floor", "results")

    def __init__(self) -> None:
        self.floor = 1  # requests below this are done with: their results may be forgotten
        self.results: OrderedDict[int, Result] = OrderedDict()


class KVStore:
    """The state machine: ``RaftNode(..., apply=kv.apply, read=kv.read)``.

    ``read(("get", key))`` returns the value or ``None``; ``read(("len",))`` the number of
    keys; ``read(("sessions",))`` the number of client sessions.
    """

    def __init__(self, *, max_sessions: int = 10_000, max_results: int = 4096) -> None:
        if max_sessions < 1 or max_results < 1:
            raise InvalidArgumentError("KVStore: max_sessions and max_results must be >= 1")
        self.data: dict[bytes, bytes] = {}
        self.applied_seq = -1
        self.duplicates = 0
        """Requests recognised as retries of ones already applied (not applied again)."""
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._max_sessions = max_sessions
        self._max_results = max_results

    # --- RaftNode's state machine interface ----------------------------------------------

    def apply(self, bufs: list[bytes | None], seq: int) -> list[Result | None]:
        out: list[Result | None] = []
        for i, buf in enumerate(bufs):
            out.append(None if buf is None else self._apply_one(buf, seq + i))
        self.applied_seq = seq + len(bufs) - 1
        return out

    def read(self, cmd: Any) -> Any:
        if isinstance(cmd, tuple) and cmd:
            if cmd[0] == "get" and len(cmd) == 2:
                return self.data.get(cmd[1])
            if cmd[0] == "len":
                return len(self.data)
            if cmd[0] == "sessions":
                return len(self._sessions)
        raise InvalidArgumentError(f"KVStore.read: unknown query {cmd!r}")

    # --- applying ------------------------------------------------------------------------

    def _apply_one(self, buf: bytes, seq: int) -> Result:
        try:
            cmd = msgpack.unpackb(buf, raw=False)
            if type(cmd) is not list or len(cmd) != 6:
                raise InvalidArgumentError("not a [client, seq, ack, op, key, value] array")
            client_id, rseq, ack, op, key, value = cmd
            check_write(client_id, rseq, ack, op, key, value)
        except Exception as e:  # never raise from apply: every replica returns the same error
            return ("err", "bad_command", f"seq {seq}: not a key-value command ({e})")
        sess = self._session(client_id)
        if ack > sess.floor:
            sess.floor = ack
            res = sess.results
            while res and next(iter(res)) < ack:
                res.popitem(last=False)
        done = sess.results.get(rseq)
        if done is not None:
            self.duplicates += 1
            return done
        if rseq < sess.floor:
            return ("err", "stale",
                    f"request {rseq} of client {client_id} arrived after the client gave up "
                    f"on it (it acknowledged everything below {sess.floor}); not applied")
        result = self._do(op, key, value, seq)
        sess.results[rseq] = result
        if len(sess.results) > self._max_results:
            # Commands commit in any order, so the oldest kept result is the smallest seq
            # only approximately; dropping by insertion order is deterministic either way.
            sess.results.popitem(last=False)
        return result

    def _session(self, client_id: int) -> _Session:
        sessions = self._sessions
        sess = sessions.get(client_id)
        if sess is None:
            sess = sessions[client_id] = _Session()
            if len(sessions) > self._max_sessions:
                sessions.popitem(last=False)
        else:
            sessions.move_to_end(client_id)
        return sess

    def _do(self, op: str, key: bytes, value: bytes | None, seq: int) -> Result:
        data = self.data
        if op == "put":
            assert value is not None
            data[key] = value
            return ("ok", seq)
        if op == "append":
            assert value is not None
            new = data.get(key, b"") + value
            data[key] = new
            return ("ok", len(new))
        existed = data.pop(key, None) is not None
        return ("ok", existed)


__all__ = ["KVStore", "encode_write", "check_write", "check_key", "OPS", "MAX_KEY", "MAX_VALUE"]
