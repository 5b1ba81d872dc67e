"""A deterministic simulator for Raft clusters, with fault injection and safety checks.

It runs N real ``RaftCore`` instances (the same code ``RaftNode`` drives) on virtual time,
over a network that drops, delays, duplicates and reorders messages and makes partitions
(random splits, an isolated minority, an isolated leader, a bridge node that sees both sides,
one-way cuts), with nodes that crash at any storage step and restart from what they had
synced. Clients run put / get / append against a key-value store (or your own state machine)
through any node, retrying on timeouts and missing leaders. While it runs it checks election
safety, log matching, leader completeness, state machine safety, commit monotonicity and the
durability of acknowledged writes; at the end it checks the client history is linearizable.
With snapshots on (``SimConfig.snapshot_entries``, drawn from the seed by default) nodes
snapshot their state machines, compact their logs, restart from snapshots and catch up by
InstallSnapshot, with crashes at every snapshot storage step and damaged snapshot bytes (at
rest and in flight); every node's snapshot at a seq must hold the same state
(``sim/snapshots.py``). A seed fixes everything: the same seed replays the same trace.

Command line::

    python -m tinyraftplus.sim --seeds 0:10000 --jobs 2      # summary of 10,000 seeds
    python -m tinyraftplus.sim --seed 42 --steps 300 --trace  # replay one, print its trace
    python -m tinyraftplus.sim --seeds 0:500 --preset churn --bug commit_old_term
    python -m tinyraftplus.sim --seeds 0:2000 --jobs 2 --snapshot-entries 5  # snapshots on

From Python::

    from tinyraftplus.sim import SimConfig, run_seed, run_seeds
    result = run_seed(42)                       # SimResult; .violation is None when all held
    summary = run_seeds(range(1000), jobs=2)    # Summary; .failures lists violations

Running your own state machine
------------------------------
Give the simulator a :class:`SimApp`: a factory for your state machine (``apply(data, seq)``
for committed entries, ``b""`` being a leader's no-op; ``read(query)`` for linearizable
reads), a workload that invents operations and encodes them, and a model (the sequential
specification the history is checked against). Duplicate commits of retried writes are
filtered before your ``apply`` sees them (see :class:`SessionStateMachine`)::

    import msgpack
    from tinyraftplus.sim import OpSpec, SimApp, run_seeds

    class Counter:                              # the state machine under test
        def __init__(self):
            self.n = 0
        def apply(self, data, seq):
            if data:
                self.n += msgpack.unpackb(data)
            return None
        def read(self, query):
            return self.n

    class CounterWorkload:
        def next_op(self, rng, client, n):
            if rng.random() < 0.5:
                return OpSpec("add", "counter", rng.randint(1, 9), write=True)
            return OpSpec("get", "counter", None, write=False)
        def encode(self, op):
            return msgpack.packb(op.input)
        def query(self, op):
            return None
        def output(self, op, result):
            return result

    class CounterModel:                         # what a correct counter would answer
        def init(self, key):
            return 0
        def step(self, state, op):
            if op.kind == "add":
                return True, state + op.input
            return op.pending or op.output == state, state
        def observes(self, reader, writer):
            return False

    def make_app():                             # module level: picklable for --jobs
        return SimApp(Counter, CounterWorkload(), CounterModel())

    summary = run_seeds(range(200), app_factory=make_app)
    assert not summary.failures, summary.text()

or from the shell: ``python -m tinyraftplus.sim --seeds 0:1000 --app mymodule:make_app``.
"""

from __future__ import annotations

from .app import (
    KVStateMachine,
    KVWorkload,
    OpSpec,
    SessionStateMachine,
    SimApp,
    StateMachine,
    Workload,
    kv_app,
)
from .cluster import (
    ALL_BUGS,
    CORE_BUGS,
    SNAPSHOT_BUGS,
    SimConfig,
    SimResult,
    Simulation,
    run_seed,
)
from .invariants import SafetyViolation
from .linearizable import CheckResult, History, KVModel, Model, Operation, check
from .network import EventQueue, NetworkFaults, SimNetwork
from .runner import Summary, run_seeds
from .store import SimCrash, SimStore

__all__ = [
    "ALL_BUGS",
    "CORE_BUGS",
    "SNAPSHOT_BUGS",
    "CheckResult",
    "EventQueue",
    "History",
    "KVModel",
    "KVStateMachine",
    "KVWorkload",
    "Model",
    "NetworkFaults",
    "OpSpec",
    "Operation",
    "SafetyViolation",
    "SessionStateMachine",
    "SimApp",
    "SimConfig",
    "SimCrash",
    "SimNetwork",
    "SimResult",
    "SimStore",
    "Simulation",
    "StateMachine",
    "Summary",
    "Workload",
    "check",
    "kv_app",
    "run_seed",
    "run_seeds",
]
