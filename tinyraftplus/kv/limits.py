"""What keeps one client (or a crowd of them) from taking a node down: connection caps per
port and per source address, the descriptor reserve, and rate-limited refusal logging.

Theory of operation
-------------------
Every connection costs a file descriptor, and the node's own files (log segments, the state
file written on every term change, the directory fsyncs) need descriptors too: a node whose
``open`` fails with EMFILE cannot persist a vote and must stop. So at start the server raises
its soft ``RLIMIT_NOFILE`` to the hard limit and keeps ``fd_reserve`` descriptors for itself:
client connections are capped at ``min(max_clients, soft limit - fd_reserve)``, counted from
``accept`` (before the TLS handshake, which is where a stranger's connection sits), and a
connection over the cap or over ``max_clients_per_source`` for its address is closed at once.
EMFILE on ``accept`` itself (the reserve was used up by something else) pauses accepting for a
moment; it never reaches the node.

Refusals are counted and logged at most once per ``interval`` with the number suppressed, so
a flood of refused connections cannot fill the disk with log lines either.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import defaultdict

from ..errors import ConfigurationError


class RateLimitedLog:
    """``log(msg)`` at most once per ``interval`` seconds; the lines in between are counted
    and the count is reported with the next line that gets through."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING,
                 interval: float = 10.0) -> None:
        self.logger = logger
        self.level = level
        self.interval = interval
        self.count = 0
        """Events seen in all (logged or not)."""
        self._last = -1e18
        self._suppressed = 0

    def __call__(self, fmt: str, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        self._last = now
        if self._suppressed:
            fmt += f" ({self._suppressed} more like it in the last {self.interval:g}s not logged)"
            self._suppressed = 0
        self.logger.log(self.level, fmt, *args)


def raise_fd_limit(cap: int = 1 << 16) -> int:
    """Raise the soft descriptor limit to the hard one (at most ``cap``); returns the soft
    limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else cap


def open_fds() -> int:
    """Descriptors open in this process now (Linux; 0 where it cannot be told)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class ConnectionLimits:
    """Admission of client connections: ``admit(host)`` is True (and counts it) or False;
    ``release(host)`` when the connection ends."""

    def __init__(self, max_clients: int, per_source: int, fd_reserve: int) -> None:
        if max_clients < 1 or per_source < 1 or fd_reserve < 0:
            raise ConfigurationError(
                "--max-clients and --max-clients-per-source must be >= 1, --fd-reserve >= 0")
        soft = raise_fd_limit()
        room = soft - fd_reserve - open_fds()
        if room < 1:
            raise ConfigurationError(
                f"the descriptor limit (ulimit -n = {soft}) leaves no room for client "
                f"connections after the node's own files and the --fd-reserve of "
                f"{fd_reserve}: raise the limit (ulimit -n) or lower --fd-reserve")
        self.fd_limit = soft
        self.max_clients = min(max_clients, room)
        self.per_source = per_source
        self.total = 0
        self.by_source: defaultdict[str, int] = defaultdict(int)
        self.refused = 0

    def admit(self, host: str) -> str | None:
        """``None`` if the connection may stay (and it is counted), else why not."""
        if self.total >= self.max_clients:
            self.refused += 1
            return f"{self.total} client connections open (the limit, --max-clients)"
        if self.by_source[host] >= self.per_source:
            self.refused += 1
            return (f"{self.by_source[host]} connections from {host} open (the limit, "
                    f"--max-clients-per-source)")
        self.total += 1
        self.by_source[host] += 1
        return None

    def release(self, host: str) -> None:
        self.total -= 1
        n = self.by_source[host] - 1
        if n:
            self.by_source[host] = n
        else:
            del self.by_source[host]


__all__ = ["ConnectionLimits", "RateLimitedLog", "raise_fd_limit", "open_fds"]
