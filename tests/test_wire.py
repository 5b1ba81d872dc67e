"""The wire codec: round trips, validation of every field, framing under any chunking.

Oracles are independent of the code under test: a bitwise CRC32C written here, msgpack
built by hand, and a per-field spec table (``SPEC``) that says what each field may hold.
"""

from __future__ import annotations

import os
import struct
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyraftplus.entry import Entry
from tinyraftplus.errors import InvalidArgumentError, ProtocolError
from tinyraftplus.raft.messages import (
    AppendEntries,
    AppendResponse,
    Propose,
    ProposeResponse,
    ReadIndex,
    ReadIndexResponse,
    RequestVote,
    TimeoutNow,
    VoteResponse,
)
from tinyraftplus.transport import wire
from tinyraftplus.transport.wire import (
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    Ping,
    WireLimits,
    decode,
    encode,
    encode_frame,
    frame,
)

MAX = (1 << 63) - 1


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc_oracle_known_answer():
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the standard check value


# --- strategies ----------------------------------------------------------------------------

seqs = st.integers(-1, MAX)
terms = st.integers(0, MAX)
pos_terms = st.integers(1, MAX)
u63 = st.integers(0, MAX)
node_ids = st.one_of(st.integers(-MAX, MAX), st.text(min_size=1, max_size=256))
payloads = st.binary(max_size=300)


@st.composite
def append_entries(draw):
    term = draw(terms)
    prev_term = draw(st.integers(0, term))
    n = draw(st.integers(0, 40))
    prev_seq = draw(st.integers(-1, MAX - n))
    ts = sorted(draw(st.lists(st.integers(prev_term, term), min_size=n, max_size=n)))
    ents = tuple(Entry(prev_seq + 1 + i, t, draw(payloads)) for i, t in enumerate(ts))
    return AppendEntries(term, prev_seq, prev_term, ents, draw(seqs), draw(u63))


@st.composite
def request_votes(draw):
    term = draw(pos_terms)
    return RequestVote(term, draw(seqs), draw(st.integers(0, term)), draw(st.booleans()),
                       draw(st.booleans()))


messages = st.one_of(
    request_votes(),
    st.builds(VoteResponse, terms, st.booleans(), st.booleans()),
    append_entries(),
    st.builds(AppendResponse, terms, st.booleans(), seqs, terms, seqs, u63),
    st.builds(TimeoutNow, pos_terms),
    st.builds(ReadIndex, terms, u63),
    st.builds(ReadIndexResponse, terms, u63, st.integers(-2, MAX)),
    st.builds(Propose, u63, st.lists(st.binary(min_size=1, max_size=200), min_size=1,
                                     max_size=20).map(tuple)),
    st.builds(ProposeResponse, u63, seqs, terms, st.none() | st.text(max_size=4096),
              st.none() | node_ids),
    st.builds(Hello, node_ids, st.none() | node_ids),
    st.just(Ping()),
)


@given(messages)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_every_message_round_trips(msg):
    payload = encode(msg)
    out = decode(payload)
    assert out == msg and type(out) is type(msg)
    if isinstance(msg, AppendEntries):
        assert all(type(e) is Entry for e in out.entries)
    # Framing: header is length + CRC32C (checked against the bitwise oracle), big-endian.
    f = encode_frame(msg)
    length, crc = struct.unpack(">II", f[:8])
    assert length == len(payload) and f[8:] == payload and crc == crc32c_bitwise(payload)
    assert FrameDecoder().feed(f) == [payload]


def test_wire_layout_is_the_documented_flat_array():
    m = AppendEntries(5, 9, 4, (Entry(10, 4, b"a"), Entry(11, 5, b"bc")), 8, 3)
    assert msgpack.unpackb(encode(m)) == [1, 3, 5, 9, 4, 8, 3, [4, 5], [b"a", b"bc"]]
    assert msgpack.unpackb(encode(Hello("n1", 2))) == [1, 16, "n1", 2]


def test_encode_accepts_bytes_like_payloads_and_decodes_bytes():
    m = AppendEntries(1, -1, 0, (Entry(0, 1, memoryview(b"xy")), Entry(1, 1, bytearray(b"z"))),
                      -1)
    out = decode(encode(m))
    assert [e.data for e in out.entries] == [b"xy", b"z"]
    assert all(type(e.data) is bytes for e in out.entries)
    assert decode(encode(Propose(1, (bytearray(b"q"),)))) == Propose(1, (b"q",))


# --- validation: a table of what each field may hold --------------------------------------

