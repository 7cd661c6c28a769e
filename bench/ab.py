#!/usr/bin/env python3
"""A/B: the same cluster benchmark on two revisions, interleaved in one run.

    .venv/bin/python bench/ab.py --base 3682e50                    # base vs the working tree
    .venv/bin/python bench/ab.py --base HEAD~3 --nodes 1 --rounds 4

This machine is shared and its speed drifts by tens of percent between minutes, so two
separate runs of bench/load.py cannot show a 10 % change. This script checks the base
revision out into a temporary git worktree and runs the two variants in alternating
order (A B, B A, A B, ...: whichever goes second in a pair runs slower), each time a
fresh local cluster on [::1] with the same precomputed kind of load, and reports
per-variant medians and the B/A ratios.

Each run: ``--requests`` closed-loop requests at ``--concurrency`` in flight (or an open
loop at ``--rate``) against a
fresh ``--nodes``-node cluster (the code under test is the variant's, for the nodes and
for the client). Reported: throughput, p50/p99 latency, server CPU per request (from
/proc), and UDP receive-buffer drops per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside one variant's tree: only functions that bench/load.py has had all along.
DRIVER = r"""
import asyncio, json, sys, tempfile
from pathlib import Path
tree, nodes, requests, concurrency, port, rate = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                                  int(sys.argv[5]), float(sys.argv[6]))
sys.path.insert(0, tree)
import bench.load as bl
from cluster.manifest import load_manifest

def drops():
    for line in open("/proc/net/snmp6"):
        name, value = line.split()
        if name == "Udp6RcvbufErrors":
            return int(value)
    return 0

with tempfile.TemporaryDirectory(prefix="hm-ab-") as tmp:
    cluster = bl.start_cluster(Path(tmp) / "c", nodes, port, 64, "ML-DSA-65")
    try:
        manifest = load_manifest(cluster.directory)
        payloads = bl.precompute(manifest, requests, "ML-DSA-44")
        pids = [n.process.pid for n in cluster.nodes.values() if n.process]
        before = drops()
        if rate > 0:
            r = asyncio.run(bl.open_loop(manifest, payloads, rate, pids, "ab"))
        else:
            r = asyncio.run(bl.closed_loop(manifest, payloads, concurrency, pids, "ab"))
        print("RESULT " + json.dumps({"rate": r.rate, "p50": r.pct(0.5), "p99": r.pct(0.99),
                                      "cpu_us": r.cpu_us_per_request(), "errors": r.errors,
                                      "drops": (drops() - before) / r.requests}), flush=True)
    finally:
        cluster.stop()
"""

METRICS = (("rate", "throughput (req/s)"), ("p50", "p50 (ms)"), ("p99", "p99 (ms)"),
           ("cpu_us", "server CPU/request (µs)"), ("drops", "UDP drops/request"))


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev],
                   check=True, capture_output=True, text=True)
    return into


def run_variant(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tree), str(args.nodes), str(args.requests), str(args.concurrency),
         str(args.base_port), str(args.rate)],
        capture_output=True, text=True, timeout=900, cwd=tree,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"the run in {tree} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (variant A)")
    parser.add_argument("--nodes", type=int, default=4, help="cluster size (default 4)")
    parser.add_argument("--requests", type=int, default=800, help="requests per run (default 800)")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop requests in flight (default 64)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop at this many requests/s instead of the closed loop (latency at a fixed load)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs to run; use an even number (default 2)")
    parser.add_argument("--base-port", type=int, default=33292, help="first UDP port on [::1] (default 33292)")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 10 or args.requests < 100:
        parser.error("--rounds must be 1..10 and --requests >= 100")

    with tempfile.TemporaryDirectory(prefix="hm-ab-tree-") as tmp:
        base_tree = checkout(args.base, Path(tmp) / "base")
        try:
            runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
            for round_no in range(1, args.rounds + 1):
                # A B, then B A: the run that goes second inherits the first one's disk
                # writeback and warm-up (the same code measured 1.06-1.29x slower p50
                # in second place); alternating cancels that out over pairs of rounds.
                order = (("A", base_tree), ("B", ROOT)) if round_no % 2 else (("B", ROOT), ("A", base_tree))
                for name, tree in order:
                    os.sync()  # the previous run's dirty pages go to disk now, not during this run
                    result = run_variant(tree, args)
                    runs[name].append(result)
                    print(f"round {round_no} {name}: {result['rate']:.0f} req/s, {result['cpu_us']:.0f} µs/request, "
                          f"p99 {result['p99']:.0f} ms, drops {result['drops']:.2f}/request", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)

    load = f"open loop {args.rate:,.0f}/s" if args.rate > 0 else f"closed loop ×{args.concurrency}"
    print(f"\nA = {args.base}, B = working tree; {args.nodes} node(s), {load}, "
          f"{args.requests} requests, {args.rounds} interleaved rounds (medians)\n")
    print("| metric | A | B | B / A |")
    print("|---|---|---|---|")
    for key, label in METRICS:
        a = statistics.median(r[key] for r in runs["A"])
        b = statistics.median(r[key] for r in runs["B"])
        ratio = f"{b / a:.2f}" if a else "–"
        print(f"| {label} | {a:,.2f} | {b:,.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
