"""``FastStream``: a TCP stream, with or without TLS, whose reads and writes skip the
scheduler when the socket is ready.

Why not ``trio.SocketStream`` / ``trio.SSLStream``: every successful Trio socket call ends
with a trip through the scheduler (``cancel_shielded_checkpoint``), and ``SSLStream`` adds its
own locking and retry machinery around each record. For a request that crosses four
processes that is about a dozen scheduler rounds per put; measured on the 2-core dev VM
(issue 13), one 100-byte round trip between two Trio processes cost 106-110 us of CPU on
each side in plain Trio against 37 us for a blocking socket loop, and a TLS one about 186 us
in all. With one put in flight the cluster spent 4-5 ms of CPU per put, most of it in such
plumbing.

What this stream does instead:

* ``receive_some`` calls ``recv`` first and waits (``wait_readable``) only when it would
  block; with TLS it feeds the ciphertext to an ``ssl.SSLObject`` through memory BIOs and
  returns every whole record already received (up to ``max_bytes``), not one record per call.
* ``send_all`` encrypts (TLS) and calls ``send`` at once; it waits (``wait_writable``) only
  for what the socket did not take. ``try_send`` is the same without any wait: it returns
  whether everything went out, and leaves the rest buffered for ``flush``. That lets a caller
  that is not the writer task (the Raft driver) hand a frame to the kernel directly.
* Cancellation is still honoured at every call (``checkpoint_if_cancelled``), and a stream
  that keeps finding data ready yields to the scheduler every ``_YIELD_EVERY`` calls, so a
  flooding peer cannot starve the other tasks.

TLS details: ciphertext leaves in exactly the order the SSL object produced it, because all
of it goes through one queue of buffers (``_out``) whose head is always sent first, whoever
sends. A read may produce ciphertext too (post-handshake messages such as a TLS 1.3 client
authentication or key update): the reader adds it to the same queue and pushes it without
waiting; a writer that finds the queue non-empty sends the backlog before its own bytes.
Only one task at a time may wait to flush (``_flushing``); others wait for it to finish.

Callers decide when to write directly (``ready_for_direct_send``, and their own rule: the
transport when nothing is queued for the peer, the key-value server and client only for a
lone request or answer), because a burst sent one message at a time costs a system call and
a TLS record each, and splits the batches group commit relies on.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Any, cast

import trio

_YIELD_EVERY = 16
"""Calls that completed without waiting before one yields to the scheduler anyway."""

_RECV_MAX = 256 << 10
"""Largest single ``recv``, and largest plaintext one ``receive_some`` returns."""

_scratch = threading.local()


def _buffers() -> tuple[bytearray, memoryview, bytearray, memoryview]:
    """This thread's scratch buffers (ciphertext, plaintext): reads land in them and are
    copied out before any await, so one pair per thread serves every stream. A fresh 256 KiB
    ``bytes`` per call instead is above malloc's ``mmap`` threshold until the threshold
    adapts: an ``mmap``, page faults and a ``munmap`` per read."""
    b = getattr(_scratch, "b", None)
    if b is None:
        c, p = bytearray(_RECV_MAX), bytearray(_RECV_MAX)
        b = _scratch.b = (c, memoryview(c), p, memoryview(p))
    return b

_EAGAIN = (BlockingIOError, InterruptedError)

Buffer = bytes | bytearray | memoryview

_SEND_SLICE = 256 << 10
"""A buffer larger than this is encrypted and handed to the socket in slices this size."""

_IOV_MAX = 64
"""Buffers gathered into one ``sendmsg``."""

BURST_GAP = 200e-6
"""``ready_for_direct_send`` is false within this many seconds of the last send: a burst of
small messages (answers to hundreds of requests woken in one scheduler round) is better
left to the writer task, which sends them in one system call and one TLS record."""

_clock = time.perf_counter


class FastStream(trio.abc.Stream):
    """A connected TCP socket as a Trio stream; TLS when ``ssl_context`` is given (then
    ``await do_handshake()`` before use, or the first read or write does it)."""

    def __init__(self, sock: socket.socket, ssl_context: ssl.SSLContext | None = None, *,
                 server_side: bool = False, server_hostname: str | None = None) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._out: deque[Buffer] = deque()  # buffers not yet taken by the socket, in order
        self._out_len = 0
        self._flushing = False
        self._flushed = trio.Event()
        self._fast = 0
        self._last_send = 0.0
        self._handshaken = ssl_context is None
        self._eof = False
        self._obj: ssl.SSLObject | None = None
        if ssl_context is not None:
            self._in_bio = ssl.MemoryBIO()
            self._out_bio = ssl.MemoryBIO()
            self._handshake_lock = trio.Lock()  # a first read and a first write may race
            self._obj = ssl_context.wrap_bio(self._in_bio, self._out_bio,
                                             server_side=server_side,
                                             server_hostname=server_hostname)

    @classmethod
    def from_trio(cls, stream: trio.SocketStream, ssl_context: ssl.SSLContext | None = None,
                  **kwargs: Any) -> FastStream:
        """Take over the socket of a connected ``trio.SocketStream`` (from
        ``open_tcp_stream`` or a listener); ``stream`` must not be used afterwards."""
        tsock = stream.socket
        fd = tsock.detach()
        sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=fd)
        return cls(sock, ssl_context, **kwargs)

    # --- information ------------------------------------------------------------------
    @property
    def tls(self) -> bool:
        return self._obj is not None

    def getpeercert(self) -> dict[str, Any] | None:
        return None if self._obj is None else self._obj.getpeercert()

    def getpeername(self) -> Any:
        return self._live().getpeername()

    def getsockname(self) -> Any:
        return self._live().getsockname()

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self._live().setsockopt(level, option, value)

    def ready_for_direct_send(self) -> bool:
        """Nothing buffered, nobody flushing, and no send in the last ``BURST_GAP``: a
        caller whose own queue is empty may ``try_send`` now instead of waking its writer.
        (Trio gives no cheaper sign that more messages are coming in this round.)"""
        if self._out or self._flushing:
            return False
        now = _clock()
        if now - self._last_send < BURST_GAP:
            return False
        self._last_send = now
        return True

    @property
    def out_pending(self) -> int:
        """Bytes accepted by ``try_send`` or a read's TLS housekeeping, not yet sent."""
        return self._out_len

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise trio.ClosedResourceError("the stream is closed")
        return self._sock

    # --- TLS handshake ----------------------------------------------------------------
    async def do_handshake(self) -> None:
        obj = self._obj
        if obj is None or self._handshaken:
            return
        async with self._handshake_lock:
            if self._handshaken:  # another task did it while we waited
                return
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._take_tls_output()
                    await self._flush_all()
                    if not await self._recv_into_bio():
                        raise trio.BrokenResourceError(
                            "the peer closed the connection during the TLS handshake"
                        ) from None
                except ssl.SSLError as e:  # as trio.SSLStream does: the cause says what failed
                    self._take_tls_output()  # the alert, for the peer's log
                    try:
                        self._send_now()
                    except trio.BrokenResourceError:
                        pass
                    raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from e
            self._take_tls_output()
            await self._flush_all()
            self._handshaken = True

    # --- receive ----------------------------------------------------------------------
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.lowlevel.checkpoint_if_cancelled()
        n = 65536 if max_bytes is None else min(max_bytes, _RECV_MAX)
        if n < 1:
            raise ValueError("max_bytes must be >= 1")
        self._live()  # closed here: not what the SSL object still holds, nor its EOF
        waited = False
        if self._obj is None:
            sock = self._live()
            buf, view = _buffers()[:2]
            while True:
                try:
                    k = sock.recv_into(buf, n)
                    data = bytes(view[:k])
                    break
                except _EAGAIN:
                    waited = True
                    await trio.lowlevel.wait_readable(sock)
                except OSError as e:
                    raise trio.BrokenResourceError(f"read failed: {e}") from e
        else:
            if not self._handshaken:
                await self.do_handshake()
            data, waited = await self._tls_read(n)
        await self._maybe_yield(waited)
        return data

    async def _tls_read(self, n: int) -> tuple[bytes, bool]:
        obj = self._obj
        assert obj is not None
        waited = False
        plain, view = _buffers()[2:]
        while True:
            try:
                total = cast(int, obj.read(n, plain))  # with a buffer: a count
            except ssl.SSLWantReadError:
                self._push_tls_output()
                if self._eof:
                    raise trio.BrokenResourceError(
                        "the connection was cut inside a TLS record") from None
                if not self._try_recv_into_bio():
                    waited = True
                    if not await self._recv_into_bio():
                        self._in_bio.write_eof()
                        self._eof = True
                continue
            except ssl.SSLZeroReturnError:
                return b"", waited  # the peer's close_notify
            except ssl.SSLEOFError as e:
                raise trio.BrokenResourceError(
                    "the peer closed the connection without a TLS close_notify") from e
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS error: {e}") from e
            break
        if not total:
            return b"", waited
        # Every whole record already here, without waiting: one call, not one per 16 KiB.
        while total < n and (self._in_bio.pending or obj.pending()):
            try:
                more = cast(int, obj.read(n - total, view[total:]))  # type: ignore[arg-type]
            except ssl.SSLError:  # a partial record, or an error the next call reports
                break
            if not more:
                break
            total += more
        self._push_tls_output()
        return bytes(view[:total]), waited

    def _try_recv_into_bio(self) -> bool:
        """Feed what the socket has now; False if it has nothing yet (would block)."""
        buf, view = _buffers()[:2]
        try:
            k = self._live().recv_into(buf)
        except _EAGAIN:
            return False
        except OSError as e:
            raise trio.BrokenResourceError(f"read failed: {e}") from e
        if k:
            self._in_bio.write(view[:k])
        else:
            self._in_bio.write_eof()
            self._eof = True
        return True

    async def _recv_into_bio(self) -> bool:
        """Wait for ciphertext and feed it; False at EOF."""
        sock = self._live()
        while True:
            buf, view = _buffers()[:2]  # after the wait: another stream used them meanwhile
            try:
                k = sock.recv_into(buf)
                break
            except _EAGAIN:
                await trio.lowlevel.wait_readable(sock)
            except OSError as e:
                raise trio.BrokenResourceError(f"read failed: {e}") from e
        if not k:
            return False
        self._in_bio.write(view[:k])
        return True

    # --- send -------------------------------------------------------------------------
    def try_send(self, data: Buffer | Sequence[Buffer]) -> bool:
        """Send ``data`` (one buffer, or a sequence sent in order as if joined) without
        waiting: True if the socket took all of it (and every byte before it). Otherwise
        the rest stays buffered, in order, and ``flush`` (or the next ``send_all``)
        finishes it. Raises ``trio.BrokenResourceError`` if the connection failed; never
        blocks (``trio.ClosedResourceError`` once closed here). Buffers are not copied
        while queued: do not change them afterwards."""
        self._live()  # the SSL object would say "protocol is shutdown" after aclose
        parts = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
        if self._obj is not None:
            if not self._handshaken:
                raise trio.BrokenResourceError("send before the TLS handshake")
            obj, bio = self._obj, self._out_bio
            try:
                for part in parts:
                    # Encrypt a large buffer in slices and hand each to the socket as it is
                    # ready: no ciphertext copy of the whole, and the kernel starts early.
                    n = len(part)
                    if n <= _SEND_SLICE:
                        obj.write(part)
                        continue
                    with memoryview(part) as view:
                        for i in range(0, n, _SEND_SLICE):
                            obj.write(view[i:i + _SEND_SLICE])
                            self._queue(bio.read())
                            self._send_now()
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS error: {e}") from e
            if bio.pending:
                self._queue(bio.read())
        else:
            for part in parts:
                if len(part):
                    self._queue(part)
        return self._send_now()

    async def send_all(self, data: Buffer | Sequence[Buffer]) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._obj is not None and not self._handshaken:
            await self.do_handshake()
        waited = False
        self._last_send = _clock()
        if not self.try_send(data):
            waited = True
            await self.flush()
        await self._maybe_yield(waited)

    async def flush(self) -> None:
        """Wait until everything buffered is sent."""
        while self._flushing:  # another task is sending the backlog: ours is behind it
            await self._flushed.wait()
        await self._flush_all()

    async def wait_send_all_might_not_block(self) -> None:
        while self._out or self._flushing:
            await self.flush()
        await trio.lowlevel.wait_writable(self._live())

    def _queue(self, buf: Buffer) -> None:
        self._out.append(buf)
        self._out_len += len(buf)

    def _take_tls_output(self) -> None:
        if self._out_bio.pending:
            self._queue(self._out_bio.read())

    def _push_tls_output(self) -> None:
        """After a read: send what it produced (tickets, key updates) if the socket takes
        it now; otherwise it waits in ``_out`` for the next send or flush."""
        if self._out_bio.pending:
            self._take_tls_output()
            if not self._flushing:
                self._send_now()

    def _send_some(self, sock: socket.socket) -> None:
        """One ``send``/``sendmsg`` from the head of ``_out``; raises what the socket does
        (``BlockingIOError`` when it takes nothing)."""
        out = self._out
        if len(out) == 1:
            sent = sock.send(out[0])
        else:
            sent = sock.sendmsg(list(islice(out, _IOV_MAX)))
        self._out_len -= sent
        while sent:
            head = out[0]
            if sent >= len(head):
                sent -= len(head)
                out.popleft()
            else:
                out[0] = memoryview(head)[sent:]
                break

    def _send_now(self) -> bool:
        """Send from the head of ``_out`` without waiting; True when it is empty."""
        if not self._out:
            return True
        if self._flushing:
            return False
        sock = self._live()
        try:
            while self._out:
                self._send_some(sock)
        except _EAGAIN:
            return False
        except OSError as e:
            raise trio.BrokenResourceError(f"write failed: {e}") from e
        return True

    async def _flush_all(self) -> None:
        if not self._out:
            return
        self._flushing = True
        self._flushed = trio.Event()
        try:
            sock = self._live()
            while self._out:
                try:
                    self._send_some(sock)
                except _EAGAIN:
                    await trio.lowlevel.wait_writable(sock)
                except OSError as e:
                    raise trio.BrokenResourceError(f"write failed: {e}") from e
        finally:
            self._flushing = False
            self._flushed.set()

    async def _maybe_yield(self, waited: bool) -> None:
        if waited:
            self._fast = 0
            return
        self._fast += 1
        if self._fast >= _YIELD_EVERY:
            self._fast = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def send_raw_now(self, data: bytes) -> None:
        """Best effort, never waits: ``data`` as is, bypassing TLS (a plaintext answer to a
        client that spoke plaintext to a TLS port, after the handshake failed)."""
        try:
            self._live().send(data)
        except OSError:
            pass

    # --- close ------------------------------------------------------------------------
    async def aclose(self) -> None:
        sock = self._sock
        if sock is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._obj is not None and self._handshaken and not self._flushing:
                # A polite close_notify, if the socket takes it now; never wait for it.
                try:
                    self._obj.unwrap()
                except ssl.SSLError:
                    pass
                self._take_tls_output()
                try:
                    self._send_now()
                except trio.BrokenResourceError:
                    pass
        finally:
            self._sock = None
            trio.lowlevel.notify_closing(sock)
            sock.close()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """Close without any TLS goodbye (``aclose`` from sync code)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()


__all__ = ["FastStream"]