KINDS = {
    "seq": lambda v: type(v) is int and -1 <= v <= MAX,
    "term": lambda v: type(v) is int and 0 <= v <= MAX,
    "term1": lambda v: type(v) is int and 1 <= v <= MAX,
    "u63": lambda v: type(v) is int and 0 <= v <= MAX,
    "index": lambda v: type(v) is int and -2 <= v <= MAX,
    "bool": lambda v: type(v) is bool,
    "id": lambda v: (type(v) is int and -MAX <= v <= MAX)
    or (type(v) is str and 1 <= len(v) <= 256),
    "id?": lambda v: v is None or KINDS["id"](v),
    "err?": lambda v: v is None or (type(v) is str and len(v) <= 4096),
}

# Valid examples (fields beyond version and tag) and the kind of each field. Fields whose
# validity depends on another (last_term <= term, prev_term <= term) use large partners.
SPEC = {
    1: ([MAX, 5, 0, False, True], ["term1", "seq", "term", "bool", "bool"]),
    2: ([3, True, False], ["term", "bool", "bool"]),
    3: ([MAX, 5, 0, 4, 0, [], []], ["term", "seq", "term", "seq", "u63", None, None]),
    4: ([3, True, 7, 2, -1, 0], ["term", "bool", "seq", "term", "seq", "u63"]),
    5: ([2], ["term1"]),
    6: ([2, 9], ["term", "u63"]),
    7: ([2, 9, -2], ["term", "u63", "index"]),
    8: ([4, [b"x"]], ["u63", None]),
    9: ([4, -1, 0, "no leader", 3], ["u63", "seq", "term", "err?", "id?"]),
    16: ([1, "b"], ["id", "id?"]),
    17: ([], []),
}

BAD_VALUES = [
    None, True, False, 0, 1, -1, -2, -3, MAX, MAX + 1, (1 << 64) - 1, -(1 << 63), 1.0, "x",
    "", "y" * 257, "z" * 4097, b"x", [], [1], {}, {"a": 1},
]


def raw(tag, fields, version=PROTOCOL_VERSION):
    return msgpack.packb([version, tag, *fields], use_bin_type=True)


@pytest.mark.parametrize("tag", sorted(SPEC))
def test_each_field_accepts_exactly_what_its_kind_allows(tag):
    good, kinds = SPEC[tag]
    decode(raw(tag, good))  # the example itself is valid
    for i, kind in enumerate(kinds):
        if kind is None:
            continue
        for v in BAD_VALUES:
            fields = list(good)
            fields[i] = v
            if KINDS[kind](v):
                decode(raw(tag, fields))
            else:
                with pytest.raises(ProtocolError) as ei:
                    decode(raw(tag, fields))
                assert wire._NAMES[tag] in str(ei.value)


@pytest.mark.parametrize("tag", sorted(SPEC))
def test_missing_and_extra_fields_are_refused(tag):
    good, _ = SPEC[tag]
    with pytest.raises(ProtocolError, match="must have"):
        decode(raw(tag, good + [0]))
    if good:
        with pytest.raises(ProtocolError, match="must have"):
            decode(raw(tag, good[:-1]))


def test_cross_field_ranges():
    with pytest.raises(ProtocolError, match="last_term"):
        decode(raw(1, [3, 5, 4, False, False]))  # last_term > term
    with pytest.raises(ProtocolError, match="prev_term"):
        decode(raw(3, [3, 5, 4, 4, 0, [], []]))  # prev_term > term


@pytest.mark.parametrize(
    "terms, datas, why",
    [
        ([1, 2], [b"a"], "2 entry terms but 1"),
        ([1], "a", "two arrays"),
        ({}, [], "two arrays"),
        ([1, True], [b"a", b"b"], "entry terms must be ints"),
        ([1, 1.0], [b"a", b"b"], "entry terms must be ints"),
        ([1, None], [b"a", b"b"], "entry terms must be ints"),
        ([2, 1], [b"a", b"b"], "must not decrease"),
        ([0], [b"a"], "must not decrease"),  # below prev_term=1
        ([4], [b"a"], "must not decrease"),  # above term=3
        ([1, 1], [b"a", "b"], "data must be bytes"),
        ([1, 1], [b"a", None], "data must be bytes"),
        ([1, 1], [b"a", [b"b"]], "data must be bytes"),
    ],
)
def test_bad_entries_are_refused(terms, datas, why):
    with pytest.raises(ProtocolError, match=why):
        decode(raw(3, [3, 10, 1, 5, 0, terms, datas]))


def test_entries_may_not_run_past_the_largest_seq():
    decode(raw(3, [3, MAX - 2, 1, 5, 0, [1, 1], [b"a", b"b"]]))
    with pytest.raises(ProtocolError, match="past seq"):
        decode(raw(3, [3, MAX - 1, 1, 5, 0, [1, 1], [b"a", b"b"]]))


