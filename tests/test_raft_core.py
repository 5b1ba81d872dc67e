"""RaftCore beyond the paper: PreVote, CheckQuorum, priorities, ReadIndex, flow control,
replication groups, hard state across restarts, the driving protocol and the bug hooks."""

from __future__ import annotations

import random

import pytest

from tinyraftplus.entry import Entry
from tinyraftplus.errors import (
    ConfigurationError,
    InvalidArgumentError,
    NotLeaderError,
    UsageError,
)
from tinyraftplus.raft.core import HardState, RaftConfig, RaftCore, ReadState, Role
from tinyraftplus.raft.memory import MemoryLog
from tinyraftplus.raft.messages import (
    AppendEntries,
    AppendResponse,
    ReadIndex,
    ReadIndexResponse,
    RecoverResponse,
    RequestVote,
    TimeoutNow,
    VoteResponse,
)
from tinyraftplus.raft.quorum import Quorum
from tinyraftplus.raft.testing import Cluster, messages_of

T = RaftConfig().election_timeout
HB = RaftConfig().heartbeat_interval


def leader_core(n: int = 3, **cfg) -> tuple[RaftCore, MemoryLog]:
    """A core that won an election by hand-fed votes, its Ready handled and advanced."""
    log = MemoryLog()
    core = RaftCore(1, list(range(1, n + 1)), log, HardState(),
                    config=RaftConfig(**cfg), rng=random.Random(1))
    core.campaign()
    drive(core, log)
    for p in range(2, n // 2 + 2):
        core.step(p, VoteResponse(1, True))
    assert core.role is Role.LEADER
    drive(core, log)
    return core, log


def drive(core: RaftCore, log: MemoryLog):
    """Handle every Ready like a driver would; returns all messages sent."""
    out = []
    while core.has_ready():
        rd = core.ready()
        out += rd.messages
        if rd.truncate_after is not None:
            log.truncate_after(rd.truncate_after)
        log.append(rd.entries)
        core.advance(rd)
        out += rd.messages_after_persist
    return out


# --- PreVote ------------------------------------------------------------------------------


def test_prevote_changes_no_term_or_vote_on_either_side():
    log = MemoryLog()
    core = RaftCore(1, [1, 2, 3], log, HardState(term=3, vote=2), rng=random.Random(0))
    core.tick(core.next_deadline)
    assert core.role is Role.PRE_CANDIDATE and core.term == 3 and core.vote == 2
    rd = core.ready()
    assert rd.hard_state is None
    reqs = [m for _, m in rd.messages]
    assert reqs == [RequestVote(4, -1, 0, pre_vote=True)] * 2
    core.advance(rd)
    voter = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=3, vote=2), rng=random.Random(0))
    voter.tick(0.0)
    voter.step(1, reqs[0])
    rd = voter.ready()
    assert rd.hard_state is None
    assert rd.messages_after_persist == [(1, VoteResponse(4, True, pre_vote=True))]
    assert voter.term == 3 and voter.vote == 2


def test_prevote_rejoining_partitioned_node_does_not_disrupt_the_leader():
    c = Cluster([1, 2, 3], seed=4)
    leader = c.wait_leader()
    term = c.cores[leader].term
    lonely = next(i for i in c.ids if i != leader)
    c.partition([i for i in c.ids if i != lonely], [lonely])
    c.advance(10 * T)  # many election timeouts alone
    assert c.cores[lonely].term == term  # pre-votes failed; the term never moved
    c.heal()
    c.advance(5 * T)
    assert c.leader() == leader and c.cores[leader].term == term
    assert c.cores[lonely].leader == leader


def test_without_prevote_a_rejoining_node_disrupts_the_leader():
    cfg = RaftConfig(pre_vote=False, check_quorum=False)
    c = Cluster([1, 2, 3], seed=4, config=cfg)
    leader = c.wait_leader()
    term = c.cores[leader].term
    lonely = next(i for i in c.ids if i != leader)
    c.partition([i for i in c.ids if i != lonely], [lonely])
    c.advance(10 * T)
    assert c.cores[lonely].term > term + 3
    c.heal()
    c.advance(5 * T)
    assert min(c.cores[i].term for i in c.ids) > term  # the old leader was deposed


def test_lease_ignores_real_votes_but_transfer_overrides():
    c = Cluster([1, 2, 3], seed=2)
    leader = c.wait_leader()
    f = next(i for i in c.ids if i != leader)
    core = c.cores[f]
    term = core.term
    other = next(i for i in c.ids if i not in (leader, f))
    core.step(other, RequestVote(term + 1, 100, term, pre_vote=True))
    rd = core.ready()
    assert rd.messages_after_persist == [(other, VoteResponse(term, False, pre_vote=True))]
    core.advance(rd)
    core.step(other, RequestVote(term + 5, 100, term, pre_vote=False))
    assert core.term == term and core.vote != other
    rd = core.ready()
    assert not [m for _, m in rd.messages_after_persist if type(m) is VoteResponse]
    core.advance(rd)
    core.step(other, RequestVote(term + 5, 100, term, transfer=True))
    assert core.term == term + 5 and core.vote == other


