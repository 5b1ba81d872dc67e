"""Snapshots in the simulator: the snapshot files' durability model, log compaction in the
simulated store, a crash at every snapshot step, and whole runs with snapshots on.

The planted snapshot bugs (``compact_past_snapshot``, ``restore_unchecked``) are hunted in
``test_sim_bugs.py`` with the others.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from tinyraftplus.entry import Entry
from tinyraftplus.errors import InvalidArgumentError
from tinyraftplus.raft.snapshot import crc32c
from tinyraftplus.sim import SimConfig, SimCrash, SimStore, Simulation, run_seeds
from tinyraftplus.sim.snapfiles import PARTIAL, SnapshotDir, final_name, good
from tinyraftplus.snapshot import SnapshotMeta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meta(data: bytes, seq: int = 9, term: int = 2) -> SnapshotMeta:
    return SnapshotMeta(seq, term, len(data), crc32c(data), b"", b"")


def _dir(torn: bool = False, seed: int = 0) -> tuple[SnapshotDir, list[str]]:
    steps: list[str] = []
    return SnapshotDir(steps.append, random.Random(seed), torn), steps


def _write_snapshot(d: SnapshotDir, data: bytes, upto: int = 4) -> SnapshotMeta:
    """The driver's sequence, cut after ``upto`` steps (4: all)."""
    meta = _meta(data)
    tmp, final = "tmp-" + final_name(meta), final_name(meta)
    ops = [lambda: d.create(tmp, meta, data, "snapshot temp write"),
           lambda: d.fsync(tmp, "snapshot fsync"),
           lambda: d.rename(tmp, final, "snapshot rename"),
           lambda: d.dir_fsync("snapshot dir fsync")]
    for op in ops[:upto]:
        op()
    return meta


# --- the snapshot directory --------------------------------------------------------------

def test_snapshot_is_durable_only_after_fsync_rename_and_dir_fsync():
    data = b"state" * 50
    for upto in range(5):
        d, steps = _dir()
        meta = _write_snapshot(d, data, upto)
        assert len(steps) == upto
        assert d.durable_cover() == (meta.seq if upto == 4 else -1)
        d.crash()
        finals = d.finals()
        if upto == 4:
            assert finals == [(meta, final_name(meta))]
            assert d.read(final_name(meta)) == data
        else:
            # before the directory fsync nothing of it survives (not torn: only what is
            # durable does)
            assert finals == [] and d.names() == []


def test_rename_made_durable_before_the_content_leaves_garbage_the_crc_catches():
    data = bytes(range(256)) * 4
    seen_damaged = False
    for seed in range(40):
        d, _ = _dir(torn=True, seed=seed)
        meta = _meta(data)
        d.create("tmp", meta, data, "snapshot temp write")
        d.rename("tmp", final_name(meta), "snapshot rename")
        d.dir_fsync("snapshot dir fsync")  # the wrong order: content never fsynced
        d.crash()
        got = d.read(final_name(meta))
        assert got is not None and len(got) <= len(data)
        if not good(meta, got):
            seen_damaged = True
        assert d.durable_cover() == (meta.seq if good(meta, got) else -1)
    assert seen_damaged


def test_partial_keeps_a_prefix_of_unsynced_chunks_sometimes_damaged():
    chunks = [bytes([i]) * 64 for i in range(8)]
    whole = b"".join(chunks)
    outcomes = set()
    for seed in range(80):
        d, _ = _dir(torn=True, seed=seed)
        meta = _meta(whole)
        d.create(PARTIAL, meta, b"", "partial create")
        d.dir_fsync("partial dir fsync")
        d.append(PARTIAL, chunks[0])
        d.fsync(PARTIAL, "partial fsync")
        for c in chunks[1:]:
            d.append(PARTIAL, c)
        d.crash()
        got = d.read(PARTIAL)
        assert got is not None and got[:64] == chunks[0]  # the synced part is intact
        assert len(got) <= len(whole)
        outcomes.add("intact" if whole.startswith(got) else "garbage")
    assert outcomes == {"intact", "garbage"}


