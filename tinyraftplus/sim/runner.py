"""Run many seeds, optionally on several processes, and summarise them.

Workers get ``(seed, config, app factory)`` and send back plain tuples (a violation travels
as its report text, since exceptions with keyword arguments do not pickle). Results are
merged in seed order so a summary does not depend on scheduling.

Every failure comes with a replay command that reproduces exactly that run: the seed, every
``SimConfig`` setting that differs from the default (the simulator's own options, and
``--config FIELD=VALUE`` for the settings only Python code can change) and ``--app`` naming the
state machine under test, so a failing user app replays as that app, not as the built-in
key-value store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import multiprocessing
import os
import shlex
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from .app import SimApp
from .cluster import SimConfig, Simulation
from .invariants import SafetyViolation

__all__ = [
    "SeedOutcome",
    "Summary",
    "run_seeds",
    "load_app",
    "app_spec",
    "parse_seed_range",
    "replay_command",
    "report_with_replay",
    "CONFIG_FIELDS",
]


@dataclass(frozen=True, slots=True)
class SeedOutcome:
    seed: int
    ok: bool
    ops: int
    messages: int
    elections: int
    crashes: int
    partitions: int
    checks: int
    invariant: str = ""
    wipes: int = 0
    member_changes: int = 0
    short: str = ""
    report: str = ""
    snap: tuple[tuple[str, int], ...] = ()  # snapshot counters (``Simulation.snap_stats``)


@dataclass
class Summary:
    seeds: int = 0
    ops: int = 0
    messages: int = 0
    elections: int = 0
    crashes: int = 0
    partitions: int = 0
    wipes: int = 0
    member_changes: int = 0
    checks: int = 0
    seconds: float = 0.0
    jobs: int = 1
    failures: list[SeedOutcome] = field(default_factory=list)
    snap: Counter[str] = field(default_factory=Counter)  # snapshot counters, summed
    config: SimConfig | None = None  # what the seeds ran with (for the replay commands)
    app: str | None = None  # ``module:factory`` of the app under test; None: the KV store
    app_unnamed: bool = False  # an app factory ran that has no importable name

    @property
    def violations(self) -> int:
        return len(self.failures)

    def add(self, o: SeedOutcome) -> None:
        self.seeds += 1
        self.ops += o.ops
        self.messages += o.messages
        self.elections += o.elections
        self.crashes += o.crashes
        self.partitions += o.partitions
        self.wipes += o.wipes
        self.member_changes += o.member_changes
        self.checks += o.checks
        self.snap.update(dict(o.snap))
        if not o.ok:
            self.failures.append(o)

    def text(self, config: SimConfig | None = None) -> str:
        """The summary, with a replay command for each of the first 20 failures. ``config``
        defaults to the one the seeds ran with."""
        lines = [
            f"seeds run:          {self.seeds}",
            f"operations checked: {self.ops} (linearizability, per key)",
            f"invariant checks:   {self.checks}",
            f"elections won:      {self.elections}",
            f"crashes:            {self.crashes}",
            f"partitions:         {self.partitions}",
            f"disks wiped:        {self.wipes}",
            f"membership changes: {self.member_changes} (and leadership transfers)",
            f"messages sent:      {self.messages}",
            *self._snap_lines(),
            f"violations:         {self.violations}",
            f"time:               {self.seconds:.1f} s on {self.jobs} process(es) "
            f"({1000 * self.seconds / max(1, self.seeds):.1f} ms per seed wall)",
        ]
        config = config or self.config or SimConfig()
        for o in sorted(self.failures, key=lambda o: o.seed)[:20]:
            replay = replay_command(o.seed, config, self.app, unnamed_app=self.app_unnamed)
            lines.append(f"  seed {o.seed}: [{o.invariant}] {o.short.splitlines()[0]}")
            lines.append(f"    replay: {replay}")
        if self.violations > 20:
            lines.append(f"  ... and {self.violations - 20} more")
        return "\n".join(lines)


    def _snap_lines(self) -> list[str]:
        sn = self.snap
        if not sn.get("seeds"):
            return ["snapshots:          off"]
        crashes = sorted((k[6:], v) for k, v in sn.items() if k.startswith("crash "))
        return [
            f"snapshots:          {sn['taken']} taken in {sn['seeds']} seeds with snapshots "
            f"on, {sn['installs']} installed by InstallSnapshot ({sn['resumed']} transfers "
            f"resumed from the follower's offset, {sn.get('early', 0)} chunks kept that "
            f"overtook a missing one), {sn['restores']} restarts "
            f"from a snapshot, {sn['compactions']} log compactions",
            f"snapshot faults:    {sum(v for _, v in crashes)} crashes during snapshot steps"
            + (" (" + ", ".join(f"{k} {v}" for k, v in crashes) + ")" if crashes else "")
            + f"; {sn['damaged']} damaged chunks or files caught by their CRC; "
            f"{sn['rot']} snapshot files rotted at rest; {sn['set aside']} leader copies "
            "set aside after a follower's SNAP_CORRUPT",
        ]


AppFactory = Callable[[], SimApp]


def load_app(spec: str) -> AppFactory:
    """``"package.module:factory"`` (or ``"path/to/file.py:factory"``) -> the factory (a
    callable returning a ``SimApp``).

    Raises :class:`InvalidArgumentError` naming ``--app`` and the fix when the module cannot
    be found or has no such callable; an error raised while importing the module itself (a
    bug in it) propagates as it is."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise InvalidArgumentError(
            f"--app {spec!r}: expected MODULE:FACTORY, e.g. --app myapp.sim:make_app "
            "(or --app path/to/file.py:make_app)"
        )
    if mod_name.endswith(".py") or os.sep in mod_name:
        module = _import_file(spec, mod_name)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise  # the module exists; something it imports does not
            raise InvalidArgumentError(
                f"--app {spec!r}: no module named {e.name!r} on the Python path; run from "
                "the directory that holds it, add that directory to PYTHONPATH, or give "
                "the file: --app path/to/file.py:FACTORY"
            ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InvalidArgumentError(
            f"--app {spec!r}: {mod_name} has no callable {attr!r}; name a module-level "
            "function (or class) that returns a tinyraftplus.sim.SimApp"
        )
    return factory  # type: ignore[no-any-return]


_FILE_MODULE = "_tinyraftplus_sim_app_"  # prefix of the modules --app loads from a file


def _import_file(spec: str, path: str) -> Any:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise InvalidArgumentError(
            f"--app {spec!r}: no file {full}; give an existing .py file or MODULE:FACTORY"
        )
    name = _FILE_MODULE + hashlib.sha256(full.encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    # As when the file runs as a script, its own directory is importable (its helpers).
    if os.path.dirname(full) not in sys.path:
        sys.path.insert(0, os.path.dirname(full))
    loader_spec = importlib.util.spec_from_file_location(name, full)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # so worker processes (forked) can unpickle its factory
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def app_spec(factory: AppFactory | None) -> str | None:
    """The ``--app`` text that loads ``factory`` in a new process, or None when it has no
    importable name (a lambda, a nested function, a ``functools.partial``)."""
    if factory is None:
        return None
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not module or not qualname or "<" in qualname or "." in qualname:
        return None
    if module.startswith(_FILE_MODULE):
        path = getattr(sys.modules.get(module), "__file__", None)
        return f"{path}:{qualname}" if path else None
    if module == "__main__":
        main = sys.modules.get("__main__")
        main_spec = getattr(main, "__spec__", None)
        if main_spec is not None and main_spec.name and main_spec.name != "__main__":
            module = main_spec.name  # run with python -m
        else:
            main_file = getattr(main, "__file__", None)  # run as a script
            return f"{os.path.abspath(main_file)}:{qualname}" if main_file else None
    return f"{module}:{qualname}"


# SimConfig settings that have an option of their own in the command line (``replay_command``
# of SimConfig writes them); every other field that differs from the default is written as
# ``--config FIELD=VALUE``.
_OWN_OPTIONS = frozenset({
    "steps", "nodes", "clients", "keys", "faults", "bugs", "election_timeout", "overrides",
    "snapshot_entries",
})
CONFIG_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(SimConfig) if f.name not in _OWN_OPTIONS
)


def replay_command(seed: int, config: SimConfig, app: str | None = None, *,
                   unnamed_app: bool = False) -> str:
    """The shell command that runs ``seed`` again exactly as ``config`` and the app did,
    printing its trace. ``unnamed_app``: an app ran whose factory has no importable name, so
    no command can load it (said in place of a command that would run the wrong app)."""
    base = config.replay_command(seed)
    trace = " --trace"
    if base.endswith(trace):
        base = base[: -len(trace)]
    parts = [base]
    defaults = SimConfig()
    for name in CONFIG_FIELDS:
        value = getattr(config, name)
        if value != getattr(defaults, name):
            parts.append("--config " + shlex.quote(f"{name}={value!r}"))
    if app is not None:
        parts.append("--app " + shlex.quote(app))
    elif unnamed_app:
        return (f"run_seed({seed}, config, app) in Python with your app: its factory has no "
                "importable name (make it a module-level function to get a command line)")
    parts.append("--trace")
    return " ".join(parts)


def report_with_replay(report: str, command: str) -> str:
    """``report`` (a violation's text) with its replay line set to ``command``."""
    return "\n".join(f"replay: {command}" if line.startswith("replay: ") else line
                     for line in report.splitlines())


def parse_seed_range(text: str) -> range:
    """``"0:10000"`` -> ``range(0, 10000)``; ``"7"`` -> ``range(7, 8)``."""
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            r = range(int(a), int(b))
        else:
            n = int(text)
            r = range(n, n + 1)
    except ValueError:
        example = "0:100"
        a, dash, b = text.partition("-")
        if dash and a.strip().isdigit() and b.strip().isdigit():
            example = f"{int(a)}:{int(b) + 1} for seeds {int(a)} to {int(b)}"
        raise InvalidArgumentError(
            f"--seeds {text!r}: use START:STOP with STOP excluded (e.g. --seeds {example}), "
            "or one seed"
        ) from None
    if not r:
        raise InvalidArgumentError(
            f"--seeds {text!r}: the range is empty; STOP must be greater than START, "
            "e.g. --seeds 0:100"
        )
    return r


def _one(seed: int, config: SimConfig, app_factory: AppFactory | None,
         record_trace: bool, app: str | None = None) -> SeedOutcome:
    sim = Simulation(seed, config, app_factory() if app_factory is not None else None,
                     record_trace)
    try:
        r = sim.run()
    except SafetyViolation as v:
        # Count what happened before the failure too (partitions, crashes, ...).
        report = report_with_replay(str(v), replay_command(
            seed, config, app, unnamed_app=app_factory is not None and app is None))
        return SeedOutcome(
            seed, False, len(sim.history), sim.net.sent, sim.elections, sim.crashes,
            sim.partitions, sim.inv.checks, invariant=v.invariant, short=v.short,
            report=report, wipes=sim.wipes, member_changes=sim.member_changes,
            snap=tuple(sim._snap_counts().items()),
        )
    return SeedOutcome(seed, True, r.ops, r.messages, r.elections, r.crashes, r.partitions,
                       r.checks, wipes=r.wipes, member_changes=r.member_changes,
                       snap=tuple(sim._snap_counts().items()))


def _work(args: tuple[list[int], SimConfig, AppFactory | None, bool, str | None]
          ) -> list[SeedOutcome]:
    seeds, config, factory, record, app = args
    return [_one(s, config, factory, record, app) for s in seeds]


def _ignore_sigint() -> None:
    # Ctrl-C reaches every process of the terminal's group; the parent handles it (and
    # terminates the pool), so the workers must not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_seeds(seeds: Iterable[int], config: SimConfig | None = None, *, jobs: int = 1,
              app_factory: AppFactory | None = None, record_trace: bool = True,
              stop_after: int | None = None,
              progress: Callable[[Summary], None] | None = None,
              app: str | None = None) -> Summary:
    """Run ``seeds`` (on ``jobs`` processes when > 1) and return a :class:`Summary`.

    ``stop_after``: stop early once that many violations were found (handy when hunting a
    deliberate bug). ``app_factory`` must be picklable (a module-level function) when
    ``jobs > 1``. ``app``: the ``--app`` text that loads ``app_factory`` in the replay
    commands (default: worked out from the factory's module and name)."""
    config = config if config is not None else SimConfig()
    seeds = list(seeds)
    if app is None:
        app = app_spec(app_factory)
    summary = Summary(jobs=max(1, jobs), config=config, app=app,
                      app_unnamed=app_factory is not None and app is None)
    t0 = time.perf_counter()
    if jobs <= 1:
        for s in seeds:
            summary.add(_one(s, config, app_factory, record_trace, app))
            if progress is not None:
                progress(summary)
            if stop_after is not None and summary.violations >= stop_after:
                break
    else:
        chunk = max(1, min(25, len(seeds) // (jobs * 8) or 1))
        work = [(seeds[i:i + chunk], config, app_factory, record_trace, app)
                for i in range(0, len(seeds), chunk)]
        ctx = multiprocessing.get_context("fork" if hasattr(multiprocessing, "get_context")
                                          else None)
        with ctx.Pool(jobs, initializer=_ignore_sigint) as pool:
            # Chunks are handed out a few at a time and collected in order; stopping early
            # means handing out no more and letting the ones out finish. (Terminating the
            # pool in the middle of an ``imap`` could leave the parent waiting forever.)
            todo = iter(work)
            out: deque[Any] = deque()

            def hand_out() -> None:
                w = next(todo, None)
                if w is not None:
                    out.append(pool.apply_async(_work, (w,)))

            for _ in range(2 * jobs):
                hand_out()
            stopping = False
            while out:
                for o in out.popleft().get():
                    summary.add(o)
                if progress is not None:
                    progress(summary)
                if stop_after is not None and summary.violations >= stop_after:
                    stopping = True
                if not stopping:
                    hand_out()
            pool.close()
            pool.join()
    summary.seconds = time.perf_counter() - t0
    return summary
