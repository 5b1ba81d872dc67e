"""The linearizability checker on hand-written histories, with a brute-force oracle.

Each history is small enough that an independent checker (try every permutation of the
operations that respects real-time order, and every subset of the pending ones) decides it
too; random histories are cross-checked against that oracle so the search, the memoisation
and the pruning can each be wrong and be caught.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tinyraftplus.errors import InvalidArgumentError
from tinyraftplus.sim.linearizable import (
    History,
    KVModel,
    Operation,
    check,
    check_key,
    minimal_offending_set,
)

_ids = itertools.count()


def op(kind, key, inp, out, call, ret, client="c"):
    return Operation(next(_ids), client, key, kind, inp, out, call, ret)


def put(key, v, call, ret, client="c"):
    return op("put", key, v, None, call, ret, client)


def app(key, v, call, ret, client="c"):
    return op("append", key, v, None, call, ret, client)


def get(key, out, call, ret, client="c"):
    return op("get", key, None, out, call, ret, client)


# --- an independent oracle: brute force over orders --------------------------------------

def _apply(state, o):
    if o.kind == "put":
        return True, o.input
    if o.kind == "append":
        return True, (state or "") + o.input
    return (o.ret is None or o.output == state), state


def brute_force(ops):
    """Linearizable iff some subset of pending ops plus all completed ops has a
    real-time-respecting order whose outputs match; straight from the definition."""
    by_key = {}
    for o in ops:
        by_key.setdefault(o.key, []).append(o)
    for kops in by_key.values():
        done = [o for o in kops if o.ret is not None]
        pend = [o for o in kops if o.ret is None]
        found = False
        for r in range(len(pend) + 1):
            for chosen in itertools.combinations(pend, r):
                for perm in itertools.permutations(done + list(chosen)):
                    # real-time: if a returned before b was called, a must come first
                    good = True
                    for x in range(len(perm)):
                        for y in range(x + 1, len(perm)):
                            b, a = perm[x], perm[y]
                            if a.ret is not None and a.ret < b.call:
                                good = False
                                break
                        if not good:
                            break
                    if not good:
                        continue
                    state = None
                    for o in perm:
                        ok, state = _apply(state, o)
                        if not ok:
                            good = False
                            break
                    if good:
                        found = True
                        break
                if found:
                    break
            if found:
                break
        if not found:
            return False
    return True


# --- hand-written histories -------------------------------------------------------------

def test_empty_history_is_linearizable():
    assert check([]).ok is True


def test_sequential_history():
    h = [put("x", "a", 0, 1), get("x", "a", 2, 3), app("x", "b", 4, 5), get("x", "ab", 6, 7)]
    res = check(h)
    assert res.ok is True
    assert res.ops == 4


def test_read_of_missing_key_is_none():
    assert check([get("x", None, 0, 1)]).ok is True
    assert check([get("x", "", 0, 1)]).ok is False


def test_stale_read_is_caught_and_shrunk_to_the_three_ops_that_show_it():
    w1 = put("x", "1", 0, 1)
    w2 = put("x", "2", 2, 3)
    r = get("x", "1", 4, 5)
    noise = get("y", None, 0, 10)
    res = check([w1, w2, r, noise])
    assert res.ok is False
    (bad,) = res.failures
    assert bad.key == "x"
    assert {o.id for o in bad.offending} == {w1.id, w2.id, r.id}
    text = res.explain()
    assert "NOT linearizable" in text and f"#{r.id}" in text


def test_lost_write_is_caught():
    w = put("x", "1", 0, 1)
    r = get("x", None, 2, 3)
    res = check([w, r])
    assert res.ok is False
    assert {o.id for o in res.failures[0].offending} == {w.id, r.id}


def test_read_of_value_never_written():
    w = put("x", "1", 0, 1)
    r = get("x", "9", 2, 3)
    res = check([w, r])
    assert res.ok is False
    # the write is not needed to show the problem: the read alone is impossible
    assert [o.id for o in res.failures[0].offending] == [r.id]


def test_concurrent_overlapping_ops_may_take_either_order():
    # two writes overlap, reads during and after may see either, but consistently
    w1 = put("x", "1", 0, 10, "a")
    w2 = put("x", "2", 1, 9, "b")
    assert check([w1, w2, get("x", "1", 11, 12)]).ok is True
    assert check([w1, w2, get("x", "2", 11, 12)]).ok is True
    # both reads after both writes returned must agree
    assert check([w1, w2, get("x", "2", 11, 12), get("x", "1", 13, 14, "c")]).ok is False
    # a read overlapping the writes may see the older value first, then the newer
    assert check([w1, w2, get("x", None, 0.5, 2, "c"), get("x", "1", 3, 4, "c"),
                  get("x", "2", 5, 20, "c")]).ok is True


def test_reads_flip_flopping_is_not_linearizable():
    w1 = put("x", "1", 0, 1)
    w2 = put("x", "2", 2, 10, "b")
    # during w2 a reader sees 2 and then 1 again: once 2 is visible, 1 cannot come back
    h = [w1, w2, get("x", "2", 3, 4, "r"), get("x", "1", 5, 6, "r")]
    assert check(h).ok is False


def test_appends_order():
    h = [app("x", "<a>", 0, 5, "a"), app("x", "<b>", 0, 5, "b"), get("x", "<b><a>", 6, 7)]
    assert check(h).ok is True
    h2 = [app("x", "<a>", 0, 1, "a"), app("x", "<b>", 2, 3, "b"), get("x", "<b><a>", 6, 7)]
    assert check(h2).ok is False


def test_pending_write_may_take_effect_late_or_never():
    w = put("x", "1", 0, None)  # never returned
    assert check([w, get("x", None, 5, 6)]).ok is True
    assert check([w, get("x", "1", 5, 6)]).ok is True
    assert check([w, get("x", "1", 5, 6), get("x", None, 7, 8)]).ok is False
    # never before its call
    assert check([get("x", "1", 0, 0.5, "r"), put("x", "1", 1, None)]).ok is False
    # a pending op's recorded output is ignored
    assert check([op("put", "x", "1", "garbage", 0, None)]).ok is True


def test_pending_appends_in_any_order_or_not_at_all():
    a = app("x", "<a>", 0, None, "a")
    b = app("x", "<b>", 0, None, "b")
    for seen in ["", "<a>", "<b>", "<a><b>", "<b><a>"]:
        assert check([a, b, get("x", seen or None, 1, 2)]).ok is True
    assert check([a, b, get("x", "<a><a>", 1, 2)]).ok is False


def test_keys_are_independent():
    h = [put("x", "1", 0, 1), put("y", "2", 0, 1), get("x", "1", 2, 3), get("y", "2", 2, 3)]
    res = check(h)
    assert res.ok is True and len(res.keys) == 2


def test_history_recorder():
    h = History()
    a = h.invoke("c1", "x", "put", "1", 0.0)
    b = h.invoke("c2", "x", "get", None, 0.5)
    c = h.invoke("c3", "x", "put", "2", 0.6)
    h.ok(a, None, 1.0)
    h.ok(b, "1", 1.5)
    h.fail(c)  # certainly did not happen: dropped
    d = h.invoke("c3", "x", "put", "3", 2.0)
    h.info(d)  # maybe
    ops = h.operations()
    assert len(ops) == 3 == len(h)
    assert [o.pending for o in sorted(ops, key=lambda o: o.id)] == [False, False, True]
    assert check(h).ok is True
    with pytest.raises(InvalidArgumentError):
        h.ok(a, None, 3.0)
    with pytest.raises(InvalidArgumentError):
        h.ok(99, None, 3.0)


def test_return_before_call_is_refused():
    with pytest.raises(InvalidArgumentError, match="before its call"):
        check([put("x", "1", 5, 4)])


def test_unknown_kind_is_refused():
    with pytest.raises(InvalidArgumentError, match="unknown kind"):
        check([op("cas", "x", "1", None, 0, 1)])


def test_budget_gives_unknown_not_a_wrong_answer():
    # many concurrent pending appends: too many configurations for a tiny budget
    h = [app("x", f"<{i}>", 0, None, i) for i in range(8)]
    h.append(get("x", "<3><1>", 1, 2, "r"))
    h.append(get("x", "<3><1><7>", 3, 4, "r"))
    verdict, states = check_key(h, KVModel(), "x", max_states=50)
    assert verdict is None and states > 50
    assert check(h).ok is True


def test_long_sequential_history_is_fast():
    h = []
    t = 0.0
    val = ""
    for i in range(2000):
        if i % 3 == 2:
            h.append(get("x", val or None, t, t + 0.5))
        else:
            h.append(app("x", f"<{i}>", t, t + 0.5))
            val += f"<{i}>"
        t += 1
    verdict, states = check_key(h, KVModel(), "x")
    assert verdict is True and states <= 2 * len(h) + 1


# --- randomised cross-check against the brute-force oracle -------------------------------

def _random_history(rng: random.Random):
    """Simulate a real register with concurrent clients, then maybe corrupt one output."""
    n_ops = rng.randint(1, 6)
    ops = []
    state = None
    t = 0.0
    pending = []
    for i in range(n_ops):
        kind = rng.choice(["put", "append", "get"])
        call = t
        t += rng.random()
        if kind == "put":
            state = f"<{i}>"
            out = None
            inp = state
        elif kind == "append":
            state = (state or "") + f"<{i}>"
            out = None
            inp = f"<{i}>"
        else:
            out = state
            inp = None
        # the op took effect at ``t``; its call may be earlier and its return later
        call = max(0.0, call - rng.random() * 2)
        ret = None if (kind != "get" and rng.random() < 0.2) else t + rng.random() * 2
        t += rng.random() * 0.5
        o = Operation(i, rng.randint(0, 2), "x", kind, inp, out, call, ret)
        ops.append(o)
        if ret is None:
            pending.append(o)
    if rng.random() < 0.5:
        # corrupt one read's output
        reads = [i for i, o in enumerate(ops) if o.kind == "get"]
        if reads:
            i = rng.choice(reads)
            o = ops[i]
            bad = rng.choice([None, "<0>", "<1>", "<0><1>", "<9>"])
            ops[i] = Operation(o.id, o.client, o.key, o.kind, o.input, bad, o.call, o.ret)
    # pending ops that "never happened" in this run are still allowed to be dropped
    return ops


def test_random_histories_agree_with_brute_force():
    rng = random.Random(1234)
    outcomes = {True: 0, False: 0}
    for _ in range(1500):
        h = _random_history(rng)
        expect = brute_force(h)
        res = check(h, shrink=False)
        assert res.ok is expect, "\n".join(o.describe() for o in h)
        outcomes[expect] += 1
        if expect is False:
            small = minimal_offending_set(h)
            assert brute_force(small) is False
    # the generator must produce plenty of both kinds or this test proves little
    assert outcomes[True] > 300 and outcomes[False] > 100, outcomes


def test_minimal_set_is_one_minimal():
    rng = random.Random(99)
    checked = 0
    model = KVModel()
    for _ in range(400):
        h = _random_history(rng)
        if brute_force(h):
            continue
        small = minimal_offending_set(h)
        for i in range(len(small)):
            rest = small[:i] + small[i + 1:]
            if any(model.observes(r, small[i]) for r in rest):
                continue
            assert brute_force(rest) is True
        checked += 1
    assert checked > 50


def test_many_unobserved_pending_writes_stay_cheap():
    # 40 writes never returned; reads observe only two of them. Without leaving out the
    # unobserved ones this would be 2^40 configurations; the verdicts must stay exact.
    h = [app("x", f"<{i}>", i * 0.1, None, i) for i in range(40)]
    h.append(put("x", "<p>", 0, None, "p"))
    h.append(get("x", "<p><7>", 5, 6, "r"))
    h.append(get("x", "<p><7><31>", 7, 8, "r"))
    res = check(h)
    assert res.ok is True and res.keys[0].states < 1000
    # a pending write may still show up late, but never before it was called:
    late = app("x", "<late>", 9, None, "l")
    assert check(h + [late, get("x", "<p><7><31>", 8.5, 8.6, "r")]).ok is True
    assert check(h + [late, get("x", "<p><late>", 8.5, 8.8, "r2")]).ok is False
