"""``Client``: talk to a cluster of ``python -m tinyraftplus.kv`` nodes (Trio).

    async with Client(["10.0.0.1:7101", "10.0.0.2:7101", "10.0.0.3:7101"], tls=ctx) as c:
        await c.put("k", "v")           # -> the key's revision (log seq)
        await c.append("k", "w")        # -> the value's new length
        assert await c.get("k") == b"vw"
        await c.delete("k")             # -> whether the key existed

Theory of operation
-------------------
**Any node will do, the leader is best.** Every node accepts every request (a follower
forwards writes to the leader and serves linearizable reads with ReadIndex), so the client
needs one working connection. It prefers the leader's: that saves a hop, and a follower
that still believes in a leader that just died would forward into the void until its
timeout. So the client asks every address for its status and sends to the node that says it
leads (the highest term wins if two do for a moment), on start, after every failed attempt
(before sending again, for up to ``attempt_timeout``), and in the background while it has
not found one.

**Retrying is safe.** A write that got no answer -- its connection broke, the node said "no
leader" or "timeout", the attempt took longer than ``attempt_timeout`` -- is sent again,
perhaps to another node, with the *same* ``(session, seq)``. The store's client sessions
(:mod:`tinyraftplus.kv.store`) recognise a copy that was already applied and return the first
result instead of applying it again. Each write also carries ``ack``, the lowest seq this
client still waits for, so the store can forget the results of everything below.

**Giving up is explicit.** After ``timeout`` seconds without success an operation raises
``NoLeaderError`` (nodes answered but could not commit: no quorum, or an election that does
not end) or ``TransportError`` (no node answered at all). A write that raised may or
may not have been applied; a later write from the same client never re-applies it.

**The client protocol** is the peer wire's framing (``[u32 length][u32 CRC32C][payload]``,
see :mod:`tinyraftplus.transport.wire`) around msgpack arrays, many requests in flight on one
connection, answered in any order:

    request   [1, 1, rid]                                          status
              [1, 2, rid, key]                                     get
              [1, 3, rid, session, seq, ack, op, key, value]       write (put/append/delete)
              [1, 4, rid]                                          register -> session id
              [1, 5, rid, op, node_id | nil, "host:port" | nil]    admin (see below)
    response  [1, rid, "ok", result] | [1, rid, code, message]

**Admin requests** (``op``: ``add_learner`` with an address, ``promote``, ``remove``,
``transfer_leader`` with an optional target) run on the leader: another node answers
``not_leader`` naming the one it knows, and the client looks for the leader and sends again
(nothing was done). Once the leader took the request, its outcome may be unknown (``timeout``,
a lost connection, a leader change): the client then raises saying so instead of sending it
again, and ``status()`` tells what happened. A refusal (a change in flight, a stale view, a
lagging learner, an unknown node) is answered ``refused`` and raised as ``MembershipError``;
a client whose certificate may not administer (``--admin-allow``) gets ``forbidden``.

Error codes: ``no_leader``, ``timeout``, ``retry`` (leadership changed; safe to retry),
``stopped`` (the node is shutting down) -- all retried by the client -- and ``bad_request``,
``err`` (the store refused: ``stale``, ``session_expired``, ``not_owner``, ``bad_seq``,
``too_large``), ``error``, which are raised.

**Sessions.** The client registers a session on its first write (the cluster assigns the id;
the session belongs to the client certificate's identity, so another certificate cannot write
in it). If the store evicted the session (it keeps a bounded number, least recently used out)
it refuses the write, never applies it. A write refused so at its first and only attempt is
sent again in a new session (no copy of it can have been applied); one sent before raises
:class:`SessionExpiredError` (an earlier copy may have been applied before the eviction, and
sending it again could apply it twice); the next write registers a new session.

With TLS (the default; ``plaintext=True`` to say you mean otherwise) the client presents a
certificate signed by the cluster's CA and accepts any server whose certificate the CA
signed and which names a node (``node-<id>.tinyraftplus``); :func:`client_ssl_context` makes
such a context from PEM files.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from ..errors import (
    ConfigurationError,
    InvalidArgumentError,
    LeadershipLostError,
    MembershipError,
    NoLeaderError,
    ProtocolError,
    RaftError,
    RaftTimeoutError,
    TinyRaftError,
    TransportError,
    UsageError,
)
from ..transport.faststream import FastStream
from ..transport.tls import DNS_SUFFIX, cert_dns_names, cert_names_node, new_context
from ..transport.wire import FrameDecoder, frame, show_value
from .store import MAX_CLIENT_ID, MAX_VALUE, check_key, check_write

logger = logging.getLogger("tinyraftplus.client")

VERSION = 1
TAG_STATUS = 1
TAG_GET = 2
TAG_WRITE = 3
TAG_REGISTER = 4
TAG_ADMIN = 5
ADMIN_OPS = frozenset({"add_learner", "promote", "remove", "transfer_leader"})
MAX_ADMIN_STR = 255
"""Longest string in an admin request (a node id, an address)."""
MAX_RID = (1 << 63) - 1
CLIENT_MAX_FRAME = 2 << 20
"""Largest frame on the client port (a 1 MiB value plus a 4 KiB key fits with room)."""
SESSION_WINDOW = 2048
"""Most seqs a client runs ahead of its oldest unanswered write (below the store's
``max_results`` of 4096, so a result the client may still ask for again is never dropped)."""
RETRYABLE = frozenset({"no_leader", "timeout", "retry", "stopped"})
RECEIVE_SIZE = 256 * 1024

Address = tuple[str, int]


_REFUSED = "connection refused"


def _connect_error(e: BaseException, in_tls_handshake: bool) -> str:
    """What went wrong in a connection attempt, in words a user can act on."""
    if isinstance(e, trio.TooSlowError):
        return "no answer in time"
    causes: list[BaseException] = [e]
    c = e.__cause__ or e.__context__
    if isinstance(c, BaseExceptionGroup):
        causes = list(c.exceptions)
    elif c is not None:
        causes = [c]
    if causes and all(isinstance(x, ConnectionRefusedError) for x in causes):
        return _REFUSED
    if in_tls_handshake:
        text = f"{causes[0]}"
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return ("the TLS handshake failed: the server does not speak TLS (started with "
                    "--plaintext? then use plaintext=True)")
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return ("the TLS handshake failed: the server's certificate is not signed by the "
                    "CA this client trusts")
        return (f"the TLS handshake failed ({type(causes[0]).__name__}: {text[:200]}); does "
                f"the server accept this client's certificate?")
    return f"{type(causes[0]).__name__}: {str(causes[0])[:200]}"


class ForbiddenError(RaftError, PermissionError):
    """The server's ``--authz`` does not let this client's certificate do that."""


class _Expired(RaftError):
    """Internal: the store answered session_expired after ``sent`` copies were sent."""

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


class SessionExpiredError(RaftError):
    """The cluster evicted this client's session: the write was refused and not applied (an
    earlier attempt of it may have been, before the eviction). The client registers a new
    session for its next write."""


# --- the client protocol -------------------------------------------------------------------


def encode_status(rid: int) -> bytes:
    return frame(msgpack.packb([VERSION, TAG_STATUS, rid]))


def encode_get(rid: int, key: bytes) -> bytes:
    return frame(msgpack.packb([VERSION, TAG_GET, rid, key], use_bin_type=True))


def encode_register_request(rid: int) -> bytes:
    return frame(msgpack.packb([VERSION, TAG_REGISTER, rid]))


def encode_write_request(rid: int, client_id: int, seq: int, ack: int, op: str, key: bytes,
                         value: bytes | None) -> bytes:
    return frame(msgpack.packb([VERSION, TAG_WRITE, rid, client_id, seq, ack, op, key, value],
                               use_bin_type=True))


def encode_admin(rid: int, op: str, node_id: Any = None, addr: str | None = None) -> bytes:
    return frame(msgpack.packb([VERSION, TAG_ADMIN, rid, op, node_id, addr]))


_REQUEST_HEADS = frozenset({0x93, 0x94, 0x96, 0x99})


def _one_array() -> Callable[[list[Any]], list[Any]]:
    """msgpack ``list_hook``: a request holds no array but itself; stop at the first inner
    one (an array of two million empty arrays is refused after one, not decoded)."""
    seen = 0

    def hook(lst: list[Any]) -> list[Any]:
        nonlocal seen
        seen += 1
        if seen > 1:
            raise ProtocolError("a request holds no nested arrays")
        return lst

    return hook


def decode_request(payload: bytes) -> list[Any]:
    """Decode and validate one request payload (server side); raises ``ProtocolError``
    saying what is wrong. Returns the msgpack array: ``[1, tag, rid, ...]``."""
    # Refused before decoding where the first byte says it cannot be valid: a request is a
    # fixarray of 3, 4, 6 or 9 elements (status/register, get, admin, write).
    if not payload or payload[0] not in _REQUEST_HEADS:
        raise ProtocolError(f"a request must be an array [1, tag, rid, ...] of 3, 4, 6 or 9 "
                            f"elements (first byte {payload[:1].hex() or 'missing'})")
    # Strings are at most 16 characters (an op), except in an admin request (a node id, an
    # address): its tag is the third byte ([fixarray, 1, 5, ...]).
    admin = payload[0] == 0x96 and payload[1:3] == b"\x01\x05"
    if payload[0] == 0x96 and not admin:
        raise ProtocolError("an array of 6 elements must be an admin request [1, 5, rid, op, "
                            "node_id, address]")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_array_len=9,
                              max_map_len=0, max_str_len=MAX_ADMIN_STR if admin else 16,
                              max_bin_len=0 if admin else MAX_VALUE,
                              max_ext_len=0, list_hook=_one_array())
    except Exception as e:  # msgpack raises several unrelated types; all mean "garbage"
        raise ProtocolError(f"a request of {len(payload)} bytes is not msgpack "
                            f"({type(e).__name__})") from None
    if type(obj) is not list or len(obj) < 3:
        raise ProtocolError(f"a request must be an array [1, tag, rid, ...], got "
                            f"{type(obj).__name__}")
    version, tag, rid = obj[0], obj[1], obj[2]
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"client protocol version {show_value(version, 20)} (this node "
                            f"speaks {VERSION})")
    if type(rid) is not int or not 0 <= rid <= MAX_RID:
        raise ProtocolError("request id must be an int in [0, 2**63)")
    if (tag == TAG_STATUS or tag == TAG_REGISTER) and type(tag) is int:
        if len(obj) != 3:
            raise ProtocolError("a status or register request has no fields")
    elif tag == TAG_GET and type(tag) is int:
        if len(obj) != 4:
            raise ProtocolError("a get request is [1, 2, rid, key]")
        try:
            check_key(obj[3])
        except InvalidArgumentError as e:
            raise ProtocolError(f"get: {e}") from None
    elif tag == TAG_ADMIN and type(tag) is int:
        _check_admin(obj)
    elif tag == TAG_WRITE and type(tag) is int:
        if len(obj) != 9:
            raise ProtocolError("a write request is [1, 3, rid, client_id, seq, ack, op, key, "
                                "value]")
        try:
            check_write(*obj[3:])
        except InvalidArgumentError as e:
            raise ProtocolError(f"write: {e}") from None
    else:
        raise ProtocolError(f"unknown request tag {show_value(tag, 20)}")
    return obj


def _check_admin(obj: list[Any]) -> None:
    if len(obj) != 6:
        raise ProtocolError("an admin request is [1, 5, rid, op, node_id, address]")
    op, target, addr = obj[3], obj[4], obj[5]
    if op not in ADMIN_OPS or type(op) is not str:
        raise ProtocolError(f"admin: unknown op {show_value(op, 20)} (one of "
                            f"{', '.join(sorted(ADMIN_OPS))})")
    if target is not None or op != "transfer_leader":
        if type(target) is int:
            ok = 0 <= target <= MAX_RID
        else:
            ok = type(target) is str and 0 < len(target) <= MAX_ADMIN_STR
        if not ok:
            raise ProtocolError(f"admin {op}: the node id must be an int >= 0 or a str of "
                                f"1..{MAX_ADMIN_STR} characters, got {show_value(target, 20)}")
    if op == "add_learner":
        if type(addr) is not str:
            raise ProtocolError("admin add_learner: give the node's peer address host:port")
        try:
            parse_address(addr)
        except InvalidArgumentError as e:
            raise ProtocolError(f"admin add_learner: {e}") from None
    elif addr is not None:
        raise ProtocolError(f"admin {op} takes no address")


def encode_response(rid: int, code: str, payload: Any) -> bytes:
    return frame(msgpack.packb([VERSION, rid, code, payload], use_bin_type=True))


def _decode_response(payload: bytes) -> tuple[int, str, Any]:
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise ProtocolError(f"a response of {len(payload)} bytes is not msgpack "
                            f"({type(e).__name__})") from None
    if (type(obj) is not list or len(obj) != 4 or obj[0] != VERSION or type(obj[1]) is not int
            or type(obj[2]) is not str):
        raise ProtocolError("a response must be [1, rid, code, payload]")
    return obj[1], obj[2], obj[3]


# --- TLS --------------------------------------------------------------------------------------


def client_ssl_context(ca_file: str | os.PathLike[str], cert_file: str | os.PathLike[str],
                       key_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """An SSL context for :class:`Client`: trusts only the cluster CA and presents the
    client's certificate (servers refuse clients without one the CA signed).

    The hostname check is off because one address list serves every node: instead the
    client checks, after the handshake, that the server's certificate names a node."""
    ctx = new_context(server=False)  # the project's TLS settings, as between nodes
    ctx.check_hostname = False
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
        ctx.load_cert_chain(os.fspath(cert_file),
                            None if key_file is None else os.fspath(key_file))
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgumentError(
            f"cannot load the client's TLS files (CA {os.fspath(ca_file)!r}, certificate "
            f"{os.fspath(cert_file)!r}): {e}"
        ) from None
    return ctx


