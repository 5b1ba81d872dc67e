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

from tinyraftplus.entry import ConfigEntry, Entry
from tinyraftplus.errors import InvalidArgumentError, ProtocolError
from tinyraftplus.raft.messages import (
    AppendEntries,
    AppendResponse,
    Propose,
    ProposeResponse,
    ReadIndex,
    ReadIndexResponse,
    Recover,
    RecoverResponse,
    RequestVote,
    TimeoutNow,
    VoteResponse,
)
from tinyraftplus.transport import wire
from tinyraftplus.transport.wire import (
    PING_FRAME,
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
incs = st.integers(0, MAX)  # a sender's incarnation: every core message carries one, last
node_ids = st.one_of(st.integers(-MAX, MAX), st.text(min_size=1, max_size=256))
payloads = st.binary(max_size=300)


@st.composite
def append_entries(draw):
    term = draw(terms)
    prev_term = draw(st.integers(0, term))
    n = draw(st.integers(0, 40))
    prev_seq = draw(st.integers(-1, MAX - n))
    ts = sorted(draw(st.lists(st.integers(prev_term, term), min_size=n, max_size=n)))
    # Mostly plain entries, sometimes configuration entries (anywhere, any number of them).
    kinds = st.sampled_from([Entry, Entry, Entry, ConfigEntry])
    ents = tuple(draw(kinds)(prev_seq + 1 + i, t, draw(payloads)) for i, t in enumerate(ts))
    return AppendEntries(term, prev_seq, prev_term, ents, draw(seqs), draw(u63), draw(incs))


@st.composite
def request_votes(draw):
    term = draw(pos_terms)
    return RequestVote(term, draw(seqs), draw(st.integers(0, term)), draw(st.booleans()),
                       draw(st.booleans()), draw(incs))


@st.composite
def recover_responses(draw):
    term = draw(terms)
    voters = tuple(draw(st.lists(node_ids, max_size=7)))
    return RecoverResponse(term, draw(seqs), draw(st.integers(0, term)), voters, draw(incs))


messages = st.one_of(
    request_votes(),
    st.builds(VoteResponse, terms, st.booleans(), st.booleans(), incs),
    append_entries(),
    st.builds(AppendResponse, terms, st.booleans(), seqs, terms, seqs, u63, incs),
    st.builds(TimeoutNow, pos_terms, incs),
    st.builds(ReadIndex, terms, u63, incs),
    st.builds(ReadIndexResponse, terms, u63, st.integers(-2, MAX), incs),
    st.builds(Recover, terms, incs),
    recover_responses(),
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
        # Entry == ConfigEntry with the same triple (tuple equality), so compare the types:
        # every entry comes back exactly as an Entry or a ConfigEntry, as it was sent.
        assert len(out.entries) == len(msg.entries)
        assert all(type(e) in (Entry, ConfigEntry) for e in out.entries)
        assert [type(e) for e in out.entries] == [type(e) for e in msg.entries]
        for i in range(len(msg.entries)):
            assert type(out.entries[i]) is type(msg.entries[i])
        assert msgpack.unpackb(payload)[10] == [
            i for i, e in enumerate(msg.entries) if type(e) is ConfigEntry
        ]
    # Framing: header is length + CRC32C (checked against the bitwise oracle), big-endian.
    f = encode_frame(msg)
    length, crc = struct.unpack(">II", f[:8])
    assert length == len(payload) and f[8:] == payload and crc == crc32c_bitwise(payload)
    assert FrameDecoder().feed(f) == [payload]


def test_wire_layout_is_the_documented_flat_array():
    # Literal version 2 and literal tags: this is the documented layout, not "whatever the
    # code says the current version is".
    m = AppendEntries(5, 9, 4, (Entry(10, 4, b"a"), Entry(11, 5, b"bc")), 8, 3, 77)
    assert msgpack.unpackb(encode(m)) == [2, 3, 5, 9, 4, 8, 3, 77, [4, 5], [b"a", b"bc"], []]
    # Configuration entries travel as the indexes (into this message's entries) of the
    # entries that are ConfigEntry, in order.
    m = AppendEntries(5, 9, 4, (ConfigEntry(10, 4, b"a"), Entry(11, 5, b"bc"),
                                ConfigEntry(12, 5, b"d")), 8, 3, 77)
    assert msgpack.unpackb(encode(m)) == [
        2, 3, 5, 9, 4, 8, 3, 77, [4, 5, 5], [b"a", b"bc", b"d"], [0, 2]
    ]
    assert msgpack.unpackb(encode(Hello("n1", 2))) == [2, 16, "n1", 2]


@pytest.mark.parametrize(
    "msg, layout",
    [
        (RequestVote(4, 10, 3, True, False, 6), [2, 1, 4, 10, 3, True, False, 6]),
        (VoteResponse(4, True, False, 6), [2, 2, 4, True, False, 6]),
        (AppendEntries(5, 9, 4, (), 8, 3, 77), [2, 3, 5, 9, 4, 8, 3, 77, [], [], []]),
        (AppendEntries(5, 9, 4, (Entry(10, 4, b"a"), ConfigEntry(11, 5, b"c")), 8, 3, 77),
         [2, 3, 5, 9, 4, 8, 3, 77, [4, 5], [b"a", b"c"], [1]]),
        (AppendEntries(5, 9, 4, (ConfigEntry(10, 5, b""),), 8, 3, 77),
         [2, 3, 5, 9, 4, 8, 3, 77, [5], [b""], [0]]),
        (AppendResponse(4, False, 9, 2, 7, 3, 6), [2, 4, 4, False, 9, 2, 7, 3, 6]),
        (TimeoutNow(4, 6), [2, 5, 4, 6]),
        (ReadIndex(4, 3, 6), [2, 6, 4, 3, 6]),
        (ReadIndexResponse(4, 3, -2, 6), [2, 7, 4, 3, -2, 6]),
        (Propose(5, (b"a", b"b")), [2, 8, 5, [b"a", b"b"]]),
        (ProposeResponse(5, -1, 0, "no leader", "n2"), [2, 9, 5, -1, 0, "no leader", "n2"]),
        (Recover(4, 6), [2, 10, 4, 6]),
        (RecoverResponse(4, 10, 3, (1, "b"), 6), [2, 11, 4, 10, 3, [1, "b"], 6]),
        (Hello(1, None), [2, 16, 1, None]),
        (Ping(), [2, 17]),
        # inc is always on the wire, even when it is the default 0.
        (RequestVote(4, 10, 3), [2, 1, 4, 10, 3, False, False, 0]),
        (VoteResponse(4, True), [2, 2, 4, True, False, 0]),
        (AppendEntries(5, 9, 4, (), 8), [2, 3, 5, 9, 4, 8, 0, 0, [], [], []]),
        (AppendResponse(4, True, 9), [2, 4, 4, True, 9, 0, -1, 0, 0]),
        (TimeoutNow(4), [2, 5, 4, 0]),
        (ReadIndex(4, 3), [2, 6, 4, 3, 0]),
        (ReadIndexResponse(4, 3, 8), [2, 7, 4, 3, 8, 0]),
        (Recover(4), [2, 10, 4, 0]),
        (RecoverResponse(4, -1, 0), [2, 11, 4, -1, 0, [], 0]),
    ],
)
def test_every_message_has_its_documented_layout(msg, layout):
    assert msgpack.unpackb(encode(msg)) == layout
    out = decode(msgpack.packb(layout, use_bin_type=True))
    assert out == msg
    if isinstance(msg, AppendEntries):  # equality alone does not tell Entry from ConfigEntry
        assert [type(e) for e in out.entries] == [type(e) for e in msg.entries]


def test_ping_bytes_are_fixed():
    assert encode(Ping()) == b"\x92\x02\x11"  # fixarray(2) [2, 17]
    assert PING_FRAME == struct.pack(">II", 3, crc32c_bitwise(b"\x92\x02\x11")) + b"\x92\x02\x11"
    assert encode_frame(Ping()) == PING_FRAME


def test_protocol_version_is_2():
    # Bumping the version is a deliberate act that must come with new layouts above.
    assert PROTOCOL_VERSION == 2


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
    # AppendEntries.entry_configs of a message without entries: only the empty array.
    "configs0": lambda v: type(v) is list and v == [],
    # RecoverResponse.voters: an array of node ids
    "voters": lambda v: type(v) is list and len(v) <= 1024 and all(KINDS["id"](x) for x in v),
}

# Valid examples (fields beyond version and tag), the kind of each field and its name (an
# error must name the message and the field). Fields whose validity depends on another
# (last_term <= term, prev_term <= term) use large partners. ``inc`` (the sender's
# incarnation) is the last field of every core message.
SPEC = {
    1: ([MAX, 5, 0, False, True, 7], ["term1", "seq", "term", "bool", "bool", "u63"],
        ["term", "last_seq", "last_term", "pre_vote", "transfer", "inc"]),
    2: ([3, True, False, 7], ["term", "bool", "bool", "u63"],
        ["term", "granted", "pre_vote", "inc"]),
    3: ([MAX, 5, 0, 4, 0, 7, [], [], []],
        ["term", "seq", "term", "seq", "u63", "u63", None, None, "configs0"],
        ["term", "prev_seq", "prev_term", "commit_seq", "read_id", "inc", None, None,
         "entry_configs"]),
    4: ([3, True, 7, 2, -1, 0, 7], ["term", "bool", "seq", "term", "seq", "u63", "u63"],
        ["term", "success", "match_seq", "conflict_term", "conflict_seq", "read_id", "inc"]),
    5: ([2, 7], ["term1", "u63"], ["term", "inc"]),
    6: ([2, 9, 7], ["term", "u63", "u63"], ["term", "read_id", "inc"]),
    7: ([2, 9, -2, 7], ["term", "u63", "index", "u63"], ["term", "read_id", "index", "inc"]),
    8: ([4, [b"x"]], ["u63", None], ["req_id", None]),
    9: ([4, -1, 0, "no leader", 3], ["u63", "seq", "term", "err?", "id?"],
        ["req_id", "first_seq", "term", "error", "leader"]),
    10: ([3, 7], ["term", "u63"], ["term", "inc"]),
    11: ([MAX, 5, 0, [1, "a"], 7], ["term", "seq", "term", "voters", "u63"],
         ["term", "last_seq", "last_term", "voters", "inc"]),
    16: ([1, "b"], ["id", "id?"], ["node_id", "to"]),
    17: ([], [], []),
}

BAD_VALUES = [
    None, True, False, 0, 1, -1, -2, -3, MAX, MAX + 1, (1 << 64) - 1, -(1 << 63), 1.0, "x",
    "", "y" * 257, "z" * 4097, b"x", [], [1], {}, {"a": 1},
]


V = PROTOCOL_VERSION


def raw(tag, fields, version=PROTOCOL_VERSION):
    return msgpack.packb([version, tag, *fields], use_bin_type=True)


@pytest.mark.parametrize("tag", sorted(SPEC))
def test_each_field_accepts_exactly_what_its_kind_allows(tag):
    good, kinds, names = SPEC[tag]
    assert len(kinds) == len(names) == len(good)
    decode(raw(tag, good))  # the example itself is valid
    for i, (kind, name) in enumerate(zip(kinds, names, strict=True)):
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
                assert f"{wire._NAMES[tag]}.{name}" in str(ei.value)


@pytest.mark.parametrize("tag", sorted(SPEC))
def test_missing_and_extra_fields_are_refused(tag):
    good, _, _ = SPEC[tag]
    with pytest.raises(ProtocolError, match=f"must have {len(good)} fields"):
        decode(raw(tag, good + [0]))
    if good:
        with pytest.raises(ProtocolError, match=f"must have {len(good)} fields"):
            decode(raw(tag, good[:-1]))


@pytest.mark.parametrize(
    "tag, v1_fields, missing",
    [
        (1, [3, 5, 2, False, False], 1),
        (2, [3, True, False], 1),
        (3, [3, 5, 2, 4, 0, [3], [b"a"]], 2),  # no inc and no entry_configs
        (4, [3, True, 7, 2, -1, 0], 1),
        (5, [3], 1),
        (6, [3, 9], 1),
        (7, [3, 9, 4], 1),
    ],
)
def test_version_1_layout_under_the_current_version_is_refused(tag, v1_fields, missing):
    # A version-1 body without inc, even if labelled with the current version, is short of
    # fields: never read with a field shifted into the wrong slot.
    with pytest.raises(ProtocolError, match=f"{wire._NAMES[tag]} must have "
                       f"{len(v1_fields) + missing} "
                       r"fields \(.*inc.*\), got " f"{len(v1_fields)}$"):
        decode(raw(tag, v1_fields))


def test_append_entries_without_entry_configs_is_refused():
    # The AppendEntries of version 2 before configuration entries (inc, no entry_configs) is
    # one field short: refused by its length, never decoded as if entry_configs were [].
    for body in ([3, 5, 2, 4, 0, 7, [3], [b"a"]], [3, 5, 2, 4, 0, 7, [], []]):
        with pytest.raises(ProtocolError, match=r"AppendEntries must have 9 fields "
                           r"\(.*, inc, entry_terms, entry_data, entry_configs\), got 8$"):
            decode(raw(3, body))


def test_cross_field_ranges():
    with pytest.raises(ProtocolError, match="last_term"):
        decode(raw(1, [3, 5, 4, False, False, 0]))  # last_term > term
    with pytest.raises(ProtocolError, match="prev_term"):
        decode(raw(3, [3, 5, 4, 4, 0, 0, [], [], []]))  # prev_term > term
    last_term = r"RecoverResponse.last_term must be an int in \[0, {}\]"
    with pytest.raises(ProtocolError, match=last_term.format(3)):
        decode(raw(11, [3, 5, 4, [], 0]))  # last_term > term
    with pytest.raises(ProtocolError, match=last_term.format(0)):
        decode(raw(11, [0, -1, 1, [], 0]))
    # The bound is inclusive.
    assert decode(raw(1, [3, 5, 3, False, False, 0])) == RequestVote(3, 5, 3)
    assert decode(raw(3, [3, 5, 3, 4, 0, 0, [], [], []])) == AppendEntries(3, 5, 3, (), 4)
    assert decode(raw(11, [3, 5, 3, [], 0])) == RecoverResponse(3, 5, 3)
    assert decode(raw(11, [0, -1, 0, [2], MAX])) == RecoverResponse(0, -1, 0, (2,), MAX)
    with pytest.raises(ProtocolError, match="RecoverResponse.voters"):
        decode(raw(11, [3, 5, 3, list(range(1025)), 0]))


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
        decode(raw(3, [3, 10, 1, 5, 0, 7, terms, datas, []]))


# --- configuration entries: AppendEntries.entry_configs ------------------------------------

# Three entries after prev_seq=10 (seqs 11, 12, 13), within [prev_term=1, term=3].
AE_HEAD = [3, 10, 1, 5, 0, 7]
AE_TERMS = [1, 1, 2]
AE_DATAS = [b"a", b"b", b"c"]


@pytest.mark.parametrize("configs", [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]])
def test_entry_configs_decode_to_config_entries_at_those_indexes(configs):
    out = decode(raw(3, [*AE_HEAD, AE_TERMS, AE_DATAS, configs]))
    assert isinstance(out, AppendEntries)
    assert out.entries == (Entry(11, 1, b"a"), Entry(12, 1, b"b"), Entry(13, 2, b"c"))
    assert [type(e) for e in out.entries] == [
        ConfigEntry if i in configs else Entry for i in range(3)
    ]
    assert [e.kind for e in out.entries] == [1 if i in configs else 0 for i in range(3)]
    # And back: the encoder sends the same indexes.
    assert msgpack.unpackb(encode(out))[8:] == [AE_TERMS, AE_DATAS, configs]


