"""``raft.validate.check_message``: what a node refuses in an ``AppendEntries`` before its
core sees it (the entries are checked one by one, inline; each check here fails if it is
dropped)."""

from __future__ import annotations

import pytest

from tinyraftplus.entry import ConfigEntry, Entry
from tinyraftplus.errors import ProtocolError
from tinyraftplus.raft.messages import AppendEntries
from tinyraftplus.raft.validate import check_message


def _ae(*entries: object, term: int = 5, prev_seq: int = 9, prev_term: int = 3) -> AppendEntries:
    return AppendEntries(term, prev_seq, prev_term, tuple(entries), 9)  # type: ignore[arg-type]


def test_well_formed_entries_pass() -> None:
    check_message(_ae(Entry(10, 3, b"a"), ConfigEntry(11, 4, b"c"), Entry(12, 5, b"")))
    check_message(_ae())  # a heartbeat


@pytest.mark.parametrize(("entries", "says"), [
    ((Entry(10, 6, b"a"),), "entry term=6 is out of range [3, 5]"),  # past the message's term
    ((Entry(10, 2, b"a"),), "entry term=2 is out of range [3, 5]"),  # below prev_term
    ((Entry(10, 4, b"a"), Entry(11, 3, b"b")), "entry term=3 is out of range [4, 5]"),
    ((Entry(10, True, b"a"),), "entry term must be an int, got bool"),
    ((Entry(10, 4.0, b"a"),), "entry term must be an int, got float"),
    ((Entry(10, 4, "a"),), "entry data must be bytes"),
    ((Entry(11, 4, b"a"),), "entry seq 11 does not follow 9"),
    (((10, 4, b"a"),), "entries hold tuple, not Entry"),
])
def test_bad_entries_are_refused_saying_why(entries: tuple[object, ...], says: str) -> None:
    with pytest.raises(ProtocolError, match=says.replace("[", r"\[").replace("]", r"\]")):
        check_message(_ae(*entries))
