"""The simulator's command line as a user meets it: replay commands that reproduce exactly
what failed (including the user's own app and every setting), a right summary for failing
seeds, and command-line mistakes reported in one line with exit status 2."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tinyraftplus.sim import SafetyViolation, SimConfig, Simulation, run_seeds
from tinyraftplus.sim.runner import app_spec, load_app, replay_command

ROOT = Path(__file__).resolve().parent.parent

# A user's module with a broken state machine: it forgets every fifth add, on every node, so
# the history is not linearizable. The built-in key-value store passes the same seeds.
USER_APP = textwrap.dedent("""
    import msgpack
    from tinyraftplus.sim import OpSpec, SimApp

    class LossyCounter:
        def __init__(self):
            self.n = 0
            self.adds = 0
        def apply(self, data, seq):
            if data:
                self.adds += 1
                if self.adds % 5:
                    self.n += msgpack.unpackb(data)
        def read(self, query):
            return self.n

    class Workload:
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

    class Model:
        def init(self, key):
            return 0
        def step(self, state, op):
            if op.kind == "add":
                return True, state + op.input
            return op.pending or op.output == state, state
        def observes(self, reader, writer):
            return False

    def make_app():
        return SimApp(LossyCounter, Workload(), Model())
""")


@pytest.fixture
def user_app(tmp_path):
    (tmp_path / "lossy_counter.py").write_text(USER_APP)
    return tmp_path


def _sim(*args: str, cwd=ROOT, env_path: Path | None = None, timeout: float = 180):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(env_path) if env_path else "", str(ROOT)) if p)
    return subprocess.run([sys.executable, "-m", "tinyraftplus.sim", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _replay_args(text: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.strip().startswith("replay: "))
    argv = shlex.split(line.split("replay: ", 1)[1])
    assert argv[:3] == ["python", "-m", "tinyraftplus.sim"], line
    return argv[3:]


def test_failing_user_app_replays_as_failing(user_app):
    out = _sim("--seeds", "0:6", "--clients", "2", "--app", "lossy_counter:make_app",
               "--stop-after", "1", "--config", "settle_time=25.0", env_path=user_app)
    assert out.returncode == 1, out.stdout + out.stderr
    head = next(x for x in out.stdout.splitlines() if x.startswith("SAFETY VIOLATION"))
    args = _replay_args(out.stdout)
    assert "--app" in args and "lossy_counter:make_app" in args
    assert "--clients" in args and "settle_time=25.0" in args
    # the summary's replay line and the report's are the same command
    summary_line = next(x for x in out.stdout.splitlines() if x.startswith("    replay: "))
    assert shlex.split(summary_line.split("replay: ", 1)[1])[3:] == args
    replay = _sim(*args, env_path=user_app)
    assert replay.returncode == 1, replay.stdout[-3000:] + replay.stderr
    assert head in replay.stdout  # the same violation: seed, step, time, nodes, message
    # ... and the same seed with the built-in store is fine, so the --app is what matters
    args_kv = [a for a in args if a not in ("--app", "lossy_counter:make_app")]
    assert _sim(*args_kv).returncode == 0


def test_replay_from_python_names_the_app_and_settings(user_app, monkeypatch):
    monkeypatch.syspath_prepend(str(user_app))
    factory = load_app("lossy_counter:make_app")
    config = SimConfig(clients=2, op_timeout=2.0)
    s = run_seeds(range(6), config, app_factory=factory, stop_after=1)
    assert s.violations == 1
    text = s.text()  # no config passed: the summary knows what it ran with
    args = _replay_args(text)
    assert args[args.index("--app") + 1] == "lossy_counter:make_app"
    assert "op_timeout=2.0" in args and "--clients" in args
    assert s.failures[0].report.count("--app lossy_counter:make_app") == 1
    replay = _sim(*args, env_path=user_app)
    assert replay.returncode == 1 and s.failures[0].short in replay.stdout


def test_app_from_a_file_path(user_app):
    path = str(user_app / "lossy_counter.py")
    factory = load_app(f"{path}:make_app")
    assert app_spec(factory) == f"{path}:make_app"
    out = _sim("--seeds", "0:6", "--clients", "2", "--app", f"{path}:make_app",
               "--stop-after", "1", cwd=user_app.parent)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"--app {path}:make_app" in out.stdout


def test_unnamed_factory_is_said_not_replaced_by_the_kv_store(user_app, monkeypatch):
    monkeypatch.syspath_prepend(str(user_app))
    make = load_app("lossy_counter:make_app")
    s = run_seeds(range(6), SimConfig(clients=2), app_factory=lambda: make(), stop_after=1)
    assert s.violations == 1
    replay = next(x for x in s.text().splitlines() if "replay: " in x)
    assert "no importable name" in replay and "python -m" not in replay


def test_replay_command_keeps_every_setting():
    cfg = SimConfig.churn(clients=4, keys=2, steps=120, bugs=frozenset({"forget_vote"}),
                          overrides=(("drop", 0.2),), step_dt=0.02, require_liveness=False)
    cmd = replay_command(7, cfg, "pkg.mod:make")
    for part in ("--seed 7", "--steps 120", "--clients 4", "--keys 2", "--bug forget_vote",
                 "--set drop=0.2", "--config step_dt=0.02", "--config require_liveness=False",
                 "--app pkg.mod:make", "--trace"):
        assert part in cmd, cmd
    # and the command line parses back to the same configuration
    from tinyraftplus.sim.__main__ import _config, _parser
    args = _parser().parse_args(shlex.split(cmd)[3:])
    assert _config(args) == cfg


def test_summary_counts_partitions_of_failing_seeds():
    cfg = SimConfig(bugs=frozenset({"skip_fsync"}))
    s = run_seeds(range(5), cfg, stop_after=5)
    assert s.violations == 5
    for failed in s.failures:
        # what the trace of that seed shows, up to the failure
        sim = Simulation(failed.seed, cfg)
        with pytest.raises(SafetyViolation):
            sim.run()
        lines = sim.trace_lines()
        assert failed.partitions == sum(" partition " in x for x in lines)
        assert failed.crashes == sim.crashes
    assert s.partitions == sum(f.partitions for f in s.failures) > 0
    assert "partitions:         0" not in s.text()


@pytest.mark.parametrize("args,words", [
    (["--seeds", "0-3"], ["--seeds", "'0-3'", "0:4"]),
    (["--seeds", "9:2"], ["--seeds", "empty"]),
    (["--app", "no_such_module_here:make_app"], ["--app", "no_such_module_here", "PYTHONPATH"]),
    (["--app", "tinyraftplus.sim:nope"], ["--app", "no callable 'nope'"]),
    (["--app", "justamodule"], ["--app", "MODULE:FACTORY"]),
    (["--app", "builtins:dict"], ["--app", "returned dict", "SimApp"]),
    (["--steps", "x"], ["--steps", "whole number"]),
    (["--set", "dorp=0.1"], ["--set", "dorp"]),
    (["--config", "nope=1"], ["--config", "settle_time"]),
])
def test_command_line_mistakes_one_line_exit_2(args, words):
    out = _sim(*args, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]


def test_broken_app_module_is_one_line_unless_debug(tmp_path):
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('my module is broken')\n")
    out = _sim("--seeds", "0:1", "--app", "broken_app:make_app", env_path=tmp_path, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "python -m tinyraftplus.sim: error: RuntimeError: my module is broken "
        "(--debug shows the traceback)"]
    debug = _sim("--seeds", "0:1", "--app", "broken_app:make_app", "--debug",
                 env_path=tmp_path, timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "my module is broken" in debug.stderr
