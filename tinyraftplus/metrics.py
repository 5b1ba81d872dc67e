"""Prometheus metrics for a ``RaftNode`` (``pip install 'tinyraftplus[metrics]'``).

    metrics = NodeMetrics(node, transport=transport)   # before or after the node starts
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 9101)

``GET /metrics`` (or any path) on that port answers the Prometheus text format, produced by
the standard client library (``prometheus_client``). The key-value server runs this with
``--metrics-port``.

Each ``NodeMetrics`` has a registry of its own (not ``prometheus_client``'s global one), so
several nodes in one process (tests, an in-process cluster) each export their own figures.
What costs nothing until scraped is read at scrape time (term, seqs, queue depths, drops,
bytes written); only the two latency histograms are fed as things happen: one observation
per successful append (a hook the node calls only while one is set) and one per durable
write round of the log (timestamps its flusher takes anyway), never per record.

Metrics (all prefixed ``tinyraftplus_``):

* ``term``, ``commit_seq``, ``apply_seq``, ``last_seq``, ``first_seq``: gauges; commits
  and applies progress as ``commit_seq`` and ``apply_seq`` (use ``rate()`` on them).
* ``is_leader``: 1 on the leader, else 0; ``elections_total``: elections this node started
  (it became a candidate).
* ``append_seconds``: histogram of ``append`` / ``append_batch`` calls that succeeded
  (from the call until this node applied the entries).
* ``log_fsync_seconds``: histogram of the log's durable write rounds (``pwrite`` +
  ``fdatasync``, as its appenders waited for them); ``log_written_bytes_total``.
* ``peer_send_queue_depth{peer}``, ``peer_send_dropped_total{peer}``,
  ``peer_connected{peer}``: per peer of the transport (messages waiting, dropped because
  the queue was full, whether a connection is up).

The HTTP side is a few lines of Trio (no thread): the metrics are read on the event loop,
between two steps of the node, so they never see a half-made change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import trio

from .errors import ConfigurationError

logger = logging.getLogger("tinyraftplus.metrics")

INSTALL_HINT = "pip install 'tinyraftplus[metrics]'"

# Latency buckets from 100 us (a group-committed fdatasync on a fast disk) to 10 s (the
# default append timeout).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0)

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16


def require_prometheus(what: str = "metrics") -> Any:
    """The ``prometheus_client`` module, or ``ConfigurationError`` saying how to install it."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            f"{what} needs the prometheus_client package, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    return prometheus_client


