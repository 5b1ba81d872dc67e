"""Raft core tests named after the sections of the Raft paper (Ongaro & Ousterhout, 2014).

Every scenario runs on ``tinyraftplus.raft.testing.Cluster``, which drives the cores
exactly as the contract says and fails on two leaders in a term or two different entries
applied at one seq; the tests add the section's own property on top."""

from __future__ import annotations

import dataclasses

import pytest

from tinyraftplus.entry import Entry
from tinyraftplus.raft.core import HardState, RaftConfig, RaftCore, Role
from tinyraftplus.raft.memory import MemoryLog
from tinyraftplus.raft.messages import AppendEntries, AppendResponse, RequestVote, VoteResponse
from tinyraftplus.raft.testing import Cluster, messages_of

T = RaftConfig().election_timeout


def ent(seq: int, term: int) -> Entry:
    # Same seq and term -> same payload, as the log matching property demands.
    return Entry(seq, term, f"t{term}s{seq}".encode())


def log_of(terms: list[int]) -> MemoryLog:
    return MemoryLog(ent(s, t) for s, t in enumerate(terms))


# --- 5.2 leader election ------------------------------------------------------------------


@pytest.mark.parametrize("n,down", [(1, 0), (3, 0), (3, 1), (5, 0), (5, 1), (5, 2)])
def test_5_2_election_elects_one_leader(n, down):
    ids = list(range(1, n + 1))
    c = Cluster(ids, seed=n * 10 + down)
    for i in ids[:down]:
        c.crash(i)
    took = c.run_until(lambda: c.leader() is not None, timeout=10 * T)
    leader = c.leader()
    assert leader not in ids[:down]
    c.advance(1.0)
    # Every live node follows that leader in its term.
    for i in c.up():
        core = c.cores[i]
        assert core.term == c.cores[leader].term
        assert core.leader == leader
    # With PreVote and one round, the first election normally completes within 2T + a bit.
    assert took < 6 * T


@pytest.mark.parametrize("n,delayed", [(5, 1), (5, 2), (3, 1)])
def test_5_2_election_and_commit_with_slow_nodes(n, delayed):
    ids = list(range(1, n + 1))
    c = Cluster(ids, seed=30 + n + delayed)
    for i in ids[:delayed]:
        c.delay[i] = 0.2  # 0.4 s round trips: close to the election timeout
    c.run_until(lambda: c.leader() is not None, timeout=20 * T)
    c.advance(1.0)
    leader = c.leader()
    terms = {c.cores[i].term for i in ids}
    c.propose([b"slow"], at=leader)
    c.advance(2.0)
    assert all(c.data(i) == [b"slow"] for i in ids)  # the slow nodes catch up too
    assert c.leader() == leader and {c.cores[i].term for i in ids} == terms  # stable


def test_5_2_no_leader_without_a_majority():
    c = Cluster([1, 2, 3, 4, 5], seed=3)
    for i in (1, 2, 3):
        c.crash(i)
    c.advance(20 * T)
    assert c.leader() is None
    # PreVote: failed pre-elections do not inflate terms.
    assert all(c.cores[i].term == 0 for i in c.up())


def test_5_2_election_timeouts_are_randomised_in_T_to_2T():
    seen = []
    for seed in range(200):
        import random

        core = RaftCore(1, [1, 2, 3], MemoryLog(), HardState(), rng=random.Random(seed), now=5.0)
        d = core.next_deadline - 5.0
        assert T <= d < 2 * T
        seen.append(d)
    assert max(seen) - min(seen) > 0.8 * T  # spread over the window, not a constant


@pytest.mark.parametrize("seed", range(40))
def test_5_2_election_safety_under_partitions_and_crashes(seed):
    ids = [1, 2, 3, 4, 5]
    c = Cluster(ids, seed=seed, loss=0.05, duplicate=0.05, reorder=0.2)
    rng = c.rng
    for _ in range(40):
        what = rng.random()
        down = [i for i in ids if i not in c.cores]
        if what < 0.3:
            a = rng.sample(ids, rng.randint(1, 4))
            c.partition(a, [i for i in ids if i not in a])
        elif what < 0.5:
            c.heal()
        elif what < 0.7 and c.leader() is not None and len(down) < 2:
            c.crash(c.leader())
        elif what < 0.9 and down:
            c.start(rng.choice(down))
        leader = c.leader()
        if leader is not None:
            try:
                c.propose([f"v{seed}-{_}".encode()], at=leader)
            except Exception:
                pass
        c.advance(rng.uniform(0.05, 2 * T))
    assert len(c.leaders) >= 3  # the schedule really forced elections
    # The cluster checked election safety and state machine safety at every step.
    c.heal()
    for i in ids:
        if i not in c.cores:
            c.start(i)
    c.run_until(lambda: c.leader() is not None, timeout=20 * T)
    c.propose([b"final"])
    c.run_until(lambda: all(c.data(i)[-1:] == [b"final"] for i in ids), timeout=20 * T)
    c.check_log_matching()
    for term, who in c.leaders.items():
        assert len(who) == 1, (term, who)