# --- CheckQuorum --------------------------------------------------------------------------


def test_check_quorum_partitioned_leader_steps_down_within_two_timeouts():
    c = Cluster([1, 2, 3, 4, 5], seed=6)
    old = c.wait_leader()
    c.advance(0.3)
    c.partition([old], [i for i in c.ids if i != old])
    cut_at = c.now
    took = c.run_until(lambda: c.cores[old].role is not Role.LEADER, timeout=5 * T, step=0.01)
    assert took <= 2 * T + 0.02
    assert took >= T - 0.02  # not before a whole election timeout without a quorum
    new = c.wait_leader()
    assert new != old and c.now - cut_at < 5 * T


def test_without_check_quorum_an_isolated_leader_stays_leader():
    c = Cluster([1, 2, 3], seed=6, config=RaftConfig(check_quorum=False))
    old = c.wait_leader()
    c.partition([old], [i for i in c.ids if i != old])
    c.advance(10 * T)
    assert c.cores[old].role is Role.LEADER  # the scenario CheckQuorum exists for


# --- priorities ---------------------------------------------------------------------------


def test_priorities_shorten_election_timeouts():
    cfg = RaftConfig(priorities={1: 5, 2: 1})
    for seed in range(50):
        top = RaftCore(1, [1, 2, 3], MemoryLog(), HardState(), config=cfg,
                       rng=random.Random(seed))
        mid = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(), config=cfg,
                       rng=random.Random(seed))
        low = RaftCore(3, [1, 2, 3], MemoryLog(), HardState(), config=cfg,
                       rng=random.Random(seed))
        assert T <= top.next_deadline < mid.next_deadline < low.next_deadline < 2 * T


def test_priority_leader_hands_over_to_a_higher_priority_follower():
    cfg = RaftConfig(priorities={3: 10})
    c = Cluster([1, 2, 3], seed=9, config=cfg)
    c.crash(3)
    first = c.wait_leader()
    assert first != 3
    c.propose([b"a", b"b"])
    c.advance(0.3)
    c.start(3)
    c.run_until(lambda: c.leader() == 3, timeout=5 * T)
    assert any(to == 3 for _, to, _m in messages_of(c.sent, TimeoutNow))
    c.propose([b"c"])
    c.advance(0.3)
    for i in c.ids:
        assert c.data(i) == [b"a", b"b", b"c"]


def test_propose_refused_during_transfer():
    core, log = leader_core(3, priorities={2: 1})
    core.step(2, AppendResponse(1, True, core.last_seq))
    out = drive(core, log)
    assert (2, TimeoutNow(1)) in out
    assert core.transfer_target == 2
    with pytest.raises(NotLeaderError, match="handing leadership"):
        core.propose([b"x"])
    core.tick(core.next_deadline + T)  # the transfer timed out: lead on
    assert core.transfer_target is None
    core.propose([b"x"])


def test_timeout_now_makes_a_follower_campaign_with_transfer():
    core = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=4), rng=random.Random(0))
    core.step(1, AppendEntries(4, -1, 0, (), -1))  # node 1 leads term 4
    core.ready()
    core.advance(core._unadvanced)  # type: ignore[arg-type]
    core.step(1, TimeoutNow(4))
    assert core.role is Role.CANDIDATE and core.term == 5
    rd = core.ready()
    assert rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) == (5, 2)
    assert {m for _, m in rd.messages_after_persist} == {RequestVote(5, -1, 0, transfer=True)}


@pytest.mark.parametrize("sender, term", [(3, 4), (1, 5), (1, 3)])
def test_timeout_now_only_from_the_current_leader(sender, term):
    """A TimeoutNow from a node that is not this term's leader (or a duplicate that arrives
    after the campaign it started, hence from an older term) must not start an election:
    that election would bypass PreVote and the lease check."""
    core = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=4), rng=random.Random(0))
    core.step(1, AppendEntries(4, -1, 0, (), -1))
    core.ready()
    core.advance(core._unadvanced)  # type: ignore[arg-type]
    core.step(sender, TimeoutNow(term))
    assert core.role is Role.FOLLOWER and core.term == 4 and core.vote is None


