"""Your own state machine through the simulator: ``python examples/sim_counter.py``
(or ``python -m tinyraftplus.sim --seeds 0:1000 --app examples/sim_counter.py:make_app``)."""

import sys

import msgpack

from tinyraftplus.sim import OpSpec, SimApp, run_seeds


class Counter:  # your state machine
    def __init__(self):
        self.n = 0

    def apply(self, data, seq):  # one committed entry; b"" is a leader's no-op
        if data:
            self.n += msgpack.unpackb(data)

    def read(self, query):
        return self.n


class CounterWorkload:  # invents operations and encodes them
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


class CounterModel:  # what a correct counter answers
    def init(self, key):
        return 0

    def step(self, state, op):
        if op.kind == "add":
            return True, state + op.input
        return op.pending or op.output == state, state

    def observes(self, reader, writer):
        return False


def make_app():  # module level, so --jobs can pickle it
    return SimApp(Counter, CounterWorkload(), CounterModel())


if __name__ == "__main__":
    summary = run_seeds(range(100), app_factory=make_app, jobs=2)
    print(f"{summary.seeds} seeds, {summary.violations} violations")  # .text(): all figures
    if summary.failures:  # each with a replay command that names this file as --app
        print(summary.text())
        sys.exit(1)