# --- 5.3 log replication ------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5])
def test_5_3_replication_commits_on_every_node(n):
    ids = list(range(1, n + 1))
    c = Cluster(ids, seed=n)
    c.wait_leader()
    for k in range(6):
        c.propose([f"e{k}".encode()])
    c.propose([b"b0", b"b1", b"b2"])
    c.advance(3 * c.config.heartbeat_interval)
    want = [f"e{k}".encode() for k in range(6)] + [b"b0", b"b1", b"b2"]
    for i in ids:
        assert c.data(i) == want
        assert c.cores[i].commit_seq == c.logs[i].seq
        assert c.logs[i].all() == c.logs[c.leader()].all()


def test_5_3_new_leader_appends_a_noop():
    c = Cluster([1, 2, 3], seed=1)
    leader = c.wait_leader()
    c.advance(0.3)
    first = c.logs[leader].all()[0]
    assert first == Entry(0, c.cores[leader].term, b"")
    assert all(c.applied[i][:1] == [first] for i in c.ids)


FIG7_LEADER = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIG7_FOLLOWERS = {
    "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],
    "b": [1, 1, 1, 4],
    "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    "e": [1, 1, 1, 4, 4, 4, 4],
    "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
}


def test_5_3_figure_7_follower_logs_are_repaired_by_term():
    ids = ["L", *FIG7_FOLLOWERS]
    c = Cluster(ids, seed=7, start=False)
    c.logs["L"] = log_of(FIG7_LEADER)
    for k, terms in FIG7_FOLLOWERS.items():
        c.logs[k] = log_of(terms)
    for i in ids:
        c.hard[i] = HardState(term=7)
        c.start(i)
    c.cores["L"].campaign()  # term 8; a, b, e, f vote for it (c and d hold newer logs)
    c.handle("L")
    c.stabilize()
    assert c.cores["L"].role is Role.LEADER and c.cores["L"].term == 8
    c.advance(3 * c.config.heartbeat_interval)
    want = log_of(FIG7_LEADER).all() + [Entry(10, 8, b"")]
    for i in ids:
        assert c.logs[i].all() == want, i
        assert c.cores[i].commit_seq == 10
    # Back-off by term: f's three extra terms cost at most three rejections, not eight.
    rejections_to = {}
    for frm, _, m in messages_of(c.sent, AppendResponse):
        if not m.success:
            rejections_to[frm] = rejections_to.get(frm, 0) + 1
    assert rejections_to.get("f", 0) <= 3
    assert rejections_to.get("e", 0) <= 2
    assert rejections_to.get("b", 0) <= 1
    c.check_log_matching()


# --- 5.4 safety ---------------------------------------------------------------------------


def test_5_4_1_votes_refused_to_out_of_date_candidates():
    core = RaftCore(1, [1, 2, 3], log_of([1, 1, 2]), HardState(term=2))
    # Older last term, longer log: refused.
    core.step(2, RequestVote(term=3, last_seq=9, last_term=1))
    rd = core.ready()
    assert rd.messages_after_persist == [(2, VoteResponse(3, False))]
    assert rd.hard_state == HardState(3, None)  # the term is still adopted
    core.advance(rd)
    # Same last term, shorter log: refused.
    core.step(3, RequestVote(term=3, last_seq=1, last_term=2))
    rd = core.ready()
    assert rd.messages_after_persist == [(3, VoteResponse(3, False))]
    core.advance(rd)
    # Same last term, same length: granted, and the vote is persisted before the answer.
    core.step(3, RequestVote(term=4, last_seq=2, last_term=2))
    rd = core.ready()
    assert rd.hard_state == HardState(4, 3)
    assert rd.messages_after_persist == [(3, VoteResponse(4, True))]
    assert rd.messages == []


def test_5_4_1_leader_completeness_elected_leader_holds_committed_entries():
    ids = [1, 2, 3, 4, 5]
    c = Cluster(ids, seed=11)
    first = c.wait_leader()
    for k in range(20):
        c.propose([f"x{k}".encode()])
    c.advance(0.3)
    committed = [e for e in c.logs[first].all() if e.seq <= c.cores[first].commit_seq]
    c.crash(first)
    second = c.wait_leader()
    assert second != first
    assert c.logs[second].all()[: len(committed)] == committed


