"""Deterministic simulation of a HyperMesh cluster (see docs/SIMULATION.md).

Public API: ``SCENARIOS``/``Scenario``/``scenario_for`` (what to run), ``run_seed`` and
``Simulation`` (run one seed), ``SimResult`` and ``Violation`` (what came out), and
``History``/``check_history`` (the invariant checker, usable on hand-made histories).
"""

from consensus.sim.app import HashChainApp, encode_request, request_id_of
from consensus.sim.invariants import History, Violation, check_history
from consensus.sim.network import LinkFaults, Network
from consensus.sim.runner import CLUSTER_ID, SimResult, Simulation, run_seed, sim_key, sim_keyring
from consensus.sim.scenarios import SCENARIOS, Scenario, scenario_for

__all__ = [
    "CLUSTER_ID", "SCENARIOS", "HashChainApp", "History", "LinkFaults", "Network", "Scenario", "SimResult",
    "Simulation", "Violation", "check_history", "encode_request", "request_id_of", "run_seed", "scenario_for",
    "sim_key", "sim_keyring",
]