def test_size_limits():
    lim = WireLimits(max_entries=3, max_bytes=10, max_id_len=4, max_error_len=5)
    decode(raw(3, [3, 10, 1, 5, 0, [1, 1, 1], [b"abc", b"abc", b"abcd"]]), lim)
    with pytest.raises(ProtocolError, match="4 entries"):
        decode(raw(3, [3, 10, 1, 5, 0, [1] * 4, [b"a"] * 4]), lim)
    with pytest.raises(ProtocolError, match="11 payload bytes"):
        decode(raw(3, [3, 10, 1, 5, 0, [1, 1, 1], [b"abc", b"abc", b"abcde"]]), lim)
    with pytest.raises(ProtocolError, match="4 items"):
        decode(raw(8, [1, [b"a"] * 4]), lim)
    with pytest.raises(ProtocolError, match="11 payload bytes"):
        decode(raw(8, [1, [b"abcdef", b"abcde"]]), lim)
    with pytest.raises(ProtocolError, match="node id"):
        decode(raw(16, ["abcde", None]), lim)
    with pytest.raises(ProtocolError, match="error must be"):
        decode(raw(9, [1, -1, 0, "abcdef", None]), lim)
    with pytest.raises(InvalidArgumentError, match="4 entries"):
        encode(AppendEntries(1, -1, 0, tuple(Entry(i, 1, b"") for i in range(4)), -1), lim)


@pytest.mark.parametrize(
    "items, why",
    [([], "non-empty array"), ([b""], "non-empty bytes"), ([b"a", "b"], "non-empty bytes"),
     (b"ab", "non-empty array"), ([b"a", None], "non-empty bytes")],
)
def test_bad_propose_items(items, why):
    with pytest.raises(ProtocolError, match=why):
        decode(raw(8, [1, items]))


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"", "not one valid msgpack"),
        (b"\xc1", "not one valid msgpack"),  # the one byte msgpack never uses
        (msgpack.packb([1, 5, 2]) + b"\x00", "not one valid msgpack"),  # trailing bytes
        (msgpack.packb([1, 5, 2])[:-1], "not one valid msgpack"),  # truncated
        (b"\x92\x01\xa1\xff", "not one valid msgpack"),  # [1, invalid utf-8]
        (msgpack.packb({"v": 1, "t": 5}), "must be a msgpack array"),
        (msgpack.packb(1), "must be a msgpack array"),
        (msgpack.packb([1]), "must be a msgpack array"),
        (msgpack.packb([2, 5, 2]), "version 2"),
        (msgpack.packb([True, 5, 2]), "version"),
        (msgpack.packb([1.0, 5, 2]), "version"),
        (msgpack.packb(["1", 5, 2]), "version"),
        (msgpack.packb([1, 99, 2]), "unknown message tag"),
        (msgpack.packb([1, True, 2]), "unknown message tag"),  # True == 1 in Python
        (msgpack.packb([1, "AppendEntries"]), "unknown message tag"),
        (msgpack.packb([1, 5, msgpack.ExtType(1, b"x")]), "TimeoutNow.term"),
        (b"\x91" * 5000 + b"\x01", "not one valid msgpack"),  # nested too deep
    ],
)
def test_garbage_payloads_are_refused(payload, why):
    with pytest.raises(ProtocolError, match=why):
        decode(payload)


