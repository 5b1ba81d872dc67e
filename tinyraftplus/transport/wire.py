"""The wire format between nodes: msgpack messages inside CRC32C-checked frames.

Theory of operation
-------------------
A **frame** is ``[u32 length][u32 CRC32C(payload)][payload]``, both integers big-endian
(network byte order). ``length`` counts the payload only. A receiver checks ``length``
against its maximum frame size as soon as it has the 8-byte header, so a hostile length
prefix never makes it buffer more than that; then it checks the CRC before it parses a byte
of msgpack.

A **payload** is one msgpack array: ``[version, tag, field, field, ...]``. ``version`` is
:data:`PROTOCOL_VERSION`; a node refuses any other (there is no negotiation: the version
changes only when the meaning of a field changes, and mixed clusters are then refused loudly
rather than misread quietly). ``tag`` says which message follows and the fields are that
message's dataclass fields in declaration order, every one always present (no defaults on
the wire, so "missing" and "extra" are both simply a wrong length). Flat arrays rather than
maps keep field names off the wire and make ``AppendEntries`` -- the hot path -- cheap:

    [2, 3, term, prev_seq, prev_term, commit_seq, read_id, inc, [term, ...], [data, ...],
     [index of each configuration entry, ...]]

The entries' seqs are not sent: Raft's entries always follow ``prev_seq`` one by one, so the
``i``-th entry is ``prev_seq + 1 + i``. The encoder refuses entries that are not contiguous.

Every decoded message is validated before it is returned: exact types (a bool is not an int,
a str is not bytes), integer ranges (seqs in ``[-1, 2**63)``, terms in ``[0, 2**63)``), sizes
(entries per message, bytes of payload, length of node ids and error strings) and the few
structural Raft facts that are free to check (entry terms never decrease and lie between
``prev_term`` and ``term``). Anything else raises :class:`~tinyraftplus.errors.ProtocolError`
naming the message and field. The encoder applies the same checks and raises
:class:`~tinyraftplus.errors.InvalidArgumentError` instead: if we sent what a peer must
refuse, the peer would close the connection every time and the cluster would stall.

Two messages exist only on the wire: :class:`Hello`, the first frame each side of a new
connection sends (who am I, whom did I mean to reach), and :class:`Ping`, the keepalive a
connection sends when it has had nothing else to say for a while.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgpack
from crc32c import crc32c

from ..entry import ENTRY_TYPES, ConfigEntry, Entry
from ..errors import InvalidArgumentError, ProtocolError
from ..raft.messages import (
    AppendEntries,
    AppendResponse,
    InstallSnapshot,
    Message,
    NodeId,
    Propose,
    ProposeResponse,
    ReadIndex,
    ReadIndexResponse,
    Recover,
    RecoverResponse,
    RequestVote,
    SnapshotResponse,
    TimeoutNow,
    VoteResponse,
)

PROTOCOL_VERSION = 2
"""2: every Raft message carries its sender's incarnation (``inc``, last); ``Recover`` and
``RecoverResponse`` are new. ``InstallSnapshot`` and ``SnapshotResponse`` came later with new
tags: a peer that does not know them refuses them as unknown, which a transfer survives
(it is retried), so the version did not change."""
MAX_CRC = (1 << 32) - 1
MAX_CONFIG_BYTES = 1 << 20

MAX_U63 = (1 << 63) - 1
MAX_VOTERS = 1024
"""Voters a configuration (as named in ``RecoverResponse``) may have."""
"""Largest seq, term or id a message may carry (the log stores them as signed 64-bit)."""

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size

DEFAULT_MAX_FRAME = 16 << 20
"""Default largest payload accepted in one frame: room for ``rpc_max_bytes`` (1 MiB by
default) many times over, small enough that a hostile peer cannot make us buffer much."""


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame on every connection, in both directions.

    ``node_id`` is who the sender says it is; ``to`` is the node it meant to reach, so that a
    dial to the wrong address is caught even in plaintext. Under mutual TLS the claim is
    checked against the certificate; in plaintext it is only a claim, which is what plaintext
    means.
    """

    node_id: NodeId
    to: NodeId | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """Keepalive: says "this connection is alive" when there is nothing else to send."""


