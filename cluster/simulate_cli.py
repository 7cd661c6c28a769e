"""``hypermesh simulate``: run the deterministic simulator over many seeds.

Wired into ``cluster/cli.py`` through ``add_commands(subparsers)``; also runnable alone
as ``python -m cluster.simulate_cli --seeds 50``. A failing seed prints the exact
command that replays it; replaying one seed (``--seed S``) prints its fault timeline.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Sequence

from consensus.byzantine import BYZANTINE_MODES
from consensus.sim.runner import run_seed
from consensus.sim.scenarios import SCENARIOS, scenario_for

ALL = "all"


def _count_of_seeds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1 seed (0 would run nothing and report success)")
    return value


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=_count_of_seeds, default=100, help="how many seeds per scenario (default 100)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--seed", type=int, default=None, help="replay exactly this one seed, with its timeline")
    parser.add_argument("--nodes", type=int, choices=(4, 7), default=None, help="cluster size (default: the scenario's)")
    parser.add_argument("--byzantine", nargs="+", choices=(*BYZANTINE_MODES, "none"), default=None, metavar="MODE",
                        help=f"one Byzantine node per MODE ({', '.join(BYZANTINE_MODES)}; 'none' for no Byzantine node)")
    parser.add_argument("--scenario", default=ALL, choices=(ALL, *SCENARIOS),
                        help="scenario to run (default: every scenario that must stay safe)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per seed, and the timeline of replayed seeds")
    parser.set_defaults(func=run_command)


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``simulate`` on the ``hypermesh`` command's subparsers."""
    parser = subparsers.add_parser(
        "simulate",
        help="run the deterministic cluster simulator over many seeds",
        description="Run N replicas in one process under a seeded, faulty network and check "
        "agreement, validity, exactly-once, results, certificates and liveness. Exit code 1 "
        "on any violation. See docs/SIMULATION.md.",
    )
    _configure(parser)


def run_command(options: argparse.Namespace) -> int:
    byzantine: tuple[str, ...] | None = None
    if options.byzantine is not None:
        byzantine = () if options.byzantine == ["none"] else tuple(options.byzantine)
    names = [options.scenario] if options.scenario != ALL else [s.name for s in SCENARIOS.values() if s.expect_safety]
    seeds = [options.seed] if options.seed is not None else list(range(options.start, options.start + options.seeds))
    trace = print if (options.verbose and options.seed is not None) else None

    started = time.perf_counter()
    runs = 0
    virtual_ms = 0
    kinds: Counter[str] = Counter()
    failing: list[str] = []
    live_expected = live_ok = 0
    for name in names:
        base = SCENARIOS[name]
        try:
            scenario = scenario_for(name, nodes=options.nodes, byzantine=byzantine)
        except ValueError as exc:
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        print(f"scenario {name} ({scenario.nodes} nodes, byzantine={list(scenario.byzantine)}, twins={scenario.twins}): "
              f"{len(seeds)} seed(s)", flush=True)
        for done, seed in enumerate(seeds, start=1):
            result = run_seed(scenario, seed, base=base, trace=trace)
            runs += 1
            virtual_ms += result.virtual_ms
            if result.expect_liveness:
                live_expected += 1
                live_ok += result.all_final
            if options.verbose:
                state = "ok" if result.ok else f"{len(result.violations)} violation(s)"
                print(f"  seed {seed}: {state}, {result.virtual_ms} virtual ms, all final={result.all_final}, "
                      + ", ".join(f"{k}={v}" for k, v in result.stats.items() if v))
            if not result.ok:
                failing.append(result.replay)
                for violation in result.violations:
                    kinds[violation.kind] += 1
                print(f"  FAIL seed {seed}: replay with: {result.replay}", flush=True)
                for violation in result.violations[:10]:
                    print(f"    {violation}")
            elif done % 25 == 0:
                print(f"  {done}/{len(seeds)} seeds ok", flush=True)
    elapsed = time.perf_counter() - started
    print(f"\nseeds run: {runs}; failing seeds: {len(failing)}; violations: "
          + (", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) or "none"))
    print(f"liveness: {live_ok}/{live_expected} seeds with every request final where it is promised (<= f faulty)")
    print(f"time: {virtual_ms / 1000:.1f} s virtual, {elapsed:.1f} s real")
    if failing:
        print("replay the failing seeds with:")
        for command in failing[:20]:
            print(f"  {command}")
    return 1 if failing else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.simulate_cli", description="HyperMesh cluster simulator")
    _configure(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
