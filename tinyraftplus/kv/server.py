"""``python -m tinyraftplus.kv``: one node of a replicated key-value store (also runs as
``python -m tinyraftplus.server``).

    python -m tinyraftplus.kv --id 1 \\
        --peers 1=10.0.0.1:7001,2=10.0.0.2:7001,3=10.0.0.3:7001 \\
        --client-port 7101 --data /var/lib/kv1 \\
        --tls-ca ca.crt --tls-cert node-1.crt --tls-key node-1.key

Theory of operation
-------------------
A node is four things in one Trio task tree: an ``FsLog`` in ``DATA/raft`` (fsync on; term
and vote in ``DATA/raft.raftstate``), a :class:`~tinyraftplus.transport.tcp.TcpTransport`
to the peers, a :class:`~tinyraftplus.node.RaftNode` applying commands to a
:class:`~tinyraftplus.kv.KVStore`, and a listener for clients (protocol: see
:mod:`tinyraftplus.kv.client`). The log is opened first and by the server itself, so that a
data directory another process holds is refused (exit status 3) before anything listens.

**Snapshots.** The node snapshots the store every ``--snapshot-entries`` entries
(:meth:`KVStore.snapshot`, in ``DATA/raft.snap/``) and compacts the log behind it, keeping
``--trailing-entries``; a restart restores the newest snapshot and replays only the log after
it, and a follower that fell behind the compaction is sent the snapshot.

**Any node serves any request.** Writes go through ``node.append_batch`` (the node forwards
to the leader when it follows); gets through ``node.read`` (linearizable, ReadIndex). The
writes that arrive in one read from a connection become one ``append_batch``: the whole
point of pipelining is that many requests share one trip through the log.

**Bad input** on the client port -- a bad frame, bytes that are not msgpack, a request of
the wrong shape or types -- closes that connection with a warning and touches nothing else;
a TLS client without a certificate the cluster CA signed never gets past the handshake.

**Bounded per connection and per node** (the README's "Threat model and limits" has the
figures). Connections are capped per port and per source address below the descriptor
limit, with a reserve for the node's own files (:mod:`.limits`); idle ones are closed. The
limits are checked per request, not per read: a connection may have ``max_inflight``
requests in progress and the node ``max_inflight_total``, and answers waiting to be written
count against ``answer_budget``; past any of them the server stops reading that connection
(back-pressure, not an unbounded queue), and a client that does not take its answers for
``answer_timeout`` is disconnected. A frame must arrive whole within ``frame_timeout`` of its
first byte. Sessions are opened by a register request and belong to the client
certificate's identity (:func:`cert_identity`), which the server writes into every command;
``--authz`` optionally limits each identity to key prefixes (:mod:`.authz`).

**Membership.** ``--join`` starts a node empty as a learner of a running cluster (``--peers``
the current voters, ``--listen`` its own address) until an admin request adds it;
``--bootstrap`` lets a node without state vote at once (a brand-new cluster with members
missing). The transport follows the configuration: a member it does not know is added (its
address from ``--peers`` or the configuration's ``addrs``) when a configuration names it or
the node first sends to it; one the configuration removed is dropped once that configuration
is committed and it does not lead. Admin requests (:mod:`.admin`) run on the leader (others
answer ``not_leader``), optionally only for the identities ``--admin-allow`` names.

**Lifecycle.** Once everything listens the server prints one line to stdout::

    tinyraftplus-server ready id=1 peer=127.0.0.1:7001 client=127.0.0.1:7101

(ports 0 are resolved), which scripts and tests wait for. SIGTERM or SIGINT stops it
cleanly: the node stops, pending requests fail with ``stopped`` (clients retry elsewhere),
the log is closed, exit status 0. SIGHUP reloads the TLS files (and ``--authz``). A mistake
on the command line is one line naming the option (exit status 2), a failure at run time one
line saying what (exit status 1; 3 for a data directory in use); ``--debug`` adds tracebacks.
Logs go to stderr through ``logging``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from msgpack import packb

from ..errors import (
    ClosedError,
    ConfigurationError,
    InvalidArgumentError,
    LeadershipLostError,
    LogLockedError,
    MembershipError,
    NodeStoppedError,
    NoLeaderError,
    NotLeaderError,
    ProtocolError,
    RaftTimeoutError,
    TinyRaftError,
    TransportError,
    UsageError,
)
from ..log import FsLog
from ..node import RaftNode
from ..transport.faststream import FastStream
from ..transport.tcp import TcpTransport
from ..transport.tls import TlsConfig, cert_expiry, check_own_certificate
from ..transport.wire import FrameDecoder, show_value
from .authz import AdminPolicy, Authorization
from .client import (
    CLIENT_MAX_FRAME,
    TAG_ADMIN,
    TAG_GET,
    TAG_REGISTER,
    TAG_STATUS,
    decode_request,
    encode_response,
    parse_address,
)
from .limits import ConnectionLimits, RateLimitedLog
from .store import KVStore, encode_register

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("tinyraftplus.server")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_FAILED = 1

READY_PREFIX = "tinyraftplus-server ready"
RECEIVE_SIZE = 256 * 1024
BATCH_MAX = 1024
WRITE_CHUNK = 256 * 1024
"""Most writes one ``append_batch`` carries."""
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_NET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Address = tuple[str, int]


@dataclass
class ServerConfig:
    """Everything a node needs; :func:`parse_args` builds one from the command line."""

    node_id: int | str
    peers: dict[Any, Address]
    data_dir: str
    client_listen: Address
    peer_listen: Address | None = None
    """Where to bind the peer port (default: this node's entry in ``peers``)."""
    tls: TlsConfig | None = None
    plaintext: bool = False
    fsync: bool = True
    election_timeout: float = 0.5
    ping_timeout: float = 0.1
    append_timeout: float = 5.0
    read_timeout: float = 5.0
    max_inflight: int = 1024
    """Requests of one client connection being processed at once (reading pauses beyond)."""
    max_inflight_total: int = 2048
    """Requests of all client connections together processed at once: the node's own work
    (one ReadIndex or log entry each) is bounded whatever the number of connections."""
    answer_budget: int = 4 << 20
    """Bytes of answers one client connection may have waiting to be written: beyond it the
    server stops reading that connection's requests until the client reads its answers."""
    answer_timeout: float = 30.0
    """A client that does not take its waiting answers for this long is disconnected."""
    handshake_timeout: float = 5.0
    max_sessions: int = 10_000
    """Client sessions the store keeps (least recently used out; an evicted session's writes
    are refused). Carried in each register command, so the leader's setting applies."""
    max_results_total: int = 1 << 20
    """Results the store keeps over all sessions (~200 bytes each)."""
    max_request_bytes: int = CLIENT_MAX_FRAME
    """Largest request frame on the client port."""
    quota_bytes: int = 0
    """Most bytes of keys and values the store holds (0: no quota)."""
    debug: bool = False
    authz: Authorization | None = None
    """Per-identity key-prefix permissions (``--authz FILE``); ``None``: all may do all."""
    max_clients: int = 1024
    """Client connections open at once (lowered at start to fit the descriptor limit)."""
    max_clients_per_source: int = 256
    """Client connections open at once from one source address."""
    fd_reserve: int = 256
    """Descriptors kept for the node's own files and peer connections."""
    idle_timeout: float = 300.0
    """A client connection with nothing in progress and nothing received for this long is
    closed (its descriptor is worth more than a client that left without saying)."""
    frame_timeout: float = 30.0
    """A client that started a frame must finish it within this time (the whole frame, not
    each read of it)."""
    transport_options: dict[str, Any] = field(default_factory=dict)
    join: bool = False
    """Start empty as a learner of an existing cluster whose voters are ``peers`` (this
    node not among them; ``peer_listen`` is its own address)."""
    bootstrap: bool = False
    """A brand-new cluster: a node without state may vote at once (see ``RaftNode``)."""
    metrics_listen: Address | None = None
    """Where to serve Prometheus metrics (``--metrics-port``; :mod:`tinyraftplus.metrics`)."""
    admin: AdminPolicy | None = None
    """Who may send admin requests (``--admin-allow`` / ``"admin": true`` in ``--authz``);
    ``None``: every client the CA signed."""
    snapshot_entries: int = 10_000
    """Snapshot the store each time the apply seq reaches a multiple of this (so about every
    this many entries), then compact the log behind it (0: never; the log then grows with
    every write, and a restart replays all of it)."""
    segment_size: int = 64 << 20
    """Bytes per log segment file; compaction behind a snapshot drops whole segments."""
    trailing_entries: int = 5_000
    """Entries kept in the log behind a snapshot, so that a follower a little behind
    catches up from the log rather than by a snapshot transfer."""

    def check(self) -> None:
        if self.join:
            if self.node_id in self.peers:
                raise ConfigurationError(
                    f"--join: --peers lists the cluster's current voters, without this node "
                    f"({self.node_id!r}); give this node's own address with --listen")
            if self.peer_listen is None:
                raise ConfigurationError(
                    "--join: give this node's peer address with --listen HOST:PORT (the "
                    "address the operator passes to add-learner)")
            if self.bootstrap:
                raise ConfigurationError("--join and --bootstrap together: a joining node "
                                         "enters an existing cluster; choose one")
        elif self.node_id not in self.peers:
            raise ConfigurationError(
                f"--id {self.node_id!r} is not in --peers ({', '.join(map(str, self.peers))}); "
                f"list every node, this one included"
            )
        if self.tls is None and not self.plaintext:
            raise ConfigurationError(
                "no TLS: pass --tls-ca, --tls-cert and --tls-key (mutual TLS), or --plaintext "
                "to run unencrypted and unauthenticated on purpose (local experiments only)"
            )
        for opt, v in (("--max-inflight", self.max_inflight),
                       ("--max-inflight-total", self.max_inflight_total),
                       ("--max-sessions", self.max_sessions),
                       ("--max-results-total", self.max_results_total),
                       ("--max-request-bytes", self.max_request_bytes),
                       ("--answer-budget", self.answer_budget)):
            if type(v) is not int or v < 1:
                raise ConfigurationError(f"{opt} {v!r}: give a whole number >= 1")
        for opt, v in (("--snapshot-entries", self.snapshot_entries),
                       ("--trailing-entries", self.trailing_entries)):
            if type(v) is not int or v < 0:
                raise ConfigurationError(f"{opt} {v!r}: give a whole number >= 0")
        if type(self.segment_size) is not int or self.segment_size < 4096:
            raise ConfigurationError(f"--segment-size {self.segment_size!r}: give a number of "
                                     f"bytes >= 4096")
        for opt, f in (("--answer-timeout", self.answer_timeout),
                       ("--client-idle-timeout", self.idle_timeout),
                       ("--frame-timeout", self.frame_timeout),
                       ("--election-timeout", self.election_timeout),
                       ("--append-timeout", self.append_timeout),
                       ("--read-timeout", self.read_timeout)):
            if not f > 0:
                raise ConfigurationError(f"{opt} {f!r}: give a positive number of seconds")


@dataclass(frozen=True)
class ServerInfo:
    """What :func:`serve` reports once it listens."""

    node_id: Any
    peer_address: Address
    client_address: Address
    metrics_address: Address | None = None

    def ready_line(self) -> str:
        (ph, pp), (ch, cp) = self.peer_address, self.client_address
        line = f"{READY_PREFIX} id={self.node_id} peer={ph}:{pp} client={ch}:{cp}"
        if self.metrics_address is not None:
            line += f" metrics={self.metrics_address[0]}:{self.metrics_address[1]}"
        return line


class Server:
    """One running node: its log, transport, Raft node, store and client listener."""

    def __init__(self, config: ServerConfig) -> None:
        config.check()
        self.config = config
        self.store = KVStore(max_sessions=config.max_sessions,
                             max_results_total=config.max_results_total)
        self.node: RaftNode | None = None
        self.transport: TcpTransport | None = None
        self.bad_connections = 0
        """Client connections closed for bad input or a failed TLS handshake."""
        self.clients = 0
        self.inflight_total = 0
        """Requests of all client connections in progress."""
        self.room = trio.Event()
        """Set (and replaced) when requests finish: readers waiting for the global limit."""
        self.limits = ConnectionLimits(config.max_clients, config.max_clients_per_source,
                                       config.fd_reserve)
        self._known_addrs: dict[Any, Address] = {
            k: v for k, v in config.peers.items() if k != config.node_id}
        """Peer addresses: ``--peers``, then what configurations say."""
        self._prune_pending = False
        """Peers may have to be dropped once the configuration in force commits."""
        self._refusal_log = RateLimitedLog(logger)
        self.snapshot_seq = -1
        """Seq of the newest snapshot this node took, received or restored (-1: none)."""
        self.snapshots_taken = 0
        self.snapshots_installed = 0
        self.start_seq = -1
        """The apply seq the node started from: the seq of the snapshot restored at start
        (-1: none, the whole log is replayed)."""
        self._node_started = False

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started(ServerInfo)`` once listening. Raises
        ``LogLockedError`` if another process holds the data directory."""
        cfg = self.config
        os.makedirs(cfg.data_dir, exist_ok=True)
        # poll_us=0: no Trio-side polling for the flusher. The nodes of a cluster often share
        # cores, and a poll spends the CPU another node needs for the same put: one put in
        # flight over TLS, 3 processes on 2 cores, it cost ~0.6 ms of CPU per put for no
        # gain in puts/s (issue 13). The flusher thread's own short spin stays.
        log = FsLog(cfg.data_dir, "raft", fsync=cfg.fsync, segment_size=cfg.segment_size,
                    poll_us=0)
        try:
            await log.open()
        except LogLockedError as e:
            raise LogLockedError(
                f"node {cfg.node_id!r}: the data directory {cfg.data_dir} is in use by another "
                f"process ({e}); stop that process or give this node its own --data"
            ) from None
        try:
            listen = cfg.peer_listen or cfg.peers[cfg.node_id]
            opts = dict(cfg.transport_options)
            transport = TcpTransport(
                cfg.node_id, listen, cfg.peers, tls=cfg.tls, plaintext=cfg.plaintext, **opts
            )
            async with transport:
                self.transport = transport
                node = RaftNode(
                    cfg.node_id, list(cfg.peers), self._send, log,
                    apply=self.store.apply, read=self.store.read,
                    election_timeout=cfg.election_timeout, ping_timeout=cfg.ping_timeout,
                    append_timeout=cfg.append_timeout, read_timeout=cfg.read_timeout,
                    bootstrap=cfg.bootstrap, join=cfg.join,
                    snapshot=self.store.snapshot, restore=self._restore,
                    snapshot_entries=cfg.snapshot_entries,
                    trailing_entries=cfg.trailing_entries,
                )
                transport.set_handler(node.receive)
                self.node = node
                node.on("change", self._on_change)
                node.on("config", self._on_config)
                node.on(("commit", "change"), self._on_commit_or_change)
                node.on("snapshot", self._on_snapshot)
                self._node_started = False
                async with node:
                    self._node_started = True
                    # A restarted node knows its configuration from its state: follow it
                    # now (members added or removed since --peers was written).
                    self._sync_peers(node.configuration)
                    host, port = cfg.client_listen
                    try:
                        listeners = await trio.open_tcp_listeners(port, host=host)
                    except OSError as e:
                        raise TransportError(
                            f"node {cfg.node_id!r} cannot listen for clients on {host}:{port} "
                            f"(--client-port/--client-host): {e.strerror or e}; is another "
                            f"process using that port?") from None
                    sock = listeners[0].socket
                    bound = sock.getsockname()
                    info = ServerInfo(cfg.node_id, (listen[0], transport.port),
                                      (host, bound[1]))
                    async with trio.open_nursery() as nursery:
                        if cfg.metrics_listen is not None:
                            from ..metrics import NodeMetrics, serve_metrics

                            metrics = NodeMetrics(node, transport=transport)
                            maddr = await nursery.start(serve_metrics, metrics,
                                                        *cfg.metrics_listen)
                            info = ServerInfo(info.node_id, info.peer_address,
                                              info.client_address, maddr)
                        for listener in listeners:
                            nursery.start_soon(self._accept_loop, listener, nursery)
                        logger.info("node %r: at most %d client connections (%d per source "
                                    "address; descriptor limit %d)", cfg.node_id,
                                    self.limits.max_clients, self.limits.per_source,
                                    self.limits.fd_limit)
                        logger.info("%s", info.ready_line())
                        task_status.started(info)
                        await trio.sleep_forever()
        finally:
            self.node = None
            with trio.CancelScope(shield=True):
                await log.close()

    def reload_tls(self) -> bool:
        """Read the TLS certificate, key and CA files again (SIGHUP): new connections, peer
        and client, use them; established ones keep theirs until the other side's
        certificate expires. A file that cannot be used is reported and changes nothing."""
        admin = self.config.admin
        if admin is not None and admin.file is not None:
            try:
                admin.reload()
            except TinyRaftError as e:
                logger.error("node %r: SIGHUP: kept the current --admin-allow-file: %s",
                             self.config.node_id, e)
        authz = self.config.authz
        if authz is not None:
            try:
                authz.reload()
                logger.info("node %r: SIGHUP: reloaded %s", self.config.node_id, authz.path)
            except TinyRaftError as e:
                logger.error("node %r: SIGHUP: kept the current --authz: %s",
                             self.config.node_id, e)
        tls = self.config.tls
        if tls is None or tls.files is None:
            logger.warning("node %r: SIGHUP: no TLS files to reload", self.config.node_id)
            return False
        try:
            check_own_certificate(tls.files[1], self.config.node_id)
            tls.reload()
        except TinyRaftError as e:
            logger.error("node %r: SIGHUP: kept the current certificate: %s",
                         self.config.node_id, e)
            return False
        logger.info("node %r: SIGHUP: reloaded the TLS certificate, key and CA from %s",
                    self.config.node_id, ", ".join(f for f in tls.files if f))
        return True

    def _restore(self, meta: Any, stream: Any) -> None:
        """The node's ``restore``: the store's, timed and noted (at start, in a worker
        thread; for a snapshot from the leader, likewise)."""
        started = time.monotonic()
        self.store.restore(meta, stream)
        self.snapshot_seq = max(self.snapshot_seq, meta.seq)
        if not self._node_started:
            self.start_seq = meta.seq
        logger.info("node %r: store restored from snapshot %d (%d keys, %d bytes) in %.2fs",
                    self.config.node_id, meta.seq, len(self.store.data), meta.size,
                    time.monotonic() - started)

    def _on_snapshot(self, ev: Any) -> None:
        self.snapshot_seq = max(self.snapshot_seq, ev.seq)
        if ev.installed:
            self.snapshots_installed += 1
        else:
            self.snapshots_taken += 1
            logger.info("node %r: snapshot %d taken (%d bytes)", self.config.node_id, ev.seq,
                        ev.size or 0)

    def _on_change(self, ev: Any) -> None:
        logger.info("node %r: %s, leader %r, term %s", self.config.node_id,
                    ev.state, ev.leader, ev.term)

    # --- membership: the transport follows the configuration ------------------------------

    def _send(self, to: Any, msg: Any) -> None:
        """The node's ``send``: a member the transport does not know yet (the leader sends
        to a node it just added before the ``config`` event) is added from the
        configuration in force, then sent to."""
        transport = self.transport
        assert transport is not None
        try:
            transport.send(to, msg)
        except InvalidArgumentError:
            node = self.node
            if node is None:
                raise
            cfg = node.configuration
            if to not in cfg.members:
                # An answer to a member removed since (it still talks until it is told):
                # the transport forgot it on purpose.
                logger.debug("node %r: dropped a %s to %r, not a member", self.config.node_id,
                             type(msg).__name__, to)
                return
            if not self._sync_peers(cfg):
                raise
            transport.send(to, msg)

    def _on_config(self, ev: Any) -> None:
        logger.info("node %r: configuration at seq %s: %s", self.config.node_id, ev.seq,
                    ev.description)
        try:
            self._sync_peers(ev.config)
        except TinyRaftError as e:
            logger.error("node %r: cannot follow the configuration at seq %s: %s",
                         self.config.node_id, ev.seq, e)

    def _on_commit_or_change(self, ev: Any) -> None:
        if self._prune_pending:
            self._prune_peers()

    def _sync_peers(self, config: Any) -> bool:
        """Make every member of the configuration a peer of the transport (addresses from
        ``--peers`` and from the configuration's ``addrs``); returns whether one was added.
        Peers that are no longer members are dropped later, by :meth:`_prune_peers`.
        Certificates still authenticate every peer."""
        transport = self.transport
        if transport is None:
            return False
        me = self.config.node_id
        for nid, text in config.addrs.items():
            try:
                self._known_addrs[nid] = parse_address(text)
            except InvalidArgumentError:
                logger.warning("node %r: the configuration gives node %r the address %r, "
                               "which is not HOST:PORT; ignored", me, nid, text)
        added = False
        for nid in set(config.members) - {me}:
            if transport.add_peer(nid, self._known_addrs.get(nid)):
                added = True
        self._prune_pending = True
        self._prune_peers()
        return added

    def _prune_peers(self) -> None:
        """Drop the peers the configuration removed, once it is committed and none of them
        leads: a leader that removes itself leads until the change commits, and a change
        that is cut away brings them back."""
        node, transport = self.node, self.transport
        if node is None or transport is None:
            return
        try:
            st = node.status()
        except NodeStoppedError:
            return
        if st.config_seq > st.commit_seq:
            return  # not committed yet: a commit event calls again
        keep = set(st.voters) | set(st.learners) | set(st.outgoing)
        leader = st.leader
        for nid in transport.peer_ids:
            if nid not in keep:
                if nid == leader:
                    return  # it still leads: a change of leader calls again
                transport.remove_peer(nid)
        self._prune_pending = False

    # --- client connections -------------------------------------------------------------

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept client connections; over a limit, close them at once. EMFILE and the like
        pause accepting (rate-limited warning): they must never reach the node."""
        async with listener:
            while True:
                try:
                    tcp = await listener.accept()
                except OSError as e:
                    if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self._refusal_log("node %r: cannot accept client connections: %s (%d "
                                      "open); retrying in 0.1 s", self.config.node_id,
                                      os.strerror(e.errno or 0), self.limits.total)
                    await trio.sleep(0.1)
                    continue
                try:
                    host = str(tcp.socket.getpeername()[0])
                except OSError:
                    host = "?"
                why = self.limits.admit(host)
                if why is not None:
                    self._refusal_log("node %r: refused a client connection from %s: %s",
                                      self.config.node_id, host, why)
                    tcp.socket.close()
                    continue
                nursery.start_soon(self._client_admitted, tcp, host)

    async def _client_admitted(self, tcp: trio.SocketStream, host: str) -> None:
        released = False

        def release() -> None:
            # Before the socket closes, not after: a client that sees its connection end
            # may open the next one at once, and must find the slot free.
            nonlocal released
            if not released:
                released = True
                self.limits.release(host)

        try:
            await self._client(tcp, release)
        finally:
            release()
            await trio.aclose_forcefully(tcp)

    async def _client(self, tcp: trio.SocketStream, release: Callable[[], None]) -> None:
        try:
            h, p = tcp.socket.getpeername()[:2]
            where = f"client {h}:{p}"
        except OSError:
            where = "a client"
        tls = self.config.tls
        stream = FastStream.from_trio(tcp, None if tls is None else tls.server_context,
                                      server_side=True)
        if tls is not None:
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    await stream.do_handshake()
            except (*_NET_ERRORS, trio.TooSlowError) as e:
                self.bad_connections += 1
                why = ("no TLS handshake within "
                       f"{self.config.handshake_timeout}s" if isinstance(e, trio.TooSlowError)
                       else f"TLS handshake failed ({type(e).__name__}: {e.__cause__ or e})")
                self._refusal_log("node %r: refused %s: %s", self.config.node_id, where, why)
                if "WRONG_VERSION_NUMBER" in why or "HTTP_REQUEST" in why:
                    # Plaintext on a TLS port: say so in the client protocol, so that a
                    # plaintext client reports the cause, not "could not connect".
                    stream.send_raw_now(encode_response(0, "tls_required", (
                        "this node's client port speaks TLS and this client sent "
                        "plaintext: use tls=client_ssl_context(ca, cert, key)")))
                release()
                await trio.aclose_forcefully(stream)
                return
        owner = ""
        expires = math.inf
        if stream.tls:
            cert = stream.getpeercert()
            owner = cert_identity(cert)
            at = cert_expiry(cert)
            if at is not None:  # wall clock to trio clock
                expires = trio.current_time() + (at - time.time())
        self.clients += 1
        try:
            with trio.move_on_at(expires) as expired:
                await _ClientConnection(self, stream, where, owner).run()
            if expired.cancelled_caught:
                logger.info("node %r: closed the connection with %s: its certificate expired",
                            self.config.node_id, where)
        except Exception:  # a bug of ours: drop this connection, keep serving the others
            logger.exception("node %r: internal error serving %s", self.config.node_id, where)
        finally:
            self.clients -= 1
            release()
            await trio.aclose_forcefully(stream)

    def status(self) -> dict[str, Any]:
        node = self.node
        if node is None:
            return {"id": self.config.node_id, "state": "stopped"}
        try:
            st = node.status().as_dict()
            st["addrs"] = dict(node.configuration.addrs)
        except NodeStoppedError:
            return {"id": self.config.node_id, "state": "stopped"}
        del st["node_id"]
        return {
            **st,
            "id": self.config.node_id,
            "state": node.state,
            "leader": node.leader,
            "term": node.term,
            "seq": node.seq,
            "commit_seq": node.commit_seq,
            "apply_seq": node.apply_seq,
            "snapshot_seq": self.snapshot_seq,
            "snapshots_taken": self.snapshots_taken,
            "snapshots_installed": self.snapshots_installed,
            "start_seq": self.start_seq,
            "keys": len(self.store.data),
            "duplicates": self.store.duplicates,
            "sessions": len(self.store._sessions),
            "expired_writes": self.store.expired,
            "data_bytes": self.store.data_bytes,
            "bad_connections": self.bad_connections,
            "clients": self.clients,
            "pid": os.getpid(),
        }


def cert_identity(cert: dict[str, Any] | None) -> str:
    """Who a client certificate names: its first DNS subjectAltName, else its common name
    (``"dns:client.example"``, ``"cn:alice"``); sessions are scoped by it."""
    if not cert:
        return ""
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return f"dns:{value}"[:1024]
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return f"cn:{v}"[:1024]
    return f"serial:{cert.get('serialNumber', '')}"[:1024]


def _answer_size(payload: Any) -> int:
    """About what an answer takes once encoded (a status dict is ~600 bytes and ~60 more
    per follower)."""
    if isinstance(payload, (bytes, str)):
        return len(payload) + 24
    if isinstance(payload, dict):
        return 1024 + 96 * len(payload.get("followers", ()))
    return 32


def _error_code(e: BaseException) -> str:
    if isinstance(e, NoLeaderError):
        return "no_leader"
    if isinstance(e, RaftTimeoutError):
        return "timeout"
    if isinstance(e, LeadershipLostError):
        return "retry"
    if isinstance(e, (NodeStoppedError, ClosedError)):
        return "stopped"
    if isinstance(e, UsageError):
        return "bad_request"
    return "error"


class _ClientConnection:
    """Reads requests, runs them concurrently, writes answers in batches."""

    def __init__(self, server: Server, stream: FastStream, where: str,
                 owner: str = "") -> None:
        self.owner = owner
        """The client certificate's identity: sessions opened here belong to it."""
        self.server = server
        self.stream = stream
        self.where = where
        self.out: deque[tuple[int, str, Any, int]] = deque()
        """Answers waiting to be written, not yet encoded: a get's value is the store's own
        bytes object until the writer packs it, so waiting answers do not copy values."""
        self.out_bytes = 0
        """What the waiting answers will take once encoded (counted against the budget)."""
        self.wake = trio.Event()
        self.inflight = 0
        self.room = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.closed = False

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            self.nursery = n
            n.start_soon(self._guard, self._writer)
            await self._guard(self._reader)
            if not self.closed:
                # The client finished sending: answer what is in flight, then close.
                while self.inflight or self.out:
                    self.room = trio.Event()
                    await self.room.wait()
            n.cancel_scope.cancel()

    async def _guard(self, fn: Any) -> None:
        """Run the reader or the writer; a network error or bad input ends the connection
        (and only it). Both tasks often fail at once; the first error is the one reported."""
        try:
            await fn()
        except _NET_ERRORS as e:
            if not self.closed:
                logger.debug("node %r: %s went away (%r)", self.server.config.node_id,
                             self.where, e)
            self._close()
        except ProtocolError as e:
            if not self.closed:
                self.server.bad_connections += 1
                logger.warning("node %r: closed the connection with %s: %s",
                               self.server.config.node_id, self.where, e)
            self._close()

    def _close(self) -> None:
        self.closed = True
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _reader(self) -> None:
        decoder = FrameDecoder(self.server.config.max_request_bytes)
        max_inflight = self.server.config.max_inflight
        budget = self.server.config.answer_budget
        cfg = self.server.config
        server = self.server
        total_max = cfg.max_inflight_total
        frame_deadline = math.inf
        while True:
            while self.inflight >= max_inflight or self.out_bytes >= budget:
                self.room = trio.Event()
                await self.room.wait()
            if decoder.buffered:
                # Inside a frame: the whole frame must arrive within frame_timeout of its
                # first byte (a deadline per frame: one byte every few seconds must not keep
                # a connection and its buffer for ever).
                with trio.move_on_at(frame_deadline) as waited:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                if waited.cancelled_caught:
                    raise ProtocolError(
                        f"a frame was not complete {cfg.frame_timeout}s after it began "
                        f"({decoder.buffered} bytes buffered)")
            else:
                with trio.move_on_after(cfg.idle_timeout) as idle:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                if idle.cancelled_caught:
                    if self.inflight or self.out:
                        continue  # quiet, not idle: answers are still coming
                    logger.info("node %r: closed the connection with %s: idle for %ss",
                                cfg.node_id, self.where, cfg.idle_timeout)
                    return
            if not data:
                if decoder.buffered:
                    raise ProtocolError(
                        f"the connection ended inside a frame ({decoder.buffered} bytes of "
                        f"an incomplete frame)")
                return
            if decoder.offset == 0 and not decoder.buffered and data[:2] == b"\x16\x03" \
                    and not self.stream.tls:
                # A TLS ClientHello on a plaintext port: answer in plaintext (the client's
                # TLS stack reports "not TLS"), and say so here.
                with trio.move_on_after(1):
                    await self.stream.send_all(encode_response(0, "plaintext_only", (
                        "this node runs with --plaintext: use Client(..., plaintext=True)")))
                raise ProtocolError("it speaks TLS, but this node runs with --plaintext")
            was_buffered = decoder.buffered
            payloads = decoder.feed(data)
            if decoder.buffered and (payloads or not was_buffered):
                frame_deadline = trio.current_time() + cfg.frame_timeout  # a new frame began
            writes: list[tuple[int, bytes]] = []
            for payload in payloads:
                # Limits are checked per request, not per read: one 256 KiB read can hold
                # ~20,000 requests. Past them, stop here until answers have gone out.
                if self.inflight >= max_inflight or self.out_bytes >= budget:
                    self._start_writes(writes)
                    writes = []
                    while self.inflight >= max_inflight or self.out_bytes >= budget:
                        self.room = trio.Event()
                        await self.room.wait()
                if server.inflight_total + len(writes) >= total_max:
                    self._start_writes(writes)
                    writes = []
                    while server.inflight_total >= total_max:
                        if server.room.is_set():
                            server.room = trio.Event()
                        await server.room.wait()
                req = decode_request(payload)
                tag, rid = req[1], req[2]
                if tag == TAG_STATUS:
                    self._answer(rid, "ok", self.server.status())
                elif tag == TAG_ADMIN:
                    policy = self.server.config.admin
                    if policy is not None and not policy.allows(self.owner):
                        self._answer(rid, "forbidden", f"{self.owner or 'this client'} may not "
                                                       f"send admin requests (--admin-allow)")
                        continue
                    self._start(self._admin, rid, req[3], req[4], req[5])
                elif tag == TAG_GET:
                    if not self._allowed("read", req[3]):
                        self._forbid(rid, "read", req[3])
                        continue
                    self._start(self._get, rid, req[3])
                elif tag == TAG_REGISTER:
                    self._start(self._register, rid)
                else:
                    if not self._allowed("write", req[7]):
                        self._forbid(rid, "write", req[7])
                        continue
                    # decode_request validated the fields: pack them as the log command
                    # (the layout encode_write makes) without checking them twice. The
                    # owner is the certificate's, never what the client says.
                    req.append(self.owner)
                    writes.append((rid, packb(req[3:], use_bin_type=True)))
            self._start_writes(writes)

    def _allowed(self, action: str, key: bytes) -> bool:
        authz = self.server.config.authz
        return authz is None or authz.allows(self.owner, action, key)

    def _forbid(self, rid: int, action: str, key: bytes) -> None:
        self._answer(rid, "forbidden", f"{self.owner or 'this client'} may not {action} "
                                       f"{show_value(key)} (--authz)")

    def _start_writes(self, writes: list[tuple[int, bytes]]) -> None:
        for i in range(0, len(writes), BATCH_MAX):
            self._start(self._write, writes[i:i + BATCH_MAX], n=len(writes[i:i + BATCH_MAX]))

    def _start(self, fn: Any, *args: Any, n: int = 1) -> None:
        assert self.nursery is not None
        self.inflight += n
        self.server.inflight_total += n
        self.nursery.start_soon(self._run_one, fn, args, n)

    async def _run_one(self, fn: Any, args: tuple[Any, ...], n: int) -> None:
        try:
            await fn(*args)
        finally:
            self.inflight -= n
            self.server.inflight_total -= n
            self.room.set()
            self.server.room.set()

    def _answer(self, rid: int, code: str, payload: Any) -> None:
        if self.inflight <= 1 and not self.out and not self.closed \
                and self.stream.ready_for_direct_send():
            # The only request in flight and nothing waiting or being sent: write the
            # answer now rather than wake the writer for it (a task switch per answer).
            # With more in flight the writer sends their answers together: answering the
            # first alone splits the client's next burst, and group commit with it (that
            # cost 15-25% of the puts/s at 256 in flight, in alternating runs). What the
            # socket does not take at once stays in the stream, in order, and the writer
            # finishes it.
            try:
                if not self.stream.try_send(encode_response(rid, code, payload)):
                    self.wake.set()
            except _NET_ERRORS:
                self._close()
            return
        size = _answer_size(payload)
        self.out.append((rid, code, payload, size))
        self.out_bytes += size
        self.wake.set()

    async def _writer(self) -> None:
        timeout = self.server.config.answer_timeout
        out = self.out
        stream = self.stream
        while True:
            if not out and not stream.out_pending:
                self.room.set()
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            # Encode at most WRITE_CHUNK bytes at a time: the copy made for the socket stays
            # small whatever is waiting.
            parts: list[bytes] = []
            n = taken = 0
            while out and n < WRITE_CHUNK:
                rid, code, payload, size = out.popleft()
                b = encode_response(rid, code, payload)
                parts.append(b)
                n += len(b)
                taken += size
            with trio.move_on_after(timeout) as waited:
                # No parts: only what a direct answer (``_answer``) left, which this flushes.
                await stream.send_all(b"".join(parts) if parts else ())
            if waited.cancelled_caught:
                raise ProtocolError(
                    f"it did not read its answers for {timeout}s ({self.out_bytes} bytes "
                    f"waiting)")
            self.out_bytes -= taken
            self.room.set()

    async def _get(self, rid: int, key: bytes) -> None:
        node = self.server.node
        try:
            if node is None:
                raise NodeStoppedError("the node is stopping")
            value = await node.read(("get", key))
        except TinyRaftError as e:
            self._answer(rid, _error_code(e), str(e))
        except Exception as e:  # a bug of ours: answer, say so loudly, keep serving
            logger.exception("node %r: get failed", self.server.config.node_id)
            self._answer(rid, "error", f"internal error: {e!r}")
        else:
            self._answer(rid, "ok", value)

    async def _admin(self, rid: int, op: str, target: Any, addr: str | None) -> None:
        """A membership change or leadership transfer, on the leader; another node answers
        ``not_leader`` naming the leader it knows."""
        server = self.server
        node = server.node
        me = server.config.node_id
        try:
            if node is None:
                raise NodeStoppedError("the node is stopping")
            if not node.is_leader():
                raise NotLeaderError(f"node {me!r} is not the leader", leader=node.leader)
            logger.info("node %r: admin %s %r%s from %s", me, op, target,
                        f" at {addr}" if addr else "", self.owner or self.where)
            leader = me
            if op == "add_learner":
                cfg = await node.add_learner(target, addr)
            elif op == "promote":
                cfg = await node.promote(target)
            elif op == "remove":
                cfg = await node.remove_node(target)
            else:
                leader = await node.transfer_leadership(target)
                cfg = node.configuration
        except NotLeaderError as e:
            self._answer(rid, "not_leader", f"{e}; the leader is {e.leader!r}"
                         if e.leader is not None else f"{e}; no leader known")
            return
        except (MembershipError, InvalidArgumentError, ConfigurationError) as e:
            self._answer(rid, "refused", str(e))
            return
        except Exception as e:
            if not isinstance(e, TinyRaftError):
                logger.exception("node %r: admin %s failed", me, op)
            self._answer(rid, _error_code(e), str(e))
            return
        logger.info("node %r: admin %s %r done: %s", me, op, target, cfg.describe())
        self._answer(rid, "ok", {
            "op": op, "node": target, "leader": leader, "config": cfg.describe(),
            "voters": sorted(cfg.voters, key=repr), "learners": sorted(cfg.learners, key=repr),
            "outgoing": sorted(cfg.outgoing, key=repr), "addrs": dict(cfg.addrs),
        })

    async def _register(self, rid: int) -> None:
        cfg = self.server.config
        cmd = encode_register(self.owner, max_sessions=cfg.max_sessions,
                              max_results_total=cfg.max_results_total,
                              quota_bytes=cfg.quota_bytes)
        await self._write([(rid, cmd)])

    async def _write(self, batch: list[tuple[int, bytes]]) -> None:
        node = self.server.node
        try:
            if node is None:
                raise NodeStoppedError("the node is stopping")
            res = await node.append_batch([cmd for _, cmd in batch])
        except Exception as e:
            if not isinstance(e, TinyRaftError):
                logger.exception("node %r: write failed", self.server.config.node_id)
            code, msg = _error_code(e), str(e)
            for rid, _ in batch:
                self._answer(rid, code, msg)
            return
        for (rid, _), r in zip(batch, res.result, strict=True):
            if r is not None and r[0] == "ok":
                self._answer(rid, "ok", r[1])
            else:
                self._answer(rid, "err", f"{r[1]}: {r[2]}" if r else "no result")


# --- command line ---------------------------------------------------------------------------


def _node_id(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def parse_peers(text: str) -> dict[Any, Address]:
    """``1=host:port,2=host:port`` -> ``{1: ("host", port), ...}`` (ids made of digits are
    ints, others strs)."""
    out: dict[Any, Address] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if any(c.isspace() for c in part):
            raise InvalidArgumentError(
                f"--peers: {part!r} holds a space; separate the nodes with commas: "
                f"--peers 1=host:port,2=host:port,3=host:port")
        ident, sep, addr = part.partition("=")
        if not sep or not ident:
            raise InvalidArgumentError(f"--peers: {part!r} is not ID=HOST:PORT")
        nid = _node_id(ident.strip())
        if nid in out:
            raise InvalidArgumentError(f"--peers: node {nid!r} is listed twice")
        try:
            out[nid] = parse_address(addr.strip(), allow_zero=True)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"--peers: node {nid!r} has address {addr!r}; give HOST:PORT, e.g. "
                f"{nid}=127.0.0.1:7001") from None
    if not out:
        raise InvalidArgumentError("--peers: list every node as ID=HOST:PORT,...")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyraftplus.server",
        description="Run one node of a replicated key-value store (Raft over mutual TLS).",
    )
    p.add_argument("--id", required=True, help="this node's id (one of the --peers ids)")
    p.add_argument("--peers", required=True,
                   help="every node's peer address: 1=host:port,2=host:port,3=host:port "
                        "(with --join: the current voters')")
    p.add_argument("--join", action="store_true",
                   help="start empty as a learner of an existing cluster: --peers lists its "
                        "current voters, --listen this node's peer address; then run "
                        "'python -m tinyraftplus.admin add-learner ID HOST:PORT' (and promote)")
    p.add_argument("--bootstrap", action="store_true",
                   help="a brand-new cluster: a node without state votes at once, so the "
                        "cluster starts with members missing; never for a node that lost its "
                        "data (without state and without this flag a node recovers from the "
                        "others)")
    p.add_argument("--admin-allow", action="append", default=[], metavar="IDENTITY",
                   help="only clients whose certificate identity matches (fnmatch: "
                        "dns:ops.example, cn:admin-*) may send admin requests; repeatable")
    p.add_argument("--admin-allow-file", metavar="FILE",
                   help="identities (patterns) allowed admin requests, one a line (reloaded "
                        "on SIGHUP)")
    p.add_argument("--data", required=True, help="data directory (created if missing)")
    p.add_argument("--client-port", type=int, required=True,
                   help="port for clients (0 picks a free one; see the ready line)")
    p.add_argument("--client-host", default=None,
                   help="address to bind for clients (default: this node's peer host)")
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="bind the peer port here instead of this node's --peers address "
                        "(e.g. 0.0.0.0:7001)")
    p.add_argument("--tls-ca", help="the cluster CA certificate (PEM)")
    p.add_argument("--tls-cert", help="this node's certificate (PEM, names node-<id>.tinyraftplus)")
    p.add_argument("--tls-key", help="this node's private key (PEM)")
    p.add_argument("--tls-min-version", choices=("1.2", "1.3"), default="1.2",
                   help="oldest TLS version accepted or offered (default: 1.2)")
    p.add_argument("--tls-crl", metavar="FILE",
                   help="certificate revocation list from the cluster CA (PEM); the "
                        "certificates it lists are refused")
    p.add_argument("--plaintext", action="store_true",
                   help="no encryption, no authentication (local experiments only)")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not fdatasync the log (survives a process crash, not a power loss)")
    p.add_argument("--election-timeout", type=float, default=0.5, metavar="S",
                   help="a follower that hears no leader for this long (randomised up to "
                        "twice) starts an election; keep it well above the round-trip time "
                        "between nodes (default: 0.5)")
    p.add_argument("--ping-timeout", type=float, default=None, metavar="S",
                   help="leader heartbeat interval (default: election timeout / 5)")
    p.add_argument("--append-timeout", type=float, default=5.0, metavar="S",
                   help="a write not committed within this long is answered 'timeout' (the "
                        "client retries; default: 5)")
    p.add_argument("--read-timeout", type=float, default=5.0, metavar="S",
                   help="a linearizable get not served within this long is answered "
                        "'timeout' (default: 5)")
    lim = p.add_argument_group("limits on client connections (see the README's threat model)")
    p.add_argument("--authz", metavar="FILE",
                   help="JSON map of client certificate identities to the key prefixes they "
                        "may read and write (default: every client may do everything)")
    lim.add_argument("--max-sessions", type=int, default=10_000, metavar="N",
                     help="client sessions the store keeps, least recently used out; a "
                          "write in an evicted session is refused, never applied twice "
                          "(default: 10000; the leader's value applies)")
    lim.add_argument("--max-results-total", type=int, default=1 << 20, metavar="N",
                     help="write results kept over all sessions, ~200 bytes each "
                          "(default: 1048576)")
    lim.add_argument("--max-request-bytes", type=int, default=CLIENT_MAX_FRAME,
                     metavar="BYTES",
                     help="largest request frame accepted on the client port (default: "
                          f"{CLIENT_MAX_FRAME}, room for a 1 MiB value)")
    lim.add_argument("--quota-bytes", type=int, default=0, metavar="BYTES",
                     help="most bytes of keys and values the store holds; writes past it are "
                          "refused with 'no_space' (default: 0, no quota; the leader's value "
                          "applies)")
    lim.add_argument("--max-clients", type=int, default=1024, metavar="N",
                     help="client connections open at once, lowered at start to fit the "
                          "descriptor limit minus --fd-reserve (default: 1024)")
    lim.add_argument("--max-clients-per-source", type=int, default=256, metavar="N",
                     help="client connections open at once from one address (default: 256)")
    lim.add_argument("--fd-reserve", type=int, default=256, metavar="N",
                     help="descriptors kept for the node's own files and peers (default: 256)")
    lim.add_argument("--max-inflight", type=int, default=1024, metavar="N",
                     help="requests of one connection processed at once (default: 1024)")
    lim.add_argument("--max-inflight-total", type=int, default=2048, metavar="N",
                     help="requests of all client connections processed at once "
                          "(default: 2048)")
    lim.add_argument("--answer-budget", type=int, default=4 << 20, metavar="BYTES",
                     help="answers waiting to be written per connection before the server "
                          "stops reading its requests (default: 4194304)")
    lim.add_argument("--answer-timeout", type=float, default=30.0, metavar="S",
                     help="a client that does not read its waiting answers for this long is "
                          "disconnected (default: 30)")
    lim.add_argument("--client-idle-timeout", type=float, default=300.0, metavar="S",
                     help="an idle client connection is closed after this long (default: 300)")
    lim.add_argument("--frame-timeout", type=float, default=30.0, metavar="S",
                     help="a request frame must arrive whole within this long of its first "
                          "byte (default: 30)")
    snap = p.add_argument_group("snapshots (the README's server section)")
    snap.add_argument("--snapshot-entries", type=int, default=10_000, metavar="N",
                      help="snapshot the store every N entries applied and compact the log "
                           "behind it, so that a restart restores the snapshot and replays "
                           "only the entries after it (0: never; default: 10000)")
    snap.add_argument("--trailing-entries", type=int, default=5_000, metavar="M",
                      help="entries kept in the log behind a snapshot: a follower at most "
                           "this far behind catches up from the log, one further behind "
                           "gets the snapshot (default: 5000)")
    snap.add_argument("--segment-size", type=int, default=64 << 20, metavar="BYTES",
                      help="bytes per log segment file; compaction drops whole segments, so "
                           "up to one more segment than --trailing-entries stays (default: "
                           "67108864)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="peer connection presumed dead after this long without data "
                        "(default: 4 x election timeout, at least 1 s)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics over HTTP on this port of the --client-host "
                        "address (0 picks one; see the ready line); needs "
                        "pip install 'tinyraftplus[metrics]'")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a failure (default: one line saying what)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Build a :class:`ServerConfig` from the command line; raises ``UsageError``."""
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:
        if all("=" in x and ":" in x for x in extra):
            raise ConfigurationError(
                f"--peers: {' '.join(extra)} came as separate arguments; separate the nodes "
                f"with commas: --peers 1=host:port,2=host:port,3=host:port")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    peers = parse_peers(a.peers)
    node_id = _node_id(a.id)
    tls = None
    if a.tls_ca or a.tls_cert or a.tls_key:
        if not (a.tls_ca and a.tls_cert):
            raise ConfigurationError("TLS needs --tls-ca and --tls-cert (and --tls-key unless "
                                     "the certificate file holds the key)")
        if a.plaintext:
            raise ConfigurationError("--plaintext and --tls-* together: choose one")
        for opt, path in (("--tls-ca", a.tls_ca), ("--tls-cert", a.tls_cert),
                          ("--tls-key", a.tls_key), ("--tls-crl", a.tls_crl)):
            if path and not os.path.isfile(path):
                raise ConfigurationError(f"{opt} {path}: no such file; give the path of a "
                                         f"PEM file")
        check_own_certificate(a.tls_cert, node_id)
        tls = TlsConfig.from_files(a.tls_ca, a.tls_cert, a.tls_key,
                                   min_version=a.tls_min_version, crl_file=a.tls_crl)
    et = a.election_timeout
    ping = a.ping_timeout if a.ping_timeout is not None else et / 5
    idle = a.idle_timeout if a.idle_timeout is not None else max(1.0, 4 * et)
    keepalive = min(ping * 2, idle / 4)
    peer_listen = None
    if a.listen:
            peer_listen = parse_address(a.listen, allow_zero=True)
    if node_id in peers:
        client_host = a.client_host or peers[node_id][0]
    else:
        client_host = a.client_host or (peer_listen[0] if peer_listen else "127.0.0.1")
    metrics_listen = None
    if a.metrics_port is not None:
        from ..metrics import require_prometheus

        if not 0 <= a.metrics_port <= 65535:
            raise ConfigurationError(f"--metrics-port {a.metrics_port}: give a port, 0-65535")
        require_prometheus("--metrics-port")  # one line naming the extra to install: exit 2
        metrics_listen = (client_host, a.metrics_port)
    authz = None if a.authz is None else Authorization.from_file(a.authz)
    admin = None
    if a.admin_allow or a.admin_allow_file or authz is not None:
        if a.admin_allow_file and not os.path.isfile(a.admin_allow_file):
            raise ConfigurationError(f"--admin-allow-file {a.admin_allow_file}: no such file")
        admin = AdminPolicy(a.admin_allow, a.admin_allow_file, authz)
    cfg = ServerConfig(
        node_id=node_id, peers=peers, data_dir=a.data,
        client_listen=(client_host, a.client_port), peer_listen=peer_listen,
        tls=tls, plaintext=a.plaintext, fsync=not a.no_fsync,
        election_timeout=et, ping_timeout=ping, append_timeout=a.append_timeout,
        read_timeout=a.read_timeout,
        max_sessions=a.max_sessions, max_results_total=a.max_results_total,
        max_request_bytes=a.max_request_bytes, quota_bytes=a.quota_bytes, debug=a.debug,
        authz=authz, admin=admin, join=a.join, bootstrap=a.bootstrap,
        max_clients=a.max_clients, max_clients_per_source=a.max_clients_per_source,
        fd_reserve=a.fd_reserve, max_inflight=a.max_inflight,
        max_inflight_total=a.max_inflight_total, answer_budget=a.answer_budget,
        answer_timeout=a.answer_timeout, idle_timeout=a.client_idle_timeout,
        frame_timeout=a.frame_timeout, metrics_listen=metrics_listen,
        snapshot_entries=a.snapshot_entries, trailing_entries=a.trailing_entries,
        segment_size=a.segment_size,
        transport_options={"keepalive": keepalive, "idle_timeout": idle,
                           "backoff_max": max(0.2, min(2.0, et))},
    )
    cfg.check()
    logging.getLogger().setLevel(a.log_level.upper())
    return cfg


async def _main(cfg: ServerConfig) -> None:
    server = Server(cfg)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(server.serve)
            print(info.ready_line(), flush=True)
            async for sig in signals:
                if sig == signal.SIGHUP:
                    server.reload_tls()
                    continue
                logger.info("node %r: %s received, stopping", cfg.node_id,
                            signal.Signals(sig).name)
                nursery.cancel_scope.cancel()
                break
    logger.info("node %r: stopped cleanly", cfg.node_id)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a node from the command line. A mistake on the command line prints one line
    naming the option and exits 2; a failure at run time prints one line and exits 1 (3 if
    the data directory is in use); ``--debug`` adds the traceback."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cfg = parse_args(args)
    except (UsageError, ValueError) as e:
        if debug:
            logger.exception("bad command line")
        print(f"tinyraftplus.server: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(_main, cfg)
    except KeyboardInterrupt:
        return EXIT_OK
    except BaseException as e:
        err = _single(e)
        if isinstance(err, KeyboardInterrupt):
            return EXIT_OK
        if isinstance(e, BaseExceptionGroup) and e.subgroup(LogLockedError) is not None:
            err = _first(e.subgroup(LogLockedError))
        if not isinstance(err, Exception):
            raise
        if debug or not isinstance(err, (TinyRaftError, OSError)):
            logger.error("node %r failed", cfg.node_id, exc_info=err)
        print(f"tinyraftplus.server: node {cfg.node_id}: {err}", file=sys.stderr)
        return EXIT_LOCKED if isinstance(err, LogLockedError) else EXIT_FAILED
    return EXIT_OK


def _first(eg: BaseException) -> BaseException:
    while isinstance(eg, BaseExceptionGroup) and eg.exceptions:
        eg = eg.exceptions[0]
    return eg


def _single(e: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, else ``e`` itself."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


__all__ = [
    "Server", "ServerConfig", "ServerInfo", "main", "parse_args", "parse_peers", "build_parser",
    "EXIT_OK", "EXIT_USAGE", "EXIT_LOCKED", "EXIT_FAILED", "READY_PREFIX",
]


if __name__ == "__main__":
    sys.exit(main())