def test_unlink_and_rot():
    d, _ = _dir()
    data = b"x" * 100
    meta = _write_snapshot(d, data)
    d.rot(final_name(meta))
    assert not good(meta, d.read(final_name(meta)) or b"")
    assert d.durable_cover() == -1 and d.current_cover() == -1
    d.unlink(final_name(meta), "snapshot prune")
    assert d.finals() == []
    d.crash()  # the unlink was not made durable: the (damaged) file is back
    assert [m for m, _ in d.finals()] == [meta]


# --- the store's log with compaction -----------------------------------------------------

def E(seq, term, data=b"x"):
    return Entry(seq, term, data)


def test_store_compaction_and_reset_are_durable_after_sync():
    s = SimStore(1, torn=False)
    s.append([E(i, 1) for i in range(10)])
    s.sync_log()
    h6 = s.chain_at(6)
    s.compact(6)
    assert s.first_seq == 7 and s.seq == 9 and s.term_at(6) == 1 and s.chain_at(6) == h6
    assert s.entry(6) is None and s.entry(7) is not None
    with pytest.raises(InvalidArgumentError):
        s.entries(5, 8, 1 << 20)
    with pytest.raises(InvalidArgumentError, match="compacted"):
        s.truncate_after(3)
    s.crash()
    assert s.first_seq == 0  # not synced: the whole log is back
    s.compact(6)
    s.sync_log()
    s.append([E(10, 2)])
    s.sync_log()
    s.crash()
    assert (s.first_seq, s.seq, s.term_at(10)) == (7, 10, 2)
    # a chain continues from the base's chain hash
    t = SimStore(2, torn=False)
    t.reset(6, 1, h6)
    t.append([E(7, 1), E(8, 1), E(9, 1), E(10, 2)])
    assert t.chain_at(10) == s.chain_at(10)
    s.reset(20, 3, 1234)
    s.crash()
    assert s.first_seq == 7  # the reset was not synced


def test_durable_term_at_counts_a_durable_snapshot_as_holding_committed_entries():
    s = SimStore(1, torn=False)
    s.committed_term = {i: 1 for i in range(10)}.get
    s.append([E(i, 1) for i in range(10)])
    s.sync_log()
    assert s.durable_term_at(3) == 1
    data = b"snap"
    meta = SnapshotMeta(6, 1, len(data), crc32c(data), b"", b"")
    s.snaps.create("tmp", meta, data, "snapshot temp write")
    s.snaps.fsync("tmp", "snapshot fsync")
    s.snaps.rename("tmp", final_name(meta), "snapshot rename")
    s.compact(6)
    s.sync_log()
    # compacted while the snapshot's name is not durable yet: a crash would lose 0..6
    assert s.durable_term_at(3) is None and s.durable_term_at(8) == 1
    s.snaps.dir_fsync("snapshot dir fsync")
    assert s.durable_term_at(3) == 1 and s.durable_term_at(6) == 1


def test_an_armed_crash_fires_at_a_snapshot_step():
    s = SimStore(1, torn=False)
    s.arm_crash(1)
    s.snaps.create("tmp", _meta(b"a"), b"a", "snapshot temp write")
    with pytest.raises(SimCrash, match="snapshot fsync"):
        s.snaps.fsync("tmp", "snapshot fsync")
    assert s.crash_step == "snapshot fsync"
    s.crash()
    assert s.crash_step is None and s.snaps.names() == []


# --- whole runs ------------------------------------------------------------------------------

JOB_STEPS = ("snapshot temp write", "snapshot fsync", "snapshot rename", "snapshot dir fsync",
             "snapshot prune", "compact")


