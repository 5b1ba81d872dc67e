"""``TcpTransport``: Raft messages between nodes over Trio TCP, with mutual TLS.

Theory of operation
-------------------
**One connection per pair of nodes, dialed by the lower id.** Ids are ordered ints first,
then strs (:func:`dials`). Node ``a`` dials node ``b`` iff ``a`` sorts before ``b``; the
connection then carries messages both ways. So a pair never races to open two connections,
and a node needs the addresses of the peers it dials only (a higher id could even run
behind NAT). A dialer that reconnects (after a restart, say) replaces the acceptor's old
connection to it, which may be half-open.

**Handshake.** After TCP (and TLS) the dialer sends a ``Hello(node_id=me, to=peer)`` frame
and waits; the acceptor checks it and answers ``Hello(node_id=me, to=dialer)``. Only then do
messages flow. With TLS the dialer verifies the acceptor through the standard hostname check
(``server_hostname="node-<peer>.tinyraftplus"``, see :mod:`.tls`) and the acceptor checks that
the dialer's verified certificate names the id its ``Hello`` claims; a mismatch is refused.
The id a handler receives is therefore the authenticated one. In plaintext (only with
``plaintext=True``) it is whatever the peer claims.

**Sending never blocks.** ``send(to, msg)`` encodes at once (so a bad message raises in the
caller) and appends the frame to that peer's bounded queue; when the queue is full the oldest
frame is dropped, counted and warned about (at most once a minute per peer, with a count; not
separately while the peer is reported unreachable). Raft tolerates
lost messages; it does not tolerate a leader stuck behind one slow follower. Each live
connection has a writer task that drains the queue in batches of up to 1 MiB per
``send_all``.

**Liveness.** A connection with nothing to send writes a ``Ping`` every ``keepalive``
seconds, and one that receives nothing for ``idle_timeout`` seconds (or cannot write for as
long) is closed and redialed: TCP alone can take many minutes to notice a cut cable or a
peer paused with SIGSTOP. Dialing retries with capped exponential backoff and full jitter
(a delay drawn from ``[d/2, d]``, ``d`` doubling from ``backoff_min`` up to ``backoff_max``).

**Bad input.** A bad frame (length over ``max_frame``, CRC mismatch), bytes that are not our
msgpack, a wrong protocol version, a message that fails validation, a ``Hello`` that does not
check out or a TLS failure closes that one connection, counts it and reports it through the
``warn`` callback and the ``tinyraftplus.transport.tcp`` logger. Nothing else is affected.
Unauthenticated connections are bounded in number (``max_pending``), in time
(``handshake_timeout``) and in what they can make us buffer (``HELLO_MAX_FRAME``).

**Strangers cannot keep peers out.** Connections still in their handshake are limited per
source address (``max_pending_per_source``), and the shared pool of ``max_pending`` slots is
for strangers only: a connection from a host named in the peer address map is admitted
whenever its own address has room, so a crowd of silent connections from elsewhere cannot
keep a restarted node from its peers. Refusals are counted (``refused``) and logged at most
once every ``REFUSAL_LOG_INTERVAL`` seconds with the number not logged.

**A healthy cluster is quiet.** Expected events are INFO: connections made, a peer that
closes its connection cleanly (a stop or a restart), a peer not started yet during the first
``startup_grace`` seconds. A peer that fails is a WARNING when it starts failing (a dial that
fails, or, on the side it dials, no reconnection within ``reconnect_grace`` of a close), for
each new reason, then every ``DIAL_REMIND_INTERVAL`` with the attempts and drops counted,
and its return is INFO.
"""

from __future__ import annotations

import logging
import math
import random
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio

from ..errors import (
    ClosedError,
    ConfigurationError,
    InvalidArgumentError,
    ProtocolError,
    TinyRaftError,
    TransportError,
    UsageError,
)
from ..raft.messages import Message, NodeId
from .faststream import FastStream
from .tls import (
    TlsConfig,
    cert_dns_names,
    cert_expiry,
    cert_names_node,
    check_distinct_names,
    check_own_certificate,
    node_dns_name,
)
from .wire import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_FRAME,
    PING_FRAME,
    FrameDecoder,
    Hello,
    Ping,
    WireLimits,
    check_node_id,
    decode,
    encode,
    encode_frame,
    frame,
    frame_header,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("tinyraftplus.transport.tcp")

Address = tuple[str, int]
Handler = Callable[[NodeId, Message], Any]
Warn = Callable[[TinyRaftError], Any]

HELLO_MAX_FRAME = 4096
"""Largest frame an acceptor reads before the dialer has proved who it is."""
RECEIVE_SIZE = 256 * 1024
WRITE_BATCH_BYTES = 1 << 20
BIG_FRAME = 64 << 10
"""A payload larger than this is queued and sent beside its header, not joined to it."""
DROP_WARN_INTERVAL = 60.0
"""Dropped messages to one peer are reported at most this often (with a count)."""
DIAL_REMIND_INTERVAL = 60.0
"""A peer that stays unreachable is reported again this often (with the attempt count)."""
STARTUP_GRACE = 5.0
"""A peer not reached since this transport started is not news while it refuses
connections for this long (the nodes of a cluster start one after the other): INFO until
then, a WARNING after."""
RECONNECT_GRACE = 2.0
"""A peer that closed its connection cleanly (it stopped, or restarts) is reported only if
it has not connected again after this long (on the side that does not dial it; the dialing
side reports its failed dials)."""
REFUSAL_LOG_INTERVAL = 10.0
"""Refused inbound connections are logged at most this often (with a count)."""
CLOSE_TIMEOUT = 0.5