def _figure8(bug: bool) -> Cluster:
    """Raft figure 8. S1 leads term 4 and gets its term-2 entry at seq 1 onto a majority
    (S1, S2, S3) while its own term-4 entries go nowhere; then S1 fails and S5, whose seq 1
    holds a term-3 entry, is elected and overwrites seq 1 everywhere."""
    ids = ["S1", "S2", "S3", "S4", "S5"]
    # Plain Raft (no PreVote lease) so that S5 can campaign the moment S1 is gone.
    cfg = RaftConfig(rpc_max=1, pre_vote=False, check_quorum=False)
    c = Cluster(ids, seed=8, config=cfg, start=False, strict=False,
                bugs={"S1": ["commit_old_term"]} if bug else None)
    c.logs["S1"] = log_of([1, 2])
    c.logs["S2"] = log_of([1, 2])
    c.logs["S3"] = log_of([1])
    c.logs["S4"] = log_of([1])
    c.logs["S5"] = log_of([1, 3])
    for i in ids:
        c.hard[i] = HardState(term=3)
    for i in ids[:4]:
        c.start(i)

    def strip_term4(frm, to, m):
        # S1's term-4 entries never arrive, and S1 fails before telling anyone what it
        # committed (so only S1 itself can have applied seq 1).
        if type(m) is AppendEntries:
            return dataclasses.replace(
                m, entries=tuple(e for e in m.entries if e.term < 4), commit_seq=-1
            )
        return m

    c.rewrite = strip_term4
    c.cores["S1"].campaign()
    c.handle("S1")
    c.stabilize()
    assert c.cores["S1"].role is Role.LEADER and c.cores["S1"].term == 4
    c.advance(0.5)
    # The term-2 entry is on S1, S2, S3 (a majority), S4 too.
    assert all(c.logs[i].all()[1:2] == [ent(1, 2)] for i in ("S1", "S2", "S3"))
    return c


def test_5_4_2_figure_8_old_term_entries_are_not_committed_by_counting():
    c = _figure8(bug=False)
    assert c.cores["S1"].commit_seq < 1
    assert all(len(c.applied[i]) <= 1 for i in c.ids)
    c.rewrite = None
    c.crash("S1")
    c.hard["S5"] = HardState(term=4)
    c.start("S5")
    c.cores["S5"].campaign()
    c.handle("S5")
    c.stabilize()
    assert c.cores["S5"].role is Role.LEADER
    c.advance(0.5)
    assert c.violations == []
    assert c.logs["S2"].all()[1] == ent(1, 3)  # overwritten, and that was allowed


def test_5_4_2_figure_8_bug_hook_commit_old_term_loses_a_committed_entry():
    c = _figure8(bug=True)
    assert c.cores["S1"].commit_seq >= 1
    assert c.applied["S1"][1] == ent(1, 2)
    c.rewrite = None
    c.crash("S1")
    c.hard["S5"] = HardState(term=4)
    c.start("S5")
    c.cores["S5"].campaign()
    c.handle("S5")
    c.stabilize()
    c.advance(0.5)
    assert any("applied" in v for v in c.violations), c.violations


def test_5_4_3_restarted_follower_keeps_commit_and_catches_up():
    c = Cluster([1, 2, 3], seed=5)
    leader = c.wait_leader()
    f = next(i for i in c.ids if i != leader)
    c.propose([b"a", b"b"])
    c.advance(0.3)
    c.crash(f)
    c.propose([b"c"])
    c.advance(0.3)
    c.start(f)
    c.advance(0.5)
    assert c.data(f) == [b"a", b"b", b"c"]


# --- 5.5 / 5.6 failures and timing -------------------------------------------------------


def test_5_5_duplicated_and_reordered_messages_are_harmless():
    c = Cluster([1, 2, 3], seed=21, duplicate=0.3, reorder=0.5)
    c.wait_leader()
    for k in range(50):
        c.propose([f"m{k}".encode()])
        if k % 7 == 0:
            c.advance(0.05)
    c.advance(2.0)
    want = [f"m{k}".encode() for k in range(50)]
    for i in c.ids:
        assert c.data(i) == want
    c.check_log_matching()


def test_5_6_lost_messages_are_retried():
    c = Cluster([1, 2, 3], seed=22, loss=0.3)
    c.wait_leader(timeout=60)
    for k in range(30):
        leader = c.leader()
        if leader is not None and c.cores[leader].transfer_target is None:
            c.propose([f"m{k}".encode()], at=leader)
        c.advance(0.05)
    c.loss = 0.0
    c.advance(3.0)
    datas = {i: c.data(i) for i in c.ids}
    assert datas[1] == datas[2] == datas[3]
    assert len(datas[1]) >= 15
