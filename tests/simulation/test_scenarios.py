"""Many seeds per scenario: every safety invariant on every seed, liveness where <= f
nodes are faulty. A failure message carries the command that replays the seed."""

from __future__ import annotations

import pytest

from consensus.byzantine import BYZANTINE_MODES
from consensus.sim.runner import SimResult, run_seed
from consensus.sim.scenarios import SCENARIOS, scenario_for
from tests.simulation.budget import seeds

# (scenario, nodes, seeds): tuned so the whole file runs in ~3 minutes on 2 cores.
PLAN: list[tuple[str, int, int]] = [
    ("calm", 4, 10),
    ("calm", 7, 5),
    ("lossy", 4, 35),
    ("lossy", 7, 10),
    ("hostile-net", 4, 25),
    ("partition", 4, 30),
    ("partition", 7, 10),
    ("crash", 4, 35),
    ("crash", 7, 12),
    ("chaos", 4, 35),
    ("chaos", 7, 10),
    ("crash-stop", 4, 20),
    ("crash-stop", 7, 6),
    ("skew", 4, 15),
    ("no-retry", 4, 20),
    ("no-retry", 7, 6),
    ("power-cut", 4, 20),
    ("power-cut", 7, 6),
    ("amnesia", 4, 25),
    ("amnesia", 7, 6),
    ("byzantine-crash", 4, 20),
    ("byzantine-leader", 4, 20),
    ("byzantine-leader", 7, 6),
    ("twins", 4, 25),
    ("twins", 7, 8),
    ("dedup-expiry", 4, 15),
    ("dedup-expiry", 7, 5),
]
BYZANTINE_SEEDS = {4: 16, 7: 5}  # per mode


def _cases() -> list[object]:
    cases = []
    for name, nodes, count in PLAN:
        for seed in seeds(count):
            cases.append(pytest.param(name, nodes, None, seed, id=f"{name}-{nodes}-s{seed}"))
    for mode in BYZANTINE_MODES:
        for nodes, count in BYZANTINE_SEEDS.items():
            # 7 nodes tolerate two: pair each mode with equivocation (or silence).
            modes = (mode,) if nodes == 4 else (mode, "equivocate" if mode != "equivocate" else "silent")
            for seed in seeds(count, start=1000):
                cases.append(pytest.param("byzantine", nodes, modes, seed, id=f"byz-{'+'.join(modes)}-{nodes}-s{seed}"))
    return cases


def _explain(result: SimResult) -> str:
    lines = [f"seed {result.seed} of {result.scenario} ({result.nodes} nodes) failed; replay with:",
             f"    {result.replay}", *[f"  {v}" for v in result.violations[:10]]]
    return "\n".join(lines)


@pytest.mark.parametrize(("name", "nodes", "byzantine", "seed"), _cases())
def test_invariants_hold(name: str, nodes: int, byzantine: tuple[str, ...] | None, seed: int) -> None:
    scenario = scenario_for(name, nodes=nodes, byzantine=byzantine)
    assert scenario.expect_safety and scenario.expect_liveness
    result = run_seed(scenario, seed, base=SCENARIOS[name])
    assert result.ok, _explain(result)
    assert result.all_final, _explain(result)


ATTACK_SEEDS = 12


@pytest.mark.parametrize("nodes", [4, 7])
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS.values() if not s.expect_safety])
def test_checker_detects_f_plus_one_attacks(name: str, nodes: int) -> None:
    """With f+1 Byzantine nodes PBFT's guarantees are void; a checker that never fires
    here would be blind. At least one seed must show a safety violation."""
    scenario = scenario_for(name, nodes=nodes)
    assert scenario.faulty == scenario.f + 1
    detected: list[str] = []
    for seed in seeds(ATTACK_SEEDS):
        result = run_seed(scenario, seed, base=SCENARIOS[name])
        if result.safety_violations:
            detected.append(f"seed {seed}: {result.safety_violations[0]}")
            break
    assert detected, f"{name} with {nodes} nodes: no safety violation detected in {ATTACK_SEEDS} seeds"


