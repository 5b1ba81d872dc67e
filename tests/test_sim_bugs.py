"""Proof that the simulator can fail: every deliberate bug is caught.

Each bug is switched on through the test-only hooks (``RaftCore(bugs=...)`` for the core's,
the simulator's store for ``forget_vote``) and the simulator must report a violation within a
bounded number of seeds. The bounds are several times the seed at which each is found today,
so that harmless timing changes in the core do not turn these into flaky tests, while a
simulator that stopped checking would fail them.

Two bugs need histories with several failures in a row (Raft's Figure 8 for
``commit_old_term``; a split vote plus a crash between two vote requests for
``forget_vote``), which the default fault mix produces only rarely, so they are hunted with
the ``churn`` preset. ``commit_old_term`` also gets a scripted Figure 8, step by step, which
the correct core survives and the buggy one does not.
"""

from __future__ import annotations

import os
import subprocess
import sys

import msgpack
import pytest

from tinyraftplus.raft.core import Role
from tinyraftplus.raft.messages import AppendEntries
from tinyraftplus.sim import SafetyViolation, SessionStateMachine, SimConfig, Simulation
from tinyraftplus.sim.runner import run_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    # bug, config, seeds allowed, invariants that may catch it
    ("count_vote_twice", SimConfig(), 150, {"election safety", "leader completeness",
                                            "state machine safety", "log matching"}),
    # (its stale appends can also cut a leader's log below its commit seq, which the core
    # then trips over: reported as an exception)
    ("skip_append_term_check", SimConfig(), 300, {"state machine safety", "log matching",
                                                  "leader completeness", "liveness",
                                                  "linearizability", "exception",
                                                  "acknowledged write durability"}),
    ("commit_old_term", SimConfig.churn(), 600, {"leader completeness",
                                                 "state machine safety"}),
    ("forget_vote", SimConfig.churn(), 400, {"election safety", "leader completeness",
                                             "state machine safety"}),
    ("skip_fsync", SimConfig(), 20, {"acknowledged write durability", "commit quorum"}),
    # Membership: a configuration put in force only once committed (it must be from the
    # moment it is appended). (The other planted membership bug, a change before the
    # leader's own-term commit, needs the exact 2015 interleaving: it is shown breaking
    # safety step by step in tests/test_membership_core.py.)
    ("config_on_commit", SimConfig(), 150, {"commit quorum", "acknowledged write durability",
                                            "leader completeness", "state machine safety",
                                            "election safety"}),
    # A node whose disk was wiped comes back as the member it was (the first wave's
    # behaviour): caught by the durability check, or by what it breaks.
    ("trust_wiped", SimConfig(), 60, {"acknowledged write durability", "leader completeness",
                                      "state machine safety", "election safety",
                                      "log matching", "linearizability", "liveness"}),
    # Snapshots (sim/snapshots.py): the log compacted without bounding it by the snapshot's
    # seq (a restart finds entries missing between the snapshot and the log, or a quorum
    # lost an acknowledged write); a snapshot restored without checking its CRCs (a file
    # damaged at rest, a partial damaged by a crash, a chunk damaged in flight).
    ("compact_past_snapshot", SimConfig(snapshot_entries=5), 40,
     {"snapshot restart", "acknowledged write durability", "liveness"}),
    ("restore_unchecked", SimConfig(snapshot_entries=5), 40,
     {"snapshot agreement", "linearizability", "exception"}),
]