WireMessage = Message | Hello | Ping


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Bounds a decoded message must respect (beyond the frame size the framer enforces)."""

    max_entries: int = 65536
    """Entries in one ``AppendEntries`` / items in one ``Propose``."""
    max_bytes: int = 64 << 20
    """Payload bytes summed over the entries or items of one message."""
    max_id_len: int = 256
    """Characters in a ``str`` node id."""
    max_error_len: int = 4096
    """Characters in ``ProposeResponse.error``."""


DEFAULT_LIMITS = WireLimits()

# --- tags --------------------------------------------------------------------------------

TAG_REQUEST_VOTE = 1
TAG_VOTE_RESPONSE = 2
TAG_APPEND_ENTRIES = 3
TAG_APPEND_RESPONSE = 4
TAG_TIMEOUT_NOW = 5
TAG_READ_INDEX = 6
TAG_READ_INDEX_RESPONSE = 7
TAG_PROPOSE = 8
TAG_PROPOSE_RESPONSE = 9
TAG_RECOVER = 10
TAG_RECOVER_RESPONSE = 11
TAG_INSTALL_SNAPSHOT = 12
TAG_SNAPSHOT_RESPONSE = 13
TAG_HELLO = 16
TAG_PING = 17

_NAMES = {
    TAG_REQUEST_VOTE: "RequestVote",
    TAG_VOTE_RESPONSE: "VoteResponse",
    TAG_APPEND_ENTRIES: "AppendEntries",
    TAG_APPEND_RESPONSE: "AppendResponse",
    TAG_TIMEOUT_NOW: "TimeoutNow",
    TAG_READ_INDEX: "ReadIndex",
    TAG_READ_INDEX_RESPONSE: "ReadIndexResponse",
    TAG_PROPOSE: "Propose",
    TAG_PROPOSE_RESPONSE: "ProposeResponse",
    TAG_RECOVER: "Recover",
    TAG_RECOVER_RESPONSE: "RecoverResponse",
    TAG_INSTALL_SNAPSHOT: "InstallSnapshot",
    TAG_SNAPSHOT_RESPONSE: "SnapshotResponse",
    TAG_HELLO: "Hello",
    TAG_PING: "Ping",
}

# --- field checks -------------------------------------------------------------------------


def _show(v: Any) -> str:
    """A short description of a bad value for an error message. Untrusted values are never
    formatted whole (a 2-million-element array or 1,000 levels of nesting would cost seconds
    or a RecursionError): containers by type and length, scalars cut before formatting."""
    return show_value(v)


def show_value(v: Any, width: int = 40) -> str:
    """``_show`` for other modules: at most about ``width`` characters, in time independent
    of the value's size."""
    t = type(v)
    if t in (list, tuple, dict, set):
        return f"{t.__name__} of {len(v)} items"
    if t in (bytes, bytearray, str):
        r = repr(v[:width])
        more = "..." if len(v) > width else ""
        return f"{t.__name__} {r}{more}" if t is not str else f"str {r}{more}"
    if t is int and v.bit_length() > 200:
        return f"int of {v.bit_length()} bits"
    if t in (int, float, bool) or v is None:
        return f"{t.__name__} {v!r}"
    return t.__name__


def _int(obj: list, i: int, lo: int, hi: int = MAX_U63) -> None:
    v = obj[i]
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(
            f"{_NAMES[obj[1]]}.{_FIELDS[obj[1]][i - 2]} must be an int in [{lo}, {hi}], "
            f"got {_show(v)}"
        )


def _bool(obj: list, i: int) -> None:
    v = obj[i]
    if type(v) is not bool:
        raise ProtocolError(
            f"{_NAMES[obj[1]]}.{_FIELDS[obj[1]][i - 2]} must be a bool, got {_show(v)}"
        )