def test_duplicated_timeout_now_starts_one_election():
    core = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=4), rng=random.Random(0))
    core.step(1, AppendEntries(4, -1, 0, (), -1))
    core.ready()
    core.advance(core._unadvanced)  # type: ignore[arg-type]
    core.step(1, TimeoutNow(4))
    core.step(1, TimeoutNow(4))
    assert core.term == 5


# --- replication flow control ------------------------------------------------------------


def test_inflight_and_batch_limits():
    core, log = leader_core(3, rpc_max=4, max_inflight=3, rpc_max_bytes=1 << 20)
    core.step(2, AppendResponse(1, True, 0))  # follower 2 caught up: replicate state
    core.step(3, AppendResponse(1, True, 0))
    drive(core, log)
    for k in range(40):
        core.propose([b"%d" % k])
    out = drive(core, log)
    to2 = [m for to, m in out if to == 2 and type(m) is AppendEntries]
    assert len(to2) == 3  # max_inflight
    assert [len(m.entries) for m in to2] == [4, 4, 4]  # rpc_max
    assert [m.prev_seq for m in to2] == [0, 4, 8]
    # Acknowledging the first batch opens exactly one slot.
    core.step(2, AppendResponse(1, True, 4))
    out = drive(core, log)
    to2 = [m for to, m in out if to == 2 and type(m) is AppendEntries]
    assert [(m.prev_seq, len(m.entries)) for m in to2] == [(12, 4)]


def test_batches_respect_rpc_max_bytes():
    core, log = leader_core(3, rpc_max=100, max_inflight=100, rpc_max_bytes=250)
    core.step(2, AppendResponse(1, True, 0))
    drive(core, log)
    core.propose([b"x" * 100] * 10)
    core.propose([b"y" * 1000])  # bigger than the limit alone: still sent, alone
    out = drive(core, log)
    sizes = [len(m.entries) for to, m in out if to == 2 and type(m) is AppendEntries]
    assert sizes == [2, 2, 2, 2, 2, 1]


def test_rejection_falls_back_to_probing_one_message_at_a_time():
    core, log = leader_core(3, rpc_max=2, max_inflight=4)
    core.step(2, AppendResponse(1, True, 0))
    drive(core, log)
    core.propose([b"a"] * 8)
    out = drive(core, log)
    assert len([1 for to, m in out if to == 2 and type(m) is AppendEntries]) == 4
    # The second batch was lost: the follower rejects the third (prev 4 missing).
    core.step(2, AppendResponse(1, False, 4, conflict_term=0, conflict_seq=3))
    out = drive(core, log)
    to2 = [m for to, m in out if to == 2 and type(m) is AppendEntries]
    assert [(m.prev_seq, len(m.entries)) for m in to2] == [(2, 2)]
    # A stale rejection (of a batch sent before) changes nothing while probing.
    core.step(2, AppendResponse(1, False, 6, conflict_term=0, conflict_seq=3))
    assert [m for to, m in drive(core, log) if to == 2] == []
    core.step(2, AppendResponse(1, True, 4))  # the probe worked: stream again
    out = drive(core, log)
    to2 = [m for to, m in out if to == 2 and type(m) is AppendEntries]
    assert [(m.prev_seq, len(m.entries)) for m in to2] == [(4, 2), (6, 2)]


def test_stalled_stream_is_reprobed_after_lost_tail():
    core, log = leader_core(3)
    core.step(2, AppendResponse(1, True, 0))
    drive(core, log)
    core.propose([b"a"])
    drive(core, log)  # lost on the way to 2
    resent = []
    sent_at = core._now
    while core._now < sent_at + 2 * HB:  # slow is not lost: no resend for two heartbeats
        core.tick(core.next_deadline)
        core.step(3, AppendResponse(1, True, core.last_seq))  # keep CheckQuorum happy
        resent += [m for to, m in drive(core, log) if to == 2 and type(m) is AppendEntries
                   and m.entries]
    assert resent == []
    # ... but a lost last batch is resent within three heartbeats, not an election timeout
    core.tick(sent_at + 3 * HB)
    out = drive(core, log)
    resent = [m for to, m in out if to == 2 and type(m) is AppendEntries and m.entries]
    assert resent and resent[0].entries[0] == Entry(1, 1, b"a")
    assert 3 * HB < T