def test_without_the_vote_guard_a_forgetful_node_contradicts_itself() -> None:
    """The amnesia scenario passes because restarted replicas get their signed_bound:
    without it, a validator restored from an old backup (or emptied) signs a second
    pre-prepare or prepare for a slot it already voted on, and the checker sees valid
    evidence against an honest node."""
    import dataclasses

    scenario = dataclasses.replace(SCENARIOS["amnesia"], vote_guard=False)
    found = ""
    for seed in range(40):  # not scaled by HYPERMESH_SIM_SEEDS: seeds 15 and 16 show it
        result = run_seed(scenario, seed)
        if any(v.kind == "evidence" for v in result.safety_violations):
            found = str(result.safety_violations[0])
            break
    assert "against honest" in found, "no seed of 40 showed the forgetful node equivocating"


def test_a_seed_replays_identically() -> None:
    scenario = scenario_for("chaos", nodes=4)
    first, second = run_seed(scenario, 7), run_seed(scenario, 7)
    assert (first.stats, first.virtual_ms, [str(v) for v in first.violations]) == (
        second.stats, second.virtual_ms, [str(v) for v in second.violations])
    other = run_seed(scenario, 8)
    assert other.stats != first.stats  # the seed really changes the run


def test_a_seed_replays_identically_across_processes() -> None:
    """Replay happens in a new process: set iteration order (PYTHONHASHSEED) and other
    per-process state must not leak into a run."""
    import os
    import subprocess
    import sys

    script = ("from consensus.sim import run_seed, scenario_for; r = run_seed(scenario_for('chaos'), 3); "
              "print(sorted(r.stats.items()), r.virtual_ms, [str(v) for v in r.violations])")
    outputs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]


def test_twins_equivocation_is_recorded_as_verifiable_evidence() -> None:
    """Honest replicas that see both twins hold two conflicting messages signed by one
    key: they must record that as evidence anyone can re-check (not only survive it)."""
    from consensus.evidence import verify_evidence
    from consensus.sim.runner import sim_keyring

    _, ring = sim_keyring(4)
    scenario = scenario_for("twins")
    for seed in seeds(10):
        result = run_seed(scenario, seed)
        valid = [e for i, e in result.history.evidence
                 if i in result.history.honest and e.accused in result.twin_nodes and verify_evidence(ring, e)]
        if valid:
            return
    pytest.fail("no honest replica recorded verifiable evidence against a twin in 10 seeds")


def test_crash_simulation_catches_a_replica_that_does_not_persist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation test for the crash model: drop every Persist the replica asks for, and
    a power cut must turn into a detected violation (a restarted replica forgets its
    votes and its log). If this passes silently, crashes in the simulator are toothless."""
    import consensus.replica as replica_module
    from consensus.actions import Persist

    honest = replica_module.Replica

    class Amnesiac(honest):  # type: ignore[misc, valid-type]
        def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return [a for a in super().submit(*args, **kwargs) if not isinstance(a, Persist)]

        def receive(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return [a for a in super().receive(*args, **kwargs) if not isinstance(a, Persist)]

        def tick(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return [a for a in super().tick(*args, **kwargs) if not isinstance(a, Persist)]

    monkeypatch.setattr(replica_module, "Replica", Amnesiac)
    scenario = scenario_for("power-cut")
    for seed in range(5):
        if run_seed(scenario, seed).violations:
            return
    pytest.fail("5 power cuts of replicas that persist nothing went unnoticed")


def test_bounded_dedup_forgets_ids_and_the_checker_catches_a_replica_that_forgets_unsafely(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dedup-expiry scenario really forgets ids and expires re-sent requests (so the
    seeds above test something), and forgetting *without* the expiry rule executes
    requests twice, which the checker must see."""
    from consensus import replica as replica_module

    scenario = scenario_for("dedup-expiry")
    totals = {"expired": 0, "forgotten_request_ids": 0}
    for seed in seeds(4, start=500):
        result = run_seed(scenario, seed)
        assert result.ok and result.all_final, _explain(result)
        for key in totals:
            totals[key] += result.stats[key]
    assert totals["expired"] > 0 and totals["forgotten_request_ids"] > 0, totals

    monkeypatch.setattr(replica_module.Replica, "_expired", lambda self, request, agreed_ms: False)
    caught = [seed for seed in seeds(4, start=500) if not run_seed(scenario, seed).ok]
    assert caught, "a replica that forgets ids without expiring requests executed nothing twice?"


def test_replay_command_names_a_resized_cluster() -> None:
    result = run_seed(scenario_for("calm", nodes=7), 1, base=SCENARIOS["calm"])
    assert result.replay == "hypermesh simulate --scenario calm --seed 1 --nodes 7"
    assert "--nodes" not in run_seed(scenario_for("calm"), 1, base=SCENARIOS["calm"]).replay