def check_node_id(v: Any, where: str, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Raise ``ProtocolError`` unless ``v`` is a node id: an int in ``(-2**63, 2**63)`` or a
    non-empty str of at most ``limits.max_id_len`` characters."""
    if type(v) is int:
        if -MAX_U63 <= v <= MAX_U63:
            return
    elif type(v) is str:
        if 0 < len(v) <= limits.max_id_len:
            return
    raise ProtocolError(
        f"{where} must be a node id (an int or a str of 1..{limits.max_id_len} characters), "
        f"got {_show(v)}"
    )


def _arity(obj: list, n: int) -> None:
    if len(obj) != n + 2:
        raise ProtocolError(
            f"{_NAMES[obj[1]]} must have {n} fields "
            f"({', '.join(_FIELDS[obj[1]])}), got {len(obj) - 2}"
        )


def _v_request_vote(obj: list, lim: WireLimits) -> None:
    _arity(obj, 6)
    _int(obj, 2, 1)  # term: a candidate is always past term 0
    _int(obj, 3, -1)  # last_seq
    _int(obj, 4, 0, obj[2])  # last_term <= term
    _bool(obj, 5)
    _bool(obj, 6)
    _int(obj, 7, 0)  # inc


def _v_vote_response(obj: list, lim: WireLimits) -> None:
    _arity(obj, 4)
    _int(obj, 2, 0)
    _bool(obj, 3)
    _bool(obj, 4)
    _int(obj, 5, 0)


def _v_append_entries(obj: list, lim: WireLimits) -> None:
    _arity(obj, 9)
    _int(obj, 2, 0)  # term
    _int(obj, 3, -1)  # prev_seq
    _int(obj, 4, 0, obj[2])  # prev_term <= term
    _int(obj, 5, -1)  # commit_seq
    _int(obj, 6, 0)  # read_id
    _int(obj, 7, 0)  # inc
    terms, datas = obj[8], obj[9]
    if type(terms) is not list or type(datas) is not list:
        raise ProtocolError(
            f"AppendEntries entry terms and data must be two arrays, got "
            f"{type(terms).__name__} and {type(datas).__name__}"
        )
    n = len(terms)
    if n != len(datas):
        raise ProtocolError(
            f"AppendEntries has {n} entry terms but {len(datas)} entry payloads"
        )
    configs = obj[10]
    if type(configs) is not list:
        raise ProtocolError(
            f"AppendEntries.entry_configs must be an array, got {_show(configs)}"
        )
    if configs and (
        len(configs) > n  # first: cheap, and bounds the work below by the entries' count
        or set(map(type, configs)) != {int} or sorted(set(configs)) != configs
        or configs[0] < 0 or configs[-1] >= n
    ):
        raise ProtocolError(
            "AppendEntries.entry_configs must list distinct entry indexes in order, each "
            f"below {n}, got {_show(configs)}"
        )
    if not n:
        return
    if n > lim.max_entries:
        raise ProtocolError(f"AppendEntries carries {n} entries (limit {lim.max_entries})")
    if obj[3] + n > MAX_U63:
        raise ProtocolError(f"AppendEntries entries run past seq {MAX_U63}")
    # Set-of-types and min/max run in C: a Python loop over 256 entries costs more than all
    # the rest of decoding.
    if set(map(type, terms)) != {int}:
        bad = next(t for t in terms if type(t) is not int)
        raise ProtocolError(f"AppendEntries entry terms must be ints, got {_show(bad)}")
    if terms[0] < obj[4] or terms[-1] > obj[2] or sorted(terms) != terms:
        raise ProtocolError(
            f"AppendEntries entry terms must not decrease and must lie in "
            f"[prev_term={obj[4]}, term={obj[2]}]"
        )
    if set(map(type, datas)) != {bytes}:
        bad = next(d for d in datas if type(d) is not bytes)
        raise ProtocolError(f"AppendEntries entry data must be bytes, got {_show(bad)}")
    total = sum(map(len, datas))
    if total > lim.max_bytes:
        raise ProtocolError(
            f"AppendEntries carries {total} payload bytes (limit {lim.max_bytes})"
        )


def _v_append_response(obj: list, lim: WireLimits) -> None:
    _arity(obj, 7)
    _int(obj, 2, 0)
    _bool(obj, 3)
    _int(obj, 4, -1)
    _int(obj, 5, 0)
    _int(obj, 6, -1)
    _int(obj, 7, 0)
    _int(obj, 8, 0)


def _v_timeout_now(obj: list, lim: WireLimits) -> None:
    _arity(obj, 2)
    _int(obj, 2, 1)
    _int(obj, 3, 0)


def _v_read_index(obj: list, lim: WireLimits) -> None:
    _arity(obj, 3)
    _int(obj, 2, 0)
    _int(obj, 3, 0)
    _int(obj, 4, 0)


def _v_read_index_response(obj: list, lim: WireLimits) -> None:
    _arity(obj, 4)
    _int(obj, 2, 0)
    _int(obj, 3, 0)
    _int(obj, 4, -2)  # -2: refused
    _int(obj, 5, 0)


def _v_recover(obj: list, lim: WireLimits) -> None:
    _arity(obj, 2)
    _int(obj, 2, 0)
    _int(obj, 3, 0)


def _v_recover_response(obj: list, lim: WireLimits) -> None:
    _arity(obj, 5)
    _int(obj, 2, 0)
    _int(obj, 3, -1)
    _int(obj, 4, 0, obj[2])
    voters = obj[5]
    if type(voters) is not list or len(voters) > MAX_VOTERS:
        raise ProtocolError(
            f"RecoverResponse.voters must be an array of at most {MAX_VOTERS} node ids, got "
            f"{_show(voters)}"
        )
    for v in voters:
        check_node_id(v, "RecoverResponse.voters", lim)
    _int(obj, 6, 0)


def _v_install_snapshot(obj: list, lim: WireLimits) -> None:
    _arity(obj, 12)
    _int(obj, 2, 1)  # term
    _int(obj, 3, 0)  # seq
    _int(obj, 4, 0, obj[2])  # snap_term <= term
    _int(obj, 5, 0)  # size
    _int(obj, 6, 0, MAX_CRC)  # crc
    _int(obj, 7, 0, obj[5])  # offset <= size
    data = obj[8]
    if type(data) is not bytes or len(data) > lim.max_bytes or obj[7] + len(data) > obj[5]:
        raise ProtocolError(
            f"InstallSnapshot.data must be bytes of at most {lim.max_bytes} that end within "
            f"the snapshot's size, got {_show(data)}"
        )
    _int(obj, 9, 0, MAX_CRC)  # chunk_crc
    _bool(obj, 10)  # begin
    cfg = obj[11]
    if cfg is not None and (type(cfg) is not bytes or len(cfg) > MAX_CONFIG_BYTES):
        raise ProtocolError(
            f"InstallSnapshot.config must be None or bytes of at most {MAX_CONFIG_BYTES}, "
            f"got {_show(cfg)}"
        )
    extra = obj[12]
    if type(extra) is not bytes or len(extra) > lim.max_bytes:
        raise ProtocolError(
            f"InstallSnapshot.extra must be bytes of at most {lim.max_bytes}, got {_show(extra)}"
        )
    _int(obj, 13, 0)  # inc


def _v_snapshot_response(obj: list, lim: WireLimits) -> None:
    _arity(obj, 7)
    _int(obj, 2, 0)  # term
    _int(obj, 3, 0)  # seq
    _int(obj, 4, 0)  # snap_term
    _int(obj, 5, 0, MAX_CRC)  # crc
    _int(obj, 6, 0)  # offset
    _int(obj, 7, 0, 4)  # status
    _int(obj, 8, 0)  # inc


def _v_propose(obj: list, lim: WireLimits) -> None:
    _arity(obj, 2)
    _int(obj, 2, 0)
    items = obj[3]
    if type(items) is not list or not items:
        raise ProtocolError(f"Propose.items must be a non-empty array, got {_show(items)}")
    if len(items) > lim.max_entries:
        raise ProtocolError(f"Propose carries {len(items)} items (limit {lim.max_entries})")
    if set(map(type, items)) != {bytes} or not all(items):
        bad = next(d for d in items if type(d) is not bytes or not d)
        raise ProtocolError(f"Propose.items must be non-empty bytes, got {_show(bad)}")
    total = sum(map(len, items))
    if total > lim.max_bytes:
        raise ProtocolError(f"Propose carries {total} payload bytes (limit {lim.max_bytes})")


def _v_propose_response(obj: list, lim: WireLimits) -> None:
    _arity(obj, 5)
    _int(obj, 2, 0)
    _int(obj, 3, -1)
    _int(obj, 4, 0)
    err = obj[5]
    if err is not None and (type(err) is not str or len(err) > lim.max_error_len):
        raise ProtocolError(
            f"ProposeResponse.error must be None or a str of at most {lim.max_error_len} "
            f"characters, got {_show(err)}"
        )
    if obj[6] is not None:
        check_node_id(obj[6], "ProposeResponse.leader", lim)


def _v_hello(obj: list, lim: WireLimits) -> None:
    _arity(obj, 2)
    check_node_id(obj[2], "Hello.node_id", lim)
    if obj[3] is not None:
        check_node_id(obj[3], "Hello.to", lim)


def _v_ping(obj: list, lim: WireLimits) -> None:
    _arity(obj, 0)


# --- encode ---------------------------------------------------------------------------------

def _fields_append_entries(m: AppendEntries) -> list:
    ents = m.entries
    if not isinstance(ents, (tuple, list)) or (
        ents and not set(map(type, ents)) <= _ENTRY_TYPE_SET
    ):
        raise InvalidArgumentError(
            f"cannot encode AppendEntries: entries must be a tuple of Entry, got {_show(ents)}"
        )
    if ents:
        # Entry is a tuple, so one zip transposes the entries into three columns in C.
        seqs, term_col, data_col = zip(*ents, strict=True)
        if seqs != tuple(range(m.prev_seq + 1, m.prev_seq + 1 + len(ents))):
            raise InvalidArgumentError(
                f"cannot encode AppendEntries(prev_seq={m.prev_seq}): entry seqs "
                f"{seqs[:5]}{'...' if len(seqs) > 5 else ''} do not follow prev_seq one by "
                f"one; send contiguous entries"
            )
        terms: list[Any] = list(term_col)
        datas: list[Any] = list(data_col)
        # The rare configuration entries, by index (a list that is almost always empty).
        configs = [i for i, e in enumerate(ents) if e.kind] if ConfigEntry in set(
            map(type, ents)) else []
        if set(map(type, datas)) != {bytes}:
            # The log may hand out memoryviews or bytearrays; the wire carries bytes.
            datas = [bytes(d) if isinstance(d, (bytearray, memoryview)) else d for d in datas]
    else:
        terms, datas, configs = [], [], []
    return [
        PROTOCOL_VERSION, TAG_APPEND_ENTRIES,
        m.term, m.prev_seq, m.prev_term, m.commit_seq, m.read_id, m.inc, terms, datas, configs,
    ]


def _fields_propose(m: Propose) -> list:
    items: Any = m.items
    if isinstance(items, (tuple, list)):
        items = [bytes(d) if isinstance(d, (bytearray, memoryview)) else d for d in items]
    return [PROTOCOL_VERSION, TAG_PROPOSE, m.req_id, items]


def _fields_recover_response(m: RecoverResponse) -> list:
    return [PROTOCOL_VERSION, TAG_RECOVER_RESPONSE, m.term, m.last_seq, m.last_term,
            list(m.voters), m.inc]


def _fields_simple(tag: int, names: tuple[str, ...]) -> Callable[[Any], list]:
    getter = attrgetter(*names) if len(names) > 1 else None

    def fields(m: Any) -> list:
        if getter is None:
            return [PROTOCOL_VERSION, tag] + [getattr(m, n) for n in names]
        return [PROTOCOL_VERSION, tag, *getter(m)]

    return fields


_FIELDS: dict[int, tuple[str, ...]] = {
    TAG_REQUEST_VOTE: ("term", "last_seq", "last_term", "pre_vote", "transfer", "inc"),
    TAG_VOTE_RESPONSE: ("term", "granted", "pre_vote", "inc"),
    TAG_APPEND_ENTRIES: (
        "term", "prev_seq", "prev_term", "commit_seq", "read_id", "inc", "entry_terms",
        "entry_data", "entry_configs",
    ),
    TAG_APPEND_RESPONSE: (
        "term", "success", "match_seq", "conflict_term", "conflict_seq", "read_id", "inc",
    ),
    TAG_TIMEOUT_NOW: ("term", "inc"),
    TAG_READ_INDEX: ("term", "read_id", "inc"),
    TAG_READ_INDEX_RESPONSE: ("term", "read_id", "index", "inc"),
    TAG_RECOVER: ("term", "inc"),
    TAG_RECOVER_RESPONSE: ("term", "last_seq", "last_term", "voters", "inc"),
    TAG_INSTALL_SNAPSHOT: (
        "term", "seq", "snap_term", "size", "crc", "offset", "data", "chunk_crc", "begin",
        "config", "extra", "inc",
    ),
    TAG_SNAPSHOT_RESPONSE: ("term", "seq", "snap_term", "crc", "offset", "status", "inc"),
    TAG_PROPOSE: ("req_id", "items"),
    TAG_PROPOSE_RESPONSE: ("req_id", "first_seq", "term", "error", "leader"),
    TAG_HELLO: ("node_id", "to"),
    TAG_PING: (),
}

_CLASSES: dict[int, type] = {
    TAG_REQUEST_VOTE: RequestVote,
    TAG_VOTE_RESPONSE: VoteResponse,
    TAG_APPEND_ENTRIES: AppendEntries,
    TAG_APPEND_RESPONSE: AppendResponse,
    TAG_TIMEOUT_NOW: TimeoutNow,
    TAG_READ_INDEX: ReadIndex,
    TAG_READ_INDEX_RESPONSE: ReadIndexResponse,
    TAG_PROPOSE: Propose,
    TAG_PROPOSE_RESPONSE: ProposeResponse,
    TAG_RECOVER: Recover,
    TAG_RECOVER_RESPONSE: RecoverResponse,
    TAG_INSTALL_SNAPSHOT: InstallSnapshot,
    TAG_SNAPSHOT_RESPONSE: SnapshotResponse,
    TAG_HELLO: Hello,
    TAG_PING: Ping,
}

_VALIDATORS: dict[int, Callable[[list, WireLimits], None]] = {
    TAG_REQUEST_VOTE: _v_request_vote,
    TAG_VOTE_RESPONSE: _v_vote_response,
    TAG_APPEND_ENTRIES: _v_append_entries,
    TAG_APPEND_RESPONSE: _v_append_response,
    TAG_TIMEOUT_NOW: _v_timeout_now,
    TAG_READ_INDEX: _v_read_index,
    TAG_READ_INDEX_RESPONSE: _v_read_index_response,
    TAG_PROPOSE: _v_propose,
    TAG_PROPOSE_RESPONSE: _v_propose_response,
    TAG_RECOVER: _v_recover,
    TAG_RECOVER_RESPONSE: _v_recover_response,
    TAG_INSTALL_SNAPSHOT: _v_install_snapshot,
    TAG_SNAPSHOT_RESPONSE: _v_snapshot_response,
    TAG_HELLO: _v_hello,
    TAG_PING: _v_ping,
}

_ENCODERS: dict[type, tuple[int, Callable[[Any], list]]] = {}
for _tag, _cls in _CLASSES.items():
    if _tag == TAG_APPEND_ENTRIES:
        _ENCODERS[_cls] = (_tag, _fields_append_entries)
    elif _tag == TAG_PROPOSE:
        _ENCODERS[_cls] = (_tag, _fields_propose)
    elif _tag == TAG_RECOVER_RESPONSE:
        _ENCODERS[_cls] = (_tag, _fields_recover_response)
    else:
        _ENCODERS[_cls] = (_tag, _fields_simple(_tag, _FIELDS[_tag]))
del _tag, _cls

_ENTRY_TYPE_SET = frozenset(ENTRY_TYPES)

_PING_PAYLOAD = msgpack.packb([PROTOCOL_VERSION, TAG_PING])


def encode(msg: WireMessage, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """Encode one message as a msgpack payload (without the frame header).

    Raises ``InvalidArgumentError`` if ``msg`` is not a message type this protocol carries or
    holds a value a peer's :func:`decode` would refuse (the message says which field).
    """
    try:
        tag, fields = _ENCODERS[type(msg)]
    except KeyError:
        raise InvalidArgumentError(
            f"cannot encode {type(msg).__name__}: not a message of the wire protocol "
            f"(one of {', '.join(_NAMES.values())})"
        ) from None
    obj = fields(msg)
    try:
        _VALIDATORS[tag](obj, limits)
    except ProtocolError as e:
        raise InvalidArgumentError(f"cannot encode {e}") from None
    return msgpack.packb(obj, use_bin_type=True)


# --- decode ---------------------------------------------------------------------------------


def _build(tag: int, obj: list) -> WireMessage:
    if tag == TAG_APPEND_ENTRIES:
        terms, datas = obj[8], obj[9]
        if terms:
            first = obj[3] + 1
            # tuple.__new__ builds each Entry in C; Entry(...) would run Python code per entry.
            entries = tuple(map(
                tuple.__new__, [Entry] * len(terms),
                zip(range(first, first + len(terms)), terms, datas, strict=True),
            ))
            if obj[10]:
                lst = list(entries)
                for i in obj[10]:
                    lst[i] = ConfigEntry(*lst[i])
                entries = tuple(lst)
        else:
            entries = ()
        return AppendEntries(obj[2], obj[3], obj[4], entries, obj[5], obj[6], obj[7])
    if tag == TAG_PROPOSE:
        return Propose(obj[2], tuple(obj[3]))
    if tag == TAG_RECOVER_RESPONSE:
        return RecoverResponse(obj[2], obj[3], obj[4], tuple(obj[5]), obj[6])
    return _CLASSES[tag](*obj[2:])


MAX_CONTAINERS = 5
"""Arrays (and maps) in one valid message: the message itself and at most three field arrays
(``AppendEntries``' terms, data and configuration indexes), with one to spare so that a field
of the wrong type is refused by name."""


class _ContainerCounter:
    """``list_hook`` and ``object_hook`` for msgpack: counts the containers decoded and stops
    decoding (raises) past ``MAX_CONTAINERS``: a payload of two million nested or empty
    arrays is refused after a few, instead of costing a second of the event loop. One Python
    call per array of a valid message (three at most)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, obj: Any) -> Any:
        self.n += 1
        if self.n > MAX_CONTAINERS:
            raise ProtocolError(f"more than {MAX_CONTAINERS} arrays or maps in one message")
        return obj


def _decode_limits(limits: WireLimits) -> dict[str, Any]:
    """msgpack's own limits, sized to what a valid message can hold (with room for the
    validators to name a field that is a little off), so that a hostile payload is refused
    while decoding rather than after."""
    counter = _ContainerCounter()
    return {
        "max_array_len": max(limits.max_entries, 32),
        "max_map_len": 16,
        "max_str_len": 4 * max(limits.max_id_len, limits.max_error_len) + 64,
        "max_bin_len": limits.max_bytes,
        "max_ext_len": 64,
        "list_hook": counter,
        "object_hook": counter,
    }


def _peek_name(payload: bytes) -> str:
    """`` (a Name)`` when the payload starts like ``[1, tag, ...]`` with a known tag, for
    errors raised before decoding finished."""
    if len(payload) >= 3 and (payload[0] & 0xF0) == 0x90 and payload[1] == PROTOCOL_VERSION:
        name = _NAMES.get(payload[2])
        if name is not None:
            return f" (a {name})"
    return ""


def decode(payload: bytes, limits: WireLimits = DEFAULT_LIMITS) -> WireMessage:
    """Decode and validate one payload; returns a message from ``raft.messages``, a
    :class:`Hello` or a :class:`Ping`.

    Raises ``ProtocolError`` for anything else: bytes that are not exactly one msgpack
    value, a wrong protocol version, an unknown tag, a missing or extra field, a field of the
    wrong type or out of range, or a message over ``limits``.
    """
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                              **_decode_limits(limits))
    except Exception as e:  # msgpack raises several unrelated types; all mean "garbage"
        why = f"{type(e).__name__}: {str(e)[:200]}" if str(e) else type(e).__name__
        raise ProtocolError(
            f"payload of {len(payload)} bytes{_peek_name(payload)} is not one valid msgpack "
            f"value within the limits of a message ({why})"
        ) from None
    if type(obj) is not list or len(obj) < 2:
        raise ProtocolError(
            f"payload must be a msgpack array [version, tag, fields...], got {_show(obj)}"
        )
    version, tag = obj[0], obj[1]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(
            f"peer speaks wire protocol version "
            f"{version if type(version) is int else _show(version)}, this node speaks "
            f"{PROTOCOL_VERSION}; run the same tinyraftplus wire version on every node"
        )
    if type(tag) is not int or tag not in _VALIDATORS:
        raise ProtocolError(f"unknown message tag {_show(tag)}")
    _VALIDATORS[tag](obj, limits)
    return _build(tag, obj)


