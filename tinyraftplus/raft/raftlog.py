"""The core's view of its log: what storage holds durably plus an in-memory tail.

Theory of operation. The tail ``mem`` is a contiguous list of entries starting at
``mem_start`` and always ending at the last seq the core knows. Entries in it with
``seq > stable`` are *unstable*: the driver has not yet confirmed them durable (``advance``),
so storage must not be asked for them; entries ``<= stable`` are a cache of recent durable
entries kept so that a leader serves its followers without reading storage. The cache is
trimmed to about ``cache_max`` entries and ``cache_max_bytes`` of payload, whichever is
reached first. The byte bound matters for large values: 8,192 entries of 64 KiB held 512 MiB
per node, and the memory for each new entry came fresh from the kernel (page faults and
zeroing were 9% of a 3-node cluster's CPU; issue 13).

Invariants:

* ``mem`` covers ``[mem_start, last_seq]`` and ``mem_start <= stable + 1``;
* storage holds valid entries ``[first_seq, stable]`` (and possibly stale ones beyond
  ``stable``, which ``pending_truncate`` will remove);
* ``stable <= emitted <= last_seq``: ``emitted`` is the last seq handed to the driver in a
  ``Ready``.

Terms are non-decreasing along any Raft log, which lets the hint searches bisect.
"""

from __future__ import annotations

from bisect import bisect_left
from operator import itemgetter
from typing import TYPE_CHECKING

from ..entry import ConfigEntry, Entry

if TYPE_CHECKING:
    from .storage import LogStorage


_DATA = itemgetter(2)  # Entry.data, at C speed


def _payload_bytes(entries: list[Entry]) -> int:
    return sum(map(len, map(_DATA, entries)))


