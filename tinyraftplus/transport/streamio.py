"""``receive_some(stream, max_bytes)``: one read that returns every whole TLS record already
received, not just the first.

``trio.SSLStream.receive_some`` returns the plaintext of at most one TLS record (16 KiB) per
call, and each call costs a pass through Trio's scheduler even when the next records are
already in its buffer (its transport reads up to 64 KiB at a time). A 64 KiB value thus
crossed the event loop four times per hop, and a 1 MiB ``AppendEntries`` sixty-four times
(issue 13: TLS halved the rate of large puts; the cost was this stream handling, not the
cipher). After the awaited read this helper decrypts what is already buffered, without
waiting and without touching the socket, up to ``max_bytes``.

It reads ``SSLStream``'s SSL object directly, which is safe only between awaits (Trio's
stream interacts with it the same way: no await in between) and only while nothing else is
to be sent: a read that makes the SSL object want to write (a TLS 1.2 renegotiation, a TLS
1.3 key update) stops the draining, and Trio's next operation on the stream sends it. Errors
stop it too: the plaintext decrypted so far is returned and the next ``receive_some`` raises
through Trio as before. A Trio without these attributes gets the plain behaviour.
"""

from __future__ import annotations

import ssl

import trio


async def receive_some(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | bytearray:
    """``stream.receive_some(max_bytes)``, plus, for a ``trio.SSLStream``, the plaintext of
    the TLS records already buffered (never more than ``max_bytes`` in all)."""
    data = await stream.receive_some(max_bytes)
    if data and type(stream) is trio.SSLStream and len(data) < max_bytes:
        return _drain(stream, data, max_bytes)
    return data


def _drain(stream: trio.SSLStream, first: bytes | bytearray, max_bytes: int) -> bytes | bytearray:
    obj = getattr(stream, "_ssl_object", None)
    incoming = getattr(stream, "_incoming", None)
    outgoing = getattr(stream, "_outgoing", None)
    if obj is None or incoming is None or outgoing is None or outgoing.pending:
        return first
    parts = [first]
    total = len(first)
    while total < max_bytes and (incoming.pending or obj.pending()):
        try:
            more = obj.read(max_bytes - total)
        except ssl.SSLError:  # SSLWantReadError (a partial record) and every real error
            break
        if not more:
            break
        parts.append(more)
        total += len(more)
        if outgoing.pending:
            break  # the read made something to send: Trio's next operation sends it
    if len(parts) == 1:
        return first
    return b"".join(parts)


__all__ = ["receive_some"]