@pytest.mark.parametrize("bug,config,bound,expected", CASES, ids=[c[0] for c in CASES])
def test_deliberate_bug_is_caught_within_bounded_seeds(bug, config, bound, expected):
    cfg = SimConfig(**{**config.__dict__, "bugs": frozenset({bug})})
    s = run_seeds(range(bound), cfg, jobs=2, stop_after=1, record_trace=False)
    assert s.violations >= 1, f"{bug} not caught in {bound} seeds:\n{s.text(cfg)}"
    first = min(s.failures, key=lambda o: o.seed)
    print(f"\n{bug}: caught at seed {first.seed} [{first.invariant}] {first.short}")
    assert first.invariant in expected, first.report
    # the report's replay command reproduces the violation (from the shell, in a new process)
    line = next(x for x in first.report.splitlines() if x.startswith("replay: "))
    args = line.split()[4:]  # drop "replay: python -m tinyraftplus.sim"
    out = subprocess.run([sys.executable, "-m", "tinyraftplus.sim", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and first.short in out.stdout, out.stdout[-2000:]


def test_restore_unchecked_is_caught_through_install_snapshot_alone():
    """No damage at rest, no torn writes: only chunks damaged in flight, which a driver
    that skips the chunk and snapshot CRCs installs."""
    cfg = SimConfig(snapshot_entries=5, bugs=frozenset({"restore_unchecked"}),
                    overrides=(("snap_rot", 0.0), ("snap_corrupt", 0.05), ("torn", False)))
    # (found at seed 21 today)
    s = run_seeds(range(120), cfg, jobs=2, stop_after=1, record_trace=False)
    assert s.violations >= 1, s.text(cfg)
    first = min(s.failures, key=lambda o: o.seed)
    print(f"\nrestore_unchecked (in flight): caught at seed {first.seed} {first.short}")
    assert first.invariant == "snapshot agreement" and "(received)" in first.short


def test_the_churn_hunt_without_bugs_finds_nothing():
    # (the default mix without bugs is test_sim.py's 1,000-seed scale test)
    config = SimConfig.churn()
    s = run_seeds(range(400), config, jobs=2, record_trace=False)
    assert s.violations == 0, s.text(config) + "\n" + s.failures[0].report


def test_the_membership_hunt_without_bugs_finds_nothing():
    config = SimConfig.membership_churn()
    s = run_seeds(range(300), config, jobs=2, record_trace=False)
    assert s.member_changes > 1000
    assert s.violations == 0, s.text(config) + "\n" + s.failures[0].report


def _figure8(bugs):
    """Raft paper, Figure 8, on three nodes, scripted with partitions and message filters.

    1. Node 1 leads term 1, is cut off, and appends X at seq 1 that nobody else gets.
    2. Node 2 wins term 2 with node 3's vote; its no-op (seq 1, term 2) reaches nobody.
    3. Node 1 restarts and wins term 3 with node 3; with one entry per message it sends X
       alone, then its own no-op, which is lost. Node 3 now holds X: a majority has it.
       The correct core does not commit X (not of its term); the buggy one does.
    4. Node 1 is cut off; node 2 restarts and wins term 4 with node 3 (its last term 2
       beats node 3's last term 1) and overwrites X.
    """
    cfg = SimConfig(faults=False, nodes=3, clients=0, bugs=frozenset(bugs),
                    election_timeout=5.0,
                    overrides=(("rpc_max", 1), ("pre_vote", False), ("check_quorum", False)))
    sim = Simulation(0, cfg)
    q = sim.queue
    nodes = sim.nodes

    def run(dt):
        q.run_until(q.now + dt)

    def isolate(x):
        for y in nodes:
            if y != x:
                sim.net.cut.update({(x, y), (y, x)})

    def connect(x, y):
        sim.net.cut.difference_update({(x, y), (y, x)})

    def win(i):
        for _ in range(3):
            nodes[i].core.campaign()
            nodes[i].process()
            run(2.5)
            if nodes[i].core.role is Role.LEADER:
                return
        raise AssertionError(f"node {i} did not win: {nodes[i].core.role}")

    for n in nodes.values():
        n.start()
    win(1)
    isolate(1)
    nodes[1].core.propose([SessionStateMachine.wrap("c", 1, msgpack.packb(["put", "k",
                                                                          "X"]))])
    nodes[1].process()
    run(0.1)
    sim.net.filter = lambda s, d, m: not (s == 2 and isinstance(m, AppendEntries))
    win(2)
    assert [e.term for e in nodes[2].store.entries(0, 1, 1 << 20)] == [1, 2]
    isolate(2)
    connect(1, 3)
    nodes[1].crash("scripted restart")
    nodes[1].start()
    own_term_appends = []

    def lose_own_noop(s, d, m):
        if s == 1 and isinstance(m, AppendEntries) and any(e.term == m.term
                                                           for e in m.entries):
            own_term_appends.append(m)
            return len(own_term_appends) == 1  # the first is refused anyway (a gap)
        return True

    sim.net.filter = lose_own_noop
    win(1)
    assert nodes[3].store.term_at(1) == 1  # X reached node 3
    isolate(1)
    sim.net.filter = None
    connect(2, 3)
    nodes[2].crash("scripted restart")
    nodes[2].start()
    win(2)
    return sim


def test_figure8_scripted_correct_core_survives():
    sim = _figure8(set())
    # the new leader overwrote X, which was never committed: legal
    assert sim.nodes[3].store.term_at(1) == 2
    assert sim.nodes[1].core is not None and sim.nodes[1].core.commit_seq < 1


def test_figure8_scripted_commit_old_term_is_caught():
    with pytest.raises(SafetyViolation) as ei:
        _figure8({"commit_old_term"})
    v = ei.value
    assert v.invariant == "leader completeness"
    assert set(v.nodes) == {1, 2} and "seq 1" in v.short
