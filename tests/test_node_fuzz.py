"""Throw random and mutated messages at a live 3-node cluster: it must stay available and
consistent, and every bad message must be dropped with a warning, never raised."""

from __future__ import annotations

import dataclasses
import random

import trio
from cluster import cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyraftplus.entry import Entry
from tinyraftplus.errors import RaftError
from tinyraftplus.raft import messages as m

ints = st.one_of(
    st.integers(-5, 5), st.integers(-(2**70), 2**70), st.booleans(), st.none(), st.floats(),
    st.text(max_size=3), st.binary(max_size=3),
)


def mutate(rng: random.Random, msg):
    """Replace one field of a valid message with something random (often invalid)."""
    fields = [f.name for f in dataclasses.fields(msg)]
    name = rng.choice(fields)
    choices = [-1, -2, 0, 1, 2**63, 2**64, -(2**63), None, "x", b"x", 1.5, True, (), ("a",),
               (Entry(0, 0, b"x"),), (Entry(-7, 1, b""),), [1, 2], {"a": 1}]
    return dataclasses.replace(msg, **{name: rng.choice(choices)})


def plausible(rng: random.Random, term: int):
    """Well-formed messages a real but out-of-date peer could send: stale terms for anything
    that carries entries or commit information. (A peer that forges well-formed messages of
    the current term is Byzantine, which Raft does not claim to survive.)"""
    t = max(term - rng.choice([1, 2, 3]), 0)
    kinds = [
        lambda: m.AppendEntries(t, rng.randint(-1, 30), rng.randint(0, t), (), rng.randint(-1, 30)),
        lambda: m.AppendEntries(
            t, 2, max(t - 1, 0), tuple(Entry(3 + k, t, b"zz") for k in range(3)), 100),
        lambda: m.AppendResponse(t, rng.random() < 0.5, rng.randint(-1, 40), 0, -1),
        lambda: m.RequestVote(max(t, 1), rng.randint(-1, 50), rng.randint(0, max(t, 1))),
        lambda: m.RequestVote(term + 1, 0, 0, pre_vote=True),  # future term, stale log
        lambda: m.RequestVote(term + 1, -1, 0),
        lambda: m.VoteResponse(t, rng.random() < 0.5, rng.random() < 0.5),
        lambda: m.TimeoutNow(max(t, 1)),
        lambda: m.ReadIndex(t, rng.randint(0, 9)),
        lambda: m.ReadIndexResponse(t, rng.randint(0, 9), rng.randint(-2, 40)),
        lambda: m.Propose(rng.randint(0, 9), (b"fuzz",)),
        lambda: m.ProposeResponse(rng.randint(10**6, 10**7), rng.randint(-1, 40), t),
    ]
    return rng.choice(kinds)()


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32), junk=st.lists(ints, max_size=5))
def test_random_messages_do_not_break_a_live_cluster(tmp_path_factory, seed, junk):
    root = tmp_path_factory.mktemp("fuzz")

    async def main():
        rng = random.Random(seed)
        async with cluster(root, 3, append_timeout=10.0) as c:
            await c.leader()
            warns = []
            for node in c.running():
                node.on("warn", lambda ev: warns.append(ev.message))
            acked = []
            for round_ in range(10):
                for _ in range(20):
                    target = rng.choice(c.running())
                    frm = rng.choice([i for i in c.ids if i != target.node_id] + [99, "x"])
                    base = plausible(rng, target.term)
                    msg = mutate(rng, base) if rng.random() < 0.6 else base
                    if rng.random() < 0.1 or frm in (99, "x"):
                        # A node follows a leader outside its configuration (membership:
                        # it may not know it yet), so a well-formed message from an unknown
                        # id is a forged one, like any other (Byzantine, out of the fault
                        # model); unknown ids send what validation must drop.
                        msg = rng.choice(junk) if junk else object()
                    target.receive(frm, msg)  # must never raise
                await trio.sleep(0.005)
                # Forged higher-term votes from real node ids can depose the leader, so an
                # append may be lost (LeadershipLostError); available means a retry succeeds.
                for _attempt in range(20):
                    try:
                        r = await rng.choice(c.running()).append(b"ok%d" % round_)
                    except RaftError:
                        continue
                    acked.append((r.seq, r.data))
                    break
                else:
                    raise AssertionError("the cluster stopped accepting appends")
            await c.leader()
            await c.converge()
            for node in c.running():
                for seq, data in acked:
                    assert node.log.entries(seq, seq, 1 << 20)[0].data == data
            assert warns, "bad messages must produce warnings"

    trio.run(main)