def _names_a_node(cert: dict[str, Any] | None) -> bool:
    for kind, value in (cert or {}).get("subjectAltName", ()):
        v = value.lower()
        if kind == "DNS" and v.startswith("node-") and v.endswith(DNS_SUFFIX):
            return True
    return False


def parse_address(a: str | Address, *, allow_zero: bool = False) -> Address:
    """``"host:port"`` (``[v6]:port`` too) or ``(host, port)`` -> ``(host, port)``; port 0
    ("pick one") only with ``allow_zero``."""
    if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str) and type(a[1]) is int:
        host, port = a
    elif isinstance(a, str) and ":" in a:
        host, _, p = a.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            port = int(p)
        except ValueError:
            raise InvalidArgumentError(f"address {a!r}: the port is not a number") from None
    else:
        raise InvalidArgumentError(f"address {a!r}: expected 'host:port' or (host, port)")
    if not host or not (0 if allow_zero else 1) <= port < 65536:
        raise InvalidArgumentError(f"address {a!r}: need a host and a port in 1..65535")
    return host, port


def _as_bytes(v: Any, what: str) -> bytes:
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise InvalidArgumentError(f"{what} must be str or bytes, got {type(v).__name__}")


# --- connections --------------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("event", "code", "payload", "deadline")

    def __init__(self, deadline: float) -> None:
        self.event = trio.Event()
        self.code = ""
        self.payload: Any = None
        self.deadline = deadline

    def set(self, code: str, payload: Any) -> None:
        if not self.event.is_set():
            self.code, self.payload = code, payload
            self.event.set()