@pytest.mark.parametrize(
    "configs",
    [None, 0, 1, -1, True, 1.0, "x", "", b"x", b"", {}, {"a": 1}, msgpack.ExtType(1, b"")],
)
def test_entry_configs_must_be_an_array(configs):
    for terms, datas in ((AE_TERMS, AE_DATAS), ([], [])):
        with pytest.raises(ProtocolError,
                           match=r"AppendEntries\.entry_configs must be an array"):
            decode(raw(3, [*AE_HEAD, terms, datas, configs]))


@pytest.mark.parametrize(
    "configs",
    [
        [True], [False], [0, True], [1.0], [0.0], [None], ["0"], [b"\x00"], [[0]], [{}],
        [0, 1.0], [0, None],
    ],
)
def test_entry_configs_items_must_be_ints(configs):
    with pytest.raises(ProtocolError, match=r"AppendEntries\.entry_configs must list"):
        decode(raw(3, [*AE_HEAD, AE_TERMS, AE_DATAS, configs]))


@pytest.mark.parametrize(
    "configs",
    [[1, 0], [2, 1], [0, 2, 1], [2, 0, 1], [2, 1, 0]],
)
def test_entry_configs_must_be_in_order(configs):
    with pytest.raises(ProtocolError, match=r"AppendEntries\.entry_configs must list"):
        decode(raw(3, [*AE_HEAD, AE_TERMS, AE_DATAS, configs]))