_Queued = bytes | tuple[bytes, bytes]
"""A framed message waiting: one buffer, or (header, payload) for a big one."""


def _nbytes(item: _Queued) -> int:
    if isinstance(item, bytes):
        return len(item)
    return len(item[0]) + len(item[1])


def _order(node_id: NodeId) -> tuple[int, int, str]:
    return (0, node_id, "") if type(node_id) is int else (1, 0, str(node_id))


def _same_id(a: Any, b: Any) -> bool:
    """Ids are equal and of the same type (``1 == True`` and ``1 == 1.0`` in Python)."""
    return type(a) is type(b) and a == b


def dials(a: NodeId, b: NodeId) -> bool:
    """Whether node ``a`` is the one that dials node ``b`` (the lower id dials)."""
    return _order(a) < _order(b)


@dataclass
class PeerStats:
    """Counters for one peer (a snapshot: :meth:`TcpTransport.stats` returns a copy)."""

    sent: int = 0
    """Messages written to a connection."""
    received: int = 0
    """Messages received and handed to the handler (pings not counted)."""
    dropped: int = 0
    """Messages dropped because the peer's queue was full."""
    connects: int = 0
    """Connections established (handshake completed)."""
    bad_connections: int = 0
    """Authenticated connections closed for a protocol violation."""
    queued: int = 0
    """Messages waiting now."""


class _Peer:
    __slots__ = (
        "id", "addr", "we_dial", "queue", "queued_bytes", "wakeup", "addr_known", "up",
        "scope", "stats", "last_drop_warn", "dropped_since_warn", "dial_failures",
        "dial_reason", "dial_warned_at", "dial_scope", "ever_up", "down_reported",
        "dropped_at_down", "conn",
    )

    def __init__(self, node_id: NodeId, addr: Address | None, we_dial: bool) -> None:
        self.id = node_id
        self.addr = addr
        self.we_dial = we_dial
        self.queue: deque[_Queued] = deque()
        self.queued_bytes = 0
        self.wakeup = trio.Event()
        self.addr_known = trio.Event()
        if addr is not None:
            self.addr_known.set()
        self.up = trio.Event()
        self.scope: trio.CancelScope | None = None
        self.stats = PeerStats()
        self.last_drop_warn = -math.inf
        self.dropped_since_warn = 0
        self.dial_failures = 0
        self.dial_reason = ""
        """Why the last dial failed (a new reason is news: logged at WARNING once)."""
        self.dial_warned_at = -math.inf
        self.dial_scope: trio.CancelScope | None = None
        """The dial loop's (``remove_peer`` cancels it)."""
        self.ever_up = False
        """Connected at least once since the transport started."""
        self.down_reported = False
        """A WARNING said it is unreachable; its return is then logged (INFO)."""
        self.dropped_at_down = 0
        self.conn: _Conn | None = None
        """The established connection, while there is one (``send`` writes to it directly
        when nothing is queued)."""

    def take(self) -> tuple[list[bytes], int]:
        """Pop up to ``WRITE_BATCH_BYTES`` of frames (at least one): the buffers to send
        (small frames joined, big payloads as they are) and how many frames they hold."""
        q = self.queue
        parts: list[bytes] = []
        small: list[bytes] = []
        size = n = 0
        while q and (not n or size + _nbytes(q[0]) <= WRITE_BATCH_BYTES):
            item = q.popleft()
            size += _nbytes(item)
            n += 1
            if isinstance(item, bytes):
                small.append(item)
            else:
                if small:
                    parts.append(b"".join(small))
                    small = []
                parts.extend(item)
        if small:
            parts.append(small[0] if len(small) == 1 else b"".join(small))
        self.queued_bytes -= size
        return parts, n


class _ConnectError(TransportError):
    """A dial found nothing listening (refused, unreachable, timed out): the peer is down or
    not started yet, as opposed to a handshake that failed."""


class _PeerClosed(TransportError):
    """The peer closed the connection cleanly (end of stream): it stopped or restarts."""


class _Conn:
    """One established connection: its stream, the decoder holding any bytes read past the
    ``Hello``, and why it ended."""

    __slots__ = ("stream", "decoder", "pending", "where", "reason", "bad", "nursery",
                 "last_rx")

    def __init__(self, stream: FastStream, decoder: FrameDecoder, pending: list[bytes],
                 where: str) -> None:
        self.stream = stream
        self.last_rx = trio.current_time()
        """When bytes last arrived (the watchdog's idle timeout counts from it)."""
        self.decoder = decoder
        self.pending = pending
        self.where = where
        self.reason: TinyRaftError | None = None
        self.bad = False
        self.nursery: trio.Nursery | None = None

    def fail(self, reason: TinyRaftError, *, bad: bool = False) -> None:
        if self.reason is None:
            self.reason, self.bad = reason, bad
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()


def _reason_key(e: BaseException) -> str:
    """What a dial failure was, without the parts that change every time (ports)."""
    return re.sub(r"\d+", "#", str(e))