class _Conn:
    """One connection to one node: requests are written in batches by a writer task and
    answers matched to waiters by request id in a reader task."""

    def __init__(self, addr: Address, stream: FastStream) -> None:
        self.addr = addr
        self.stream = stream
        self.out: list[bytes] = []
        self.wake = trio.Event()
        self.pending: dict[int, _Waiter] = {}
        self.closed = False
        self.error = ""
        self.scope = trio.CancelScope()
        self.node_id: Any = None
        self.fatal = False
        """Closed for a reason retrying cannot mend (plaintext against TLS)."""

    def send(self, rid: int, data: bytes, deadline: float) -> _Waiter:
        """Queue a request; its waiter gets the answer, or code ``"timeout"`` from the
        sweeper once ``deadline`` passed (no cancel scope per request: they cost more than
        the rest of a request's handling here)."""
        w = _Waiter(deadline)
        if self.closed:
            w.set("closed", self.error or "connection closed")
            return w
        self.pending[rid] = w
        if len(self.pending) == 1 and not self.out and self.stream.ready_for_direct_send():
            # The only request in flight and nothing being sent: write now, saving a task
            # switch. With more in flight the writer sends them together (see the server's
            # ``_answer``). What the socket does not take stays in the stream, in order;
            # the writer finishes it.
            try:
                if not self.stream.try_send(data):
                    self.wake.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self.close(f"connection to {self.addr[0]}:{self.addr[1]} failed: {e!r}")
                self.scope.cancel()
            return w
        self.out.append(data)
        self.wake.set()
        return w

    def close(self, why: str) -> None:
        if not self.closed:
            self.closed = True
            self.error = why
            for w in self.pending.values():
                w.set("closed", why)
            self.pending.clear()
        self.scope.cancel()

    async def run(self) -> None:
        with self.scope:
            async with trio.open_nursery() as n:
                n.start_soon(self._guard, self._writer)
                n.start_soon(self._sweeper)
                await self._guard(self._reader)
                n.cancel_scope.cancel()
        self.close(self.error or "connection closed")
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    async def _guard(self, fn: Callable[[], Any]) -> None:
        """Run the reader or the writer; a network or protocol error closes the connection
        (both tasks usually fail together; one error is enough to report)."""
        try:
            await fn()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.close(f"connection to {self.addr[0]}:{self.addr[1]} failed: {e!r}")
        except ProtocolError as e:
            self.close(f"bad answer from {self.addr[0]}:{self.addr[1]}: {e}")

    async def _sweeper(self) -> None:
        """Time out requests that passed their deadline (checked every 20 ms)."""
        while True:
            await trio.sleep(0.02)
            now = trio.current_time()
            late = [rid for rid, w in self.pending.items() if w.deadline <= now]
            for rid in late:
                self.pending.pop(rid).set("timeout_local", "no answer in time")

    async def _writer(self) -> None:
        stream = self.stream
        while True:
            if not self.out and not stream.out_pending:
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            # No requests: only what a direct send left, which send_all flushes.
            buf = b"".join(self.out) if self.out else ()
            self.out.clear()
            await stream.send_all(buf)

    async def _reader(self) -> None:
        decoder = FrameDecoder(CLIENT_MAX_FRAME)
        while True:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                self.close(f"{self.addr[0]}:{self.addr[1]} closed the connection")
                return
            if decoder.offset == 0 and data[:2] in (b"\x15\x03", b"\x16\x03"):
                self.fatal = True
                self.close(f"{self.addr[0]}:{self.addr[1]} answered in TLS: its client port "
                           f"speaks TLS and this client runs with plaintext=True; use "
                           f"tls=client_ssl_context(ca, cert, key)")
                return
            for payload in decoder.feed(data):
                rid, code, body = _decode_response(payload)
                if rid == 0 and code != "ok":  # about the connection, not a request
                    self.fatal = code == "tls_required"
                    self.close(f"{self.addr[0]}:{self.addr[1]}: {show_value(body, 300)}")
                    return
                w = self.pending.pop(rid, None)
                if w is not None:
                    w.set(code, body)


