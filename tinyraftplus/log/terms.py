"""``TermIndex``: the term of every seq as runs of equal terms, kept in memory.

Raft asks for the term at a seq on every AppendEntries it sends or receives; terms change
rarely (once per election), so a handful of runs describe millions of records and a
bisect answers in O(log runs) without touching the disk.
"""

from __future__ import annotations

from bisect import bisect_right


class TermIndex:
    __slots__ = ("_seqs", "_terms", "base_seq", "base_term")

    def __init__(self, base_seq: int = -1, base_term: int = 0) -> None:
        # base_seq / base_term: the record just before the first one held (first_seq - 1),
        # whose term a compacted log still has to answer for.
        self.base_seq = base_seq
        self.base_term = base_term
        self._seqs: list[int] = []
        self._terms: list[int] = []

    def add(self, seq: int, term: int) -> None:
        """Record that ``seq`` (the next seq after all added so far) has ``term``."""
        if not self._terms or self._terms[-1] != term:
            self._seqs.append(seq)
            self._terms.append(term)

    def term_at(self, seq: int) -> int:
        if seq == self.base_seq:
            return self.base_term
        i = bisect_right(self._seqs, seq) - 1
        if i < 0:
            return self.base_term
        return self._terms[i]

    def last_term(self) -> int:
        return self._terms[-1] if self._terms else self.base_term

    def truncate_after(self, seq: int) -> None:
        """Forget runs that start after ``seq``."""
        i = bisect_right(self._seqs, seq)
        del self._seqs[i:]
        del self._terms[i:]

    def drop_before(self, first_seq: int, base_term: int) -> None:
        """The log now starts at ``first_seq``; keep only what is needed from there on."""
        i = bisect_right(self._seqs, first_seq) - 1
        if i > 0:
            del self._seqs[:i]
            del self._terms[:i]
        if self._seqs and self._seqs[0] < first_seq:
            self._seqs[0] = first_seq
        self.base_seq = first_seq - 1
        self.base_term = base_term

    def runs_between(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Runs covering seqs lo..hi, the first one starting at lo."""
        if hi < lo:
            return []
        i = max(bisect_right(self._seqs, lo) - 1, 0)
        out = [(lo, self.term_at(lo))]
        for s, t in zip(self._seqs[i:], self._terms[i:], strict=True):
            if s > hi:
                break
            if s > lo:
                out.append((s, t))
        return out

    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self._seqs, self._terms, strict=True))