def test_follower_commit_is_min_of_leader_commit_and_last_new_entry():
    log = MemoryLog()
    f = RaftCore(2, [1, 2, 3], log, HardState(term=1))
    ents = tuple(Entry(s, 1, b"x") for s in range(6))
    f.step(1, AppendEntries(1, -1, 0, ents[:4], commit_seq=10))
    assert f.commit_seq == 3
    drive(f, log)
    f.step(1, AppendEntries(1, 3, 1, ents[4:], commit_seq=4))
    assert f.commit_seq == 4
    # A heartbeat at prev 2 vouches for entries up to 2, and for those of its own term
    # after it (only its leader wrote them): commit goes to 5, and the answer says so.
    f.step(1, AppendEntries(1, 2, 1, (), commit_seq=10))
    assert f.commit_seq == 5
    rd = f.ready()
    assert rd.commit_seq == 5
    assert rd.messages_after_persist[-1] == (1, AppendResponse(1, True, 5))
    f.advance(rd)
    # Entries of an older term are vouched for only up to prev: commit never goes back.
    f.step(3, AppendEntries(2, 2, 1, (), commit_seq=10))
    assert f.commit_seq == 5
    assert f.ready().messages_after_persist[-1] == (3, AppendResponse(2, True, 2))


def test_leader_counts_itself_only_after_advance():
    log = MemoryLog()
    core = RaftCore(1, [1], log, HardState(), rng=random.Random(0))
    core.tick(0.0)
    assert core.role is Role.LEADER
    rd = core.ready()
    assert rd.entries == [Entry(0, 1, b"")] and rd.commit_seq == -1
    log.append(rd.entries)
    core.advance(rd)
    assert core.commit_seq == 0
    first, term = core.propose([b"a", b"b"])
    assert (first, term) == (1, 1)
    rd = core.ready()
    assert rd.commit_seq == 0
    log.append(rd.entries)
    core.advance(rd)
    assert core.ready().commit_seq == 2


def test_conflicting_uncommitted_suffix_is_truncated_in_the_ready():
    log = MemoryLog([Entry(0, 1, b"a"), Entry(1, 1, b"b"), Entry(2, 1, b"c")])
    f = RaftCore(2, [1, 2, 3], log, HardState(term=1), commit_seq=0)
    f.step(1, AppendEntries(2, 0, 1, (Entry(1, 2, b"B"),), commit_seq=0))
    rd = f.ready()
    assert rd.truncate_after == 0 and rd.entries == [Entry(1, 2, b"B")]
    log.truncate_after(rd.truncate_after)
    log.append(rd.entries)
    f.advance(rd)
    assert log.all() == [Entry(0, 1, b"a"), Entry(1, 2, b"B")]
    # A duplicate of an older, shorter append does not truncate anything.
    f.step(1, AppendEntries(2, -1, 0, (Entry(0, 1, b"a"),), commit_seq=0))
    rd = f.ready()
    assert rd.truncate_after is None and rd.entries == []


def test_hint_gives_conflicting_term_and_its_first_seq():
    log = MemoryLog([Entry(0, 1, b"a")] + [Entry(s, 3, b"x") for s in range(1, 6)])
    f = RaftCore(2, [1, 2, 3], log, HardState(term=3))
    f.step(1, AppendEntries(4, 4, 2, (), commit_seq=0))
    rd = f.ready()
    assert rd.messages_after_persist == [
        (1, AppendResponse(4, False, 4, conflict_term=3, conflict_seq=1))
    ]
    f.advance(rd)
    f.step(1, AppendEntries(4, 9, 4, (), commit_seq=0))
    assert f.ready().messages_after_persist == [
        (1, AppendResponse(4, False, 9, conflict_term=0, conflict_seq=6))
    ]


# --- ReadIndex ----------------------------------------------------------------------------


def test_read_index_on_leader_needs_a_quorum_round():
    core, log = leader_core(3)
    core.step(2, AppendResponse(1, True, 0))
    drive(core, log)
    assert core.commit_seq == 0
    core.read_index(7)
    core.read_index(8)  # shares the round
    rd = core.ready()
    beats = [(to, m) for to, m in rd.messages if type(m) is AppendEntries and m.read_id]
    assert {to for to, _ in beats} == {2, 3} and len({m.read_id for _, m in beats}) == 1
    rid = beats[0][1].read_id
    assert rd.read_states == []
    log.append(rd.entries)
    core.advance(rd)
    core.step(3, AppendResponse(1, True, 0, read_id=rid))
    assert core.ready().read_states == [ReadState(7, 0), ReadState(8, 0)]


def test_read_index_waits_for_the_new_leaders_first_commit():
    core, log = leader_core(3)
    core.read_index(1)
    out = drive(core, log)
    assert not [m for _, m in out if type(m) is AppendEntries and m.read_id]
    core.step(2, AppendResponse(1, True, 0))  # the no-op commits
    out = drive(core, log)
    rids = {m.read_id for _, m in out if type(m) is AppendEntries and m.read_id}
    assert len(rids) == 1
    core.step(2, AppendResponse(1, True, 0, read_id=rids.pop()))
    assert core.ready().read_states == [ReadState(1, 0)]


