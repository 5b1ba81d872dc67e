"""Command line: ``python -m tinyraftplus.sim --seeds 0:10000 --jobs 2`` or replay one seed
with ``python -m tinyraftplus.sim --seed N --steps M --trace``.

Exit status: 0 when every seed held, 1 on a violation (or when the run itself failed), 2 for a
command-line mistake (one line naming the option and the fix), 130 on Ctrl-C. ``--debug``
shows the traceback of an unexpected error."""

from __future__ import annotations

import argparse
import ast
import os
import sys
import traceback
from typing import Any, NoReturn

from .._interrupt import run_command
from ..errors import InvalidArgumentError
from .app import SimApp
from .cluster import ALL_BUGS, SimConfig, Simulation
from .invariants import SafetyViolation
from .runner import (
    CONFIG_FIELDS,
    app_spec,
    load_app,
    parse_seed_range,
    replay_command,
    report_with_replay,
    run_seeds,
)

PROG = "python -m tinyraftplus.sim"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the option, not the whole usage block.
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _int_at_least(low: int) -> Any:
    def conv(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is too small: use {low} or more")
        return n

    return conv


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return x


def _seed_range(text: str) -> range:
    try:
        return parse_seed_range(text)
    except InvalidArgumentError as e:  # argparse names the option itself
        raise argparse.ArgumentTypeError(str(e).removeprefix("--seeds ")) from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run Raft clusters on virtual time with faults; check safety invariants "
        "and linearizability of the client history for every seed.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--seed", type=_int_at_least(0), help="run one seed (a replay)")
    which.add_argument("--seeds", type=_seed_range, default=range(0, 100),
                       help="START:STOP seed range, STOP excluded (default 0:100)")
    p.add_argument("--steps", type=_int_at_least(0), default=SimConfig.steps,
                   help=f"virtual steps per seed (default {SimConfig.steps})")
    p.add_argument("--nodes", type=_int_at_least(1), default=None,
                   help="cluster size (default: 3 or 5 from the seed)")
    p.add_argument("--clients", type=_int_at_least(0), default=SimConfig.clients,
                   help=f"concurrent clients (default {SimConfig.clients})")
    p.add_argument("--keys", type=_int_at_least(1), default=SimConfig.keys,
                   help=f"keys the default key-value workload uses (default {SimConfig.keys})")
    p.add_argument("--snapshot-entries", type=_int_at_least(0), default=None, metavar="N",
                   help="each node snapshots its state machine every N applied entries and "
                   "compacts its log behind it (0: off; default: drawn from the seed, off in "
                   "some seeds and 4 to 25 in the others)")
    p.add_argument("--no-faults", action="store_true", help="no drops, partitions or crashes")
    p.add_argument("--bug", action="append", default=[], choices=sorted(ALL_BUGS),
                   help="switch on a deliberate bug (repeatable)")
    p.add_argument("--preset", choices=["default", "churn"], default="default",
                   help="churn: harsher faults that find subtle Raft bugs in fewer seeds")
    p.add_argument("--election-timeout", type=_positive_float, default=None,
                   help="seconds (default: 0.05 .. 0.3 from the seed)")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="pin a fault-profile knob, e.g. --set drop=0.2 --set rpc_max=1 "
                   "(repeatable; see tinyraftplus.sim.cluster._Profile)")
    p.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any other SimConfig field, e.g. --config settle_time=40.0 "
                   f"(repeatable; one of {', '.join(CONFIG_FIELDS)}); replay commands "
                   "use it to reproduce runs started from Python")
    p.add_argument("--jobs", type=_int_at_least(1), default=1,
                   help=f"worker processes for --seeds (this machine has {os.cpu_count()})")
    p.add_argument("--app", default=None, metavar="MODULE:FACTORY",
                   help="a callable returning a tinyraftplus.sim.SimApp, as module:factory or "
                   "path/to/file.py:factory (default: the key-value store)")
    p.add_argument("--trace", action="store_true", help="with --seed: print the whole trace")
    p.add_argument("--stop-after", type=_int_at_least(1), default=None,
                   help="with --seeds: stop after this many violations")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an unexpected error")
    return p