@pytest.mark.parametrize(
    "configs",
    [[0, 0], [1, 1], [2, 2], [0, 1, 1], [0, 0, 1, 2], [0, 1, 2, 2], [1, 1, 1]],
)
def test_entry_configs_must_not_repeat(configs):
    with pytest.raises(ProtocolError, match=r"AppendEntries\.entry_configs must list"):
        decode(raw(3, [*AE_HEAD, AE_TERMS, AE_DATAS, configs]))


@pytest.mark.parametrize(
    "configs",
    [[-1], [-1, 0], [-1, 0, 1], [-2, 2], [-(1 << 63)], [-(1 << 63), 0]],
)
def test_entry_configs_must_not_be_negative(configs):
    with pytest.raises(ProtocolError, match=r"AppendEntries\.entry_configs must list"):
        decode(raw(3, [*AE_HEAD, AE_TERMS, AE_DATAS, configs]))


@pytest.mark.parametrize(
    "configs",
    [[3], [0, 3], [2, 3], [0, 1, 2, 3], [4], [MAX], [(1 << 64) - 1], [0, (1 << 64) - 1]],
)
def test_entry_configs_must_index_an_entry_of_the_message(configs):
    with pytest.raises(ProtocolError, match=r"AppendEntries\.entry_configs must list") as ei:
        decode(raw(3, [*AE_HEAD, AE_TERMS, AE_DATAS, configs]))
    assert "below 3" in str(ei.value)


