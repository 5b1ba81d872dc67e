"""The example replicated key-value store: a deterministic state machine with client sessions.

Theory of operation
-------------------
Keys and values are ``bytes``. Every write travels through the Raft log as one msgpack
*command* ``[client_id, seq, ack, op, key, value, owner]`` (:func:`encode_write`), and every node
applies the same commands in the same order, so every replica reaches the same state.

**Exactly once.** A client that does not hear back (its connection broke, the leader changed,
the answer was slow) sends the same request again, perhaps to another node; both copies may
end up committed. The store therefore keeps a *session* per client (Raft dissertation,
section 6.3): the result of each request it applied, by ``seq``. A request whose result is
already there is not applied again; its first result is returned instead. Because a client
may have many requests in flight, which can commit in any order, a session keeps one result
per outstanding request, not only the last one; ``ack`` (the client's lowest seq still
waiting for an answer) tells the store which results the client no longer needs. A command
with ``seq < ack`` seen earlier is one the client has given up on: it is refused rather than
applied late (``stale``).

**Sessions are registered, owned and bounded.** A client starts with a *register* command
(:func:`encode_register`); its session id is the log seq of that command, so ids are unique
and increase, and an id below the current seq that the store does not hold is one it has
*forgotten*. Sessions are bounded (``max_sessions``, least recently used out, and
``max_results_total`` results over all sessions, the oldest sessions out first): a write for a
forgotten session is refused with ``session_expired`` and never applied -- it may be a late
retry of a write applied before the session was evicted, and applying it again is what
exactly-once forbids -- and the client must register again. The bounds travel in each
register command (the leader's settings), so every replica evicts the same sessions at the
same entry whatever its own command line says. A session belongs to the *owner* named at
registration (the server puts the client certificate's identity there): a write naming it
from another owner is refused (``not_owner``). Seqs must stay within ``max_results`` of the
session's oldest unacknowledged seq (``bad_seq`` otherwise, and the session is left as it
was), so one bad request cannot move a session's floor out of reach. Commands of the older
six-field form (client-chosen ids, no registration, in logs written before this) are replayed
as they were then applied, sessions made on demand; servers no longer write them.

Everything a session does depends only on the commands in the log, never on clocks or on
which node applies them, so sessions are replicated state like the data: a retry that lands
on a new leader is recognised there too.

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
"""Largest value in bytes (an append that would make a value larger is refused)."""
MAX_CLIENT_ID = (1 << 63) - 1

Result = tuple[Any, ...]


MAX_OWNER = 1024
"""Longest owner identity (a certificate name) in characters."""
DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_MAX_RESULTS = 4096
DEFAULT_MAX_RESULTS_TOTAL = 1 << 20
"""Results kept over all sessions (each costs about 200 bytes: ~200 MiB in all)."""


def encode_write(client_id: int, seq: int, ack: int, op: str, key: bytes,
                 value: bytes | None, owner: str = "") -> bytes:
    """The log command for one write in session ``client_id`` (from :func:`encode_register`),
    on behalf of ``owner``. Raises ``InvalidArgumentError`` for a request the store would
    refuse (so the mistake shows at the caller, not as an error result later)."""
    check_write(client_id, seq, ack, op, key, value)
    check_owner(owner)
    return msgpack.packb([client_id, seq, ack, op, key, value, owner], use_bin_type=True)


def encode_register(owner: str = "", *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                    max_results_total: int = DEFAULT_MAX_RESULTS_TOTAL,
                    quota_bytes: int = 0) -> bytes:
    """The log command that opens a session for ``owner``; its result is ``("ok", id)``, the
    session id (the command's log seq). The bounds (and the store's quota, 0 for none) are
    those the store applies from this entry on: carried in the log so that every replica
    decides alike."""
    check_owner(owner)
    for name, v in (("max_sessions", max_sessions), ("max_results_total", max_results_total)):
        if type(v) is not int or not 1 <= v <= MAX_CLIENT_ID:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")
    if type(quota_bytes) is not int or not 0 <= quota_bytes <= MAX_CLIENT_ID:
        raise InvalidArgumentError(f"quota_bytes must be an int >= 0, got {quota_bytes!r}")
    return msgpack.packb(["register", owner, max_sessions, max_results_total, quota_bytes],
                         use_bin_type=True)


def check_owner(owner: Any) -> None:
    if type(owner) is not str or len(owner) > MAX_OWNER:
        raise InvalidArgumentError(f"an owner must be a str of at most {MAX_OWNER} characters")


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
    __slots__ = ("floor", "results", "owner")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.floor = 1  # requests below this are done with: their results may be forgotten
        self.results: OrderedDict[int, Result] = OrderedDict()


class KVStore:
    """The state machine: ``RaftNode(..., apply=kv.apply, read=kv.read)``.

    ``read(("get", key))`` returns the value or ``None``; ``read(("len",))`` the number of
    keys; ``read(("sessions",))`` the number of client sessions.

    ``max_sessions`` and ``max_results_total`` are the bounds until the first register
    command in the log sets them (see the module docstring); ``max_results`` is the most
    results one session keeps and how far its seqs may run ahead of its oldest unanswered one.
    """

    def __init__(self, *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_results: int = DEFAULT_MAX_RESULTS,
                 max_results_total: int = DEFAULT_MAX_RESULTS_TOTAL) -> None:
        if max_sessions < 1 or max_results < 1 or max_results_total < 1:
            raise InvalidArgumentError(
                "KVStore: max_sessions, max_results and max_results_total must be >= 1")
        self.data: dict[bytes, bytes] = {}
        self.applied_seq = -1
        self.duplicates = 0
        """Requests recognised as retries of ones already applied (not applied again)."""
        self.expired = 0
        """Writes refused because their session had been evicted."""
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._max_sessions = max_sessions
        self._max_results = max_results
        self._max_results_total = max_results_total
        self._results_total = 0
        self.data_bytes = 0
        """Bytes of keys and values held."""
        self.quota_bytes = 0
        """Most bytes of keys and values (0: none); set by register commands."""

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
            cmd = msgpack.unpackb(buf, raw=False, max_array_len=8, max_map_len=0)
            if type(cmd) is list and len(cmd) == 5 and cmd[0] == "register":
                _, owner, max_sessions, max_total, quota = cmd
                encode_register(owner, max_sessions=max_sessions, max_results_total=max_total,
                                quota_bytes=quota)
                self.quota_bytes = quota
                return self._register(owner, max_sessions, max_total, seq)
            if type(cmd) is not list or len(cmd) not in (6, 7):
                raise InvalidArgumentError("not a [client, seq, ack, op, key, value, owner] "
                                           "array")
            client_id, rseq, ack, op, key, value = cmd[:6]
            owner = cmd[6] if len(cmd) == 7 else ""
            check_write(client_id, rseq, ack, op, key, value)
            check_owner(owner)
        except Exception as e:  # never raise from apply: every replica returns the same error
            return ("err", "bad_command", f"seq {seq}: not a key-value command "
                    f"({type(e).__name__}: {str(e)[:200]})")
        sess = self._sessions.get(client_id)
        if sess is None and len(cmd) == 6:
            # A command written before sessions were registered (an older server's log):
            # replayed as it was applied then, its session made on demand, so that an
            # upgraded node rebuilds the same data. Servers no longer write this form.
            sess = self._sessions[client_id] = _Session("")
        if sess is None:
            self.expired += 1
            return ("err", "session_expired",
                    f"session {client_id} is not known here: it was evicted (the store keeps "
                    f"{self._max_sessions} sessions and {self._max_results_total} results, "
                    f"least recently used out) or never registered. Request {rseq} was not "
                    f"applied now; if it was sent before, it may have been applied then. "
                    f"Register a new session")
        if sess.owner != owner:
            return ("err", "not_owner",
                    f"session {client_id} belongs to another client identity; not applied")
        if rseq >= sess.floor + self._max_results:
            return ("err", "bad_seq",
                    f"request {rseq} of session {client_id} is {self._max_results} or more "
                    f"past its oldest unacknowledged request ({sess.floor}); not applied")
        self._sessions.move_to_end(client_id)
        if ack > sess.floor:
            sess.floor = ack
            res = sess.results
            while res and next(iter(res)) < ack:
                res.popitem(last=False)
                self._results_total -= 1
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
        self._results_total += 1
        if len(sess.results) > self._max_results:
            # Commands commit in any order, so the oldest kept result is the smallest seq
            # only approximately; dropping by insertion order is deterministic either way.
            sess.results.popitem(last=False)
            self._results_total -= 1
        self._evict(keep=client_id)
        return result

    def _register(self, owner: str, max_sessions: int, max_total: int, seq: int) -> Result:
        self._max_sessions = max_sessions
        self._max_results_total = max_total
        self._sessions[seq] = _Session(owner)
        self._evict(keep=seq)
        return ("ok", seq)

    def _evict(self, keep: int) -> None:
        """Drop least recently used sessions while over a bound (never ``keep``, the one
        in use)."""
        sessions = self._sessions
        while (len(sessions) > self._max_sessions
               or self._results_total > self._max_results_total) and len(sessions) > 1:
            sid = next(iter(sessions))
            if sid == keep:
                sessions.move_to_end(sid)
                continue
            self._results_total -= len(sessions.pop(sid).results)

    def _do(self, op: str, key: bytes, value: bytes | None, seq: int) -> Result:
        data = self.data
        old = data.get(key)
        before = 0 if old is None else len(key) + len(old)
        if op == "delete":
            if old is not None:
                del data[key]
                self.data_bytes -= before
            return ("ok", old is not None)
        assert value is not None
        new = value if op == "put" or old is None else old + value
        if len(new) > MAX_VALUE:
            return ("err", "too_large",
                    f"append would make the value {len(new)} bytes, over the limit of "
                    f"{MAX_VALUE}; not applied")
        grown = self.data_bytes - before + len(key) + len(new)
        if self.quota_bytes and grown > self.quota_bytes and grown > self.data_bytes:
            return ("err", "no_space",
                    f"the store holds {self.data_bytes} bytes and this {op} would make it "
                    f"{grown}, over its quota of {self.quota_bytes} (--quota-bytes); delete "
                    f"keys or raise the quota. Not applied")
        data[key] = new
        self.data_bytes = grown
        return ("ok", seq if op == "put" else len(new))


__all__ = ["KVStore", "encode_write", "encode_register", "check_write", "check_key",
           "check_owner", "OPS", "MAX_KEY", "MAX_VALUE"]
