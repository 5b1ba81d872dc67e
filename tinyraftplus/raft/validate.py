"""Checks on Raft messages that arrive from a peer, before the core sees them.

The wire codec checks shapes while decoding; this module checks the decoded objects, so that
in-process transports (which hand over Python objects) get the same protection. A message that
fails is dropped by the node with a ``warn`` event; ``check_message`` says precisely why.
"""

from __future__ import annotations

from typing import Any

from ..entry import ENTRY_TYPES
from ..errors import ProtocolError
from . import messages as m

MAX_SEQ = (1 << 63) - 1
_CORE = frozenset(m.CORE_MESSAGE_TYPES)
MAX_VOTERS = 1024
MAX_ID_LEN = 256
MAX_CRC = (1 << 32) - 1
MAX_META = 1 << 20  # bytes of an encoded configuration


def _int(name: str, v: Any, lo: int, hi: int = MAX_SEQ) -> None:
    if type(v) is not int:  # bool is an int subclass: refuse it too
        raise ProtocolError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{name}={v} is out of range [{lo}, {hi}]")


def _bool(name: str, v: Any) -> None:
    if type(v) is not bool:
        raise ProtocolError(f"{name} must be a bool, got {type(v).__name__}")


def check_node_id(name: str, v: Any) -> None:
    if type(v) is int:
        _int(name, v, -MAX_SEQ, MAX_SEQ)
    elif type(v) is str:
        if not 0 < len(v) <= MAX_ID_LEN:
            raise ProtocolError(f"{name} must be 1..{MAX_ID_LEN} characters")
    else:
        raise ProtocolError(f"{name} must be an int or str node id, got {type(v).__name__}")


def check_message(msg: Any, *, max_entries: int = 65536, max_bytes: int = 64 << 20) -> None:
    """Raise ``ProtocolError`` unless ``msg`` is a well-formed message of a known type."""
    t = type(msg)
    if t in _CORE:
        _int("inc", msg.inc, 0)
    if t is m.AppendEntries:
        _int("term", msg.term, 0)
        _int("prev_seq", msg.prev_seq, -1)
        _int("prev_term", msg.prev_term, 0, msg.term)
        _int("commit_seq", msg.commit_seq, -1)
        _int("read_id", msg.read_id, 0)
        ents = msg.entries
        if type(ents) is not tuple:
            raise ProtocolError("entries must be a tuple")
        if len(ents) > max_entries:
            raise ProtocolError(f"{len(ents)} entries in one message (limit {max_entries})")
        seq, term, total, top = msg.prev_seq, msg.prev_term, 0, msg.term
        for e in ents:  # per entry: inline checks (a call each cost ~5% of a batch's work)
            if type(e) not in ENTRY_TYPES:
                raise ProtocolError(f"entries hold {type(e).__name__}, not Entry")
            if e.seq != seq + 1:
                raise ProtocolError(f"entry seq {e.seq} does not follow {seq}")
            et = e.term
            if type(et) is not int or not term <= et <= top:
                _int("entry term", et, term, top)  # raises, saying which
            if type(e.data) is not bytes:
                raise ProtocolError("entry data must be bytes")
            seq, term, total = e.seq, et, total + len(e.data)
        if total > max_bytes:
            raise ProtocolError(f"{total} payload bytes in one message (limit {max_bytes})")
        _int("last entry seq", seq, -1)
    elif t is m.AppendResponse:
        _int("term", msg.term, 0)
        _bool("success", msg.success)
        _int("match_seq", msg.match_seq, -1)
        _int("conflict_term", msg.conflict_term, 0)
        _int("conflict_seq", msg.conflict_seq, -1)
        _int("read_id", msg.read_id, 0)
    elif t is m.RequestVote:
        _int("term", msg.term, 1)
        _int("last_seq", msg.last_seq, -1)
        _int("last_term", msg.last_term, 0, msg.term)
        _bool("pre_vote", msg.pre_vote)
        _bool("transfer", msg.transfer)
    elif t is m.VoteResponse:
        _int("term", msg.term, 0)
        _bool("granted", msg.granted)
        _bool("pre_vote", msg.pre_vote)
    elif t is m.TimeoutNow:
        _int("term", msg.term, 1)
    elif t is m.ReadIndex:
        _int("term", msg.term, 0)
        _int("read_id", msg.read_id, 0)
    elif t is m.ReadIndexResponse:
        _int("term", msg.term, 0)
        _int("read_id", msg.read_id, 0)
        _int("index", msg.index, -2)
    elif t is m.Recover:
        _int("term", msg.term, 0)
    elif t is m.RecoverResponse:
        _int("term", msg.term, 0)
        _int("last_seq", msg.last_seq, -1)
        _int("last_term", msg.last_term, 0, msg.term)
        if type(msg.voters) is not tuple or len(msg.voters) > MAX_VOTERS:
            raise ProtocolError(f"RecoverResponse.voters must be a tuple of at most {MAX_VOTERS}")
        for v in msg.voters:
            check_node_id("RecoverResponse.voters", v)
    elif t is m.InstallSnapshot:
        _int("term", msg.term, 1)
        _int("seq", msg.seq, 0)
        _int("snap_term", msg.snap_term, 0, msg.term)
        _int("size", msg.size, 0)
        _int("crc", msg.crc, 0, MAX_CRC)
        _int("offset", msg.offset, 0, msg.size)
        _int("chunk_crc", msg.chunk_crc, 0, MAX_CRC)
        _bool("begin", msg.begin)
        if type(msg.data) is not bytes or len(msg.data) > max_bytes:
            raise ProtocolError(f"InstallSnapshot.data must be bytes of at most {max_bytes}")
        if msg.offset + len(msg.data) > msg.size:
            raise ProtocolError("InstallSnapshot.data runs past the snapshot's size")
        if msg.config is not None and (type(msg.config) is not bytes
                                       or len(msg.config) > MAX_META):
            raise ProtocolError(f"InstallSnapshot.config must be None or bytes of at most "
                                f"{MAX_META}")
        if type(msg.extra) is not bytes or len(msg.extra) > max_bytes:
            raise ProtocolError(f"InstallSnapshot.extra must be bytes of at most {max_bytes}")
    elif t is m.SnapshotResponse:
        _int("term", msg.term, 0)
        _int("seq", msg.seq, 0)
        _int("snap_term", msg.snap_term, 0)
        _int("crc", msg.crc, 0, MAX_CRC)
        _int("offset", msg.offset, 0)
        _int("status", msg.status, 0, 4)
    elif t is m.Propose:
        _int("req_id", msg.req_id, 0)
        if type(msg.items) is not tuple or not msg.items:
            raise ProtocolError("Propose.items must be a non-empty tuple of bytes")
        if len(msg.items) > max_entries:
            raise ProtocolError(f"{len(msg.items)} items in one Propose (limit {max_entries})")
        total = 0
        for it in msg.items:
            if type(it) is not bytes or not it:
                raise ProtocolError("Propose.items must be non-empty bytes")
            total += len(it)
        if total > max_bytes:
            raise ProtocolError(f"{total} payload bytes in one Propose (limit {max_bytes})")
    elif t is m.ProposeResponse:
        _int("req_id", msg.req_id, 0)
        _int("first_seq", msg.first_seq, -1)
        _int("term", msg.term, 0)
        if msg.error is not None and type(msg.error) is not str:
            raise ProtocolError("ProposeResponse.error must be a str or None")
        if msg.leader is not None:
            check_node_id("ProposeResponse.leader", msg.leader)
    else:
        raise ProtocolError(f"unknown message type {t.__name__}")
