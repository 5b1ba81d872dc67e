"""Idempotent appends: ``RaftNode.append(data, key=(client_id, seq))`` is applied at most once.

A caller that gets ``LeadershipLostError``, ``RaftTimeoutError`` or ``NoLeaderError`` from an
``append`` cannot know whether the entry was committed. With a key it may simply call
``append`` again with the *same* key: if the first attempt was applied, the retry is not
applied again and returns the first attempt's result.

How: the key travels in the entry (an envelope, below), and every replica keeps a table of
the keys it applied, updated as entries are applied, in log order, so the table is part of
the replicated state and the same on every replica. For each client id it keeps the results
of its last ``window`` seqs; a key whose seq is in there is a duplicate: the state machine
sees ``None`` at that seq (as for a no-op) and the append returns the recorded result. A seq
at or below the lowest one forgotten is refused (``KeyExpiredError``): it may have been
applied, and its result is gone. The table holds the ``max_clients`` client ids that applied
most recently (least recently used out, deterministically); a client forgotten so is new
again, so keep retries of one key within that horizon (seconds to minutes in practice).

The rule for callers: use one client id per writer and increasing seqs (gaps allowed), retry
a failed append with the same key until it returns or raises something other than the three
errors above, and do not reuse a key for different data.

**The envelope.** A keyed entry is ``MAGIC + msgpack([client_id, seq]) + data``. A plain
payload that happens to start with ``MAGIC`` is wrapped in an envelope without a key
(``client_id`` None), so every payload beginning with ``MAGIC`` is an envelope and user data
is never misread. (Logs written before this module by an application whose payloads began
with these 5 bytes would be misread; none did in this project.)

**Snapshots.** The table is replicated state: the node's snapshots carry ``table.dump()``
as of their seq (in the snapshot's extra state, ``node_snapshot.py``), and restoring or
installing one loads it before entries after it are applied. A node restarted with
``apply_seq`` (a durable state machine) rebuilds the table only from the entries it
replays; persist ``dump()`` with your state to keep older keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import InvalidArgumentError, RaftError

MAGIC = b"\x00\xfeTPK"
DEFAULT_WINDOW = 64
DEFAULT_MAX_CLIENTS = 4096


class KeyExpiredError(RaftError):
    """The key's seq is older than the window this node keeps for its client: the entry may
    have been applied and its result is forgotten, so it was not applied again."""


class _Expired:
    """The result of a refused (expired) key: the append raises ``KeyExpiredError``."""

    __slots__ = ("key", "window")

    def __init__(self, key: tuple[Any, int], window: int) -> None:
        self.key = key
        self.window = window


def check_key(key: Any) -> tuple[Any, int]:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise InvalidArgumentError(f"append key must be (client_id, seq), got {key!r}")
    client, seq = key
    if not isinstance(client, (str, int)) or isinstance(client, bool):
        raise InvalidArgumentError(f"append key: client id must be a str or int, got "
                                   f"{client!r}")
    if type(seq) is not int or seq < 0:
        raise InvalidArgumentError(f"append key: seq must be an int >= 0, got {seq!r}")
    return client, seq


def wrap(data: bytes, key: tuple[Any, int] | None) -> bytes:
    """The payload to append: ``data`` in an envelope if it has a key or looks like one."""
    if key is None:
        if not data.startswith(MAGIC):
            return data
        return MAGIC + msgpack.packb([None, 0]) + data
    client, seq = check_key(key)
    return MAGIC + msgpack.packb([client, seq]) + data


def unwrap(buf: bytes) -> tuple[tuple[Any, int] | None, bytes]:
    """(key or None, data) of a payload that starts with ``MAGIC``. One that does not decode
    as an envelope (written before envelopes existed) is plain data: ``(None, buf)``."""
    try:
        u = msgpack.Unpacker(max_buffer_size=max(len(buf), 1024))
        u.feed(buf[len(MAGIC):])
        client, seq = u.unpack()
        data = buf[len(MAGIC) + u.tell():]
    except Exception:  # any decoding failure: not an envelope (the same on every replica)
        return None, buf
    if client is None:
        return None, data
    if not isinstance(client, (str, int)) or isinstance(client, bool) or type(seq) is not int:
        return None, buf
    return (client, seq), data


def result_of(r: Any) -> Any:
    """What an append returns for its entry's apply result ``r`` (raises for a refusal)."""
    if isinstance(r, _Expired):
        raise KeyExpiredError(
            f"append key {r.key!r}: older than the last {r.window} seqs kept for its "
            "client; it may have been applied before, so it was not applied again")
    return r