def test_read_index_fails_when_leadership_is_not_confirmed():
    core, log = leader_core(3)
    core.step(2, AppendResponse(1, True, 0))
    drive(core, log)
    core.read_index(5)
    drive(core, log)
    core.tick(core._now + T + 0.001)  # nobody acknowledged within the timeout
    states = []
    while core.has_ready():
        rd = core.ready()
        states += rd.read_states
        core.advance(rd)
    assert ReadState(5, -2) in states


def test_stale_leader_cannot_serve_a_read():
    # Without CheckQuorum the cut-off leader keeps believing it leads: the worst case.
    c = Cluster([1, 2, 3, 4, 5], seed=12, config=RaftConfig(check_quorum=False))
    old = c.wait_leader()
    c.propose([b"v1"])
    c.advance(0.3)
    c.partition([old], [i for i in c.ids if i != old])
    others = [i for i in c.ids if i != old]
    c.run_until(lambda: any(c.cores[i].role is Role.LEADER for i in others), timeout=5 * T)
    new = next(i for i in others if c.cores[i].role is Role.LEADER)
    c.propose([b"v2"], at=new)
    c.advance(0.05)
    assert c.cores[old].role is Role.LEADER
    c.read(old, 99)
    c.advance(2 * T)
    assert c.reads[old][99] == -2
    c.read(new, 100)
    c.advance(0.2)
    assert c.reads[new][100] >= 2


def test_read_index_on_follower_is_forwarded():
    c = Cluster([1, 2, 3], seed=13)
    leader = c.wait_leader()
    f = next(i for i in c.ids if i != leader)
    c.propose([b"a", b"b"])
    c.advance(0.05)
    c.read(f, 42)
    c.advance(0.3)
    assert c.reads[f][42] == c.cores[leader].commit_seq >= 2
    assert any(frm == f for frm, _, _m in messages_of(c.sent, ReadIndex))
    assert any(to == f for _, to, _m in messages_of(c.sent, ReadIndexResponse))


def test_read_index_without_leader_fails_at_once():
    core = RaftCore(1, [1, 2, 3], MemoryLog(), HardState())
    core.read_index(3)
    assert core.ready().read_states == [ReadState(3, -2)]


def test_forwarded_read_times_out():
    log = MemoryLog()
    f = RaftCore(2, [1, 2, 3], log, HardState(term=1))
    f.step(1, AppendEntries(1, -1, 0, (), commit_seq=-1))
    drive(f, log)
    f.read_index(9)
    assert (1, ReadIndex(1, 9)) in drive(f, log)
    f.tick(T + 0.01)
    assert f.ready().read_states == [ReadState(9, -2)]


# --- replication groups -------------------------------------------------------------------

SIX = ["a1", "a2", "a3", "b1", "b2", "b3"]
GROUPS = {k: k[0] for k in SIX}


def majority_each(ids) -> bool:
    return all(sum(1 for i in ids if GROUPS[i] == g) >= 2 for g in "ab")


@pytest.mark.parametrize("check_quorum", [True, False])
def test_groups_commit_stalls_while_a_group_lacks_a_majority(check_quorum):
    q = Quorum(SIX, group=GROUPS, group_fn=majority_each)
    c = Cluster(SIX, seed=14, quorum=q, config=RaftConfig(check_quorum=check_quorum))
    c.crash("b3")
    leader = c.wait_leader()
    c.propose([b"one"])
    c.advance(0.3)
    assert all(c.data(i) == [b"one"] for i in c.up())
    victim = "b2" if leader != "b2" else "b1"
    c.crash(victim)  # group b is down to one of three
    before = {i: len(c.applied[i]) for i in c.up()}
    leader = c.leader()
    if leader is not None:
        c.propose([b"two"], at=leader)
    c.advance(10 * T)
    assert {i: len(c.applied[i]) for i in c.up()} == before  # nothing more committed
    if check_quorum:
        assert c.leader() is None  # and no leader survives without the groups' quorum
    c.start(victim)
    leader = c.wait_leader(timeout=20 * T)
    c.propose([b"three"], at=leader)
    c.advance(0.5)
    for i in c.up():
        assert c.data(i)[-1] == b"three"
        if not check_quorum:
            assert c.data(i) == [b"one", b"two", b"three"]


def test_unsafe_group_fn_is_refused():
    with pytest.raises(ConfigurationError, match="disjoint"):
        Quorum(SIX, group=GROUPS, group_fn=lambda ids: len(ids) >= 2)


# --- hard state and restarts --------------------------------------------------------------


