"""Issue 12: ``RaftNode.append(data, key=(client_id, seq))``: a retry of a keyed append is
applied at most once, on every replica, and returns the first attempt's result."""

from __future__ import annotations

import msgpack
import pytest
import trio
from cluster import cluster

from tinyraftplus.errors import InvalidArgumentError, LeadershipLostError
from tinyraftplus.idempotency import MAGIC, KeyExpiredError, KeyTable, unwrap, wrap


def test_the_table_answers_duplicates_and_refuses_what_it_forgot():
    t = KeyTable(window=3, max_clients=2)
    seen = []

    def sm(bufs, seq):  # results: how many entries it has seen
        out = []
        for b in bufs:
            seen.append(b)
            out.append(None if b is None else len(seen))
        return out

    apply = t.wrap_apply(sm, False)
    a1, a2 = wrap(b"x", ("a", 1)), wrap(b"y", ("a", 2))
    assert apply([a1, a2, a1], 0) == [1, 2, 1]  # the same key twice in one batch
    assert seen == [b"x", b"y", None]
    assert apply([a2], 3) == [2]  # a later duplicate: the recorded result, not applied
    assert seen[-1] is None
    for k in (3, 4, 5):
        apply([wrap(b"z", ("a", k))], 10 + k)
    with pytest.raises(KeyExpiredError):
        from tinyraftplus.idempotency import result_of

        result_of(apply([a1], 20)[0])  # seq 1 fell out of the window of 3
    assert seen[-1] is None  # and was not applied
    # Plain payloads pass untouched, even one that starts like an envelope.
    tricky = MAGIC + b"not an envelope"
    assert wrap(tricky, None) != tricky
    assert apply([b"plain", wrap(tricky, None)], 30) == [len(seen) - 1, len(seen)]
    assert seen[-2:] == [b"plain", tricky]
    # At most max_clients clients, least recently used out, the same on every replica.
    apply([wrap(b"1", ("b", 1))], 40)
    apply([wrap(b"1", ("c", 1))], 41)
    assert list(t.clients) == ["b", "c"]
    again = KeyTable()
    again.load(t.dump())
    assert again.clients == t.clients and (again.window, again.max_clients) == (3, 2)


def test_keys_are_checked():
    for bad in ("k", ("a",), ("a", -1), ("a", 1.5), (None, 1), (True, 1), (b"a", 1)):
        with pytest.raises(InvalidArgumentError):
            wrap(b"x", bad)
    assert unwrap(wrap(b"data", ("c", 7))) == (("c", 7), b"data")


async def test_a_retried_append_is_applied_once_on_every_replica(tmp_path):
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        follower = next(n for n in c.nodes.values() if n is not leader)
        r1 = await leader.append(b"+1", key=("client-7", 1))
        # The answer was lost (say): the caller retries through another node.
        r2 = await follower.append(b"+1", key=("client-7", 1))
        assert r2.result == r1.result and r2.seq != r1.seq
        r3 = await follower.append(b"+1", key=("client-7", 2))
        assert r3.result == r1.result + 1
        plain = await leader.append(MAGIC + b"looks like an envelope")
        assert plain.result == r3.result + 1
        await c.converge()
        for i, sm in c.sms.items():
            data = [b for _, b in sm.seen if b is not None]
            assert data == [b"+1", b"+1", MAGIC + b"looks like an envelope"], (i, sm.seen)
            assert c.nodes[i].keys.duplicates == 1


async def test_retry_after_a_lost_leadership_is_safe(tmp_path, monkeypatch):
    """The situation the key is for: the append was proposed, the caller got
    LeadershipLostError, the entry was committed anyway; the retry returns its result."""
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        real = type(leader)._append

        async def lose_the_answer(self, items):
            await real(self, items)  # committed and applied ...
            raise LeadershipLostError("lost (simulated)")  # ... but the caller is not told

        monkeypatch.setattr(type(leader), "_append", lose_the_answer)
        with pytest.raises(LeadershipLostError):
            await leader.append(b"+1", key=(42, 0))
        monkeypatch.setattr(type(leader), "_append", real)
        r = await leader.append(b"+1", key=(42, 0))  # the retry rule: same key again
        assert r.result == 1
        await c.converge()
        assert all(sm.count == 1 for sm in c.sms.values())


async def test_an_async_state_machine_gets_the_same(tmp_path):
    got = []

    async def apply(bufs, seq):
        await trio.sleep(0)
        got.extend(b for b in bufs if b is not None)
        return [msgpack.packb(len(got)) for _ in bufs]

    async with cluster(tmp_path, n=1, machines=False, apply=apply) as c:
        node = await c.leader()
        a = await node.append(b"x", key=("k", 5))
        b = await node.append(b"x", key=("k", 5))
        assert a.result == b.result and got == [b"x"]