def test_a_crash_at_every_snapshot_step_leaves_nodes_that_restart_correctly():
    """No other faults; a crash placed at a random step of half the snapshots written or
    installed. Every step gets crashes, the crashed nodes restart from their snapshot (and
    the log after it), and every check holds."""
    cfg = SimConfig(faults=False, snapshot_entries=5, steps=300,
                    overrides=(("snap_crash", 0.5), ("restart_min", 0.02),
                               ("restart_max", 0.3)))
    s = run_seeds(range(24), cfg, jobs=2, record_trace=False)
    assert s.violations == 0, s.text() + "\n" + s.failures[0].report
    sn = s.snap
    for step in JOB_STEPS:
        assert sn["crash " + step] > 0, (step, dict(sn))
    assert sum(v for k, v in sn.items() if k.startswith("crash partial")) > 0, dict(sn)
    assert sn["restores"] > 20 and sn["installs"] > 0 and sn["compactions"] > 50


def test_snapshots_on_many_seeds_zero_violations():
    """The default fault mix with snapshots every 5 entries: snapshots are taken, sent,
    installed, restored at restarts, damaged in flight and at rest, and nothing breaks."""
    cfg = SimConfig(snapshot_entries=5)
    s = run_seeds(range(80), cfg, jobs=2, record_trace=False)
    print(f"\n{s.text()}")
    assert s.violations == 0, s.text() + "\n" + s.failures[0].report
    sn = s.snap
    assert sn["seeds"] == 80
    assert sn["taken"] > 1000 and sn["installs"] > 50 and sn["compactions"] > 500
    assert sn["restores"] > 200 and sn["damaged"] > 10 and sn["rot"] > 5
    assert sum(v for k, v in sn.items() if k.startswith("crash ")) > 100
    assert "snapshots:" in s.text() and "installed by InstallSnapshot" in s.text()


def test_snapshot_settings_are_drawn_per_seed_and_off_keeps_traces():
    # drawn: some seeds with snapshots, some without
    on = [Simulation(seed).snapshot_entries for seed in range(30)]
    assert 0 in on and any(on)
    # with snapshots off a seed runs exactly as before they existed: same draws
    a = Simulation(5, SimConfig(snapshot_entries=0)).run()
    b = Simulation(5, SimConfig(snapshot_entries=0)).run()
    assert a.trace_hash == b.trace_hash
    assert a.stats["snapshots"] == {}


def test_snapshot_entries_refused_for_a_state_machine_without_snapshots():
    from test_sim import make_counter_app

    with pytest.raises(InvalidArgumentError, match="snapshot"):
        Simulation(0, SimConfig(snapshot_entries=5), make_counter_app())
    # drawn: off for it
    assert Simulation(0, SimConfig(), make_counter_app()).snapshot_entries == 0
    with pytest.raises(InvalidArgumentError, match="snapshot_entries"):
        SimConfig(snapshot_entries=-1)