# --- the client -------------------------------------------------------------------------------


class Client:
    """A Trio client for the key-value cluster; see the module docstring.

    ``addresses``: the nodes' client ports (``"host:port"`` or tuples), any subset of the
    cluster (one is enough, all is best). ``tls``: an ``ssl.SSLContext`` from
    :func:`client_ssl_context`; or ``plaintext=True``. ``timeout``: how long one operation
    may take in all, retries included; ``attempt_timeout``: how long one attempt waits for an
    answer before trying again (elsewhere); ``connect_timeout``: per TCP+TLS connection.
    ``client_id`` (read-only): the session id the cluster assigned on the first write
    (``None`` before); a new ``Client`` always gets a new session. ``max_inflight``: writes
    in flight at once (the rest wait), below the
    store's per-session memory. ``backoff_max``: the longest pause between attempts
    (they start at 10 ms and double, with jitter).
    """

    def __init__(
        self,
        addresses: Sequence[str | Address],
        *,
        tls: ssl.SSLContext | None = None,
        plaintext: bool = False,
        timeout: float = 10.0,
        attempt_timeout: float = 3.0,
        connect_timeout: float = 2.0,
        max_inflight: int = 1024,
        backoff_max: float = 0.25,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(addresses, (str, tuple)):
            addresses = [addresses]  # type: ignore[list-item]
        addrs = [parse_address(a) for a in addresses]
        if not addrs:
            raise InvalidArgumentError("Client: give at least one node address")
        if tls is None and plaintext is not True:
            raise ConfigurationError(
                "Client: no TLS context; pass tls=client_ssl_context(ca, cert, key), or "
                "plaintext=True for a cluster started with --plaintext"
            )
        if tls is not None and plaintext:
            raise ConfigurationError("Client: both tls and plaintext=True given; choose one")
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise InvalidArgumentError(f"Client: tls must be an ssl.SSLContext, got {tls!r}")
        for name, v in (("timeout", timeout), ("attempt_timeout", attempt_timeout),
                        ("connect_timeout", connect_timeout), ("backoff_max", backoff_max)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise InvalidArgumentError(f"Client({name}={v!r}): a positive number of seconds")
        if not (isinstance(max_inflight, int) and 1 <= max_inflight <= 4096):
            raise InvalidArgumentError(f"Client(max_inflight={max_inflight!r}): 1..4096")
        self._rng = rng or random.Random()
        self.addresses = addrs
        self.client_id: int | None = None
        self._registering: trio.Event | None = None
        self._connect_errors: dict[Address, str] = {}
        """Why the last connection attempt to each address failed."""
        self._misnamed: set[Address] = set()
        """Addresses whose certificate named another node than the id they reported: no
        request but status goes there until a status check passes again."""
        self.timeout = float(timeout)
        self.attempt_timeout = float(attempt_timeout)
        self.connect_timeout = float(connect_timeout)
        self.backoff_max = float(backoff_max)
        self._tls = tls
        self._conns: dict[Address, _Conn] = {}
        self._connecting: dict[Address, trio.Event] = {}
        self._target = 0
        self._next_rid = 0
        self._next_seq = 1
        self._outstanding: dict[int, None] = {}
        self._window_moved = trio.Event()
        self._max_inflight = max_inflight
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self._finding: trio.Event | None = None
        self._found = False
        self._last_search = -1e9
        self.retries = 0
        """Attempts that were sent again (for tests and curious users)."""

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        # Learn who is who (and who leads) now, so the first request goes to the leader.
        with trio.move_on_after(self.connect_timeout):
            await self._find_leader()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        for c in list(self._conns.values()):
            c.close("client closed")
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        # The body's own exception is not handed to the nursery: it would come back wrapped
        # in an ExceptionGroup, and a caller should catch NoLeaderError, not a group of one.
        # The background tasks (connections) handle their own errors.
        await self._nursery_cm.__aexit__(None, None, None)
        return False

    # --- public API ---------------------------------------------------------------------

    async def put(self, key: str | bytes, value: str | bytes) -> int:
        """Set ``key`` to ``value``; returns the log seq it was applied at (its revision)."""
        return int(await self._write("put", key, value))

    async def append(self, key: str | bytes, value: str | bytes) -> int:
        """Append ``value`` to ``key``'s value (creating it); returns the new length."""
        return int(await self._write("append", key, value))

    async def delete(self, key: str | bytes) -> bool:
        """Remove ``key``; returns whether it existed."""
        return bool(await self._write("delete", key, None))

    async def get(self, key: str | bytes) -> bytes | None:
        """The value of ``key`` (``None`` if absent), read linearizably."""
        k = _as_bytes(key, "key")
        check_key(k)
        return await self._call(  # type: ignore[no-any-return]
            lambda rid: encode_get(rid, k), "read")

    async def status(self, address: str | Address | None = None) -> dict[str, Any]:
        """The status of one node (its view: id, state, leader, term, commit and apply
        seq, ...): the node at ``address``, or whichever the client is connected to."""
        if address is None:
            return await self._call(encode_status, "other")  # type: ignore[no-any-return]
        addr = parse_address(address)
        with trio.fail_after(self.attempt_timeout):
            st = await self._status_of(addr)
        if st is None:
            raise TransportError(f"no status from {addr[0]}:{addr[1]}")
        return st

    async def cluster_status(self) -> dict[Any, dict[str, Any]]:
        """The status of every node that answers (within ``attempt_timeout``), by node id.
        Each holds its ``role``, ``term``, ``leader``, ``first_seq``/``last_seq``/
        ``commit_seq``/``apply_seq``, its configuration (``voters``, ``learners``,
        ``outgoing``, ``config_seq``, ``addrs``) and, on the leader, ``followers``: per
        member ``match``, ``next``, ``state`` and ``inflight``."""
        out: dict[Any, dict[str, Any]] = {}

        async def one(addr: Address) -> None:
            with trio.move_on_after(self.attempt_timeout):
                st = await self._status_of(addr)
                if st is not None:
                    out[st.get("id")] = st

        async with trio.open_nursery() as n:
            for a in self.addresses:
                n.start_soon(one, a)
        return out

    # --- admin (on the leader; see the module docstring) --------------------------------

    async def add_learner(self, node_id: int | str, address: str) -> dict[str, Any]:
        """Add ``node_id`` (listening for peers at ``address``, ``host:port``) as a learner.
        Returns ``{"config": ..., "leader": ...}`` once the change is committed."""
        parse_address(address)
        return await self._admin("add_learner", node_id, address)

    async def promote(self, node_id: int | str) -> dict[str, Any]:
        """Make learner ``node_id`` a voter (refused while it lags)."""
        return await self._admin("promote", node_id)

    async def remove_node(self, node_id: int | str) -> dict[str, Any]:
        """Remove voter or learner ``node_id`` (the leader itself too: it then steps down)."""
        return await self._admin("remove", node_id)

    async def transfer_leadership(self, to: int | str | None = None) -> dict[str, Any]:
        """Hand leadership to voter ``to`` (``None``: the most up-to-date one)."""
        return await self._admin("transfer_leader", to)

    async def _admin(self, op: str, target: Any, addr: str | None = None) -> dict[str, Any]:
        """Send an admin request to the leader. Sent again only when the answer says nothing
        was done (not the leader, no leader, could not connect); an unknown outcome raises."""
        deadline = trio.current_time() + self.timeout
        last: TinyRaftError | None = None
        attempt = 0
        while True:
            if trio.current_time() >= deadline:
                raise last or NoLeaderError(f"no leader answered within {self.timeout}s")
            if attempt:
                await trio.sleep(min(self.backoff_max, 0.05 * 2 ** min(attempt, 5)))
                with trio.move_on_at(deadline):
                    await self._find_leader()
            attempt += 1
            conn = await self._connection(deadline)
            if conn is None:
                last = TransportError(f"could not connect to {self._addrs_text()}")
                continue
            rid = self._rid()
            w = conn.send(rid, encode_admin(rid, op, target, addr), deadline)
            await w.event.wait()
            code, body = w.code, w.payload
            where = f"{conn.addr[0]}:{conn.addr[1]}"
            if code == "ok" and isinstance(body, dict):
                return body
            if code in ("not_leader", "no_leader"):
                last = NoLeaderError(f"{where}: {body}")
                if self.addresses[self._target] == conn.addr and len(self.addresses) > 1:
                    self._target = (self._target + 1) % len(self.addresses)
                continue
            if code == "refused":
                raise MembershipError(f"{where} refused: {body}")
            if code == "forbidden":
                raise ForbiddenError(f"{where} refused: {body}")
            if code == "bad_request":
                raise InvalidArgumentError(f"the server refused the request: {body}")
            if code in ("timeout", "timeout_local", "closed", "retry", "stopped"):
                cls = RaftTimeoutError if code.startswith("timeout") else LeadershipLostError
                more = "" if "may" in str(body) else ("; it may or may not have taken "
                                                      "effect: check the status")
                raise cls(f"{op} {target!r}: {where}: {body}{more}")
            raise RaftError(f"{where} answered {code!r}: {body}")

    @property
    def leader_address(self) -> Address | None:
        """The address the client currently sends to (the leader's, once known)."""
        return self.addresses[self._target]

    # --- internals ----------------------------------------------------------------------

    async def _write(self, op: str, key: Any, value: Any, *, again: bool = False) -> Any:
        k = _as_bytes(key, "key")
        v = None if value is None else _as_bytes(value, "value")
        check_write(1, 1, 1, op, k, v)
        cid = await self._session()
        out = self._outstanding
        # At most max_inflight writes at once; and since the store keeps the results of seqs
        # from the ack on only up to a bound, never run so far ahead of the oldest write
        # still waiting that its result could be forgotten while it may still be retried.
        # (A counter, not a trio.Semaphore: no scheduling point on the fast path.)
        while out and (len(out) >= self._max_inflight
                       or self._next_seq - next(iter(out)) >= SESSION_WINDOW):
            if self._window_moved.is_set():  # one event shared by all who wait
                self._window_moved = trio.Event()
            await self._window_moved.wait()
            if self.client_id != cid:  # the session expired while we waited
                cid = await self._session()
                out = self._outstanding
        seq = self._next_seq
        self._next_seq += 1
        out[seq] = None
        retry = False
        try:
            # ack: the lowest seq still waiting (dict order is seq order), recomputed per
            # attempt so that a retry also lets the store forget what it can.
            return await self._call(
                lambda rid: encode_write_request(rid, cid, seq, next(iter(out)), op, k, v))
        except _Expired as e:
            if self.client_id == cid:  # the first to hear: the next write registers anew
                self.client_id = None
                self._next_seq = 1
                self._outstanding = {}
                self._window_moved.set()
            if e.sent == 1 and not again:
                # Refused at its only attempt: no copy of this write can have been applied,
                # so it is safe to send it again in a new session (once).
                retry = True
            else:
                raise SessionExpiredError(
                    f"write {op} {k[:60]!r}: the cluster forgot this client's session {cid} (it "
                    f"keeps a bounded number, least recently used out), so the write was refused "
                    f"and not applied now; if an earlier attempt of it reached the cluster before "
                    f"the session was evicted, that one may have been applied. The next write "
                    f"opens a new session") from None
        finally:
            out.pop(seq, None)
            self._window_moved.set()
        assert retry
        return await self._write(op, key, value, again=True)

    async def _session(self) -> int:
        """This client's session id, registering one first if it has none (concurrent
        writers share one registration)."""
        while self.client_id is None:
            ev = self._registering
            if ev is not None:
                await ev.wait()
                continue
            ev = self._registering = trio.Event()
            try:
                sid = await self._call(encode_register_request)
                if type(sid) is not int or not 0 <= sid <= MAX_CLIENT_ID:
                    raise ProtocolError(f"register answered {sid!r}, not a session id")
                self.client_id = sid
                self._next_seq = 1
            finally:
                self._registering = None
                ev.set()
        return self.client_id

    def _rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    async def _call(self, build: Callable[[int], bytes], what: str = "write") -> Any:
        """Send a request (``build(rid)``) until answered, retrying elsewhere; ``what``
        ("write", "read" or "other") words the error when it gives up."""
        deadline = trio.current_time() + self.timeout
        last: TinyRaftError | None = None
        reached = False
        attempt = 0
        seek = 0  # rounds spent looking for a leader since the last failure
        seek_until = 0.0
        refused_rounds = 0
        sent = 0  # copies of the request sent
        while True:
            now = trio.current_time()
            if now >= deadline:
                raise self._give_up(last, reached, what)
            if attempt:
                delay = min(self.backoff_max, 0.01 * 2 ** min(attempt + seek, 10))
                await trio.sleep(min(self._rng.uniform(delay / 2, delay),
                                     max(0.0, deadline - now)))
                # Find the leader before sending again: a follower that still believes in a
                # leader that just died would forward the request into the void. If none
                # says it leads for an attempt_timeout, send anyway (the client may reach
                # only followers).
                if seek and trio.current_time() < seek_until:
                    with trio.move_on_at(deadline):
                        if not await self._find_leader():
                            seek += 1
                            continue
                seek = 0
                self.retries += 1
            attempt += 1
            conn = self._conns.get(self.addresses[self._target])
            if conn is None or conn.closed:
                conn = await self._connection(deadline)
            if conn is None:
                errs = [self._connect_errors.get(a, "") for a in self.addresses]
                if all(e.startswith(_REFUSED) for e in errs):
                    refused_rounds += 1
                    if refused_rounds >= 2:  # nothing listens anywhere: say so now
                        raise TransportError(
                            f"every node refused the connection ({self._addrs_text()}): "
                            f"nothing listens there. Are the servers running, and are these "
                            f"their client ports?")
                else:
                    refused_rounds = 0
                why = "; ".join(sorted({e for e in errs if e})) or "no answer"
                last = TransportError(f"could not connect to {self._addrs_text()} ({why})")
                continue
            refused_rounds = 0
            rid = self._rid()
            sent += 1
            w = conn.send(rid, build(rid),
                          min(deadline, trio.current_time() + self.attempt_timeout))
            await w.event.wait()
            code, body = w.code, w.payload
            if code == "ok":
                if not self._found and self._finding is None and self._nursery is not None \
                        and trio.current_time() - self._last_search > 0.5:
                    # Served, but not known to be by the leader (none had been elected when
                    # we looked): look again in the background, to save the forwarding hop
                    # and not depend on a follower when the leader changes.
                    self._last_search = trio.current_time()
                    self._nursery.start_soon(self._find_leader)
                return body
            if code == "timeout_local":
                reached = True  # it is up and speaks TLS with us; it cannot commit in time
                last = RaftTimeoutError(
                    f"{conn.addr[0]}:{conn.addr[1]} did not answer within "
                    f"{self.attempt_timeout}s")
            elif code == "closed":
                if conn.fatal:
                    raise ConfigurationError(str(body))
                last = TransportError(str(body))
            elif code in RETRYABLE:
                reached = True
                last = NoLeaderError(f"{conn.addr[0]}:{conn.addr[1]}: {body}")
            elif code == "bad_request":
                raise InvalidArgumentError(f"the server refused the request: {body}")
            elif code == "forbidden":
                raise ForbiddenError(f"{conn.addr[0]}:{conn.addr[1]} refused: {body}")
            elif code == "err":
                if isinstance(body, str) and body.startswith("session_expired:"):
                    raise _Expired(body, sent)
                raise RaftError(f"the store refused the request: {body}")
            else:
                raise RaftError(f"{conn.addr[0]}:{conn.addr[1]} answered {code!r}: {body}")
            # Retry: move off this address (the leader search may point back to it).
            if self.addresses[self._target] == conn.addr and len(self.addresses) > 1:
                self._target = (self._target + 1) % len(self.addresses)
            seek = 1
            seek_until = trio.current_time() + self.attempt_timeout

    def _give_up(self, last: TinyRaftError | None, reached: bool,
                 what: str) -> TinyRaftError:
        if not reached:
            return TransportError(
                f"no node answered within {self.timeout}s ({self._addrs_text()}): connections "
                f"failed, were closed or got no reply. Are the servers running, and are these "
                f"their client ports?" + (f" Last error: {last}" if last else "")
            )
        outcome = {
            "read": "The read was not served; it changed nothing.",
            "write": "The write may or may not have been applied.",
        }.get(what, "Nothing was changed.")
        return NoLeaderError(
            f"no quorum: the request did not complete within {self.timeout}s "
            f"(nodes: {self._addrs_text()}). A majority of the nodes must be up and able to "
            f"reach each other. Last error: {last}. {outcome}"
        )

    def _addrs_text(self) -> str:
        return ", ".join(f"{h}:{p}" for h, p in self.addresses)

    async def _find_leader(self) -> bool:
        """Ask every node which one leads and point the client at it; True if a node said
        it leads. Concurrent callers share one round of questions."""
        ev = self._finding
        if ev is not None:
            await ev.wait()
            return self._found
        ev = self._finding = trio.Event()
        try:
            self._found = await self._refresh()
        finally:
            self._finding = None
            ev.set()
        return self._found

    async def _refresh(self) -> bool:
        """Ask every node for its status and point the client at the leader."""
        statuses: dict[Address, dict[str, Any]] = {}

        async def one(addr: Address) -> None:
            with trio.move_on_after(min(self.attempt_timeout, 1.0)):
                st = await self._status_of(addr)
                if st is not None:
                    statuses[addr] = st

        async with trio.open_nursery() as n:
            for a in self.addresses:
                n.start_soon(one, a)
        # A node that says it leads is believed over one that names another leader.
        claims = [(st["term"], addr) for addr, st in statuses.items()
                  if st.get("state") == "leader" and type(st.get("term")) is int]
        if claims:
            # Two claims happen for a moment (a deposed leader that has not heard yet):
            # the higher term is the real one.
            self._target = self.addresses.index(max(claims)[1])
            return True
        return False

    async def _status_of(self, addr: Address) -> dict[str, Any] | None:
        conn = await self._connect(addr)
        if conn is None:
            return None
        rid = self._rid()
        w = conn.send(rid, encode_status(rid), trio.current_time() + self.attempt_timeout)
        await w.event.wait()
        if w.code != "ok" or not isinstance(w.payload, dict):
            return None
        node_id = w.payload.get("id")
        stream = conn.stream
        if stream.tls and not (
                isinstance(node_id, (int, str))
                and cert_names_node(stream.getpeercert(), node_id)):
            # A node's certificate names the node: one that says it is another is not to
            # be believed (nor sent to).
            why = (f"{addr[0]}:{addr[1]} says it is node {show_value(node_id)} but its "
                   f"certificate names {', '.join(cert_dns_names(stream.getpeercert()))}")
            logger.warning("refusing %s", why)
            self._connect_errors[addr] = why
            self._misnamed.add(addr)
            conn.close(why)
            return None
        self._misnamed.discard(addr)
        conn.node_id = node_id
        return w.payload

    async def _connection(self, deadline: float) -> _Conn | None:
        """A live connection, to the target address if possible, else to the next one that
        answers; ``None`` if none could be made in this round (the caller backs off)."""
        n = len(self.addresses)
        for k in range(n):
            if trio.current_time() >= deadline:
                return None
            addr = self.addresses[(self._target + k) % n]
            if addr in self._misnamed:
                continue
            with trio.move_on_at(deadline):
                conn = await self._connect(addr)
                if conn is not None:
                    self._target = (self._target + k) % n
                    return conn
        return None

    async def _connect(self, addr: Address) -> _Conn | None:
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        busy = self._connecting.get(addr)
        if busy is not None:  # someone is connecting there already: share the result
            await busy.wait()
            conn = self._conns.get(addr)
            return conn if conn is not None and not conn.closed else None
        done = self._connecting[addr] = trio.Event()
        try:
            stream = await self._open_stream(addr)
            if stream is None:
                return None
            conn = _Conn(addr, stream)
            self._conns[addr] = conn
            if self._nursery is None:
                raise UsageError("use the Client inside `async with Client(...) as c:`")
            self._nursery.start_soon(conn.run)
            return conn
        finally:
            del self._connecting[addr]
            done.set()

    async def _open_stream(self, addr: Address) -> FastStream | None:
        host, port = addr
        tcp: FastStream | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = FastStream.from_trio(await trio.open_tcp_stream(host, port), self._tls)
                if self._tls is None:
                    return tcp
                tls = tcp
                await tls.do_handshake()
            if not _names_a_node(tls.getpeercert()):
                why = f"its certificate does not name a node (node-<id>{DNS_SUFFIX})"
                self._connect_errors[addr] = why
                logger.warning("refusing %s:%d: %s", host, port, why)
                await trio.aclose_forcefully(tls)
                return None
            self._connect_errors.pop(addr, None)
            return tls
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
            why = _connect_error(e, tcp is not None and self._tls is not None)
            self._connect_errors[addr] = why
            logger.debug("cannot connect to %s:%d: %s", host, port, why)
            if tcp is not None:
                await trio.aclose_forcefully(tcp)
            return None


__all__ = [
    "Client", "SessionExpiredError", "ForbiddenError", "encode_register_request",
    "client_ssl_context",
    "parse_address", "decode_request", "encode_response",
    "encode_status", "encode_get", "encode_write_request", "CLIENT_MAX_FRAME",
    "encode_admin", "ADMIN_OPS",
]