class KeyTable:
    """Per client id: the results of its last ``window`` applied seqs, and the highest seq
    forgotten. Changed only by ``filter``/``record`` on committed entries, in log order."""

    def __init__(self, window: int = DEFAULT_WINDOW,
                 max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self.window = window
        self.max_clients = max_clients
        self.clients: OrderedDict[Any, tuple[int, dict[int, Any]]] = OrderedDict()
        self.duplicates = 0

    def lookup(self, key: tuple[Any, int]) -> tuple[bool, Any]:
        """(True, result) for a key applied before (or refused), else (False, None)."""
        client, seq = key
        entry = self.clients.get(client)
        if entry is None:
            return False, None
        floor, results = entry
        if seq in results:
            return True, results[seq]
        if seq <= floor:
            return True, _Expired(key, self.window)
        return False, None

    def record(self, key: tuple[Any, int], result: Any) -> None:
        client, seq = key
        floor, results = self.clients.pop(client, (-1, {}))
        results[seq] = result
        while len(results) > self.window:
            oldest = min(results)
            del results[oldest]
            floor = max(floor, oldest)
        self.clients[client] = (floor, results)  # most recently used last
        while len(self.clients) > self.max_clients:
            self.clients.popitem(last=False)

    def dump(self) -> bytes:
        """The table as bytes, for a snapshot (results must be msgpack-serialisable)."""
        return msgpack.packb([self.window, self.max_clients,
                              [[c, f, list(r.items())] for c, (f, r) in self.clients.items()]],
                             strict_types=False)

    def load(self, raw: bytes) -> None:
        """Replace the table with one ``dump()`` returned."""
        window, max_clients, clients = msgpack.unpackb(raw, strict_map_key=False)
        self.window, self.max_clients = window, max_clients
        self.clients = OrderedDict((c, (f, dict(r))) for c, f, r in clients)

    # --- the state machine's side --------------------------------------------------------

    def _prepare(self, bufs: list[bytes | None]) -> tuple[list[bytes | None], list[Any]] | None:
        """The bufs the state machine sees (keys stripped, duplicates as None) and, per
        position, what to do with its result; None when no entry carries an envelope."""
        for b in bufs:  # the common case, first: no envelope at all (~50 ns an entry)
            if b is not None and b.startswith(MAGIC):
                break
        else:
            return None
        plan: list[Any] = []
        out: list[bytes | None] = []
        seen: dict[tuple[Any, int], int] = {}
        any_env = False
        for i, b in enumerate(bufs):
            if b is None or not b.startswith(MAGIC):
                out.append(b)
                plan.append(None)
                continue
            any_env = True
            key, data = unwrap(b)
            if key is None:
                out.append(data)
                plan.append(None)
                continue
            dup, res = self.lookup(key)
            if dup:
                self.duplicates += 1
                out.append(None)
                plan.append(("old", res))
            elif key in seen:  # the same key twice in one batch: the first one counts
                self.duplicates += 1
                out.append(None)
                plan.append(("same", seen[key]))
            else:
                seen[key] = i
                out.append(data)
                plan.append(("new", key))
        return (out, plan) if any_env else None

    def _finish(self, plan: list[Any], results: Any) -> list[Any]:
        results = [None] * len(plan) if results is None else list(results)
        for i, p in enumerate(plan):
            if p is None:
                continue
            if p[0] == "new":
                self.record(p[1], results[i])
            elif p[0] == "old":
                results[i] = p[1]
            else:
                results[i] = results[p[1]]
        return results

    def wrap_apply(self, fn: Callable[[list[bytes | None], int], Any],
                   is_async: bool) -> Callable[..., Any]:
        """The state machine as the node calls it: ``fn`` sees each keyed entry once."""
        if is_async:

            async def apply_async(bufs: list[bytes | None], seq: int) -> Any:
                prep = self._prepare(bufs)
                if prep is None:
                    return await fn(bufs, seq)
                return self._finish(prep[1], await fn(prep[0], seq))

            return apply_async

        def apply(bufs: list[bytes | None], seq: int) -> Any:
            prep = self._prepare(bufs)
            if prep is None:
                return fn(bufs, seq)
            return self._finish(prep[1], fn(prep[0], seq))

        return apply


__all__ = ["KeyTable", "KeyExpiredError", "MAGIC", "wrap", "unwrap", "check_key", "result_of"]