# --- framing --------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length and CRC32C."""
    return frame_header(payload) + payload


def frame_header(payload: bytes) -> bytes:
    """The header ``frame`` puts before ``payload``: send the two without joining them
    (a large payload is then never copied just to be framed)."""
    return HEADER.pack(len(payload), crc32c(payload))


def encode_frame(msg: WireMessage, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """``frame(encode(msg))``: one message ready for the socket."""
    return frame(encode(msg, limits))


PING_FRAME = frame(_PING_PAYLOAD)


class FrameDecoder:
    """Splits a byte stream into verified payloads, however the stream was chunked.

    Feed it whatever the socket returned; it returns the payloads of every frame completed
    so far and keeps the remainder. A bad frame (length over ``max_frame``, CRC mismatch)
    raises ``ProtocolError``, after which the decoder is broken for good: a byte stream has
    no way to find the next frame boundary, so the connection must be closed.
    """

    __slots__ = ("max_frame", "_buf", "_error", "offset", "_parts", "_have", "_want", "_crc")

    GATHER_MIN = 64 << 10
    """A frame missing at least this many bytes is gathered as a list of the chunks read and
    joined once when whole: growing one buffer chunk by chunk (16 KiB TLS records) moved
    a 1 MiB frame's bytes around several times (about 2.5 ms per MiB, against 0.1 ms)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if type(max_frame) is not int or max_frame < 1 or max_frame > 0xFFFFFFFF:
            raise InvalidArgumentError(
                f"max_frame must be an int in [1, 2**32 - 1], got {max_frame!r}"
            )
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self.offset = 0
        """Stream offset of the first byte not yet consumed (for error messages)."""
        self._parts: list[bytes] = []
        """While gathering a large frame: its bytes so far (header first), as read."""
        self._have = 0
        self._want = 0
        """While gathering: the whole frame's size with its header (0: not gathering)."""
        self._crc = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf) + self._have

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._error is not None:
            raise self._error
        if not self._want:
            return self._feed_buf(data)
        # Gathering a large frame: keep the chunk (a copy only if it is not bytes already).
        chunk = data if type(data) is bytes else bytes(data)
        self._parts.append(chunk)
        self._have += len(chunk)
        if self._have < self._want:
            return []
        parts, extra = self._parts, self._have - self._want
        rest = b""
        if extra:
            rest = chunk[len(chunk) - extra:]
            parts[-1] = chunk[:len(chunk) - extra]
        parts[0] = parts[0][HEADER_SIZE:]
        payload = b"".join(parts)
        self._parts, self._have, self._want = [], 0, 0
        if crc32c(payload) != self._crc:
            self._fail(ProtocolError(
                f"frame at stream offset {self.offset} ({len(payload)} bytes) has CRC32C "
                f"{crc32c(payload):#010x} but its header says {self._crc:#010x}: corrupted "
                f"in transit or not our protocol"
            ))
        self.offset += HEADER_SIZE + len(payload)
        if not rest:
            return [payload]
        out = self._feed_buf(rest)
        out.insert(0, payload)
        return out

    def _fail(self, e: ProtocolError) -> None:
        self._error = e
        self._buf = bytearray()
        self._parts, self._have, self._want = [], 0, 0
        raise e

    def _feed_buf(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, n, unpack = 0, len(buf), HEADER.unpack_from
        while n - pos >= HEADER_SIZE:
            length, crc = unpack(buf, pos)
            if length > self.max_frame:
                self._fail(ProtocolError(
                    f"frame at stream offset {self.offset + pos} announces {length} bytes, "
                    f"over the maximum frame size of {self.max_frame}"
                ))
            end = pos + HEADER_SIZE + length
            if end > n:
                if end - n >= self.GATHER_MIN:
                    # Large and far from whole: gather it from here on (see GATHER_MIN).
                    self._parts = [bytes(buf[pos:])]
                    self._have, self._want, self._crc = n - pos, end - pos, crc
                    buf.clear()
                    self.offset += pos
                    return out
                break
            with memoryview(buf) as view:
                payload = bytes(view[pos + HEADER_SIZE:end])
            if crc32c(payload) != crc:
                self._fail(ProtocolError(
                    f"frame at stream offset {self.offset + pos} ({length} bytes) has CRC32C "
                    f"{crc32c(payload):#010x} but its header says {crc:#010x}: corrupted "
                    f"in transit or not our protocol"
                ))
            out.append(payload)
            pos = end
        del buf[:pos]  # bytearray drops a prefix without copying the rest
        self.offset += pos
        return out


__all__ = [
    "frame_header",
    "PROTOCOL_VERSION", "DEFAULT_MAX_FRAME", "HEADER_SIZE", "Hello", "Ping", "WireMessage",
    "WireLimits", "DEFAULT_LIMITS", "encode", "decode", "frame", "encode_frame", "PING_FRAME",
    "FrameDecoder", "check_node_id",
]
