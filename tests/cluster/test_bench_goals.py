"""bench/load.py states issue #2's two speed goals from the run's own phases."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "load.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_goals_are_worked_out_from_the_phases_and_judged_at_their_thresholds() -> None:
    load = _load()
    R = load.Result
    inproc = R("in-process (execute_batch)", 1000, 0.5, [1.0])  # 2,000/s
    half = [R("1 node, open loop 500/s (half of saturation)", 1000, 2.0, [10.0] * 99 + [p99]) for p99 in (19.9, 20.0)]
    at_half = R("1 node, closed loop ×64", 1000, 1.0, [5.0])  # 1,000/s: exactly 50 %
    below = R("1 node, closed loop ×64", 1000, 1.01, [5.0])
    cluster = R("4 nodes, closed loop ×64", 1000, 0.1, [1.0])  # never mistaken for the single node

    met = load.single_node_goals([inproc, at_half, half[0], cluster])
    assert met == ["goal: 1 node over STOQ >= 50 % of the in-process rate: 1,000 / 2,000 = 50% (met)",
                   "goal: 1 node p99 < 20 ms at half of saturation: 19.9 ms at 500/s (met)"]
    unmet = load.single_node_goals([cluster, below, half[1], inproc])
    assert [line.rsplit("(", 1)[1] for line in unmet] == ["not met)", "not met)"]
    assert load.single_node_goals([cluster]) == []  # --skip-cluster's opposite: no single-node phases