@pytest.mark.parametrize("configs", [[0], [1], [0, 1], [MAX]])
def test_entry_configs_of_a_message_without_entries_must_be_empty(configs):
    # A heartbeat carries no entries, so no index can be valid.
    with pytest.raises(ProtocolError, match=r"AppendEntries\.entry_configs must list") as ei:
        decode(raw(3, [*AE_HEAD, [], [], configs]))
    assert "below 0" in str(ei.value)
    assert decode(raw(3, [*AE_HEAD, [], [], []])) == AppendEntries(3, 10, 1, (), 5, 0, 7)


def test_encoder_accepts_entries_mixing_entry_and_config_entry():
    ents = (ConfigEntry(5, 1, b"c0"), Entry(6, 1, b"a"), Entry(7, 2, b""),
            ConfigEntry(8, 2, bytearray(b"c1")), Entry(9, 2, memoryview(b"b")))
    m = AppendEntries(2, 4, 1, ents, 3, 1, 9)
    assert msgpack.unpackb(encode(m))[8:] == [
        [1, 1, 2, 2, 2], [b"c0", b"a", b"", b"c1", b"b"], [0, 3]
    ]
    out = decode(encode(m))
    assert out.entries == (ConfigEntry(5, 1, b"c0"), Entry(6, 1, b"a"), Entry(7, 2, b""),
                           ConfigEntry(8, 2, b"c1"), Entry(9, 2, b"b"))
    assert [type(e) for e in out.entries] == [ConfigEntry, Entry, Entry, ConfigEntry, Entry]
    assert all(type(e.data) is bytes for e in out.entries)
    # A list of entries encodes like the tuple.
    assert encode(AppendEntries(2, 4, 1, list(ents), 3, 1, 9)) == encode(m)  # type: ignore
    # Only configuration entries; only plain entries.
    only = tuple(ConfigEntry(5 + i, 1, b"x") for i in range(3))
    assert msgpack.unpackb(encode(AppendEntries(1, 4, 1, only, 3)))[10] == [0, 1, 2]
    plain = tuple(Entry(5 + i, 1, b"x") for i in range(3))
    assert msgpack.unpackb(encode(AppendEntries(1, 4, 1, plain, 3)))[10] == []


