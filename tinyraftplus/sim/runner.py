"""Run many seeds, optionally on several processes, and summarise them.

Workers get ``(seed, config, app factory)`` and send back plain tuples (a violation travels
as its report text, since exceptions with keyword arguments do not pickle). Results are
merged in seed order so a summary does not depend on scheduling.
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError
from .app import SimApp
from .cluster import SimConfig, run_seed

__all__ = ["SeedOutcome", "Summary", "run_seeds", "load_app", "parse_seed_range"]


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
    short: str = ""
    report: str = ""


@dataclass
class Summary:
    seeds: int = 0
    ops: int = 0
    messages: int = 0
    elections: int = 0
    crashes: int = 0
    partitions: int = 0
    checks: int = 0
    seconds: float = 0.0
    jobs: int = 1
    failures: list[SeedOutcome] = field(default_factory=list)

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
        self.checks += o.checks
        if not o.ok:
            self.failures.append(o)

    def text(self, config: SimConfig | None = None) -> str:
        lines = [
            f"seeds run:          {self.seeds}",
            f"operations checked: {self.ops} (linearizability, per key)",
            f"invariant checks:   {self.checks}",
            f"elections won:      {self.elections}",
            f"crashes:            {self.crashes}",
            f"partitions:         {self.partitions}",
            f"messages sent:      {self.messages}",
            f"violations:         {self.violations}",
            f"time:               {self.seconds:.1f} s on {self.jobs} process(es) "
            f"({1000 * self.seconds / max(1, self.seeds):.1f} ms per seed wall)",
        ]
        for o in sorted(self.failures, key=lambda o: o.seed)[:20]:
            replay = (config or SimConfig()).replay_command(o.seed)
            lines.append(f"  seed {o.seed}: [{o.invariant}] {o.short.splitlines()[0]}")
            lines.append(f"    replay: {replay}")
        if self.violations > 20:
            lines.append(f"  ... and {self.violations - 20} more")
        return "\n".join(lines)


AppFactory = Callable[[], SimApp]


def load_app(spec: str) -> AppFactory:
    """``"package.module:factory"`` -> the factory (a callable returning a ``SimApp``)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise InvalidArgumentError(
            f"--app {spec!r}: expected 'module:factory', e.g. 'myapp.sim:make_app'"
        )
    factory = getattr(importlib.import_module(mod_name), attr, None)
    if not callable(factory):
        raise InvalidArgumentError(f"--app {spec!r}: {attr} is not a callable in {mod_name}")
    return factory  # type: ignore[no-any-return]


def parse_seed_range(text: str) -> range:
    """``"0:10000"`` -> ``range(0, 10000)``; ``"7"`` -> ``range(7, 8)``."""
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return range(int(a), int(b))
        n = int(text)
        return range(n, n + 1)
    except ValueError:
        raise InvalidArgumentError(
            f"seed range {text!r}: expected START:STOP (STOP excluded) or one seed"
        ) from None


def _one(seed: int, config: SimConfig, app_factory: AppFactory | None,
         record_trace: bool) -> SeedOutcome:
    app = app_factory() if app_factory is not None else None
    r = run_seed(seed, config, app, record_trace=record_trace)
    v = r.violation
    return SeedOutcome(
        seed, r.ok, r.ops, r.messages, r.elections, r.crashes, r.partitions, r.checks,
        invariant=v.invariant if v else "", short=v.short if v else "",
        report=str(v) if v else "",
    )


def _work(args: tuple[list[int], SimConfig, AppFactory | None, bool]) -> list[SeedOutcome]:
    seeds, config, factory, record = args
    return [_one(s, config, factory, record) for s in seeds]


def run_seeds(seeds: Iterable[int], config: SimConfig | None = None, *, jobs: int = 1,
              app_factory: AppFactory | None = None, record_trace: bool = True,
              stop_after: int | None = None,
              progress: Callable[[Summary], None] | None = None) -> Summary:
    """Run ``seeds`` (on ``jobs`` processes when > 1) and return a :class:`Summary`.

    ``stop_after``: stop early once that many violations were found (handy when hunting a
    deliberate bug). ``app_factory`` must be picklable (a module-level function) when
    ``jobs > 1``."""
    config = config if config is not None else SimConfig()
    seeds = list(seeds)
    summary = Summary(jobs=max(1, jobs))
    t0 = time.perf_counter()
    if jobs <= 1:
        for s in seeds:
            summary.add(_one(s, config, app_factory, record_trace))
            if progress is not None:
                progress(summary)
            if stop_after is not None and summary.violations >= stop_after:
                break
    else:
        chunk = max(1, min(25, len(seeds) // (jobs * 8) or 1))
        work = [(seeds[i:i + chunk], config, app_factory, record_trace)
                for i in range(0, len(seeds), chunk)]
        ctx = multiprocessing.get_context("fork" if hasattr(multiprocessing, "get_context")
                                          else None)
        with ctx.Pool(jobs) as pool:
            for outcomes in pool.imap(_work, work):
                for o in outcomes:
                    summary.add(o)
                if progress is not None:
                    progress(summary)
                if stop_after is not None and summary.violations >= stop_after:
                    pool.terminate()
                    break
    summary.seconds = time.perf_counter() - t0
    return summary
