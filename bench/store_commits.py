#!/usr/bin/env python3
"""COMMIT latency of the node's store, with SQLite's automatic WAL checkpoint versus the
background checkpointer (node/store.py), side by side in one run.

    .venv/bin/python bench/store_commits.py                 # 3000 commits of 48 KB each
    .venv/bin/python bench/store_commits.py --commits 10000 --kb 16

Each commit writes one record the size of a small batch (the replica persists a few
copies of a batch's request bytes per transaction) and then sleeps 2 ms, like a node
that commits once per event-loop pass. The tail is what matters: a COMMIT that has to
checkpoint the WAL stalls the whole event loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.store import Store  # noqa: E402


def run(background: bool, commits: int, size: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="hm-store-") as tmp:
        store = Store(Path(tmp) / "node.db", background_checkpoints=background)
        blob, times = os.urandom(size), []
        try:
            for i in range(commits):
                started = time.perf_counter()
                store.apply_records([(f"bench/{i % 500}", blob)])
                times.append((time.perf_counter() - started) * 1000)
                time.sleep(0.002)
        finally:
            store.close()
    return sorted(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", type=int, default=3000, help="transactions per variant (default 3000)")
    parser.add_argument("--kb", type=int, default=48, help="KB written per transaction (default 48)")
    args = parser.parse_args()
    if args.commits < 100 or not 1 <= args.kb <= 4096:
        parser.error("--commits must be >= 100 and --kb in 1..4096")
    print("| checkpoints | commits | p50 (ms) | p99 (ms) | p99.9 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|")
    for background in (False, True):
        t = run(background, args.commits, args.kb * 1024)
        pick = lambda q: t[min(len(t) - 1, int(q * len(t)))]  # noqa: E731
        name = "background thread" if background else "automatic (in COMMIT)"
        print(f"| {name} | {len(t)} | {pick(0.5):.2f} | {pick(0.99):.2f} | {pick(0.999):.2f} | {t[-1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