def test_persisted_vote_prevents_voting_twice_after_restart():
    log = MemoryLog()
    core = RaftCore(3, [1, 2, 3], log, HardState())
    core.step(1, RequestVote(5, -1, 0))
    rd = core.ready()
    assert rd.hard_state == HardState(5, 1)
    persisted = rd.hard_state
    core.advance(rd)
    restarted = RaftCore(3, [1, 2, 3], log, persisted)  # crash, come back from disk
    restarted.step(2, RequestVote(5, -1, 0))
    assert restarted.ready().messages_after_persist == [(2, VoteResponse(5, False))]
    restarted2 = RaftCore(3, [1, 2, 3], log, persisted)
    restarted2.step(1, RequestVote(5, -1, 0))  # the same candidate again: fine
    assert restarted2.ready().messages_after_persist == [(1, VoteResponse(5, True))]


def test_full_cluster_restart_loses_nothing_and_never_votes_twice():
    c = Cluster([1, 2, 3], seed=15)
    c.wait_leader()
    for k in range(10):
        c.propose([b"k%d" % k])
    c.advance(0.3)
    acked = c.data(c.leader())
    for i in c.ids:
        c.crash(i)
    for i in c.ids:
        c.start(i)
    c.wait_leader()
    c.propose([b"after"])
    c.advance(0.5)
    for i in c.ids:
        assert c.data(i)[: len(acked)] == acked and c.data(i)[-1] == b"after"
    assert c.violations == []  # the harness checks "voted twice in a term" on every persist


# --- protocol, robustness and API --------------------------------------------------------


def test_vote_and_append_responses_wait_for_persistence_leader_appends_do_not():
    core, log = leader_core(3)
    core.step(2, AppendResponse(1, True, 0))
    drive(core, log)
    core.propose([b"x"])
    rd = core.ready()
    assert any(type(m) is AppendEntries and m.entries for _, m in rd.messages)
    assert rd.messages_after_persist == []
    core.advance(rd)
    f = RaftCore(2, [1, 2, 3], MemoryLog(), HardState())
    f.step(1, AppendEntries(1, -1, 0, (Entry(0, 1, b""),), 0))
    rd = f.ready()
    assert rd.messages == [] and [type(m) for _, m in rd.messages_after_persist] == [
        AppendResponse
    ]


def test_stale_configuration_follows_a_leader_it_does_not_know_yet():
    """Membership (thesis 4.2): a node that has not seen the latest configuration must
    still follow its leader, whom it may not know; which nodes may talk to it at all is the
    driver's decision (``RaftNode.receive``), what counts is the configuration's."""
    f = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=1))
    f.step(9, AppendEntries(4, -1, 0, (Entry(0, 4, b"x"),), 0))
    assert f.leader == 9 and f.term == 4 and f.last_seq == 0
    # ... but an acknowledgement from a node outside the configuration counts for nothing
    core, log = leader_core(3)
    core.propose([b"y"])
    drive(core, log)
    core.step(9, AppendResponse(core.term, True, core.last_seq))
    assert core.commit_seq < core.last_seq


def test_stale_terms_and_odd_messages_are_ignored():
    core, log = leader_core(3)
    term = core.term
    core.step(1, AppendEntries(50, 0, 0, (), 0))  # from itself
    core.step(2, "not a message")  # type: ignore[arg-type]
    core.step(2, VoteResponse(term - 1, True))
    core.step(2, AppendResponse(term - 1, False, 0))
    assert core.role is Role.LEADER and core.term == term
    # A malformed append (entries not following prev) is dropped.
    f = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=1))
    f.step(1, AppendEntries(1, -1, 0, (Entry(5, 1, b"x"),), 0))
    assert f.last_seq == -1


def test_stale_leader_is_told_the_newer_term():
    f = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=7))
    f.step(1, AppendEntries(3, -1, 0, (), 0, read_id=4))
    assert f.ready().messages_after_persist == [(1, AppendResponse(7, False, -1, read_id=4))]


def test_propose_errors():
    follower = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(term=1))
    follower.step(1, AppendEntries(1, -1, 0, (), 0))
    with pytest.raises(NotLeaderError) as ei:
        follower.propose([b"x"])
    assert ei.value.leader == 1
    core, _ = leader_core(3)
    for bad in ([], [b""], ["str"], [bytearray(b"x")]):
        with pytest.raises(InvalidArgumentError):
            core.propose(bad)  # type: ignore[arg-type]


def test_ready_advance_misuse_raises():
    core, log = leader_core(3)
    core.propose([b"x"])
    rd = core.ready()
    with pytest.raises(UsageError):
        core.ready()
    log.append(rd.entries)
    core.advance(rd)
    with pytest.raises(UsageError):
        core.advance(rd)