def test_cli_snapshot_entries_and_summary():
    out = subprocess.run([sys.executable, "-m", "tinyraftplus.sim", "--seeds", "0:6",
                          "--snapshot-entries", "4", "--jobs", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "in 6 seeds with snapshots on" in out.stdout
    assert "installed by InstallSnapshot" in out.stdout and "log compactions" in out.stdout
    off = subprocess.run([sys.executable, "-m", "tinyraftplus.sim", "--seeds", "0:2",
                          "--snapshot-entries", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert off.returncode == 0 and "snapshots:          off" in off.stdout


@pytest.mark.slow
def test_slow_snapshots_2000_seeds():
    jobs = max(2, os.cpu_count() or 2)
    s = run_seeds(range(2000), SimConfig(snapshot_entries=5), jobs=jobs, record_trace=False)
    print(f"\n{s.text()}")
    assert s.violations == 0, s.text() + "\n" + s.failures[0].report
    assert s.snap["installs"] > 1000


# --- core bugs found on the way (CORE_BUGS.md; fixed on main): regression tests ---------------

def test_core_bug_1_restart_with_compacted_config_entry():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_snapshot_core import SnapCluster, _write

    from tinyraftplus.raft.core import RaftCore
    from tinyraftplus.raft.membership import Config
    from tinyraftplus.raft.snapshot import SnapshotBase

    c = SnapCluster([1, 2, 3])
    leader = c.wait_leader()
    _write(c, 3)
    core = c.cores[leader]
    core.propose_config(core.configuration.voters, frozenset())  # a configuration entry
    c.stabilize()
    cseq = core.config_seq
    cterm = core.term_at(cseq)
    _write(c, 10)
    meta = c.take_snapshot(leader)  # compacts the log past the configuration entry
    log = c.logs[leader]
    assert log.first_seq > cseq >= 0 and c.hard[leader].configs is not None
    base = SnapshotBase(meta.seq, meta.term, Config.decode(meta.config), cseq, cterm)
    c.crash(leader)
    core = RaftCore(leader, c.ids, log, c.hard[leader], config=c.config,
                    snapshots=c.sources[leader], snapshot_base=base)
    assert core.configuration.voters == frozenset(c.ids)


def test_core_bug_2_conflict_hint_below_compaction():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_snapshot_core import SnapCluster, _write

    c = SnapCluster([1, 2, 3])
    a = c.wait_leader()
    _write(c, 3)
    k = c.logs[a].seq  # committed everywhere
    # A (the leader) appends 30 entries of its term that nobody else gets, and is cut off.
    c.partition([a], [i for i in c.ids if i != a])
    for n in range(30):
        c.cores[a].propose([b"lost%d" % n])
        c.handle(a)
    c.advance(2.0)
    b = c.wait_leader()
    _write(c, 40)  # a newer term's entries over k+1..
    others = [i for i in c.ids if i != a]
    c.run_until(lambda: all(c.applied[i] == c.applied[b] for i in others))
    for i in others:  # snapshot, compact to k + 10 (a trailing window), restart
        c.take_snapshot(i, trailing=c.logs[i].seq - (k + 10))
        assert c.logs[i].first_seq == k + 11
        c.crash(i)
    for i in others:
        c.start(i)
    lead = c.wait_leader()  # a restarted node: its in-memory log cache is empty
    c.heal()
    c.run_until(lambda: c.applied[a] == c.applied[lead])


def test_settled_nodes_must_hold_the_same_state():
    from tinyraftplus.sim import SafetyViolation

    sim = Simulation(3, SimConfig(faults=False, nodes=3, snapshot_entries=5))
    sim.run()
    sim._check_state_agreement()  # holds
    sim.nodes[2].sm.inner.data["k0"] = "tampered"
    with pytest.raises(SafetyViolation) as ei:
        sim._check_state_agreement()
    assert ei.value.invariant == "state agreement" and 2 in ei.value.nodes


def test_core_bug_3_install_keeps_config_index_of_the_kept_log():
    from tinyraftplus.entry import ConfigEntry
    from tinyraftplus.raft.core import RaftCore
    from tinyraftplus.raft.membership import Config, ConfigStack
    from tinyraftplus.raft.memory import MemoryLog
    from tinyraftplus.raft.snapshot import SnapshotBase
    from tinyraftplus.raft.state import HardState

    cfg = Config(frozenset({1, 2, 3}))
    log = MemoryLog([Entry(0, 1, b""), Entry(1, 1, b"a"),
                     Entry(2, 1, cfg.encode()),  # stored untyped, as FsLog does
                     Entry(3, 1, b"b"), Entry(4, 1, b"c")])
    hs = HardState(term=1, configs=ConfigStack(((2, 1, cfg),)), config_index=((2, 1),))
    core = RaftCore(2, [1, 2, 3], log, hs)
    assert type(core.read_entries(2, 2, 1 << 20)[0]) is ConfigEntry
    core.snapshot_installed(SnapshotBase(3, 1, cfg, 2, 1), None)  # the log is kept (0..4)
    assert type(core.read_entries(2, 2, 1 << 20)[0]) is ConfigEntry