class NodeMetrics:
    """The metrics of one node (and optionally its transport), in a registry of its own.

    ``node``: a ``RaftNode``; ``transport``: anything with ``peer_ids``, ``stats(peer)``
    (``queued``, ``dropped``) and ``is_connected(peer)``, such as ``TcpTransport``.
    Raises ``ConfigurationError`` if ``prometheus_client`` is not installed.
    ``close()`` detaches the hooks."""

    def __init__(self, node: Any, *, transport: Any = None) -> None:
        prom = require_prometheus()
        self._prom = prom
        self.node = node
        self.transport = transport
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.append_seconds = prom.Histogram(
            "tinyraftplus_append_seconds",
            "Successful append/append_batch calls: from the call until this node applied them",
            buckets=BUCKETS, registry=self.registry)
        self.fsync_seconds = prom.Histogram(
            "tinyraftplus_log_fsync_seconds",
            "Durable write rounds of the log (pwrite + fdatasync, shared by a group commit)",
            buckets=BUCKETS, registry=self.registry)
        self.elections = 0
        self._candidate_term: int | None = None
        log = getattr(node, "log", None)
        self._log = log if hasattr(log, "on_sync") else None
        self.registry.register(_Collector(self))
        self._listener = node.on("change", self._on_change)
        node.append_observer = self.append_seconds.observe
        if self._log is not None:
            self._log.on_sync(self.fsync_seconds.observe)

    def _on_change(self, ev: Any) -> None:
        if ev.state == "candidate" and ev.term != self._candidate_term:
            self._candidate_term = ev.term
            self.elections += 1

    def text(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return self._prom.generate_latest(self.registry)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._listener.close()
        if self.node.append_observer == self.append_seconds.observe:
            self.node.append_observer = None
        if self._log is not None:
            self._log.on_sync(None)


class _Collector:
    """Reads what is cheap to read only when scraped."""

    def __init__(self, m: NodeMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.m
        node = m.node
        running = node.state != "stopped"

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"tinyraftplus_{name}", doc, value=value)

        yield gauge("term", "Current Raft term", node.term)
        yield gauge("is_leader", "1 while this node leads", 1 if node.is_leader() else 0)
        if running:
            yield gauge("commit_seq", "Highest committed seq this node knows", node.commit_seq)
            yield gauge("apply_seq", "Highest seq applied to the state machine",
                        node.apply_seq)
            yield gauge("last_seq", "Last seq in this node's log", node.seq)
            yield gauge("first_seq", "First seq this node's log holds", node.log.first_seq)
        yield CounterMetricFamily("tinyraftplus_elections", "Elections this node started",
                                  value=m.elections)
        if m._log is not None:
            yield CounterMetricFamily("tinyraftplus_log_written_bytes",
                                      "Bytes of records written to the log's segments",
                                      value=m._log.bytes_written)
        t = m.transport
        if t is not None:
            depth = GaugeMetricFamily("tinyraftplus_peer_send_queue_depth",
                                      "Messages waiting to be sent to the peer",
                                      labels=["peer"])
            dropped = CounterMetricFamily("tinyraftplus_peer_send_dropped",
                                          "Messages dropped because the peer's send queue "
                                          "was full", labels=["peer"])
            up = GaugeMetricFamily("tinyraftplus_peer_connected",
                                   "1 while a connection to the peer is up", labels=["peer"])
            for p in t.peer_ids:
                try:
                    st = t.stats(p)
                except Exception:  # removed between the two calls
                    continue
                label = [str(p)]
                depth.add_metric(label, st.queued)
                dropped.add_metric(label, st.dropped)
                up.add_metric(label, 1 if t.is_connected(p) else 0)
            yield depth
            yield dropped
            yield up


async def serve_metrics(metrics: NodeMetrics, host: str, port: int, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer HTTP ``GET`` requests on ``host:port`` with ``metrics.text()`` until
    cancelled; ``task_status.started((host, port))`` with the port bound (0 picks one).
    Raises ``TransportError`` if it cannot listen."""
    from .errors import TransportError

    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise TransportError(
            f"cannot listen for metrics on {host}:{port} (--metrics-port): "
            f"{e.strerror or e}; is another process using that port?") from None
    bound = listeners[0].socket.getsockname()[1]
    slots = trio.Semaphore(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        if slots.value == 0:  # a scraper has no reason to hold many connections
            await trio.aclose_forcefully(stream)
            return
        async with slots:
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await _answer(stream, metrics)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, handle, [listener])
        task_status.started((host, bound))


async def _answer(stream: trio.SocketStream, metrics: NodeMetrics) -> None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        data += chunk
        if len(data) > MAX_REQUEST:
            await stream.send_all(_response(431, b"request too large\n"))
            return
    line = data.split(b"\n", 1)[0].split()
    if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
        await stream.send_all(_response(405, b"GET only\n"))
        return
    body = metrics.text()
    ctype = metrics._prom.CONTENT_TYPE_LATEST.encode()
    await stream.send_all(_response(200, b"" if line[0] == b"HEAD" else body, ctype,
                                    length=len(body)))


_REASONS = {200: b"OK", 405: b"Method Not Allowed", 431: b"Request Header Fields Too Large"}


def _response(code: int, body: bytes, ctype: bytes = b"text/plain; charset=utf-8",
              length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (code, _REASONS[code], ctype, n)) + body


__all__ = ["NodeMetrics", "serve_metrics", "require_prometheus", "INSTALL_HINT"]