def test_constructor_checks():
    with pytest.raises(ConfigurationError):
        RaftCore(9, [1, 2, 3], MemoryLog(), HardState())
    with pytest.raises(ConfigurationError):
        RaftCore(1, [1, 2, 3], MemoryLog(), HardState(), quorum=Quorum([1, 2]))
    with pytest.raises(InvalidArgumentError):
        RaftCore(1, [1, 2, 3], MemoryLog(), HardState(),
                 config=RaftConfig(heartbeat_interval=1.0, election_timeout=0.5))
    with pytest.raises(InvalidArgumentError):
        RaftCore(1, [1, 2, 3], MemoryLog(), HardState(), bugs=["no_such_bug"])
    # A vote for a node outside the configuration is legitimate with membership changes
    # (one removed since, or added later): not refused.
    assert RaftCore(1, [1, 2, 3], MemoryLog(), HardState(term=1, vote=7)).vote == 7


def test_next_deadline_follows_the_role():
    core, log = leader_core(3)
    assert core.next_deadline == pytest.approx(HB)
    core.tick(HB)
    drive(core, log)
    assert core.next_deadline == pytest.approx(2 * HB)
    f = RaftCore(2, [1, 2, 3], MemoryLog(), HardState(), now=10.0, rng=random.Random(3))
    assert 10 + T <= f.next_deadline < 10 + 2 * T


def test_same_seed_same_run():
    def run(seed):
        c = Cluster([1, 2, 3, 4, 5], seed=seed, loss=0.1, reorder=0.3)
        c.wait_leader()
        for k in range(5):
            leader = c.leader()
            if leader is not None and c.cores[leader].transfer_target is None:
                c.propose([b"%d" % k], at=leader)
            c.advance(0.2)
        return [(f, t, m) for f, t, m in c.sent]

    assert run(3) == run(3)
    assert run(3) != run(4)


# --- bug hooks: each one must really break something -------------------------------------


def test_bug_count_vote_twice_wins_with_a_minority():
    for bugs, expect in (((), Role.CANDIDATE), (("count_vote_twice",), Role.LEADER)):
        core = RaftCore(1, [1, 2, 3, 4, 5], MemoryLog(), HardState(), bugs=bugs)
        core.campaign()
        core.advance(core.ready())
        core.step(2, VoteResponse(1, True))  # 2 of 5
        assert core.role is expect


def test_bug_skip_append_term_check_accepts_a_deposed_leader():
    for bugs, accepted in (((), False), (("skip_append_term_check",), True)):
        log = MemoryLog()
        f = RaftCore(2, [1, 2, 3], log, HardState(term=5), bugs=bugs)
        f.step(1, AppendEntries(3, -1, 0, (Entry(0, 3, b"stale"),), 0))
        rd = f.ready()
        assert bool(rd.entries) is accepted
        assert rd.messages_after_persist[0][1].success is accepted


def test_bug_commit_old_term_commits_by_counting():
    for bugs, committed in (((), False), (("commit_old_term",), True)):
        log = MemoryLog([Entry(0, 1, b"old")])
        core = RaftCore(1, [1, 2, 3], log, HardState(term=1), bugs=bugs,
                        rng=random.Random(0))
        core.campaign()
        drive(core, log)
        core.step(2, VoteResponse(2, True))
        assert core.role is Role.LEADER
        drive(core, log)
        # Follower 2 holds the old entry but not the new leader's no-op.
        core.step(2, AppendResponse(2, True, 0))
        assert (core.commit_seq >= 0) is committed


# --- robustness: well-typed garbage and replays -------------------------------------------


def random_message(rng: random.Random, core: RaftCore):
    """A well-typed message with plausible values: terms and seqs near the core's own, so
    that it gets deep into the handlers (and sometimes absurd ones)."""
    term, last = core.term, core.last_seq

    def seq():
        return rng.randint(-3, last + 6) if rng.random() < 0.1 else rng.randint(-1, last + 2)

    def t():
        return rng.choice([term - 1, term, term, term, term + 1, rng.randint(0, term + 3)])

    kind = rng.choice("VVRAAAAPTIJ")
    if kind == "V":
        tt = t()
        pre = rng.random() < 0.3
        return VoteResponse(tt + 1 if pre else tt, rng.random() < 0.7, pre)
    if kind == "R":
        return RequestVote(t(), seq(), rng.randint(0, term + 1), rng.random() < 0.5,
                           rng.random() < 0.2)
    if kind == "A":
        prev = seq()
        n = rng.randint(0, 4)
        start = prev + 1 if rng.random() < 0.9 else seq()
        tt = t()
        ents = tuple(Entry(start + k, rng.randint(max(0, tt - 2), max(0, tt)), b"g")
                     for k in range(n))
        prev_term = core.term_at(prev) if -1 <= prev <= last and rng.random() < 0.7 else t()
        return AppendEntries(tt, prev, max(0, prev_term), ents, seq(), rng.randint(0, 5))
    if kind == "P":
        return AppendResponse(t(), rng.random() < 0.5, seq(), rng.randint(0, term + 1), seq(),
                              rng.randint(0, 5))
    if kind == "T":
        return TimeoutNow(t())
    if kind == "I":
        return ReadIndex(t(), rng.randint(0, 5))
    return ReadIndexResponse(t(), rng.randint(0, 5), seq())