def test_entries_may_not_run_past_the_largest_seq():
    decode(raw(3, [3, MAX - 2, 1, 5, 0, 7, [1, 1], [b"a", b"b"], []]))
    with pytest.raises(ProtocolError, match="past seq"):
        decode(raw(3, [3, MAX - 1, 1, 5, 0, 7, [1, 1], [b"a", b"b"], []]))
    with pytest.raises(ProtocolError, match="past seq"):
        decode(raw(3, [3, MAX - 1, 1, 5, 0, 7, [1, 1], [b"a", b"b"], [1]]))


def test_size_limits():
    lim = WireLimits(max_entries=3, max_bytes=10, max_id_len=4, max_error_len=5)
    decode(raw(3, [3, 10, 1, 5, 0, 7, [1, 1, 1], [b"abc", b"abc", b"abcd"], []]), lim)
    decode(raw(3, [3, 10, 1, 5, 0, 7, [1, 1, 1], [b"abc", b"abc", b"abcd"], [0, 1, 2]]), lim)
    with pytest.raises(ProtocolError, match="4 entries"):
        decode(raw(3, [3, 10, 1, 5, 0, 7, [1] * 4, [b"a"] * 4, []]), lim)
    with pytest.raises(ProtocolError, match="4 entries"):
        decode(raw(3, [3, 10, 1, 5, 0, 7, [1] * 4, [b"a"] * 4, [3]]), lim)
    with pytest.raises(ProtocolError, match="11 payload bytes"):
        decode(raw(3, [3, 10, 1, 5, 0, 7, [1, 1, 1], [b"abc", b"abc", b"abcde"], []]), lim)
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
    with pytest.raises(InvalidArgumentError, match="4 entries"):
        encode(AppendEntries(1, -1, 0, tuple(ConfigEntry(i, 1, b"") for i in range(4)), -1),
               lim)


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
        (msgpack.packb([V, 5, 2, 0]) + b"\x00", "not one valid msgpack"),  # trailing bytes
        (msgpack.packb([V, 5, 2, 0])[:-1], "not one valid msgpack"),  # truncated
        (bytes([0x92, V, 0xA1, 0xFF]), "not one valid msgpack"),  # [V, invalid utf-8]
        (msgpack.packb({"v": V, "t": 5}), "must be a msgpack array"),
        (msgpack.packb(V), "must be a msgpack array"),
        (msgpack.packb([V]), "must be a msgpack array"),
        (msgpack.packb([V + 1, 5, 2, 0]), f"version {V + 1}, this node speaks {V}"),
        (msgpack.packb([0, 5, 2, 0]), f"version 0, this node speaks {V}"),
        (msgpack.packb([-1, 5, 2, 0]), "version -1"),
        (msgpack.packb([None, 5, 2, 0]), "version None"),
        (msgpack.packb([True, 5, 2, 0]), "version"),
        (msgpack.packb([1.0, 5, 2, 0]), "version"),
        (msgpack.packb([float(V), 5, 2, 0]), "version"),  # 2.0 == 2 in Python
        (msgpack.packb([str(V), 5, 2, 0]), "version"),
        (msgpack.packb([[V], 5, 2, 0]), "version"),
        (msgpack.packb([V, 99, 2, 0]), "unknown message tag"),
        (msgpack.packb([V, 14, 2, 0]), "unknown message tag"),  # first tag after the snapshots
        (msgpack.packb([V, 0, 2, 0]), "unknown message tag"),
        (msgpack.packb([V, True, 2, 0]), "unknown message tag"),  # True == 1 in Python
        (msgpack.packb([V, 10.0, 2, 0]), "unknown message tag"),  # 10.0 == 10 in Python
        (msgpack.packb([V, "AppendEntries"]), "unknown message tag"),
        (msgpack.packb([V, 5, msgpack.ExtType(1, b"x"), 0]), "TimeoutNow.term"),
        (msgpack.packb([V, 5, 2, msgpack.ExtType(1, b"x")]), "TimeoutNow.inc"),
        (msgpack.packb([V, 10, 2, -1]), "Recover.inc"),
        (b"\x91" * 5000 + b"\x01", "not one valid msgpack"),  # nested too deep
    ],
)
def test_garbage_payloads_are_refused(payload, why):
    with pytest.raises(ProtocolError, match=why):
        decode(payload)