def _literal(option: str, item: str, what: str) -> tuple[str, Any]:
    name, eq, value = item.partition("=")
    if not eq or not name.strip():
        raise InvalidArgumentError(f"{option} {item!r}: expected {what}=VALUE")
    try:
        return name.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise InvalidArgumentError(
            f"{option} {item!r}: VALUE must be a Python literal (0.2, 1, True, 'text')"
        ) from None


def _config(args: argparse.Namespace) -> SimConfig:
    overrides = []
    for item in args.set:
        name, value = _literal("--set", item, "KNOB")
        try:
            SimConfig(overrides=((name, value),))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"--set {item!r}: {e}") from None
        overrides.append((name, value))
    kw: dict[str, Any] = dict(steps=args.steps, clients=args.clients, keys=args.keys,
                              faults=not args.no_faults, bugs=frozenset(args.bug),
                              overrides=tuple(overrides))
    for item in args.config:
        name, value = _literal("--config", item, "FIELD")
        if name not in CONFIG_FIELDS:
            raise InvalidArgumentError(
                f"--config {item!r}: no such setting; use one of {', '.join(CONFIG_FIELDS)} "
                "(the others have options of their own, see --help)"
            )
        kw[name] = value
    if args.nodes is not None:
        kw["nodes"] = args.nodes
    if args.snapshot_entries is not None:
        kw["snapshot_entries"] = args.snapshot_entries
    if args.election_timeout is not None:
        kw["election_timeout"] = args.election_timeout
    return SimConfig.churn(**kw) if args.preset == "churn" else SimConfig(**kw)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except InvalidArgumentError as e:  # a command-line mistake the parser could not see
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output went into `head` or the like, which has stopped
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 1
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"{PROG}: error: {type(e).__name__}: {e} (--debug shows the traceback)",
                  file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    config = _config(args)
    factory = load_app(args.app) if args.app else None
    if factory is not None:
        app = factory()
        if not isinstance(app, SimApp):
            raise InvalidArgumentError(
                f"--app {args.app!r}: returned {type(app).__name__}, not a "
                "tinyraftplus.sim.SimApp; make the factory return SimApp(...)"
            )
    spec = app_spec(factory) if factory is not None else None
    if args.seed is not None:
        sim = Simulation(args.seed, config, factory() if factory else None)
        try:
            res = sim.run()
        except SafetyViolation as v:
            if args.trace:
                print("\n".join(sim.trace_lines()))
                print()
            print(report_with_replay(str(v), replay_command(args.seed, config, spec)))
            return 1
        if args.trace:
            print("\n".join(sim.trace_lines()))
        print(f"seed {res.seed}: ok; {res.ops} operations linearizable, "
              f"{res.acked_writes} acknowledged writes, {res.elections} elections, "
              f"{res.crashes} crashes, {res.partitions} partitions, {res.messages} messages, "
              f"{res.virtual_time:.3f}s virtual; trace sha256 {res.trace_hash[:16]}")
        sn = res.stats.get("snapshots", {})
        if sn.get("seeds"):
            print(f"  snapshots every {sim.snapshot_entries} entries (trailing "
                  f"{sim.trailing_entries}): {sn.get('taken', 0)} taken, "
                  f"{sn.get('installs', 0)} installed, {sn.get('restores', 0)} restarts from "
                  f"a snapshot, {sn.get('compactions', 0)} compactions")
        return 0
    summary = run_seeds(args.seeds, config, jobs=args.jobs, app_factory=factory,
                        stop_after=args.stop_after, app=spec)
    print(summary.text())
    if summary.failures:
        first = min(summary.failures, key=lambda o: o.seed)
        print()
        print(f"first failure (seed {first.seed}):")
        print(first.report)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    run_command(main, PROG)