def _describe(e: BaseException) -> str:
    """An exception and its cause in one line (TLS errors hide the useful part in the cause;
    a failed connect hides it in a group of one attempt per address: the first is shown)."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        leaf: BaseException = cause
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]
        return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if cause is not None and cause is not e:
        text += f" ({type(cause).__name__}: {cause})"
    return text


_NET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class TcpTransport:
    """Raft messages over TCP between this node and its peers; see the module docstring.

    ``listen`` is ``(host, port)``; port 0 picks a free port (read it from :attr:`port`; use
    a concrete host, not ``""``, so that there is one listener). ``peers`` maps every other
    node's id to its ``(host, port)``, or to ``None`` when it is not known yet
    (:meth:`set_peer_address`); only the addresses of higher ids are ever dialed. An entry
    for this node's own id is ignored, so every node can be given the same map.

    Membership changes: :meth:`add_peer` makes a node a peer while serving (it is dialed or
    accepted like the others, and authenticated the same way), :meth:`remove_peer` closes
    its connection and refuses it from then on.

    ``tls`` (a :class:`~tinyraftplus.transport.tls.TlsConfig`) turns on mutual TLS; without
    it you must pass ``plaintext=True`` to say you mean it.

    ``handler(from_id, msg)`` (sync; see :meth:`set_handler`) receives every message;
    ``warn(exc)`` receives a ``ProtocolError`` or ``TransportError`` describing each closed
    connection, refused handshake and dropped-message streak (they are logged too).

    Use ``async with TcpTransport(...) as t:`` or ``await nursery.start(t.serve)``.
    """

    def __init__(
        self,
        node_id: NodeId,
        listen: Address,
        peers: Mapping[NodeId, Address | None],
        *,
        tls: TlsConfig | None = None,
        plaintext: bool = False,
        handler: Handler | None = None,
        warn: Warn | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        queue_size: int = 1024,
        queue_bytes: int = 64 << 20,
        limits: WireLimits = DEFAULT_LIMITS,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
        keepalive: float = 1.0,
        idle_timeout: float = 5.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        max_pending: int = 64,
        max_pending_per_source: int = 8,
        rng: random.Random | None = None,
        startup_grace: float = STARTUP_GRACE,
        reconnect_grace: float = RECONNECT_GRACE,
    ) -> None:
        try:
            check_node_id(node_id, "node_id", limits)
        except ProtocolError as e:
            raise InvalidArgumentError(str(e)) from None
        if tls is None and plaintext is not True:
            raise ConfigurationError(
                f"TcpTransport for node {node_id!r}: no TLS configuration; pass "
                f"tls=TlsConfig.from_files(ca, cert, key) for mutual TLS, or plaintext=True to "
                f"run unencrypted and unauthenticated on purpose (local experiments only)"
            )
        if tls is not None and plaintext:
            raise ConfigurationError(
                f"TcpTransport for node {node_id!r}: both tls and plaintext=True given; choose one"
            )
        if tls is not None and not isinstance(tls, TlsConfig):
            raise InvalidArgumentError(f"tls must be a TlsConfig, got {type(tls).__name__}")
        if not (isinstance(listen, tuple) and len(listen) == 2 and isinstance(listen[1], int)):
            raise InvalidArgumentError(f"listen must be (host, port), got {listen!r}")
        if type(max_frame) is not int or not HELLO_MAX_FRAME <= max_frame <= 0xFFFFFFFF:
            raise InvalidArgumentError(
                f"max_frame must be an int in [{HELLO_MAX_FRAME}, 2**32 - 1], got {max_frame!r}"
            )
        if type(queue_size) is not int or queue_size < 1:
            raise InvalidArgumentError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if type(queue_bytes) is not int or queue_bytes < 1:
            raise InvalidArgumentError(f"queue_bytes must be an int >= 1, got {queue_bytes!r}")
        if not 0 < keepalive < idle_timeout:
            raise InvalidArgumentError(
                f"need 0 < keepalive < idle_timeout, got keepalive={keepalive}, "
                f"idle_timeout={idle_timeout}"
            )
        if not 0 < backoff_min <= backoff_max:
            raise InvalidArgumentError(
                f"need 0 < backoff_min <= backoff_max, got {backoff_min}, {backoff_max}"
            )
        self.node_id = node_id
        self._listen = listen
        self._tls = tls
        self._handler = handler
        self._warn_cb = warn
        self._max_frame = max_frame
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._limits = limits
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._keepalive = keepalive
        self._idle_timeout = idle_timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._startup_grace = startup_grace
        self._reconnect_grace = reconnect_grace
        self._started_at = time.monotonic()
        if type(max_pending) is not int or type(max_pending_per_source) is not int or \
                max_pending < 1 or max_pending_per_source < 1:
            raise InvalidArgumentError(
                f"max_pending and max_pending_per_source must be ints >= 1, got "
                f"{max_pending!r} and {max_pending_per_source!r}")
        self._max_pending = max_pending
        self._max_pending_per_source = max_pending_per_source
        self._pending_by_source: dict[str, int] = {}
        self._refusals_logged_at = -math.inf
        self._refusals_unlogged = 0
        self._rng = rng or random.Random()
        self._peers: dict[NodeId, _Peer] = {}
        for pid, addr in peers.items():
            try:
                check_node_id(pid, "peer id", limits)
            except ProtocolError as e:
                raise InvalidArgumentError(str(e)) from None
            if pid == node_id and type(pid) is type(node_id):
                continue
            self._peers[pid] = _Peer(pid, self._check_addr(pid, addr), dials(node_id, pid))
        if tls is not None:
            check_distinct_names([node_id, *self._peers])
            if tls.files is not None:  # a node with another's certificate: say so now
                check_own_certificate(tls.files[1], node_id)
        self._peer_hosts = {p.addr[0] for p in self._peers.values() if p.addr is not None}
        self._port: int | None = None
        self._started = False
        self._closed = False
        self._pending = 0
        self.refused = 0
        """Inbound connections refused before their handshake completed."""
        self._nursery_mgr: Any = None
        self._nursery: trio.Nursery | None = None
        self._dialers: trio.Nursery | None = None
        """Where dial loops run (``add_peer`` starts one there while serving)."""

    @staticmethod
    def _check_addr(pid: NodeId, addr: Any) -> Address | None:
        if addr is None:
            return None
        if not (isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[0], str)
                and type(addr[1]) is int and 0 < addr[1] < 65536):
            raise InvalidArgumentError(
                f"address of peer {pid!r} must be (host, port) with 0 < port < 65536, got "
                f"{addr!r}"
            )
        return addr

    # --- public API ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the listener is bound to (useful with ``listen=(host, 0)``)."""
        if self._port is None:
            raise ClosedError(f"node {self.node_id!r}: the transport is not listening yet")
        return self._port

    @property
    def peer_ids(self) -> list[NodeId]:
        return list(self._peers)

    def set_handler(self, handler: Handler | None) -> None:
        """Set the sync callable that gets ``(from_id, msg)`` for every received message.
        Messages that arrive while there is none are dropped (counted as received)."""
        self._handler = handler

    def set_peer_address(self, peer_id: NodeId, addr: Address) -> None:
        """Set or change where ``peer_id`` listens; the next dial uses it."""
        peer = self._peer(peer_id)
        peer.addr = self._check_addr(peer_id, addr)
        peer.addr_known.set()

    def add_peer(self, peer_id: NodeId, addr: Address | None = None) -> bool:
        """Make ``peer_id`` a peer (a node added to the cluster's configuration): from now
        on it may connect (authenticated by its certificate as every peer is) and messages
        can be sent to it; this node dials it if its id is the lower. ``addr`` ``None``:
        not known yet (:meth:`set_peer_address`). Returns False if it already was a peer
        (its address is then updated when given)."""
        try:
            check_node_id(peer_id, "peer id", self._limits)
        except ProtocolError as e:
            raise InvalidArgumentError(str(e)) from None
        if _same_id(peer_id, self.node_id):
            raise InvalidArgumentError(f"node {self.node_id!r}: add_peer of its own id")
        checked = self._check_addr(peer_id, addr)
        old = self._peers.get(peer_id)
        if old is not None and _same_id(old.id, peer_id):
            if checked is not None and checked != old.addr:
                self.set_peer_address(peer_id, checked)
            return False
        if self._tls is not None:
            check_distinct_names([self.node_id, *self._peers, peer_id])
        peer = _Peer(peer_id, checked, dials(self.node_id, peer_id))
        self._peers[peer_id] = peer
        if checked is not None:
            self._peer_hosts.add(checked[0])
        if peer.we_dial and self._dialers is not None and not self._closed:
            self._dialers.start_soon(self._dial_loop, peer)
        logger.info("node %r: added peer %r%s", self.node_id, peer_id,
                    f" at {checked[0]}:{checked[1]}" if checked else "")
        return True

    def remove_peer(self, peer_id: NodeId) -> bool:
        """Forget ``peer_id`` (a node removed from the configuration): its connection is
        closed, its queue dropped, and it is refused if it connects again. Returns False if
        it was not a peer."""
        peer = self._peers.get(peer_id)
        if peer is None or not _same_id(peer.id, peer_id):
            return False
        del self._peers[peer_id]
        for scope in (peer.dial_scope, peer.scope):
            if scope is not None:
                scope.cancel()
        peer.queue.clear()
        peer.queued_bytes = 0
        self._peer_hosts = {p.addr[0] for p in self._peers.values() if p.addr is not None}
        logger.info("node %r: removed peer %r", self.node_id, peer_id)
        return True

    def send(self, to: NodeId, msg: Message) -> None:
        """Queue ``msg`` for ``to``; never blocks.

        Raises ``InvalidArgumentError`` for an unknown peer or a message the wire cannot
        carry (or larger than ``max_frame``), ``ClosedError`` after the transport stopped.
        When the peer's queue is full the oldest queued message is dropped and counted.
        """
        peer = self._peer(to)
        if self._closed:
            raise ClosedError(f"node {self.node_id!r}: send to {to!r} after the transport closed")
        payload = encode(msg, self._limits)
        if len(payload) > self._max_frame:
            raise InvalidArgumentError(
                f"{type(msg).__name__} to node {to!r} encodes to {len(payload)} bytes, over "
                f"max_frame={self._max_frame}; send fewer or smaller entries per message"
            )
        data: _Queued = frame(payload) if len(payload) <= BIG_FRAME else (
            frame_header(payload), payload)
        q = peer.queue
        conn = peer.conn
        if conn is not None and not q and conn.reason is None \
                and conn.stream.ready_for_direct_send():
            # Nothing queued and nothing being sent (a writer mid-send either finished
            # without waiting or is flushing, which the stream tells): hand the frame to the
            # kernel now, saving a task switch per message. What the socket does not take
            # at once stays in the stream, in order, and the writer finishes it.
            try:
                if not conn.stream.try_send(data):
                    peer.wakeup.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                conn.fail(TransportError(f"write failed ({_describe(e)})"))
                return
            peer.stats.sent += 1
            return
        q.append(data)
        peer.queued_bytes += _nbytes(data)
        if len(q) > self._queue_size or peer.queued_bytes > self._queue_bytes:
            self._drop_oldest(peer)
        peer.wakeup.set()

    def is_connected(self, peer_id: NodeId) -> bool:
        return self._peer(peer_id).up.is_set()

    async def wait_connected(self, peer_id: NodeId) -> None:
        """Wait until a connection with ``peer_id`` is established (returns at once if one
        is). Bound it with your own ``trio.fail_after``."""
        await self._peer(peer_id).up.wait()

    def stats(self, peer_id: NodeId) -> PeerStats:
        peer = self._peer(peer_id)
        return replace(peer.stats, queued=len(peer.queue))

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> TcpTransport:
        mgr = trio.open_nursery()
        nursery = await mgr.__aenter__()
        try:
            await nursery.start(self.serve)
        except BaseException as e:
            nursery.cancel_scope.cancel()
            try:
                await mgr.__aexit__(type(e), e, e.__traceback__)
            except BaseExceptionGroup as eg:
                raise _single(eg) from None
            raise
        self._nursery_mgr, self._nursery = mgr, nursery
        return self

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> bool:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            return bool(await self._nursery_mgr.__aexit__(et, ev, tb))
        except BaseExceptionGroup as eg:
            # A nursery wraps even the body's own exception in a group; hand users the
            # exception they raised, not a group of one.
            if ev is not None and len(eg.exceptions) == 1 and eg.exceptions[0] is ev:
                return False
            raise _single(eg) from None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, dial, and run until cancelled; ``task_status.started(port)`` once the
        listener is bound. For callers with their own nursery: ``await nursery.start(t.serve)``.

        Raises ``TransportError`` if the address cannot be bound, ``UsageError`` if called twice.
        """
        if self._started:
            raise UsageError(f"node {self.node_id!r}: TcpTransport.serve() runs only once")
        self._started = True
        self._started_at = time.monotonic()
        host, port = self._listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as e:
            self._closed = True
            raise TransportError(
                f"node {self.node_id!r} cannot listen on {host}:{port}: {e}; is another "
                f"process using that port?"
            ) from None
        self._port = listeners[0].socket.getsockname()[1]
        logger.info("node %r listening on %s:%d (%s)", self.node_id, host, self._port,
                    "mutual TLS" if self._tls else "PLAINTEXT")
        try:
            async with trio.open_nursery() as nursery:
                self._dialers = nursery
                for peer in self._peers.values():
                    if peer.we_dial:
                        nursery.start_soon(self._dial_loop, peer)
                await nursery.start(trio.serve_listeners, self._accept, listeners)
                task_status.started(self._port)
        finally:
            self._closed = True
            self._dialers = None
            for peer in self._peers.values():
                peer.up = trio.Event()
            for listener in listeners:  # free the port now: a restarted node may rebind it
                await trio.aclose_forcefully(listener)

    # --- internals ---------------------------------------------------------------------------

    def _peer(self, peer_id: NodeId) -> _Peer:
        try:
            peer = self._peers[peer_id]
        except (KeyError, TypeError):
            raise InvalidArgumentError(
                f"node {self.node_id!r}: {peer_id!r} is not a peer (peers: "
                f"{sorted(map(repr, self._peers))})"
            ) from None
        if type(peer.id) is not type(peer_id):  # 1 and 1.0 hash alike; ids must match exactly
            raise InvalidArgumentError(f"node {self.node_id!r}: {peer_id!r} is not a peer")
        return peer

    def _warn(self, exc: TinyRaftError, level: int = logging.WARNING) -> None:
        """Log ``exc`` (at ``level``: expected events at INFO) and hand it to ``warn``."""
        logger.log(level, "%s", exc)
        if self._warn_cb is not None:
            try:
                self._warn_cb(exc)
            except Exception:
                logger.exception("node %r: the warn callback raised", self.node_id)

    def _drop_oldest(self, peer: _Peer) -> None:
        q = peer.queue
        while len(q) > 1 and (len(q) > self._queue_size or peer.queued_bytes > self._queue_bytes):
            peer.queued_bytes -= _nbytes(q.popleft())
            peer.stats.dropped += 1
            peer.dropped_since_warn += 1
        now = time.monotonic()
        if peer.down_reported and now - peer.dial_warned_at < DIAL_REMIND_INTERVAL:
            return  # known down: the next reminder says how many were dropped
        if now - peer.last_drop_warn >= DROP_WARN_INTERVAL:
            peer.dial_warned_at = now
            self._warn(TransportError(
                f"node {self.node_id!r}: send queue to node {peer.id!r} is full "
                f"({self._queue_size} messages / {self._queue_bytes} bytes); dropped the "
                f"oldest {peer.dropped_since_warn} message(s) ({peer.stats.dropped} in all): "
                f"the peer is slow or unreachable"
            ))
            peer.last_drop_warn = now
            peer.dropped_since_warn = 0

    async def _dial_loop(self, peer: _Peer) -> None:
        with trio.CancelScope() as scope:
            peer.dial_scope = scope
            if self._peers.get(peer.id) is peer:  # not removed before this task started
                await self._dial_forever(peer)

    async def _dial_forever(self, peer: _Peer) -> None:
        attempt = 0
        while True:
            await peer.addr_known.wait()
            assert peer.addr is not None
            try:
                conn = await self._dial(peer, peer.addr)
            except (TransportError, ProtocolError) as e:
                peer.dial_failures += 1
                # News: the first failure, a reason that changed (a certificate refused where
                # the connection used to be refused, say), and every DIAL_REMIND_INTERVAL
                # while the peer stays down (with a count); the rest is DEBUG.
                # A peer not reached since start that is not listening yet is expected
                # while the cluster starts: INFO for STARTUP_GRACE, then news.
                reason = _reason_key(e)
                now = time.monotonic()
                starting = (not peer.ever_up and isinstance(e, _ConnectError)
                            and now - self._started_at < self._startup_grace)
                if peer.dial_failures == 1 or reason != peer.dial_reason:
                    peer.dial_reason = reason
                    if starting:
                        logger.info("%s (not started yet?)", e)
                    else:
                        self._report_down(peer, e, now)
                elif not peer.down_reported and not starting:
                    self._report_down(peer, type(e)(
                        f"{e} ({peer.dial_failures} attempts since "
                        f"{'start' if not peer.ever_up else 'it went away'})"), now)
                elif peer.down_reported and now - peer.dial_warned_at >= DIAL_REMIND_INTERVAL:
                    peer.dial_warned_at = now
                    self._warn(type(e)(
                        f"{e} (still failing: {peer.dial_failures} attempts; "
                        f"{peer.stats.dropped - peer.dropped_at_down} messages dropped "
                        "meanwhile)"))
                else:
                    logger.debug("%s", e)
            else:
                if peer.dial_failures and peer.down_reported:
                    logger.info("node %r: node %r reachable again after %d failed attempts",
                                self.node_id, peer.id, peer.dial_failures)
                peer.dial_failures = 0
                peer.dial_reason = ""
                started = trio.current_time()
                await self._run_connection(peer, conn)
                if trio.current_time() - started > self._backoff_max:
                    attempt = 0
            delay = min(self._backoff_max, self._backoff_min * 2 ** min(attempt, 30))
            attempt += 1
            await trio.sleep(self._rng.uniform(delay / 2, delay))

    async def _dial(self, peer: _Peer, addr: Address) -> _Conn:
        host, port = addr
        where = f"node {peer.id!r} at {host}:{port}"
        prefix = f"node {self.node_id!r}: dialing {where}"
        try:
            with trio.fail_after(self._connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as e:
            raise _ConnectError(f"{prefix}: cannot connect ({_describe(e)})") from None
        stream = FastStream.from_trio(
            tcp, None if self._tls is None else self._tls.client_context,
            server_hostname=node_dns_name(peer.id))
        try:
            with trio.fail_after(self._handshake_timeout):
                await stream.do_handshake()
                await stream.send_all(encode_frame(Hello(self.node_id, peer.id)))
                decoder = FrameDecoder(self._max_frame)
                hello, pending = await self._read_hello(stream, decoder)
            if not (_same_id(hello.node_id, peer.id) and _same_id(hello.to, self.node_id)):
                raise ProtocolError(
                    f"{prefix}: it answered as node {hello.node_id!r} (to {hello.to!r}); "
                    f"check the peer address map"
                )
        except ProtocolError as e:
            await trio.aclose_forcefully(stream)
            if str(e).startswith(prefix):
                raise
            raise ProtocolError(f"{prefix}: {e}") from None
        except (*_NET_ERRORS, trio.TooSlowError, TransportError) as e:
            await trio.aclose_forcefully(stream)
            raise TransportError(f"{prefix}: handshake failed ({_describe(e)})") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return _Conn(stream, decoder, pending, where)

    async def _read_hello(self, stream: FastStream,
                          decoder: FrameDecoder) -> tuple[Hello, list[bytes]]:
        while True:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise TransportError("connection closed before the Hello")
            if self._tls is None and decoder.offset == 0 and data[:2] == b"\x16\x03":
                raise ProtocolError(
                    "it speaks TLS (that is a TLS ClientHello) but this node runs with "
                    "plaintext=True; give every node the same TLS settings"
                )
            payloads = decoder.feed(data)
            if payloads:
                msg = decode(payloads[0], self._limits)
                if type(msg) is not Hello:
                    raise ProtocolError(
                        f"expected a Hello as the first message, got {type(msg).__name__}"
                    )
                return msg, payloads[1:]

    async def _accept(self, tcp: trio.SocketStream) -> None:
        try:
            host, port = tcp.socket.getpeername()[:2]
            where = f"{host}:{port}"
        except OSError:
            where = "an unknown address"
        source = where.rpartition(":")[0] or where
        known = source in self._peer_hosts
        per_source = self._pending_by_source.get(source, 0)
        if per_source >= self._max_pending_per_source:
            self._refuse(TransportError(
                f"node {self.node_id!r}: refused a connection from {where}: already "
                f"{per_source} connections from {source} in their handshake "
                f"(max_pending_per_source)"))
            await trio.aclose_forcefully(tcp)
            return
        if not known and self._pending >= self._max_pending:
            self._refuse(TransportError(
                f"node {self.node_id!r}: refused a connection from {where}: already "
                f"{self._pending} connections from outside the peer map in their handshake "
                f"(max_pending)"
            ))
            await trio.aclose_forcefully(tcp)
            return
        if not known:
            self._pending += 1
        self._pending_by_source[source] = per_source + 1
        try:
            admitted = await self._handshake_inbound(tcp, where)
        finally:
            if not known:
                self._pending -= 1
            left = self._pending_by_source[source] - 1
            if left:
                self._pending_by_source[source] = left
            else:
                del self._pending_by_source[source]
        if admitted is not None:
            await self._run_connection(*admitted)

    def _refuse(self, exc: TinyRaftError) -> None:
        """Count a refused inbound connection and hand it to the ``warn`` callback; log it at
        most once every ``REFUSAL_LOG_INTERVAL`` seconds, with the number not logged (a
        flood of strangers must not fill the disk with log lines)."""
        self.refused += 1
        now = time.monotonic()
        if now - self._refusals_logged_at < REFUSAL_LOG_INTERVAL:
            self._refusals_unlogged += 1
        else:
            more = ""
            if self._refusals_unlogged:
                more = (f" ({self._refusals_unlogged} more refusals in the last "
                        f"{REFUSAL_LOG_INTERVAL:g} s not logged; {self.refused} in all)")
            self._refusals_logged_at = now
            self._refusals_unlogged = 0
            logger.warning("%s%s", exc, more)
        if self._warn_cb is not None:
            try:
                self._warn_cb(exc)
            except Exception:
                logger.exception("node %r: the warn callback raised", self.node_id)

    async def _handshake_inbound(self, tcp: trio.SocketStream,
                                 where: str) -> tuple[_Peer, _Conn] | None:
        """The handshake of an admitted inbound connection: the peer and the connection, or
        ``None`` if it was refused (and closed)."""
        stream = FastStream.from_trio(
            tcp, None if self._tls is None else self._tls.server_context, server_side=True)
        prefix = f"node {self.node_id!r}: refused a connection from {where}"
        try:
            with trio.fail_after(self._handshake_timeout):
                await stream.do_handshake()
                # A well-behaved dialer sends only its Hello and waits for ours, so a
                # stranger gets to make us buffer one small frame and no more.
                decoder = FrameDecoder(HELLO_MAX_FRAME)
                hello, pending = await self._read_hello(stream, decoder)
                peer = self._check_inbound(hello, stream)
                await stream.send_all(encode_frame(Hello(self.node_id, peer.id)))
        except ProtocolError as e:
            self._refuse(ProtocolError(f"{prefix}: {e}"))
            await trio.aclose_forcefully(stream)
            return None
        except (*_NET_ERRORS, trio.TooSlowError, TransportError) as e:
            if isinstance(e, trio.TooSlowError):
                why = f"no handshake within {self._handshake_timeout} s"
            else:
                why = f"handshake failed ({_describe(e)})"
            self._refuse(TransportError(f"{prefix}: {why}"))
            await trio.aclose_forcefully(stream)
            return None
        except Exception as e:  # a bug of ours: keep serving everyone else, but say so loudly
            self.refused += 1
            logger.exception("node %r: unexpected error in a handshake from %s", self.node_id,
                             where)
            self._warn(TransportError(f"{prefix}: internal error ({_describe(e)})"))
            await trio.aclose_forcefully(stream)
            return None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        decoder.max_frame = self._max_frame
        return peer, _Conn(stream, decoder, pending, f"node {peer.id!r} from {where}")

    def _check_inbound(self, hello: Hello, stream: FastStream) -> _Peer:
        claimed = hello.node_id
        peer = self._peers.get(claimed)
        if peer is None or not _same_id(peer.id, claimed):
            raise ProtocolError(f"it claims to be node {claimed!r}, which is not a peer")
        if self._tls is not None:
            cert = stream.getpeercert()
            if not cert_names_node(cert, claimed):
                raise ProtocolError(
                    f"it claims to be node {claimed!r} but its certificate names "
                    f"{cert_dns_names(cert) or 'no node'}; a node must use its own certificate"
                )
        if not _same_id(hello.to, self.node_id):
            raise ProtocolError(
                f"node {claimed!r} meant to reach node {hello.to!r}; check its peer address map"
            )
        if peer.we_dial:
            raise ProtocolError(
                f"node {claimed!r} dialed, but the lower id dials and {self.node_id!r} < "
                f"{claimed!r}; are both nodes running the same tinyraftplus version?"
            )
        return peer

    async def _run_connection(self, peer: _Peer, conn: _Conn) -> None:
        old = peer.scope
        with trio.CancelScope() as scope:
            peer.scope = scope
            if old is not None:
                old.cancel()  # the dialer reconnected: its previous connection is dead
            peer.stats.connects += 1
            peer.up.set()
            peer.ever_up = True
            logger.info("node %r: connected to %s", self.node_id, conn.where)
            if peer.down_reported and not peer.we_dial:
                logger.info("node %r: node %r is back (%d messages dropped while it was "
                            "away)", self.node_id, peer.id,
                            peer.stats.dropped - peer.dropped_at_down)
            if peer.down_reported:
                # Drops while it was away were reported (reminders, "is back"); the queue
                # still full from then is no news of a slow peer for a moment.
                peer.dropped_since_warn = 0
                peer.last_drop_warn = time.monotonic()
            peer.down_reported = False
            expires = math.inf
            if conn.stream.tls:
                at = cert_expiry(conn.stream.getpeercert())
                if at is not None:  # wall clock to trio clock
                    expires = trio.current_time() + (at - time.time())
            try:
                with trio.move_on_at(expires) as expired:
                    async with trio.open_nursery() as nursery:
                        conn.nursery = nursery
                        nursery.start_soon(self._writer, peer, conn)
                        nursery.start_soon(self._reader, peer, conn)
                        nursery.start_soon(self._watchdog, conn)
                        peer.conn = conn
                if expired.cancelled_caught and conn.reason is None:
                    conn.reason = TransportError(
                        "the peer's certificate expired: closed (a redial needs a valid one)")
            finally:
                if peer.conn is conn:
                    peer.conn = None
                if peer.scope is scope:
                    peer.scope = None
                    peer.up = trio.Event()
                await _close(conn.stream)
        if conn.reason is not None:
            if conn.bad:
                peer.stats.bad_connections += 1
            clean = isinstance(conn.reason, _PeerClosed)
            self._warn(type(conn.reason)(
                f"node {self.node_id!r}: closed the connection with {conn.where}: {conn.reason}"
            ), logging.INFO if clean else logging.WARNING)
            if clean and not peer.we_dial:
                await self._report_if_not_back(peer, conn.where)

    async def _report_if_not_back(self, peer: _Peer, where: str) -> None:
        """The peer closed cleanly (a stop or a restart): news only if it stays away.
        (The dialing side learns it from its dials; this is the side it dials.)"""
        await trio.sleep(self._reconnect_grace)
        if self._peers.get(peer.id) is peer and not peer.up.is_set() and not self._closed:
            self._report_down(peer, TransportError(
                f"node {self.node_id!r}: node {peer.id!r} ({where}) closed its connection "
                f"and has not connected again for {self._reconnect_grace:g} s: down?"),
                time.monotonic())

    def _report_down(self, peer: _Peer, exc: TinyRaftError, now: float) -> None:
        if not peer.down_reported:
            peer.dropped_at_down = peer.stats.dropped
        peer.down_reported = True
        peer.dial_warned_at = now
        self._warn(exc)

    async def _writer(self, peer: _Peer, conn: _Conn) -> None:
        stream = conn.stream
        try:
            while True:
                if not peer.queue and not stream.out_pending:
                    # The event is replaced before waiting, with no checkpoint between the
                    # emptiness check and here, so a send() cannot be missed.
                    wakeup = peer.wakeup = trio.Event()
                    with trio.move_on_after(self._keepalive):
                        await wakeup.wait()
                buf: list[bytes] | bytes
                if peer.queue:
                    buf, n = peer.take()
                elif stream.out_pending:
                    buf, n = [], 0  # what a direct send() left: send_all flushes it
                else:
                    buf, n = PING_FRAME, 0
                with trio.fail_after(self._idle_timeout):
                    await stream.send_all(buf)
                peer.stats.sent += n
        except trio.TooSlowError:
            conn.fail(TransportError(
                f"could not write for {self._idle_timeout} s: the peer stopped reading"
            ))
        except _NET_ERRORS as e:
            conn.fail(TransportError(f"write failed ({_describe(e)})"))
        except Exception as e:
            logger.exception("node %r: unexpected error writing to %s", self.node_id, conn.where)
            conn.fail(TransportError(f"internal error while writing ({_describe(e)})"))

    async def _reader(self, peer: _Peer, conn: _Conn) -> None:
        stream, decoder, limits = conn.stream, conn.decoder, self._limits
        try:
            for payload in conn.pending:
                self._deliver(peer, decode(payload, limits))
            conn.pending = []
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.last_rx = trio.current_time()
                if not data:
                    conn.fail(_PeerClosed("closed by the peer"))
                    return
                for payload in decoder.feed(data):
                    self._deliver(peer, decode(payload, limits))
        except ProtocolError as e:
            conn.fail(e, bad=True)
        except _NET_ERRORS as e:
            conn.fail(TransportError(f"read failed ({_describe(e)})"))
        except Exception as e:
            logger.exception("node %r: unexpected error reading from %s", self.node_id,
                             conn.where)
            conn.fail(TransportError(f"internal error while reading ({_describe(e)})"))

    async def _watchdog(self, conn: _Conn) -> None:
        """Close a connection that received nothing for ``idle_timeout`` (the peer sends a
        ``Ping`` every ``keepalive`` when it has nothing else). One sleeping task per
        connection rather than a timeout around every read."""
        while True:
            deadline = conn.last_rx + self._idle_timeout
            if trio.current_time() >= deadline:
                conn.fail(TransportError(
                    f"nothing received for {self._idle_timeout} s (keepalive every "
                    f"{self._keepalive} s): presumed dead"
                ))
                return
            await trio.sleep_until(deadline)

    def _deliver(self, peer: _Peer, msg: Any) -> None:
        t = type(msg)
        if t is Ping:
            return
        if t is Hello:
            raise ProtocolError("a second Hello on an established connection")
        peer.stats.received += 1
        handler = self._handler
        if handler is None:
            return
        try:
            handler(peer.id, msg)
        except Exception as e:
            logger.exception("node %r: the message handler raised on %s from node %r",
                             self.node_id, t.__name__, peer.id)
            err = TransportError(
                f"node {self.node_id!r}: the message handler raised {_describe(e)} on a "
                f"{t.__name__} from node {peer.id!r}; the message was dropped"
            )
            err.__cause__ = e
            if self._warn_cb is not None:
                try:
                    self._warn_cb(err)
                except Exception:
                    logger.exception("node %r: the warn callback raised", self.node_id)


async def _close(stream: FastStream) -> None:
    """Close politely (TLS close_notify, so the peer logs a clean EOF rather than a
    truncation), even while being cancelled, but never wait long for it."""
    with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True) as cs:
        try:
            await stream.aclose()
        except (*_NET_ERRORS, trio.BusyResourceError):
            pass
    if cs.cancelled_caught:
        await trio.aclose_forcefully(stream)


def _single(eg: BaseExceptionGroup) -> BaseException:
    """The one exception inside a group of one (the usual case), else the group itself."""
    while isinstance(eg, BaseExceptionGroup) and len(eg.exceptions) == 1:
        eg = eg.exceptions[0]  # type: ignore[assignment]
    return eg


__all__ = ["TcpTransport", "PeerStats", "dials", "HELLO_MAX_FRAME"]