# Version-1 payloads as a version-1 node sent them (no inc; Hello and Ping are the same as in
# version 2 apart from the version byte, so only the version can refuse them).
V1_PAYLOADS = [
    msgpack.packb([1, 3, 5, 9, 4, 8, 3, [4, 5], [b"a", b"bc"]], use_bin_type=True),
    msgpack.packb([1, 1, 3, 5, 2, False, False]),
    msgpack.packb([1, 2, 3, True, False]),
    msgpack.packb([1, 4, 3, True, 7, 2, -1, 0]),
    msgpack.packb([1, 5, 3]),
    msgpack.packb([1, 6, 3, 9]),
    msgpack.packb([1, 7, 3, 9, 4]),
    msgpack.packb([1, 8, 4, [b"x"]], use_bin_type=True),
    msgpack.packb([1, 9, 4, -1, 0, "no leader", 3]),
    msgpack.packb([1, 16, "n1", 2]),
    msgpack.packb([1, 17]),
    # Even one that happens to have the current layout (a version-1 TimeoutNow of 2 fields
    # cannot exist, but a confused peer might send one): the version alone refuses it.
    msgpack.packb([1, 5, 3, 0]),
]


@pytest.mark.parametrize("payload", V1_PAYLOADS)
def test_version_1_payloads_are_refused_with_a_clear_message(payload):
    assert PROTOCOL_VERSION != 1
    with pytest.raises(ProtocolError) as ei:
        decode(payload)
    msg = str(ei.value)
    # Says what the peer speaks, what we speak and what to do; not a field/arity complaint.
    assert f"peer speaks wire protocol version 1, this node speaks {PROTOCOL_VERSION}" in msg
    assert "same tinyraftplus wire version on every node" in msg
    assert "must have" not in msg and "must be" not in msg
    # Framing is version-independent: the frame itself passes, the payload is refused.
    assert FrameDecoder().feed(frame(payload)) == [payload]


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