@pytest.mark.parametrize("seed", range(30))
def test_well_typed_garbage_never_raises_and_never_yields_a_bad_ready(seed):
    """Whatever well-typed message arrives, the core neither raises nor asks the driver for
    an impossible write (MemoryLog refuses non-contiguous appends) or a commit beyond its
    log."""
    rng = random.Random(seed)
    log = MemoryLog([Entry(s, 1 + s // 3, b"x") for s in range(rng.randint(0, 8))])
    core = RaftCore(1, [1, 2, 3], log, HardState(term=3), rng=random.Random(seed))
    now = 0.0
    reported_commit = -1
    for k in range(600):
        r = rng.random()
        if r < 0.05:
            now += rng.uniform(0, T)
            core.tick(now)
        elif r < 0.08:
            core.campaign()
        elif r < 0.12 and core.role is Role.LEADER:
            core.propose([b"p%d" % k])
        elif r < 0.14:
            core.read_index(k)
        else:
            core.step(rng.choice([2, 3, 3, 99]), random_message(rng, core))
        while core.has_ready():
            rd = core.ready()
            if rd.truncate_after is not None:
                # never takes back an entry already reported committed
                assert rd.truncate_after >= reported_commit
                log.truncate_after(rd.truncate_after)
            log.append(rd.entries)
            core.advance(rd)
            assert reported_commit <= rd.commit_seq <= log.seq
            reported_commit = rd.commit_seq
            # Messages to a node outside the configuration (99) are only answers to it, or a
            # read forwarded to it as the leader (a node must follow a leader it does not
            # know yet): no election or replication is started there.
            answers = (VoteResponse, AppendResponse, ReadIndexResponse, RecoverResponse,
                       ReadIndex)
            assert all(to in (2, 3) or isinstance(m, answers)
                       for to, m in rd.messages + rd.messages_after_persist)


@pytest.mark.parametrize("seed", range(10))
def test_replayed_old_messages_are_harmless(seed):
    c = Cluster([1, 2, 3, 4, 5], seed=seed)
    c.wait_leader()
    rng = random.Random(seed)
    for k in range(40):
        leader = c.leader()
        if leader is not None and c.cores[leader].transfer_target is None:
            c.propose([b"r%d" % k], at=leader)
        # Replay a handful of messages from any time in the past, in random order.
        for frm, to, m in rng.sample(c.sent, min(5, len(c.sent))):
            c.net.append((frm, to, m))
        if rng.random() < 0.15 and leader is not None:
            c.crash(leader)
            c.advance(0.05)
            c.start(leader)
        c.advance(rng.uniform(0.01, 0.3))
    c.advance(3.0)
    datas = [c.data(i) for i in c.ids]
    assert all(d == datas[0] for d in datas)
    # Liveness suffers (a replayed heartbeat of a crashed leader looks like a live one and
    # delays the next election), safety and convergence must not.
    assert len(datas[0]) >= 5
    c.check_log_matching()


def test_rejection_of_an_append_never_sent_is_ignored():
    core, log = leader_core(3)
    core.step(2, AppendResponse(1, True, 0))
    drive(core, log)
    # Claims to reject prev seq 3 (we only have 0) and hints seq 3: must not move next past
    # our log (that would make the next probe refer to an entry we do not have).
    core.step(2, AppendResponse(1, False, 3, conflict_term=0, conflict_seq=3))
    drive(core, log)
    assert core.progress[2].next == 1
    core.step(2, AppendResponse(1, True, 99))  # success beyond our log: ignored too
    drive(core, log)
    assert core.progress[2].match == 0


def test_harness_catches_a_forgotten_vote():
    """The check behind "no node votes twice in a term" can fail: restart a voter with its
    vote wiped (what a store that does not persist the vote would do) and it votes again."""
    c = Cluster([1, 2, 3], seed=16, strict=False, config=RaftConfig(pre_vote=False))
    c.cores[1].campaign()
    c.handle(1)
    c.stabilize()
    term = c.cores[1].term
    assert c.hard[3].vote == 1 or c.hard[2].vote == 1
    voter = 3 if c.hard[3].vote == 1 else 2
    c.crash(voter)
    c.hard[voter] = HardState(term=term, vote=None)  # the bug: the vote did not survive
    c.start(voter)
    other = 2 if voter == 3 else 3
    c.cores[voter].step(other, RequestVote(term, 99, term))
    c.handle(voter)
    assert any("voted for" in v for v in c.violations)
