"""Command line: ``python -m tinyraftplus.sim --seeds 0:10000 --jobs 2`` or replay one seed
with ``python -m tinyraftplus.sim --seed N --steps M --trace``. Exit status 1 on a violation."""

from __future__ import annotations

import argparse
import ast
import os
import sys

from ..errors import InvalidArgumentError
from .cluster import ALL_BUGS, SimConfig, Simulation
from .invariants import SafetyViolation
from .runner import load_app, parse_seed_range, run_seeds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tinyraftplus.sim",
        description="Run Raft clusters on virtual time with faults; check safety invariants "
        "and linearizability of the client history for every seed.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="run one seed (a replay)")
    which.add_argument("--seeds", default="0:100", help="START:STOP seed range (default 0:100)")
    p.add_argument("--steps", type=int, default=SimConfig.steps,
                   help=f"virtual steps per seed (default {SimConfig.steps})")
    p.add_argument("--nodes", type=int, default=None, help="cluster size (default: 3 or 5 "
                   "from the seed)")
    p.add_argument("--clients", type=int, default=SimConfig.clients)
    p.add_argument("--keys", type=int, default=SimConfig.keys)
    p.add_argument("--no-faults", action="store_true", help="no drops, partitions or crashes")
    p.add_argument("--bug", action="append", default=[], choices=sorted(ALL_BUGS),
                   help="switch on a deliberate bug (repeatable)")
    p.add_argument("--preset", choices=["default", "churn"], default="default",
                   help="churn: harsher faults that find subtle Raft bugs in fewer seeds")
    p.add_argument("--election-timeout", type=float, default=None,
                   help="seconds (default: 0.05 .. 0.3 from the seed)")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="pin a fault-profile knob, e.g. --set drop=0.2 --set rpc_max=1 "
                   "(repeatable; see tinyraftplus.sim.cluster._Profile)")
    p.add_argument("--jobs", type=int, default=1,
                   help=f"worker processes for --seeds (this machine has {os.cpu_count()})")
    p.add_argument("--app", default=None,
                   help="module:factory returning a tinyraftplus.sim.SimApp (default: the "
                   "key-value store)")
    p.add_argument("--trace", action="store_true", help="with --seed: print the whole trace")
    p.add_argument("--stop-after", type=int, default=None,
                   help="with --seeds: stop after this many violations")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = []
        for item in args.set:
            name, eq, value = item.partition("=")
            if not eq:
                raise InvalidArgumentError(f"--set {item!r}: expected KNOB=VALUE")
            try:
                overrides.append((name.strip(), ast.literal_eval(value.strip())))
            except (ValueError, SyntaxError):
                raise InvalidArgumentError(
                    f"--set {item!r}: VALUE must be a Python literal (0.2, 1, True)"
                ) from None
        kw = dict(steps=args.steps, clients=args.clients, keys=args.keys,
                  faults=not args.no_faults, bugs=frozenset(args.bug),
                  overrides=tuple(overrides))
        if args.nodes is not None:
            kw["nodes"] = args.nodes
        if args.election_timeout is not None:
            kw["election_timeout"] = args.election_timeout
        config = SimConfig.churn(**kw) if args.preset == "churn" else SimConfig(**kw)
        factory = load_app(args.app) if args.app else None
    except InvalidArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        sim = Simulation(args.seed, config, factory() if factory else None)
        try:
            res = sim.run()
        except SafetyViolation as v:
            if args.trace:
                print("\n".join(sim.trace_lines()))
                print()
            print(v)
            return 1
        if args.trace:
            print("\n".join(sim.trace_lines()))
        print(f"seed {res.seed}: ok; {res.ops} operations linearizable, "
              f"{res.acked_writes} acknowledged writes, {res.elections} elections, "
              f"{res.crashes} crashes, {res.partitions} partitions, {res.messages} messages, "
              f"{res.virtual_time:.3f}s virtual; trace sha256 {res.trace_hash[:16]}")
        return 0
    seeds = parse_seed_range(args.seeds)
    summary = run_seeds(seeds, config, jobs=args.jobs, app_factory=factory,
                        stop_after=args.stop_after)
    print(summary.text(config))
    if summary.failures:
        first = min(summary.failures, key=lambda o: o.seed)
        print()
        print(f"first failure (seed {first.seed}):")
        print(first.report)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