class _OtherEntry(ConfigEntry):
    """A subclass the wire does not know: neither Entry nor ConfigEntry exactly."""

    __slots__ = ()


@pytest.mark.parametrize(
    "msg, why",
    [
        (AppendEntries(1, 4, 0, (Entry(6, 1, b"a"),), 0), "do not follow prev_seq"),
        (AppendEntries(1, 4, 0, (Entry(5, 1, b"a"), Entry(7, 1, b"b")), 0), "do not follow"),
        (AppendEntries(1, 4, 0, ((5, 1, b"a"),), 0), "tuple of Entry"),  # type: ignore[arg-type]
        (AppendEntries(1, 4, 0, (ConfigEntry(6, 1, b"a"),), 0), "do not follow prev_seq"),
        (AppendEntries(1, 4, 0, (Entry(5, 1, b"a"), ConfigEntry(7, 1, b"b")), 0),
         "do not follow"),
        (AppendEntries(1, 4, 0, (ConfigEntry(5, 1, b"a"), (6, 1, b"b")), 0),  # type: ignore
         "tuple of Entry"),
        (AppendEntries(1, 4, 0, (_OtherEntry(5, 1, b"a"),), 0), "tuple of Entry"),
        (AppendEntries(1, 4, 0, (ConfigEntry(5, 2, b"a"),), 0), "must not decrease"),
        (AppendEntries(1, 4, 0, (ConfigEntry(5, 1, "a"),), 0),  # type: ignore[arg-type]
         "data must be bytes"),
        (AppendEntries(1, 4, 2, (), 0), "prev_term must be an int in \\[0, 1\\]"),
        (AppendEntries(1, 4, 0, (Entry(5, 2, b"a"),), 0), "must not decrease"),
        (AppendEntries(1, 4, 0, (Entry(5, 1, "a"),), 0), "data must be bytes"),  # type: ignore
        (RequestVote(0, 1, 0), "RequestVote.term must be an int in \\[1"),
        (VoteResponse(1, 1), "VoteResponse.granted must be a bool"),  # type: ignore[arg-type]
        (ReadIndexResponse(1, 1, -3), "index"),
        (RequestVote(1, -1, 0, inc=-1), "RequestVote.inc must be an int in \\[0, "),
        (VoteResponse(1, True, inc=MAX + 1), "VoteResponse.inc must be an int in \\[0, "),
        (AppendEntries(1, -1, 0, (), -1, inc=-1), "AppendEntries.inc must be an int in \\[0, "),
        (AppendResponse(1, True, 0, inc=True), "AppendResponse.inc must be an int"),
        (TimeoutNow(1, 1.0), "TimeoutNow.inc must be an int"),  # type: ignore[arg-type]
        (ReadIndex(1, 1, None), "ReadIndex.inc must be an int"),  # type: ignore[arg-type]
        (ReadIndexResponse(1, 1, 1, "0"), "ReadIndexResponse.inc must be an int"),  # type: ignore
        (Recover(-1), "Recover.term must be an int in \\[0, "),
        (Recover(1, -1), "Recover.inc must be an int in \\[0, "),
        (RecoverResponse(-1, -1, 0), "RecoverResponse.term must be an int in \\[0, "),
        (RecoverResponse(1, -2, 0), "RecoverResponse.last_seq must be an int in \\[-1, "),
        (RecoverResponse(1, 5, 2), "RecoverResponse.last_term must be an int in \\[0, 1\\]"),
        (RecoverResponse(1, 5, 1, (), MAX + 1), "RecoverResponse.inc must be an int in \\[0, "),
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


@given(st.lists(st.sampled_from([0, 5, 1000, 70_000, 200_000]), min_size=1, max_size=5),
       st.data())
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_frame_decoder_gathers_large_frames_in_any_chunking(sizes, data):
    """Frames far from whole are gathered as a list of chunks (FrameDecoder.GATHER_MIN):
    mixed with small frames, split anywhere (TLS hands them over in 16 KiB records), they
    come out whole, in order, with the stream offset and buffered count kept."""
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    dec = FrameDecoder()
    out: list[bytes] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        out += dec.feed(bytearray(stream[prev:c]))  # not bytes: the decoder must copy
        assert dec.offset + dec.buffered == c
        prev = c
    assert out == payloads
    assert dec.buffered == 0 and dec.offset == len(stream)


def test_frame_decoder_refuses_a_bad_crc_in_a_gathered_frame():
    good = frame(b"a" * 10)
    bad = bytearray(frame(b"b" * 300_000))
    bad[150_000] ^= 1
    stream = good + bytes(bad) + good
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match=f"stream offset {len(good)} .*CRC32C"):
        for i in range(0, len(stream), 16384):
            dec.feed(stream[i:i + 16384])
    with pytest.raises(ProtocolError, match="CRC32C"):
        dec.feed(good)  # broken for good


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
    m = AppendEntries(7, 999, 7, ents, 1100, 0, 123456789)
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
