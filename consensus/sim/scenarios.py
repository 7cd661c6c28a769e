"""Named simulation scenarios: what goes wrong, how much, and what must still hold.

A scenario is plain data. Adding one is adding an entry to ``SCENARIOS`` (see
docs/SIMULATION.md); the runner reads nothing else. Sizes are tuned so that hundreds of
seeds run in CI in a few minutes: a seed is a few hundred virtual milliseconds of
faults with a dozen requests, which is enough for view changes, checkpoints and state
transfer to happen (the replica config below shrinks their intervals and timeouts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from consensus.sim.network import CALM, LinkFaults

LOSSY = LinkFaults(min_delay_ms=1, max_delay_ms=25, drop_rate=0.05, duplicate_rate=0.05, reorder_rate=0.05)
HOSTILE = LinkFaults(min_delay_ms=1, max_delay_ms=60, drop_rate=0.15, duplicate_rate=0.1, reorder_rate=0.1, reorder_extra_ms=400)

# Small intervals so a short run still crosses checkpoints, log truncation and view
# changes; the timeouts stay well above the network's delays so a calm run is calm.
SIM_REPLICA_CONFIG: dict[str, int] = {
    "batch_max_requests": 4,
    "batch_max_delay_ms": 5,
    "window": 4,
    "checkpoint_interval": 4,
    "view_change_timeout_ms": 600,
    "request_timeout_ms": 400,
}


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    nodes: int = 4
    requests: int = 12
    submit_window_ms: int = 600  # requests arrive during this window
    fault_ms: int = 1000  # faults happen in [0, fault_ms); then everything heals
    recover_ms: int = 15000  # after heal, virtual time allowed for every request to be final
    faults: LinkFaults = CALM
    crashes: int = 0  # crash/restart episodes of honest nodes during the fault phase
    torn_crash_rate: float = 0.5  # share of crashes that cut an action list in the middle
    partitions: int = 0  # partition episodes during the fault phase
    down: int = 0  # honest nodes that crash during the fault phase and never come back
    crash_all: bool = False  # once, every honest node crashes at the same moment (power cut)
    amnesia: int = 0  # episodes: an honest node restarts from an old backup of its store, or an empty one
    vote_guard: bool = True  # False: restarted replicas get no signed_bound (shows why it is needed)
    byzantine: tuple[str, ...] = ()  # one Byzantine node per entry, in that mode
    twins: int = 0  # twin pairs: two honest replicas sharing one key and node id
    split_honest: bool = False  # put honest nodes on twin sides too (the f+1 Twins attack)
    align_equivocation: bool = False  # equivocators collude: same split, shared forged digests
    faulty_first_leader: bool = False  # make the view-0 leader one of the faulty nodes
    clock_skew_ms: int = 20
    duplicate_submit_rate: float = 0.25  # client re-sends a request to another node
    retry_ms: int = 800  # client retries a request that is not final after this long
    client_retries: bool = True  # False: a request the replica accepted (persisted) must finish on its own
    late_resubmit_ms: int = 0  # > 0: every request is sent again this long after its first submit
    tick_ms: int = 10
    replica_config: tuple[tuple[str, int], ...] = tuple(SIM_REPLICA_CONFIG.items())
    expect_safety: bool = True  # False for deliberate f+1 attacks: the checker must fire

    @property
    def faulty(self) -> int:
        return len(self.byzantine) + self.twins

    @property
    def f(self) -> int:
        return (self.nodes - 1) // 3

    @property
    def expect_liveness(self) -> bool:
        """Only promised with at most f faulty nodes: Byzantine, twins, and nodes that
        stay down (the others that crashed are restarted at heal)."""
        return self.faulty + self.down <= self.f


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("calm", "no faults: the baseline must be perfect"),
        Scenario("lossy", "delay, loss, duplication and reordering", faults=LOSSY),
        Scenario("hostile-net", "heavy loss and long reordering", faults=HOSTILE, requests=8),
        Scenario("partition", "partitions that start and heal, on a lossy network", faults=LOSSY, partitions=2),
        Scenario("crash", "crash/restart from persisted records, some mid-action-list", faults=LOSSY, crashes=3),
        Scenario("chaos", "loss, partitions and crashes together", faults=LOSSY, crashes=2, partitions=1),
        Scenario("byzantine", "one Byzantine node per mode listed (<= f), lossy network", faults=LOSSY, byzantine=("equivocate",)),
        Scenario("byzantine-crash", "a Byzantine node plus crashes of honest ones", faults=LOSSY, byzantine=("equivocate",), crashes=2),
        Scenario("byzantine-leader", "the first leader equivocates", faults=LOSSY, byzantine=("equivocate",),
                 faulty_first_leader=True),
        Scenario("crash-stop", "an honest node dies for good; the rest must go on", faults=LOSSY, down=1, crashes=1),
        Scenario("no-retry", "crashes, and clients that never retry an accepted request: nothing accepted is lost",
                 faults=LOSSY, crashes=3, client_retries=False, duplicate_submit_rate=0.0),
        Scenario("power-cut", "every node crashes at once (some mid-action-list) and restarts from disk",
                 faults=LOSSY, crash_all=True, crashes=1),
        Scenario("amnesia", "nodes restart from an old backup of their store, or an empty one, with their "
                 "vote guard: they must not contradict the votes they forgot", faults=LOSSY, amnesia=2),
        Scenario("skew", "clocks seconds apart (within max_clock_skew_ms)", faults=LOSSY, clock_skew_ms=5000),
        Scenario("twins", "one twin pair (two replicas, one key), each twin seen by some peers", faults=LOSSY, twins=1),
        Scenario("dedup-expiry", "timestamped requests over 12 s, each re-sent 9 s later, with an 8 s de-dup "
                 "window: old ids are forgotten at checkpoints, and a re-sent request runs once, never twice",
                 faults=LOSSY, requests=30, submit_window_ms=12000, fault_ms=22000, late_resubmit_ms=9000,
                 crashes=1, replica_config=tuple({**SIM_REPLICA_CONFIG, "dedup_window_ms": 8000}.items())),
        # Deliberate f+1 attacks. Safety is NOT expected: these prove the checker can fail.
        Scenario("twins-attack", "f+1 twin pairs with honest nodes split between the twins",
                 twins=2, split_honest=True, expect_safety=False),
        Scenario("equivocate-attack", "f+1 colluding equivocators, one of them the leader, splitting the honest nodes",
                 byzantine=("equivocate", "equivocate"), align_equivocation=True, faulty_first_leader=True,
                 expect_safety=False),
    )
}


def scenario_for(name: str, *, nodes: int | None = None, byzantine: tuple[str, ...] | None = None) -> Scenario:
    """A named scenario with CLI overrides. 7 nodes tolerate 2 faults, so the f+1 attacks
    grow with the cluster (one more twin pair) to stay at f+1."""
    try:
        scenario = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
    if nodes is not None and nodes != scenario.nodes:
        if nodes not in (4, 7):
            raise ValueError("the simulator runs 4 or 7 nodes")
        extra = (nodes - 1) // 3 - scenario.f
        if scenario.expect_safety or extra <= 0:
            scenario = replace(scenario, nodes=nodes)
        elif scenario.twins:
            scenario = replace(scenario, nodes=nodes, twins=scenario.twins + extra)
        else:
            scenario = replace(scenario, nodes=nodes, byzantine=scenario.byzantine + scenario.byzantine[-1:] * extra)
    if byzantine is not None:
        scenario = replace(scenario, byzantine=tuple(byzantine))
    if scenario.faulty + scenario.down > scenario.nodes - 1 or (scenario.twins and scenario.split_honest and scenario.nodes - scenario.faulty < 2):
        raise ValueError(f"{scenario.faulty} faulty nodes do not fit in {scenario.nodes}")
    return scenario


__all__ = ["SCENARIOS", "Scenario", "scenario_for", "LOSSY", "HOSTILE", "SIM_REPLICA_CONFIG"]
