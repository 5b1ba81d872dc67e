"""Quorum rules: majorities, counts, replication groups and the disjoint-set refusal.

The refusal is checked against an independent brute-force oracle (``itertools`` over all
pairs of subsets) on random rules, so a wrong closure or a wrong bit trick shows up."""

from __future__ import annotations

import itertools
import random
import re
import time

import pytest

from tinyraftplus.errors import ConfigurationError, InvalidArgumentError
from tinyraftplus.raft.quorum import Quorum


def subsets(ids):
    for k in range(len(ids) + 1):
        for c in itertools.combinations(ids, k):
            yield frozenset(c)


def named_sets(msg: str) -> list[set[str]]:
    return [set(x.strip() for x in body.split(",") if x.strip()) for body in
            re.findall(r"\{([^}]*)\}", msg)]


@pytest.mark.parametrize("n", range(1, 9))
def test_default_is_strict_majority(n):
    ids = list(range(n))
    q = Quorum(ids)
    for s in subsets(ids):
        assert q.is_quorum(s) == (len(s) >= n // 2 + 1)
    assert q.count == n // 2 + 1


def test_unknown_and_duplicate_ids_do_not_count():
    q = Quorum([1, 2, 3])
    assert not q.is_quorum([1, 1])
    assert not q.is_quorum([1, 99])
    assert q.is_quorum([1, 2, 99])


@pytest.mark.parametrize("n,k", [(3, 1), (4, 2), (5, 2), (6, 3), (7, 3)])
def test_quorum_count_at_or_below_half_is_refused_naming_two_disjoint_sets(n, k):
    ids = [f"n{i}" for i in range(n)]
    with pytest.raises(ConfigurationError) as ei:
        Quorum(ids, quorum=k)
    sets = named_sets(str(ei.value))
    assert len(sets) == 2
    a, b = sets
    assert len(a) == len(b) == k and not (a & b)
    assert a <= {repr(i) for i in ids} and b <= {repr(i) for i in ids}


@pytest.mark.parametrize("n,k", [(3, 2), (3, 3), (4, 3), (5, 3), (5, 5), (6, 4)])
def test_quorum_count_above_half_is_accepted(n, k):
    ids = list(range(n))
    q = Quorum(ids, quorum=k)
    for s in subsets(ids):
        assert q.is_quorum(s) == (len(s) >= k)


def test_quorum_count_bad_values():
    with pytest.raises(ConfigurationError, match="never be reached"):
        Quorum([1, 2, 3], quorum=4)
    with pytest.raises(InvalidArgumentError):
        Quorum([1, 2, 3], quorum=2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        Quorum([1, 2, 3], quorum=True)  # type: ignore[arg-type]


def test_bad_node_lists():
    with pytest.raises(ConfigurationError, match="at least one"):
        Quorum([])
    with pytest.raises(ConfigurationError, match="duplicate"):
        Quorum([1, 2, 2])


SIX = ["a1", "a2", "a3", "b1", "b2", "b3"]
GROUPS = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "b3": "B"}


def majority_each(s: frozenset) -> bool:
    return (sum(1 for x in s if GROUPS[x] == "A") >= 2
            and sum(1 for x in s if GROUPS[x] == "B") >= 2)


def test_groups_default_is_majority_in_every_group():
    q = Quorum(SIX, group=GROUPS)
    for s in subsets(SIX):
        assert q.is_quorum(s) == majority_each(s), s
    # a plain majority of the cluster is not enough when one group lacks one
    assert not q.is_quorum({"a1", "a2", "a3", "b1"})
    assert q.is_quorum({"a1", "a2", "b1", "b2"})


def test_group_fn_majority_in_each_group_is_accepted_and_used():
    def fn(ids):
        return majority_each(ids)

    q = Quorum(SIX, group=GROUPS, group_fn=fn)
    for s in subsets(SIX):
        assert q.is_quorum(s) == majority_each(s)


def test_unsafe_group_fn_is_refused_with_two_disjoint_accepted_sets():
    def either_group(ids):  # a majority in A *or* in B: {a1,a2} and {b1,b2} are disjoint
        return (sum(1 for x in ids if GROUPS[x] == "A") >= 2
                or sum(1 for x in ids if GROUPS[x] == "B") >= 2)

    with pytest.raises(ConfigurationError) as ei:
        Quorum(SIX, group=GROUPS, group_fn=either_group)
    a, b = named_sets(str(ei.value))
    a = {x.strip("'") for x in a}
    b = {x.strip("'") for x in b}
    assert not (a & b)
    assert either_group(frozenset(a)) and either_group(frozenset(b))


def test_group_must_cover_every_node():
    with pytest.raises(ConfigurationError, match="no entry"):
        Quorum(SIX, group={k: v for k, v in GROUPS.items() if k != "b3"})
    with pytest.raises(ConfigurationError, match="unknown"):
        Quorum(SIX, group={**GROUPS, "zz": "A"})


def test_rule_that_never_accepts_the_whole_cluster_is_refused():
    with pytest.raises(ConfigurationError, match="whole cluster"):
        Quorum([1, 2, 3], group_fn=lambda ids: False)


def test_group_fn_errors_are_reported():
    def boom(ids):
        raise KeyError("x")

    with pytest.raises(ConfigurationError, match="group_fn raised"):
        Quorum([1, 2, 3], group_fn=boom)


def test_non_monotone_group_fn_is_closed_upwards():
    # Accepts exactly {1, 2} and {2, 3}: every superset of an accepted set is a quorum.
    q = Quorum([1, 2, 3, 4], group_fn=lambda ids: ids in ({1, 2}, {2, 3}))
    assert q.is_quorum({1, 2}) and q.is_quorum({1, 2, 4}) and q.is_quorum({1, 2, 3, 4})
    assert not q.is_quorum({1, 3, 4})
    assert not q.is_quorum({2})


def test_count_and_group_fn_combine():
    q = Quorum(SIX, quorum=5, group=GROUPS, group_fn=majority_each)
    assert not q.is_quorum({"a1", "a2", "b1", "b2"})
    assert q.is_quorum({"a1", "a2", "b1", "b2", "b3"})


def brute_force_disjoint(ids, accepts) -> bool:
    acc = [s for s in subsets(ids) if accepts(s)]
    return any(not (a & b) for a, b in itertools.combinations_with_replacement(acc, 2))


@pytest.mark.parametrize("seed", range(60))
def test_refusal_agrees_with_brute_force_on_random_rules(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    ids = list(range(n))
    all_sets = list(subsets(ids))
    # Random rules biased towards big sets, so that both outcomes are common.
    table = {s: rng.random() < (len(s) / n) ** 2 * 0.9 for s in all_sets}
    table[frozenset(ids)] = True
    unsafe = brute_force_disjoint(ids, table.__getitem__)
    if unsafe:
        with pytest.raises(ConfigurationError) as ei:
            Quorum(ids, group_fn=table.__getitem__)
        a, b = (frozenset(int(x) for x in s) for s in named_sets(str(ei.value)))
        assert table[a] and table[b] and not (a & b)
    else:
        q = Quorum(ids, group_fn=table.__getitem__)
        for s in all_sets:
            assert q.is_quorum(s) == any(table[t] for t in all_sets if t <= s)


@pytest.mark.parametrize("seed", range(20))
def test_highest_matches_brute_force(seed):
    rng = random.Random(seed)
    for q in (Quorum(SIX), Quorum(SIX, group=GROUPS), Quorum(SIX, quorum=5),
              Quorum(SIX, group_fn=lambda s: majority_each(s) and "a1" in s)):
        values = {i: rng.randint(-1, 9) for i in SIX}
        expect = max((v for v in range(-1, 10)
                      if q.is_quorum({i for i in SIX if values[i] >= v})), default=-1)
        assert q.highest(values) == expect


def test_enumeration_is_fast_enough_and_bounded():
    ids = list(range(14))
    t0 = time.perf_counter()
    q = Quorum(ids, group_fn=lambda s: len(s) >= 8)
    assert time.perf_counter() - t0 < 5
    assert q.is_quorum(range(8)) and not q.is_quorum(range(7))
    with pytest.raises(ConfigurationError, match="at most 16 .*use group= alone"):
        Quorum(list(range(17)), group_fn=lambda s: True)


def test_common_rules_are_never_enumerated_and_group_fn_is_checked_once():
    """Majority, quorum=N and a majority per group intersect by construction: no 2**n walk,
    whatever n. A group_fn rule is enumerated once per process, not once per node."""
    ids = list(range(40))
    group = {i: i % 3 for i in ids}
    t0 = time.perf_counter()
    for _ in range(40):
        Quorum(ids)
        Quorum(ids, quorum=30)
        Quorum(ids, group=group)
    assert time.perf_counter() - t0 < 1
    calls = []

    def fn(s):
        calls.append(1)
        return len(s) >= 7

    ids = list(range(12))
    Quorum(ids, group_fn=fn)
    first = len(calls)
    assert first > 0
    for _ in range(10):
        assert Quorum(ids, group_fn=fn).is_quorum(range(7))
    assert len(calls) == first