@given(messages, st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_payloads_never_escape_as_other_exceptions(msg, data):
    """Any byte-level mutation either decodes to a valid message or raises ProtocolError."""
    payload = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        out = decode(bytes(payload))
    except ProtocolError:
        return
    # Whatever got through must itself be valid: it re-encodes and decodes to itself.
    assert decode(encode(out)) == out


@pytest.mark.parametrize(
    "msg, why",
    [
        (AppendEntries(1, 4, 0, (Entry(6, 1, b"a"),), 0), "do not follow prev_seq"),
        (AppendEntries(1, 4, 0, (Entry(5, 1, b"a"), Entry(7, 1, b"b")), 0), "do not follow"),
        (AppendEntries(1, 4, 0, ((5, 1, b"a"),), 0), "tuple of Entry"),  # type: ignore[arg-type]
        (AppendEntries(1, 4, 2, (), 0), "prev_term must be an int in \\[0, 1\\]"),
        (AppendEntries(1, 4, 0, (Entry(5, 2, b"a"),), 0), "must not decrease"),
        (AppendEntries(1, 4, 0, (Entry(5, 1, "a"),), 0), "data must be bytes"),  # type: ignore
        (RequestVote(0, 1, 0), "RequestVote.term must be an int in \\[1"),
        (VoteResponse(1, 1), "VoteResponse.granted must be a bool"),  # type: ignore[arg-type]
        (ReadIndexResponse(1, 1, -3), "index"),
        (Propose(1, ()), "non-empty array"),
        (Propose(1, (b"",)), "non-empty bytes"),
        (ProposeResponse(1, -1, 0, None, 1.5), "leader must be a node id"),
        (Hello(True), "Hello.node_id must be a node id"),  # type: ignore[arg-type]
        ("hello", "not a message of the wire protocol"),
        (Entry(1, 1, b""), "not a message of the wire protocol"),
    ],
)
def test_encoder_refuses_what_a_peer_would_refuse(msg, why):
    with pytest.raises(InvalidArgumentError, match=why):
        encode(msg)


# --- framing -------------------------------------------------------------------------------


@given(st.lists(messages, min_size=1, max_size=8), st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_frame_decoder_handles_any_chunking(msgs, data):
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    dec = FrameDecoder()
    out = []
    prev = 0
    for c in [*cuts, len(stream)]:
        out += dec.feed(stream[prev:c])
        prev = c
    assert [decode(p) for p in out] == msgs
    assert dec.buffered == 0 and dec.offset == len(stream)


def test_frame_decoder_byte_at_a_time_and_partial_tail():
    f = encode_frame(Propose(1, (b"x" * 1000,)))
    dec = FrameDecoder()
    got = []
    for i in range(len(f) - 1):
        got += dec.feed(f[i:i + 1])
    assert got == [] and dec.buffered == len(f) - 1
    assert dec.feed(f[-1:]) == [f[8:]]


@given(messages, st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_any_bit_flip_in_crc_or_payload_is_caught(msg, data):
    f = bytearray(encode_frame(msg))
    bit = data.draw(st.integers(32, len(f) * 8 - 1))  # anywhere after the length field
    f[bit // 8] ^= 1 << (bit % 8)
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="CRC32C"):
        dec.feed(bytes(f))
    # The decoder stays broken: a byte stream cannot resynchronise after a bad frame.
    with pytest.raises(ProtocolError, match="CRC32C"):
        dec.feed(encode_frame(Ping()))


@given(messages, st.integers(0, 31))
@settings(max_examples=100)
def test_bit_flip_in_length_never_yields_a_wrong_payload(msg, bit):
    good = encode_frame(msg)
    f = bytearray(good)
    f[bit // 8] ^= 1 << (7 - bit % 8)
    dec = FrameDecoder(max_frame=1 << 20)
    try:
        out = dec.feed(bytes(f) + encode_frame(Ping()) * 3)
    except ProtocolError:
        return
    # Not refused yet means "waiting for the rest of a longer frame": nothing came out.
    assert out == []


def test_oversized_length_prefix_is_refused_from_the_header_alone():
    dec = FrameDecoder(max_frame=1000)
    assert dec.feed(struct.pack(">II", 1000, 0)[:7]) == []
    with pytest.raises(ProtocolError, match="announces 4294967295 bytes, over the maximum"):
        FrameDecoder(max_frame=1000).feed(struct.pack(">II", 0xFFFFFFFF, 0))
    with pytest.raises(ProtocolError, match="announces 1001 bytes"):
        FrameDecoder(max_frame=1000).feed(struct.pack(">II", 1001, 0))
    ok = frame(b"\x00" * 1000)
    assert FrameDecoder(max_frame=1000).feed(ok) == [b"\x00" * 1000]


def test_frame_errors_name_the_stream_offset():
    dec = FrameDecoder()
    good = encode_frame(Ping())
    bad = bytearray(encode_frame(TimeoutNow(3)))
    bad[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match=f"stream offset {len(good)}"):
        dec.feed(good + bytes(bad))


def test_frame_decoder_argument_checks():
    with pytest.raises(InvalidArgumentError):
        FrameDecoder(max_frame=0)
    with pytest.raises(InvalidArgumentError):
        FrameDecoder(max_frame=1 << 32)


@pytest.mark.slow
def test_measure_append_entries_throughput():
    """encode+decode of AppendEntries(256 x 100 B); prints the figure (no assertion on speed:
    the machine is shared)."""
    ents = tuple(Entry(1000 + i, 7, os.urandom(100)) for i in range(256))
    m = AppendEntries(7, 999, 7, ents, 1100, 0)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        p = encode(m)
    t1 = time.perf_counter()
    for _ in range(n):
        out = decode(p)
    t2 = time.perf_counter()
    assert out == m
    print(f"\nAppendEntries(256 x 100 B): encode {(t1 - t0) / n * 1e6:.1f} us, decode "
          f"{(t2 - t1) / n * 1e6:.1f} us, {n / (t2 - t0):.0f} round trips/s = "
          f"{n * 256 / (t2 - t0) / 1e6:.2f} M entries/s")