class RaftLog:
    __slots__ = ("storage", "mem", "mem_start", "stable", "emitted", "pending_truncate",
                 "cache_max", "cache_max_bytes", "cached_bytes", "config_index")

    def __init__(self, storage: LogStorage, cache_max: int, cache_max_bytes: int) -> None:
        last = storage.seq
        self.storage = storage
        self.mem: list[Entry] = []
        self.mem_start = last + 1
        self.stable = last
        self.emitted = last
        self.pending_truncate: int | None = None
        self.cache_max = cache_max
        self.cache_max_bytes = cache_max_bytes
        self.cached_bytes = 0
        """Payload bytes of the cached entries ``[mem_start, stable]``."""
        # (seq, term) of every configuration entry in the log, in order: storage keeps
        # (seq, term, payload) only, so entries read back from it are told apart here.
        self.config_index: list[tuple[int, int]] = []

    @property
    def last_seq(self) -> int:
        return self.mem_start + len(self.mem) - 1

    @property
    def first_seq(self) -> int:
        return self.storage.first_seq

    def term_at(self, seq: int) -> int:
        i = seq - self.mem_start
        if i >= 0:
            return self.mem[i].term
        if seq < 0:
            return 0
        return self.storage.term_at(seq)

    @property
    def last_term(self) -> int:
        if self.mem:
            return self.mem[-1].term
        return self.term_at(self.mem_start - 1)

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append entries that follow ``last_seq`` (the caller checked)."""
        self.mem.extend(entries)

    def truncate_after(self, seq: int) -> None:
        """Keep entries ``<= seq``. Storage is told to truncate only if it may hold (or be
        about to be handed) an entry beyond ``seq``."""
        if seq >= self.last_seq:
            return
        if seq >= self.mem_start - 1:
            del self.mem[seq + 1 - self.mem_start:]
        else:
            self.mem = []
            self.mem_start = seq + 1
        if seq < self.emitted:
            pt = self.pending_truncate
            self.pending_truncate = seq if pt is None or seq < pt else pt
            self.emitted = seq
            if seq < self.stable:
                self.stable = seq
                self._recount()

    def slice(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries ``lo..hi`` (``lo <= hi <= last_seq``), at least one, at most about
        ``max_bytes`` of payload. Served from memory when possible, else from storage
        (stopping at the start of the in-memory tail; the caller asks again)."""
        start = self.mem_start
        if lo < start:
            return self.from_storage(lo, min(hi, start - 1), max_bytes)
        out = self.mem[lo - start:hi - start + 1]
        total = 0
        for i, e in enumerate(out):
            total += len(e.data)
            if total > max_bytes and i > 0:
                del out[i:]
                break
        return out

    def from_storage(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """``storage.entries`` with configuration entries given back their type."""
        got = self.storage.entries(lo, hi, max_bytes)
        index = self.config_index
        i = bisect_left(index, (lo, -1))
        if i < len(index) and index[i][0] <= hi:
            first = lo
            for seq, term in index[i:]:
                k = seq - first
                if k >= len(got):
                    break
                e = got[k]
                if e.term == term:
                    got[k] = ConfigEntry(*e)
        return got

    # --- persistence hand-off ---------------------------------------------------------
    def has_unstable(self) -> bool:
        return self.pending_truncate is not None or self.emitted < self.last_seq

    def take_unstable(self) -> tuple[int | None, list[Entry]]:
        """What the driver must persist now: a truncation point and entries to append."""
        trunc = self.pending_truncate
        self.pending_truncate = None
        last = self.last_seq
        if self.emitted < last:
            entries = self.mem[self.emitted + 1 - self.mem_start:]
            self.emitted = last
        else:
            entries = []
        return trunc, entries

    def stable_to(self, seq: int, term: int) -> None:
        """The driver made entries through ``seq`` durable. Ignored if the entry there has
        since been replaced (its term differs)."""
        if seq <= self.stable or seq > self.last_seq or self.term_at(seq) != term:
            return
        mem, start = self.mem, self.mem_start
        self.cached_bytes += _payload_bytes(mem[self.stable + 1 - start:seq + 1 - start])
        self.stable = seq
        cached = seq + 1 - start
        # Trimmed down to the bounds only once past twice them: each trim shifts the list.
        if cached > 2 * self.cache_max or self.cached_bytes > 2 * self.cache_max_bytes:
            drop = max(cached - self.cache_max, 0)
            left = self.cached_bytes - _payload_bytes(mem[:drop])
            while drop < cached and left > self.cache_max_bytes:
                left -= len(mem[drop].data)
                drop += 1
            del mem[:drop]
            self.mem_start = start + drop
            self.cached_bytes = left

    def _recount(self) -> None:
        """Count ``cached_bytes`` again (after a cut below ``stable``: rare)."""
        self.cached_bytes = _payload_bytes(self.mem[:self.stable + 1 - self.mem_start])

    def restored(self, seq: int) -> None:
        """Storage now starts after a snapshot whose last seq is ``seq`` (and keeps what
        it held beyond only if it matched the snapshot). Call with nothing unstable."""
        st = self.storage
        self.pending_truncate = None
        if st.seq <= seq:
            self.mem = []
            self.mem_start = seq + 1
            self.stable = self.emitted = seq
            self.cached_bytes = 0
            return
        # Kept: the tail in memory still follows storage; drop what precedes storage.
        first = st.first_seq
        if self.mem_start < first:
            del self.mem[:first - self.mem_start]
            self.mem_start = first
        if self.mem_start > st.seq + 1 or (self.mem and self.mem_start + len(self.mem) <= st.seq):
            self.mem = []
            self.mem_start = st.seq + 1
        self.stable = self.emitted = max(self.stable, min(self.last_seq, st.seq))
        self._recount()

    # --- hint searches ----------------------------------------------------------------
    def first_of_term(self, seq: int, floor: int) -> int:
        """The first seq in ``[floor, seq]`` whose term equals the term at ``seq``."""
        term = self.term_at(seq)
        lo = max(floor, self.first_seq, 0)
        hi = seq
        while lo < hi:
            mid = (lo + hi) // 2
            if self.term_at(mid) < term:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def last_at_or_below_term(self, lo: int, hi: int, term: int) -> int:
        """The largest seq ``s`` in ``[lo, hi]`` with ``term_at(s) <= term``; ``lo - 1`` if
        none (``lo >= -1``; seq -1 has term 0)."""
        lo = max(lo, self.first_seq - 1)
        if hi < lo or self.term_at(lo) > term:
            return lo - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.term_at(mid) <= term:
                lo = mid
            else:
                hi = mid - 1
        return lo
